"""The tracking layer against a real `mlflow server` (no mocks): outages, replay, sync.

Every test leaves the session server running (other tests share it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("mlflow")

from bulba.tracking import RUN_FILE, SPOOL_FILE, RunTracker  # noqa: E402
from support.paths import REPO


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(uri, run_id, key):
    return _client(uri).get_metric_history(run_id, key)


def _assert_exactly_once(uri, run_id, key, steps, value_of):
    hist = _history(uri, run_id, key)
    got = sorted((m.step, m.value) for m in hist)
    assert [s for s, _ in got] == sorted(steps), f"{key}: {len(got)} points for {len(steps)} steps"
    for s, v in got:
        assert v == pytest.approx(value_of(s))


class _Trainer(threading.Thread):
    """A stand-in training loop: one log_metrics call every `dt` seconds, timing each call."""

    def __init__(self, tracker, dt=0.01, first_step=0):
        super().__init__(daemon=True)
        self.t, self.dt, self.step = tracker, dt, first_step
        self.steps: list[int] = []
        self.worst = 0.0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            a = time.perf_counter()
            self.t.log_metrics({"loss": 1.0 / (self.step + 1), "lr": self.step * 1e-4}, step=self.step)
            self.worst = max(self.worst, time.perf_counter() - a)
            self.steps.append(self.step)
            self.step += 1
            time.sleep(self.dt)

    def stop(self):
        self.halt.set()
        self.join(10)


def test_outage_mid_run_replayed_exactly_once(mlflow_uri, mlflow_server, tmp_path, capsys):
    run_dir = tmp_path / "run"
    t = RunTracker(
        "bulbagpt-test",
        "outage",
        run_dir=run_dir,
        params={"lr": 3e-4, "preset": "tiny"},
        tags={"bulba.stage": "test"},
        flush_interval=0.2,
        http_timeout=2,
        max_memory_records=100,
    )  # the outage overflows memory: replay reads the spool
    assert t.run_id, "server up at start: run created before the constructor returns"
    assert json.loads((run_dir / RUN_FILE).read_text())["run_id"] == t.run_id
    t.log_metrics({"ok_metric": 1.0, "bad*key": 2.0}, step=0)  # the server refuses only the bad key
    trainer = _Trainer(t)
    trainer.start()
    try:
        time.sleep(0.5)
        assert t.flush(20)
        a = time.monotonic()
        mlflow_server.stop()
        stop_s = time.monotonic() - a
        time.sleep(2.0)  # the loop keeps logging against a dead server
        assert not t.online
        assert (run_dir / SPOOL_FILE).stat().st_size > 0
        t.log_params({"during_outage": "yes"})
        t.set_tag("bulba.note", "logged while the server was down")
        t.log_text("written during the outage\n", "notes/outage.txt")
        mlflow_server.start()
        back = time.monotonic()
        assert t.flush(30), f"backlog {t.backlog} not replayed: {t.last_error}"
        replay_s = time.monotonic() - back
        time.sleep(0.3)
    finally:
        trainer.stop()
        if not mlflow_server.running:
            mlflow_server.start()
    assert t.finish(timeout=30)
    with capsys.disabled():
        print(
            f"\n[tracking] outage: {len(trainer.steps)} steps, worst log_metrics call "
            f"{trainer.worst * 1000:.2f} ms, backlog replayed {replay_s:.2f} s after the server was healthy "
            f"(server restart {mlflow_server.last_start_s:.1f} s, stop {stop_s:.1f} s)"
        )
    assert trainer.worst < 0.5, f"log_metrics stalled {trainer.worst:.3f} s"

    uri = mlflow_server.uri
    steps = trainer.steps
    _assert_exactly_once(uri, t.run_id, "loss", steps, lambda s: 1.0 / (s + 1))
    _assert_exactly_once(uri, t.run_id, "lr", steps, lambda s: s * 1e-4)
    run = _client(uri).get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["during_outage"] == "yes" and run.data.params["preset"] == "tiny"
    assert run.data.tags["bulba.note"].startswith("logged while")
    assert run.data.metrics["ok_metric"] == 1.0 and "bad*key" not in run.data.metrics
    assert [f.path for f in _client(uri).list_artifacts(t.run_id, "notes")] == ["notes/outage.txt"]
    assert not (run_dir / SPOOL_FILE).exists(), "fully synced: no spool left"
    err = capsys.readouterr().err
    assert "unreachable" in err and "back" in err


def test_hung_server_costs_no_stall_and_no_duplicates(mlflow_uri, mlflow_server, tmp_path):
    """A frozen server (accepts connections, never answers): requests time out in the
    background; when it wakes it also applies the stale requests, and the replay of the same
    points must not duplicate them."""
    t = RunTracker("bulbagpt-test", "hung", run_dir=tmp_path / "run", flush_interval=0.1, http_timeout=1, quiet=True)
    assert t.run_id
    trainer = _Trainer(t)
    trainer.start()
    try:
        time.sleep(0.3)
        mlflow_server.pause()
        time.sleep(2.5)
        assert t.last_error == "no answer (timeout)", t.last_error  # 1 s, not MLflow's 120 s default
        assert not t.flush(0.5)
        mlflow_server.resume()
        assert t.flush(30), t.last_error
    finally:
        trainer.stop()
        mlflow_server.resume()
    assert t.finish(timeout=30)
    assert trainer.worst < 0.5, f"log_metrics stalled {trainer.worst:.3f} s"
    _assert_exactly_once(mlflow_server.uri, t.run_id, "loss", trainer.steps, lambda s: 1.0 / (s + 1))


def test_server_down_at_start(mlflow_uri, mlflow_server, tmp_path, capsys):
    """Two runs start while the server is down. `late` keeps running and gets its run created
    when the server returns; `offline` finishes before that (server "never returns" for it),
    leaves its spool and the command to sync, and `python -m bulba.tracking sync` sends it."""
    run_dir = tmp_path / "offline"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"format": "bulba-run"}\n')
    mlflow_server.stop(kill=True)  # a crashed server
    try:
        a = time.monotonic()
        t = RunTracker(
            "bulbagpt-test",
            "offline",
            run_dir=run_dir,
            params={"n_layer": 2},
            tags={"bulba.stage": "test"},
            start_timeout=10,
        )
        started = time.monotonic() - a
        late = RunTracker("bulbagpt-test", "late", run_dir=tmp_path / "late", quiet=True, flush_interval=0.1)
        assert t.run_id is None and late.run_id is None
        worst = 0.0
        for step in range(200):
            b = time.perf_counter()
            t.log_metrics({"loss": 10.0 - step * 0.01}, step=step)
            late.log_metric("loss", float(step), step=step)
            worst = max(worst, time.perf_counter() - b)
        t.log_artifact(run_dir / "config.json")
        t.log_dict({"steps": 200}, "summary.json")
        b = time.monotonic()
        assert t.finish(timeout=1.0) is False
        finish_s = time.monotonic() - b
        err = capsys.readouterr().err
        assert "not reachable" in err
        assert f"python -m bulba.tracking sync {run_dir}" in err
        assert worst < 0.5 and finish_s < 5, (worst, finish_s)
        assert started < 10
        assert (run_dir / SPOOL_FILE).exists()
        assert json.loads((run_dir / RUN_FILE).read_text())["run_id"] is None
        with capsys.disabled():
            print(
                f"\n[tracking] server down at start: constructor {started:.2f} s, worst log call "
                f"{worst * 1000:.2f} ms, finish {finish_s:.2f} s"
            )
    finally:
        mlflow_server.start()

    # the live run: created on reconnect, backlog replayed, goes on normally
    assert late.wait_for_run_id(30), late.last_error
    for step in range(200, 250):
        late.log_metric("loss", float(step), step=step)
    assert late.finish(timeout=30)
    assert json.loads((tmp_path / "late" / RUN_FILE).read_text())["run_id"] == late.run_id
    _assert_exactly_once(mlflow_server.uri, late.run_id, "loss", list(range(250)), float)

    # the finished one: sync from the command line
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_PROXY="127.0.0.1,localhost")
    env.pop("MLFLOW_TRACKING_URI", None)  # the URI recorded in the run directory is used
    a = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "bulba.tracking", "sync", str(run_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    sync_s = time.monotonic() - a
    assert r.returncode == 0, r.stderr
    assert "synced" in r.stdout
    with capsys.disabled():
        print(
            f"[tracking] sync CLI {sync_s:.2f} s: {r.stdout.strip().splitlines()[-1]} "
            f"(server restart {mlflow_server.last_start_s:.1f} s)"
        )

    info = json.loads((run_dir / RUN_FILE).read_text())
    run_id = info["run_id"]
    assert run_id
    c = _client(mlflow_server.uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.start_time == info["start_time"], "created later, but with the original start time"
    assert run.data.params["n_layer"] == "2" and run.data.tags["bulba.stage"] == "test"
    assert run.info.run_name == "offline"
    _assert_exactly_once(mlflow_server.uri, run_id, "loss", list(range(200)), lambda s: 10.0 - s * 0.01)
    assert sorted(f.path for f in c.list_artifacts(run_id)) == ["config.json", "summary.json"]
    assert not (run_dir / SPOOL_FILE).exists()

    # again (in-process): nothing left, nothing sent twice, same run
    from bulba.tracking.sync import main as _main

    assert _main(["sync", str(run_dir)]) == 0
    assert len(c.search_runs([run.info.experiment_id], f"tags.`bulba.client_id` = '{info['client_id']}'")) == 1
    assert len(_history(mlflow_server.uri, run_id, "loss")) == 200


def test_resume_same_run_after_crash(mlflow_uri, mlflow_server, tmp_path):
    """A process that died without finish(): the next tracker on the run dir continues the
    same run, sends what the dead one had only spooled, and (skip_logged_steps) does not log
    the steps repeated since the checkpoint a second time."""
    run_dir = tmp_path / "run"
    code = (
        "import os, sys; from bulba.tracking import RunTracker\n"
        f"t = RunTracker('bulbagpt-test', 'crash', run_dir={str(run_dir)!r}, flush_interval=3600)\n"
        "print(t.run_id, flush=True)\n"
        "[t.log_metric('loss', float(s), step=s) for s in range(30)]\n"
        "import time; time.sleep(0.5)\n"  # spooled, never sent (flush interval one hour)
        "os.kill(os.getpid(), 9)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=mlflow_server.uri)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == -9, r.stderr
    run_id = r.stdout.strip()
    t = RunTracker("bulbagpt-test", "crash", run_dir=run_dir, quiet=True, skip_logged_steps=True)
    assert t.run_id == run_id
    for s in range(20, 40):  # resumed from a checkpoint at step 20: steps 20..29 come again
        t.log_metric("loss", float(s), step=s)
    assert t.finish(timeout=30)
    _assert_exactly_once(mlflow_server.uri, run_id, "loss", list(range(40)), float)
    assert _client(mlflow_server.uri).get_run(run_id).info.status == "FINISHED"


def test_embedded_sqlite_default(tmp_path, monkeypatch):
    """No MLFLOW_TRACKING_URI: sqlite mlflow.db (and ./mlruns) in the working directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    from bulba.tracking import tracking_uri

    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    with RunTracker("bulbagpt-test", "embedded", params={"x": 1}, quiet=True, start_timeout=60) as t:
        t.log_metrics({"loss": 1.5}, step=3)
        t.log_text("hi\n", "hi.txt")
    assert t.run_id and (tmp_path / "mlflow.db").exists()
    c = _client(tracking_uri())
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 1.5 and run.data.params["x"] == "1"
    assert [f.path for f in c.list_artifacts(t.run_id)] == ["hi.txt"]
    assert (tmp_path / "mlruns").is_dir()
    # `mlflow ui` in this directory picks the same store (our artifact dirs are not a file store)
    from mlflow.tracking._tracking_service.utils import _get_default_tracking_uri

    assert _get_default_tracking_uri() == "sqlite:///mlflow.db"
    assert not (tmp_path / "runs" / ".mlflow-spool").exists() or not any(
        (tmp_path / "runs" / ".mlflow-spool").iterdir()
    )


