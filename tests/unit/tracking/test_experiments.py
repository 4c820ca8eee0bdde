"""Every experiment the scripts use is a model-training experiment in MLflow 3's UI (kind tag) with
a description, read back from a real `mlflow server`: new ones are created so, existing ones are
completed on first use, and a kind someone chose in the UI is kept."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from bulba.tracking import RunTracker, setup_mlflow  # noqa: E402
from bulba.tracking.store import DESCRIPTION_TAG, KIND_TAG, KIND_TRAINING  # noqa: E402


def _tags(uri, name):
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    assert exp is not None, name
    return exp.tags


def test_mlflow_3_reads_this_kind_tag():
    """The tag and value are the ones the installed MLflow's UI switches on (not guessed)."""
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    bundle = "".join(p.read_text(errors="replace") for p in js.glob("*.js"))
    assert f'"{KIND_TAG}"' in bundle and f'"{KIND_TRAINING}"' in bundle


def test_new_and_existing_experiments_get_the_training_kind(mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    tag = uuid.uuid4().hex[:8]

    # setup_mlflow (prepare, bench, export): a new experiment is created with kind and note.
    setup_mlflow(f"bulbagpt-bench-{tag}")
    tags = _tags(mlflow_uri, f"bulbagpt-bench-{tag}")
    assert tags[KIND_TAG] == KIND_TRAINING and tags[DESCRIPTION_TAG]

    # An experiment from before (no tags) gets both on first use, here through the training
    # run's tracker (its own background client, not setup_mlflow).
    old = f"old-{tag}"
    client.create_experiment(old)
    assert KIND_TAG not in _tags(mlflow_uri, old)
    with RunTracker(old, "r", run_dir=tmp_path / "run", quiet=True, start_timeout=60) as t:
        t.log_metrics({"loss": 1.0}, step=1)
    tags = _tags(mlflow_uri, old)
    assert tags[KIND_TAG] == KIND_TRAINING and "BulbaGPT" in tags[DESCRIPTION_TAG]

    # A kind and a description chosen by someone else stay.
    chosen = f"chosen-{tag}"
    client.create_experiment(chosen, tags={KIND_TAG: "genai_development", DESCRIPTION_TAG: "mine"})
    setup_mlflow(chosen)
    assert _tags(mlflow_uri, chosen) == {KIND_TAG: "genai_development", DESCRIPTION_TAG: "mine"}
