"""The model as pure PyTorch: the Llama, attention backends, FLOPs, and the weight-layout table.

Public names are imported on first use (PEP 562): `bulba.model.weights` is read by the export
path, which must not import torch (~300 MB of RSS) just to know tensor names and shapes.
"""

from bulba import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "Llama": "bulba.model.llama",
        "rope_cache": "bulba.model.llama",
    },
)