def test_sync_cli_help_and_bad_input(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "bulba.tracking", "sync", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0 and "RUN_DIR" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "bulba.tracking", "sync", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_dataset_input_system_metrics_and_explicit_run_id(mlflow_uri, mlflow_server, tmp_path):
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.types import Schema, TensorSpec

    ds = MetaDataset(
        source=LocalArtifactDatasetSource(str(tmp_path)),
        name="demo",
        digest="abc123",
        schema=Schema([TensorSpec(np.dtype("uint16"), (-1,), "tokens")]),
    )
    with RunTracker(
        "bulbagpt-test", "extras", run_dir=tmp_path / "a", system_metrics=True, system_metrics_interval=0.2, quiet=True
    ) as t:
        t.log_input(ds, context="training")
        t.log_metric("loss", 1.0, step=0)
        t.log_metrics({"nan_metric": float("nan"), "inf_metric": float("inf")}, step=0)
        time.sleep(0.7)
    c = _client(mlflow_server.uri)
    run = c.get_run(t.run_id)
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == ["abc123"]
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert math.isnan(run.data.metrics["nan_metric"]) and run.data.metrics["inf_metric"] > 1e300  # MLflow clips inf
    # another process continues the run by id (e.g. from a checkpoint), in another directory
    with RunTracker("bulbagpt-test", run_id=t.run_id, run_dir=tmp_path / "b", quiet=True) as t2:
        t2.log_metric("loss", 0.5, step=1)
    assert t2.run_id == t.run_id
    assert sorted(m.step for m in _history(mlflow_server.uri, t.run_id, "loss")) == [0, 1]
    assert c.get_run(t.run_id).info.status == "FINISHED"
