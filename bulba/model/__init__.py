"""The model as pure PyTorch: the Llama, attention backends, FLOPs, and the weight-layout table.

Public names are imported on first use (PEP 562): `bulba.model.weights` is read by the export
path, which must not import torch (~300 MB of RSS) just to know tensor names and shapes.
"""

import importlib

_EXPORTS = {
    "Llama": "bulba.model.llama",
    "rope_cache": "bulba.model.llama",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
