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

# MLflow 3's UI opens an experiment on its GenAI overview (traces) unless the experiment's kind
# says model training: the tag and value the 3.17 UI reads (and writes from its "Model training"
# switch). Our experiments hold training, data and benchmark runs, so the runs table is the page.
KIND_TAG = "mlflow.experimentKind"
KIND_TRAINING = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # the experiment's description in the UI
DESCRIPTIONS = {
    "bulbagpt": "BulbaGPT training runs (train.py) and their GGUF exports (export.py, nested under "
    "the training run): train/loss, val/loss, perf/tokens_per_s, perf/mfu; tags bulba.preset, "
    "bulba.mode, bulba.precision, bulba.dataset_digest.",
    "bulbagpt-prepare": "BulbaGPT datasets (prepare.py): one run per prepared data directory, its "
    "digest and token counts; training runs link to it through the dataset input.",
    "bulbagpt-bench": "BulbaGPT benchmarks (bench.py): one parent run per table, one child run per row.",
}


def experiment_description(name: str) -> str:
    return DESCRIPTIONS.get(name, f"BulbaGPT runs ({name}): prepare, train, export or bench, see tag bulba.stage.")


def ensure_experiment(client, name: str) -> str:
    """The id of experiment `name`, created (or, existing, completed) with the model-training kind
    and a description. Tags already there are left alone: a kind or description someone chose in
    the UI wins. Every experiment the scripts use comes through here (setup_mlflow, the tracker)."""
    exp = client.get_experiment_by_name(name)
    tags = {KIND_TAG: KIND_TRAINING, DESCRIPTION_TAG: experiment_description(name)}
    if exp is None:
        try:
            return client.create_experiment(name, tags=tags)
        except Exception:
            exp = client.get_experiment_by_name(name)  # another process created it meanwhile
            if exp is None:
                raise
    for k, v in tags.items():
        if k not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup_mlflow(experiment: str = DEFAULT_EXPERIMENT):
    """Point mlflow at `tracking_uri()` and select (or create, see ensure_experiment) `experiment`;
    returns mlflow."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment_id=ensure_experiment(mlflow.MlflowClient(), experiment))
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
