"""Stage 3, export: a run -> GGUF (+ HF folder), verified in llama.cpp, registered in MLflow.

Public names are imported on first use (PEP 562), so `export.py --help` stays instant.
"""

from bulba import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "export": "bulba.export.pipeline",
        "open_source": "bulba.export.source",
        "Source": "bulba.export.source",
    },
)
