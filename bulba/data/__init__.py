"""Stage 1, prepare: raw text -> tokenizer.json + token files (format.py is their contract) -> batches.

Public names are imported on first use (PEP 562), so `import bulba.data.format` stays light.
"""

from bulba import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "TokenData": "bulba.data.format",
        "open_data": "bulba.data.format",
        "Batches": "bulba.data.loader",
        "document_layout": "bulba.data.loader",
        "PrepareConfig": "bulba.data.prepare",
        "prepare": "bulba.data.prepare",
    },
)
