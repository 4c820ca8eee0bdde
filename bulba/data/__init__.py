"""Stage 1, prepare: raw text -> tokenizer.json + token files (format.py is their contract) -> batches.

Public names are imported on first use (PEP 562), so `import bulba.data.format` stays light.
"""

import importlib

_EXPORTS = {
    "TokenData": "bulba.data.format",
    "open_data": "bulba.data.format",
    "Batches": "bulba.data.loader",
    "document_layout": "bulba.data.loader",
    "PrepareConfig": "bulba.data.prepare",
    "prepare": "bulba.data.prepare",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
