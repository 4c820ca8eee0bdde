"""MLflow across every stage: where runs go (store.py), a run tracker that survives tracking
outages (tracker.py, sender.py, spool.py, http.py), what links the stages' runs (lineage.py).

`python -m bulba.tracking sync RUN_DIR` sends what a dead server never got (sync.py).
"""

from bulba.tracking.spool import RUN_FILE, SPOOL_FILE
from bulba.tracking.store import DEFAULT_EXPERIMENT, check_reachable, ensure_experiment, setup_mlflow, tracking_uri
from bulba.tracking.sync import sync
from bulba.tracking.tracker import RunTracker

__all__ = [
    "DEFAULT_EXPERIMENT",
    "RUN_FILE",
    "SPOOL_FILE",
    "RunTracker",
    "check_reachable",
    "ensure_experiment",
    "setup_mlflow",
    "sync",
    "tracking_uri",
]
