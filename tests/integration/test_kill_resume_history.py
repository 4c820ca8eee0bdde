"""SIGKILL mid-run, then `resume=auto` in the same MLflow run: the run's full metric history in
MLflow equals an uninterrupted run's, every step of every metric exactly once.

The kill lands after a checkpoint and after the dead process has logged steps beyond it, so the
resumed process replays steps MLflow already holds (the case where they used to appear twice)."""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

from support.train_data import TINY, losses_from, run_train, start_train, wait_for_line

MAX_STEPS, CKPT_EVERY = 30, 10
ARGS = TINY + [
    f"train.max_steps={MAX_STEPS}",
    f"train.ckpt_every={CKPT_EVERY}",
    "train.val_every=0",
    "train.ckpt_keep=0",
]
# Same values as the uninterrupted run (CPU, deterministic); timings and memory only in count.
DETERMINISTIC = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_seen", "train/nan_skipped")


def _history(metrics_jsonl: Path) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] as MLflow would hold it (finite values only), in step order."""
    out = defaultdict(list)
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k not in ("step", "time") and v is not None and math.isfinite(float(v)):
                out[k].append((rec["step"], float(v)))
    return {k: sorted(v) for k, v in out.items()}


def _spooled_steps(out: Path, key: str) -> list[int]:
    """Steps of `key` in the run's tracking spool: what the process handed to MLflow so far."""
    steps = []
    with open(out / "mlflow_spool.jsonl", "rb") as f:
        for raw in f:
            try:
                r = json.loads(raw)
            except ValueError:
                continue  # the line being written
            if r.get("t") == "m":
                steps += [m[3] for m in r["m"] if m[0] == key]
    return steps


def _run_id(out: Path) -> str | None:
    try:
        return json.loads((out / "mlflow_run.json").read_text()).get("run_id")
    except (OSError, ValueError):  # not written yet, or being replaced
        return None


@pytest.fixture(scope="module")
def reference(train_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    p = run_train(["tiny", f"data.dir={train_data}", f"out_dir={out}", "--no-mlflow", *ARGS])
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.mark.slow  # reference, killed and resumed runs of 30 steps
def test_sigkill_then_resume_logs_every_step_once_in_same_mlflow_run(train_data, tmp_path, reference):
    import mlflow

    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": uri}
    args = ["tiny", f"data.dir={train_data}", f"out_dir={out}", *ARGS]
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment("bulbagpt")  # the store exists before the run (schema set-up is slow)
    proc = start_train(args, {"MLFLOW_TRACKING_URI": uri})
    try:
        # the step-10 checkpoint is complete once its line is printed
        seen = wait_for_line(proc, f"step-{CKPT_EVERY:08d}")
        deadline = time.monotonic() + 120
        # until the dead process will have logged steps past the checkpoint, and created the run
        while max(_spooled_steps(out, "train/loss"), default=0) <= CKPT_EVERY + 1 or not _run_id(out):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(seen[-30:])
            time.sleep(0.01)
        first_id = _run_id(out)
    finally:
        proc.kill()  # SIGKILL: no handler runs, the steps after the checkpoint are in the spool
        proc.wait(60)
    assert not (out / "final.safetensors").exists(), "the run finished before the kill landed: raise MAX_STEPS"
    replayed = sorted(s for s in set(_spooled_steps(out, "train/loss")) if s > CKPT_EVERY)
    assert replayed, "nothing logged after the checkpoint: the kill shows no replay"

    p = run_train(args + ["resume=auto"], env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"step-{CKPT_EVERY:08d}" in p.stdout and "resuming from" in p.stdout
    run_id = _run_id(out)
    assert run_id and run_id == first_id and json.loads((out / "config.json").read_text())["mlflow_run_id"] == run_id
    exp = client.get_experiment_by_name("bulbagpt")
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"

    want = _history(reference / "metrics.jsonl")
    assert sorted(losses_from(out)) == [s for s, _ in want["train/loss"]] == list(range(1, MAX_STEPS + 1))
    for key, points in want.items():
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in hist] == [s for s, _ in points], f"{key}: steps {[s for s, _ in hist]}"
        if key in DETERMINISTIC:
            for (step, got), (_, ref) in zip(hist, points):
                assert got == pytest.approx(ref, rel=1e-6, abs=1e-6), (key, step, got, ref)
    run = client.get_run(run_id)
    assert run.data.params["model.n_layer"] == "2" and "bulba.dataset_digest" in run.data.tags
