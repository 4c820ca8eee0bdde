"""A run tracker that never lets a tracking outage stop training (where runs go: store.py).

The parts: this module is the API and the run's lifecycle; sender.py the background thread that
sends; spool.py the write-ahead log on disk; http.py the tracker's HTTP limits; sync.py
`python -m bulba.tracking sync`.

RunTracker API (stable; used by train.py, prepare and export)
-------------------------------------------------------------

    from bulba.tracking import RunTracker

    tracker = RunTracker("bulbagpt", run_name="krolik-1", run_dir="runs/krolik-1",
                         tags={"bulba.stage": "train"}, params={"lr": 3e-4},
                         parent_run_id=None, resume=True)
    tracker.run_id                      # str, or None while the server has not been reached
    tracker.log_metrics({"loss": 2.3, "lr": 3e-4}, step=10)   # never blocks (a queue put)
    tracker.log_metric("val_loss", 2.1, step=10)
    tracker.log_params({"n_layer": 8}); tracker.set_tags({"k": "v"}); tracker.set_tag("k", "v")
    tracker.log_artifact("runs/krolik-1/config.json")          # the file must still exist later
    tracker.log_artifacts("some/dir", artifact_path="dir")
    tracker.log_text("...", "notes/summary.md"); tracker.log_dict({...}, "report.json")
    tracker.log_input(mlflow_dataset, context="training")  # an mlflow.data Dataset (e.g. MetaDataset)
    tracker.flush(timeout=5.0) -> bool   # True when everything so far is on the server
    tracker.wait_for_run_id(timeout) -> str | None
    tracker.finish("FINISHED" | "FAILED" | "KILLED", timeout=30.0) -> bool
    with RunTracker(...) as t: ...      # FINISHED, FAILED on exception, KILLED on Ctrl-C

`RunTracker(...)` signature::

    RunTracker(experiment="bulbagpt", run_name=None, *, run_dir=None, tags=None, params=None,
               parent_run_id=None, run_id=None, description=None, resume=True, tracking_uri=None,
               start_timeout=10.0, finish_timeout=30.0, http_timeout=3.0,
               artifact_timeout=120.0, flush_interval=1.0, max_memory_records=50_000,
               system_metrics=False, system_metrics_interval=10.0, skip_logged_steps=False,
               quiet=False)

    run_id: continue this existing run instead of creating one (e.g. from a checkpoint).
    parent_run_id: nest the run under that run in the UI (tag mlflow.parentRunId).
    system_metrics: sample CPU/RAM/RSS/GPU memory every system_metrics_interval s as
        `system/...` metrics (MLflow's names), through the same non-blocking queue.
    skip_logged_steps: when continuing a run from its run_dir after a crash, drop metric
        points whose step is <= the highest step already logged for that key (training
        resumed from an older checkpoint repeats those steps; without this they appear
        twice in MLflow's history).

How it works: every call only puts a record on a queue (microseconds). A background thread
appends each record to `RUN_DIR/mlflow_spool.jsonl` (a write-ahead log with sequence
numbers) and sends the backlog in order with `MlflowClient.log_batch` (metrics, params and
tags batched up to MLflow's limits; artifacts and the end status in their place). Each
delivered batch appends an `{"ack": seq}` line, so a crash, a dead server or a later
`sync` resumes exactly after the last delivered record; a batch that was delivered but not
acknowledged is sent again with the same timestamps, and MLflow's SQL stores (SQLite,
PostgreSQL, MySQL; embedded or behind `mlflow server`) store identical metric points
(key, step, timestamp, value) once. Our HTTP calls run with no urllib3 retries and
a short timeout (`http_timeout`) — only in the tracker's thread, other MLflow users in the
process keep MLflow's defaults — and failed sends are retried with exponential backoff
(0.5 s doubling to 2 s). Memory stays bounded (`max_memory_records` unsent records; beyond
that they live only in the spool and are read back on reconnect).

If the server cannot be reached at start, the run is created on reconnect (with the
original start time, tags and a `bulba.client_id` tag that prevents duplicates) and its id
is written to `RUN_DIR/mlflow_run.json`. `finish()` waits at most `finish_timeout` for an
unreachable server (uploads that progress may take longer); what is left stays in the spool
and one line on stderr says how to send it:

    python -m bulba.tracking sync RUN_DIR

`run_dir=None` keeps the spool under `runs/.mlflow-spool/<id>/` (deleted once synced).
With `resume=True`, a `run_dir` holding `mlflow_run.json` continues that run (same run id).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import queue
import re
import shutil
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Mapping

from bulba.atomic import write_json
from bulba.errors import UserError
from bulba.tracking.sender import Sender
from bulba.tracking.spool import ARTIFACT_STAGE, DEFAULT_SPOOL_ROOT, RUN_FILE, SPOOL_FILE, logged_steps, scan_spool
from bulba.tracking.store import DEFAULT_EXPERIMENT, now_ms, say
from bulba.tracking.store import tracking_uri as default_tracking_uri

# MLflow's value limits (mlflow.utils.validation); longer values are cut, not refused
_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 8000


class RunTracker(Sender):
    """One MLflow run, logged from a background thread; see the module docstring."""

    def __init__(
        self,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        *,
        run_dir: str | os.PathLike | None = None,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        description: str | None = None,
        resume: bool = True,
        tracking_uri: str | None = None,
        start_timeout: float = 10.0,
        finish_timeout: float = 30.0,
        http_timeout: float = 3.0,
        artifact_timeout: float = 120.0,
        flush_interval: float = 1.0,
        max_memory_records: int = 50_000,
        system_metrics: bool = False,
        system_metrics_interval: float = 10.0,
        skip_logged_steps: bool = False,
        quiet: bool = False,
        _attach_only: bool = False,
    ):
        self._pid = os.getpid()  # a forked child must not touch the parent's spool or lock
        self.finish_timeout = float(finish_timeout)
        self.http_timeout = float(http_timeout)
        self.artifact_timeout = float(artifact_timeout)
        self.flush_interval = float(flush_interval)
        self.max_memory_records = max(100, int(max_memory_records))
        self.quiet = quiet
        self._default_dir = run_dir is None
        if run_dir is None:
            # The experiment name is free text (MLflow allows '/'): keep it one plain folder name.
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(experiment)).lstrip(".") or "experiment"
            run_dir = DEFAULT_SPOOL_ROOT / f"{safe[:80]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.run_dir = Path(run_dir).absolute()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.spool_path = self.run_dir / SPOOL_FILE
        self.run_file = self.run_dir / RUN_FILE

        # Exclusive use of the run directory's spool (a second trainer or a `sync` racing us).
        self._lock_f = open(self.run_dir / (SPOOL_FILE + ".lock"), "a+")
        try:
            fcntl.flock(self._lock_f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_f.close()
            raise UserError(
                f"{self.run_dir} is in use by another process logging to MLflow "
                "(a running training or sync); wait for it to end"
            )

        uri = tracking_uri or default_tracking_uri()
        info = self._load_info()
        acked, last, pending = scan_spool(self.spool_path)
        if _attach_only:
            if info is None:
                self._release()
                raise UserError(f"{self.run_dir} has no {RUN_FILE}: not a run directory with MLflow data")
            if tracking_uri:
                info["tracking_uri"] = tracking_uri
        elif (
            info is not None
            and resume
            and info.get("tracking_uri") == uri
            and (info.get("run_id") == run_id if run_id else info.get("experiment") == experiment)
        ):
            pass  # continue the same run (same id, or still to be created)
        else:
            if info is not None and pending:
                self._release()
                raise UserError(
                    f"{self.run_dir} holds {len(pending)} tracking records not yet on the server; "
                    f"send them first: python -m bulba.tracking sync {self.run_dir}"
                )
            if info is not None and not quiet:
                say(
                    f"starting a new MLflow run in {self.run_dir} (previous run {info.get('run_id')} "
                    f"was on {info.get('tracking_uri')}, experiment {info.get('experiment')})"
                )
            info = {
                "format": "bulba-mlflow-run",
                "version": 1,
                "tracking_uri": uri,
                "experiment": experiment,
                "run_name": run_name,
                "run_id": run_id,
                "client_id": uuid.uuid4().hex,
                "start_time": now_ms(),
                "parent_run_id": parent_run_id,
                "description": description,
                "tags": {str(k): str(v) for k, v in (tags or {}).items()},
            }
            acked = last = 0
            pending = []
            with contextlib.suppress(FileNotFoundError):
                self.spool_path.unlink()
            write_json(self.run_file, info)
        self.info = info
        self.tracking_uri = info["tracking_uri"]
        self.experiment = info["experiment"]
        self._resumed_run = (not _attach_only) and info.get("run_id") is not None
        # After a crash, training resumes from its last checkpoint and logs the steps between
        # that checkpoint and the crash again; with skip_logged_steps those repeats are dropped
        # (per key, steps <= the highest step this run directory's spool has seen).
        self._prev_steps: dict[str, int] = {}
        if self.spool_path.exists():
            self._prev_steps = logged_steps(self.spool_path)
        self._skip_upto = self._prev_steps if skip_logged_steps else {}
        self._steps_seen = dict(self._prev_steps)  # worker only

        # state shared with the worker (guarded by _cv)
        self._cv = threading.Condition()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._acked = acked
        self._seq = last  # last sequence number assigned (by the worker)
        self._seq_base = last  # record k put by _put gets seq _seq_base + k
        self._pending: deque[tuple[int, bytes]] = deque(pending[: self.max_memory_records])
        self._mem_upto = self._pending[-1][0] if self._pending else acked
        self._flush_req = 0.0
        self._stop_deadline: float | None = None
        self._hard_deadline: float | None = None
        self._first_attempt_done = threading.Event()
        self._run_ready = threading.Event()
        if info.get("run_id"):
            self._run_ready.set()
        self.last_error: str | None = None
        self.online = False
        self.dropped = 0  # records the server refused (bad key/value), warned about
        self._finished = False
        self._synced = False
        self._warned_offline = False
        self._enqueued = 0
        self._put_lock = threading.Lock()
        self._client = None
        self._create_attempted = False

        self._spool_f = open(self.spool_path, "ab")
        if self._spool_f.tell() > 0:  # a torn last line from a crash must not glue onto the next record
            with open(self.spool_path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._spool_f.write(b"\n")
        self._last_fsync = time.monotonic()

        self._thread = threading.Thread(target=self._worker, name="bulba-mlflow", daemon=True)
        self._thread.start()
        _live_trackers.add(self)
        self._sys_stop = threading.Event()
        if system_metrics and not _attach_only:
            threading.Thread(
                target=self._system_metrics,
                args=(float(system_metrics_interval),),
                name="bulba-mlflow-system",
                daemon=True,
            ).start()

        if not _attach_only:
            if self._resumed_run:
                self._put({"t": "status", "status": "RUNNING"})
            if params:
                self.log_params(params)
            if tags and info.get("run_id"):
                self.set_tags(tags)  # a resumed run: (re)apply; a new run gets them at creation
            if start_timeout > 0:
                self._first_attempt_done.wait(start_timeout)
                if not self._run_ready.is_set() and not quiet:
                    say(
                        f"tracking server {self.tracking_uri} not reachable ({self.last_error or 'no answer yet'}); "
                        f"training goes on, metrics are kept in {self.spool_path} and sent when it is back"
                    )
                    self._warned_offline = True

    # ---------------------------------------------------------------- public API
    @classmethod
    def attach(cls, run_dir: str | os.PathLike, tracking_uri: str | None = None, quiet: bool = False) -> "RunTracker":
        """The tracker of an existing run directory (its mlflow_run.json), to send what it spooled;
        `tracking_uri` overrides the recorded one (the same server at a new address)."""
        t = cls(run_dir=run_dir, tracking_uri=tracking_uri, start_timeout=0, quiet=True, _attach_only=True)
        t.quiet = quiet
        return t

    @property
    def run_id(self) -> str | None:
        return self.info.get("run_id")

    def wait_for_run_id(self, timeout: float | None = None) -> str | None:
        self._run_ready.wait(timeout)
        return self.run_id

    @property
    def backlog(self) -> int:
        """Records not yet acknowledged by the server (including ones still queued)."""
        return self._seq_base + self._enqueued - self._acked

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, timestamp_ms: int | None = None) -> None:
        """Queue metrics (Python numbers; a CUDA tensor would force a device sync in float())."""
        ts = now_ms() if timestamp_ms is None else int(timestamp_ms)
        st = 0 if step is None else int(step)
        m = []
        skip = self._skip_upto
        for k, v in metrics.items():
            k = str(k)
            if skip and st <= skip.get(k, -1):
                continue  # already logged before the crash this run resumed from
            try:
                m.append((k, float(v), ts, st))
            except (TypeError, ValueError):
                continue  # not a number: not a metric
        if m:
            self._put({"t": "m", "m": m})

    def log_metric(self, key: str, value: Any, step: int | None = None, timestamp_ms: int | None = None) -> None:
        self.log_metrics({key: value}, step=step, timestamp_ms=timestamp_ms)

    def log_params(self, params: Mapping[str, Any]) -> None:
        p = {}
        for k, v in params.items():
            s = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v)
            p[str(k)] = s[:_MAX_PARAM_LEN]
        if p:
            self._put({"t": "p", "p": p})

    def log_param(self, key: str, value: Any) -> None:
        self.log_params({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        t = {str(k): str(v)[:_MAX_TAG_LEN] for k, v in tags.items()}
        if t:
            self._put({"t": "g", "g": t})

    def set_tag(self, key: str, value: Any) -> None:
        self.set_tags({key: value})

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file later (in order); it must still exist when the upload happens."""
        self._put({"t": "a", "path": str(Path(local_path).absolute()), "artifact_path": artifact_path})

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._put({"t": "a", "path": str(Path(local_dir).absolute()), "artifact_path": artifact_path, "dir": True})

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store `text` as artifact `artifact_file` (staged in the run dir until uploaded)."""
        rel = Path(artifact_file)
        if rel.is_absolute() or ".." in rel.parts:
            raise UserError(f"artifact_file must be a relative path inside the run, got {artifact_file!r}")
        stage = self.run_dir / ARTIFACT_STAGE / uuid.uuid4().hex[:12]
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_text(text, encoding="utf-8")
        parent = str(rel.parent) if str(rel.parent) != "." else None
        self._put({"t": "a", "path": str(stage / rel), "artifact_path": parent, "staged": True})

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", artifact_file)

    def log_input(self, dataset: Any, context: str | None = "training", tags: Mapping[str, str] | None = None) -> None:
        """Record a dataset input (an `mlflow.data` Dataset, e.g. MetaDataset, or an
        `mlflow.entities.Dataset`) so the UI links runs that used the same data."""
        ent = dataset._to_mlflow_entity() if hasattr(dataset, "_to_mlflow_entity") else dataset
        d = {f: getattr(ent, f, None) for f in ("name", "digest", "source_type", "source", "schema", "profile")}
        t = {str(k): str(v) for k, v in (tags or {}).items()}
        if context:
            t["mlflow.data.context"] = context
        self._put({"t": "d", "ds": d, "tags": t})

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait (at most `timeout` s) until everything logged so far is on the server."""
        target = self._seq_base + self._enqueued
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._flush_req = time.monotonic()
            self._cv.notify_all()
        self._q.put(None)  # wake the worker
        try:
            with self._cv:
                while self._acked < target:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    if not self._thread.is_alive():
                        return False
                    self._cv.wait(0.05 if left is None else min(left, 0.05))
            return True
        finally:
            with self._cv:
                self._flush_req = 0.0  # back to the normal pace (and back-off) of the worker

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """End the run; wait at most `timeout` (default `finish_timeout`) for an unreachable
        server (while the server takes data, e.g. a big artifact, the upload goes on).

        Returns True when everything reached the server; otherwise the spool stays in the
        run directory and one line on stderr gives the command that sends it later.
        """
        if self._finished or os.getpid() != self._pid:
            return self._synced
        self._finished = True
        self._sys_stop.set()
        if status:
            self._put({"t": "end", "status": status, "end_time": now_ms()})
        self._close(self.finish_timeout if timeout is None else timeout)
        return self._synced

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is None or (issubclass(et, SystemExit) and ev.code in (None, 0)):
            self.finish("FINISHED")
        elif issubclass(et, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    # ---------------------------------------------------------------- internals
    def _put(self, rec: dict) -> None:
        if (self._finished and rec.get("t") != "end") or os.getpid() != self._pid:
            return
        with self._put_lock:  # the training loop and the system-metrics thread both log
            self._enqueued += 1
            self._q.put(rec)

    def _load_info(self) -> dict | None:
        try:
            info = json.loads(self.run_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:
            return None
        return info if isinstance(info, dict) and info.get("format") == "bulba-mlflow-run" else None

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            fcntl.flock(self._lock_f.fileno(), fcntl.LOCK_UN)
        with contextlib.suppress(Exception):
            self._lock_f.close()

    def _close(self, timeout: float) -> None:
        # `timeout` bounds the wait for an unreachable server. While the server takes data
        # (e.g. a large final checkpoint upload) we keep going, up to a hard cap.
        deadline = time.monotonic() + max(0.0, timeout)
        hard = deadline + 5 * self.artifact_timeout
        with self._cv:
            self._stop_deadline = deadline
            self._hard_deadline = hard
            self._cv.notify_all()
        self._q.put(None)
        said = False
        while self._thread.is_alive() and time.monotonic() < hard + self.artifact_timeout:
            self._thread.join(0.2)
            if not said and self._thread.is_alive() and time.monotonic() > deadline + 5 and not self.quiet:
                say(f"still sending to {self.tracking_uri} ({self.backlog} records left)")
                said = True
        with self._cv:
            left = max(0, self._seq - self._acked) + self._q.qsize()  # None wake-ups at most overcount
            all_sent = self._acked >= self._seq
        alive = self._thread.is_alive()
        self._synced = all_sent and not alive and self._q.empty()
        if not self._synced:
            left = max(left, 1)
        with contextlib.suppress(Exception):
            self._spool_f.flush()
            os.fsync(self._spool_f.fileno())
        with contextlib.suppress(Exception):
            self._spool_f.close()
        _live_trackers.discard(self)
        if self._synced:
            with contextlib.suppress(FileNotFoundError):
                self.spool_path.unlink()
            shutil.rmtree(self.run_dir / ARTIFACT_STAGE, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / (SPOOL_FILE + ".lock")).unlink()
            self._release()
            if self._default_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            self._release()
            if not self.quiet:
                why = f" ({self.last_error})" if self.last_error else ""
                say(
                    f"{left} tracking records not on {self.tracking_uri}{why}; kept in {self.spool_path}; "
                    f"send them later with: python -m bulba.tracking sync {self.run_dir}"
                )

    def _system_metrics(self, interval: float) -> None:
        """MLflow-style `system/...` metrics through the same non-blocking queue."""
        import psutil  # a dependency of the package

        proc = psutil.Process()
        psutil.cpu_percent(None)
        step = self._prev_steps.get("system/cpu_utilization_percentage", -1) + 1  # a resumed run goes on
        while not self._sys_stop.wait(interval):
            try:
                vm = psutil.virtual_memory()
                m = {
                    "system/cpu_utilization_percentage": psutil.cpu_percent(None),
                    "system/system_memory_usage_megabytes": (vm.total - vm.available) / 2**20,
                    "system/system_memory_usage_percentage": vm.percent,
                    "system/process_rss_megabytes": proc.memory_info().rss / 2**20,
                }
                torch = sys.modules.get("torch")
                if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                    for i in range(torch.cuda.device_count()):
                        m[f"system/gpu_{i}_memory_allocated_megabytes"] = torch.cuda.memory_allocated(i) / 2**20
                        m[f"system/gpu_{i}_memory_reserved_megabytes"] = torch.cuda.memory_reserved(i) / 2**20
                self.log_metrics(m, step=step)
                step += 1
            except Exception:
                pass


_live_trackers: "weakref.WeakSet[RunTracker]" = weakref.WeakSet()


@atexit.register
def _finish_forgotten() -> None:
    """A script that exits without finish(): send what we can (briefly), keep the rest spooled."""
    for t in list(_live_trackers):
        with contextlib.suppress(Exception):
            if not t._finished:
                failed = getattr(sys, "last_type", None) is not None  # set for an uncaught exception
                t.finish("FAILED" if failed else "FINISHED", timeout=min(t.finish_timeout, 10.0))
