"""Team mode end to end (issue 6): prepare.py -> train.py -> export.py --register, each a real
CLI process talking to a real `mlflow server` through MLFLOW_TRACKING_URI, and the lineage
that the UI shows: dataset digest -> prepare run -> training run -> export run -> model version."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("mlflow")

from support.paths import CORPUS
from support.paths import REPO as ROOT
from support.train_data import TINY  # noqa: E402


def _run(args, env, timeout=300):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args[0]} failed:\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_prepare_train_export_register_on_server(mlflow_uri, mlflow_server, tmp_path):
    if not all((CORPUS / f"{lang}.txt").is_file() for lang in ("be", "ru", "en")):
        pytest.skip(f"corpus not found in {CORPUS}")
    src = tmp_path / "corpus"
    src.mkdir()
    for lang in ("be", "ru", "en"):  # a slice of the real corpus keeps this quick
        lines = (CORPUS / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:800]
        (src / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}
    data, out, gguf = tmp_path / "data", tmp_path / "run", tmp_path / "pipe-q8_0.gguf"

    _run(
        [
            "prepare.py",
            str(src),
            "--out",
            str(data),
            "--vocab-size",
            "512",
            "--experiment",
            "pipe-prepare",
            "--no-progress",
            "-q",
        ],
        env,
    )
    _run(
        [
            "train.py",
            "tiny",
            f"data.dir={data}",
            f"out_dir={out}",
            *TINY,
            "train.max_steps=4",
            "train.val_every=2",
            "train.ckpt_every=0",
            "tracking.experiment=pipe-train",
        ],
        env,
    )
    exported = _run(
        ["export.py", str(out), "--type", "q8_0", "--out", str(gguf), "--register", "pipe-test", "--no-verify"], env
    )

    from mlflow import MlflowClient

    c = MlflowClient(mlflow_uri)
    meta = json.loads((data / "meta.json").read_text())
    digest = meta["dataset_digest"]
    prep = c.get_run(meta["mlflow_run_id"])
    assert c.get_experiment(prep.info.experiment_id).name == "pipe-prepare"
    assert prep.data.tags["bulba.dataset_digest"] == digest

    train_id = json.loads((out / "config.json").read_text())["mlflow_run_id"]
    assert train_id == json.loads((out / "mlflow_run.json").read_text())["run_id"]
    train = c.get_run(train_id)
    assert c.get_experiment(train.info.experiment_id).name == "pipe-train"
    assert train.info.status == "FINISHED"
    assert train.data.tags["bulba.prepare_run_id"] == prep.info.run_id
    assert train.data.tags["bulba.dataset_digest"] == digest
    assert [d.dataset.digest for d in train.inputs.dataset_inputs] == [digest]
    assert sorted(m.step for m in c.get_metric_history(train_id, "train/loss")) == [1, 2, 3, 4]
    assert "val/loss" in train.data.metrics

    versions = c.search_model_versions("name = 'pipe-test'")
    assert len(versions) == 1
    v = versions[0]
    export = c.get_run(v.run_id)
    assert export.data.tags["bulba.source_run"] == train_id
    assert export.data.tags.get("mlflow.parentRunId") == train_id  # nested under the training run
    assert v.tags["source_run"] == train_id and v.tags["type"] == "q8_0"

    # What the UI needs (issue 17): both experiments open as model training, the training run has
    # a readable name and the preset / mode / precision / data columns, the version is @best.
    from bulba.tracking.store import KIND_TAG, KIND_TRAINING

    for exp_id in (prep.info.experiment_id, train.info.experiment_id):
        tags = c.get_experiment(exp_id).tags
        assert tags[KIND_TAG] == KIND_TRAINING and tags["mlflow.note.content"], tags
    assert train.info.run_name == f"tiny-{out.name}"
    t = train.data.tags
    assert t["bulba.preset"] == "tiny" and t["bulba.mode"] == "eager" and t["bulba.precision"]
    assert float(v.tags["val_loss"]) == pytest.approx(train.data.metrics["val/loss"])
    assert c.get_model_version_by_alias("pipe-test", "best").version == v.version
    assert f"aliases of pipe-test: @latest -> v{v.version}; @best -> v{v.version}" in exported.stderr

    from bulba.export.registry import fetch_gguf

    got = fetch_gguf(f"models:/pipe-test/{v.version}", tmp_path / "dl")
    assert hashlib.sha256(got.read_bytes()).hexdigest() == hashlib.sha256(gguf.read_bytes()).hexdigest()
