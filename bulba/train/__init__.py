"""Stage 2, train: recipe + token files -> run directory (run.py's `train()` and its phases).

Public names are imported on first use (PEP 562): Lightning is heavy and the entry scripts
must answer `--help` and argument errors without it.
"""

from bulba import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "train": "bulba.train.run",
        "Interrupted": "bulba.train.run",
        "TrainingFault": "bulba.train.run_dir",
        "benchmark": "bulba.train.benchmark",
        "BulbaModule": "bulba.train.module",
    },
)
