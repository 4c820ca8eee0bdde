"""Stage 3, export: a run -> GGUF (+ HF folder), verified in llama.cpp, registered in MLflow.

Public names are imported on first use (PEP 562), so `export.py --help` stays instant.
"""

import importlib

_EXPORTS = {
    "export": "bulba.export.pipeline",
    "open_source": "bulba.export.source",
    "Source": "bulba.export.source",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
