"""Where MLflow runs go: `MLFLOW_TRACKING_URI` wins everywhere (team mode: an `mlflow server`);
unset, MLflow's own default, a SQLite store `mlflow.db` with artifacts in `./mlruns`, both in the
current directory, so `mlflow ui` started from the project root shows every prepare, training,
export and benchmark run. And the one check that a tracking server answers at all.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from bulba.errors import UserError

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


def check_reachable(what: str, timeout: float = 5.0) -> None:
    """Fail fast on a dead tracking server (MLflow itself would retry for minutes)."""
    import urllib.error
    import urllib.request

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    opener = (
        urllib.request.build_opener(urllib.request.ProxyHandler({}))
        if "127.0.0.1" in uri or "localhost" in uri
        else urllib.request.build_opener()
    )
    try:
        with opener.open(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answers (a proxy or auth in front of /health): let MLflow talk to it
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"{what}: MLflow tracking server {uri} is not reachable ({getattr(e, 'reason', e)})") from None


def now_ms() -> int:
    return int(time.time() * 1000)


def say(msg: str) -> None:
    print(f"mlflow: {msg}", file=sys.stderr, flush=True)
