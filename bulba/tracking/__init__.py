"""MLflow across every stage: where runs go, and a run tracker that survives tracking outages.

`python -m bulba.tracking sync RUN_DIR` sends what a dead server never got (__main__.py).
"""

from bulba.tracking.tracker import (
    DEFAULT_EXPERIMENT,
    RUN_FILE,
    SPOOL_FILE,
    RunTracker,
    setup_mlflow,
    sync,
    tracking_uri,
)

__all__ = ["DEFAULT_EXPERIMENT", "RUN_FILE", "SPOOL_FILE", "RunTracker", "setup_mlflow", "sync", "tracking_uri"]
