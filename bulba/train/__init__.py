"""Stage 2, train: recipe + token files -> run directory (run.py's `train()` and its phases).

Public names are imported on first use (PEP 562): Lightning is heavy and the entry scripts
must answer `--help` and argument errors without it.
"""

import importlib

_EXPORTS = {
    "train": "bulba.train.run",
    "Interrupted": "bulba.train.run",
    "TrainingFault": "bulba.train.run_dir",
    "benchmark": "bulba.train.benchmark",
    "BulbaModule": "bulba.train.module",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
