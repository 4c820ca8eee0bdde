"""Where MLflow runs go.

`MLFLOW_TRACKING_URI` wins everywhere (team mode: an `mlflow server`). Unset, we use
MLflow's own default, a SQLite store `mlflow.db` with artifacts in `./mlruns`, both in
the current directory, so `mlflow ui` started from the project root shows every
prepare, training, export and benchmark run.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_EXPERIMENT = "bulbagpt"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup_mlflow(experiment: str = DEFAULT_EXPERIMENT):
    """Point mlflow at `tracking_uri()` and select (or create) `experiment`; returns mlflow."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    return mlflow
