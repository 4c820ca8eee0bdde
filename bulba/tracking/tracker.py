"""Where MLflow runs go, and a tracker that never lets a tracking outage stop training.

`MLFLOW_TRACKING_URI` wins everywhere (team mode: an `mlflow server`). Unset, we use
MLflow's own default, a SQLite store `mlflow.db` with artifacts in `./mlruns`, both in
the current directory, so `mlflow ui` started from the project root shows every
prepare, training, export and benchmark run.

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

import argparse
import atexit
import contextlib
import fcntl
import json
import math
import os
import re
import queue
import shutil
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from bulba.atomic import write_bytes, write_json
from bulba.errors import UserError

DEFAULT_EXPERIMENT = "bulbagpt"

RUN_FILE = "mlflow_run.json"
SPOOL_FILE = "mlflow_spool.jsonl"
ARTIFACT_STAGE = "mlflow_artifacts"  # log_text/log_dict content waiting for upload
DEFAULT_SPOOL_ROOT = Path("runs") / ".mlflow-spool"

# MLflow's log_batch limits (mlflow.utils.validation)
_MAX_METRICS = 1000
_MAX_PARAMS_TAGS = 100
_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 8000


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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _say(msg: str) -> None:
    print(f"mlflow: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Short HTTP timeouts and no urllib3 retries, only inside the tracker's threads.
# MLflow reads MLFLOW_HTTP_REQUEST_{TIMEOUT,MAX_RETRIES,BACKOFF_FACTOR} per request through
# these EnvironmentVariable objects; we give each a `get` that honours a thread-local
# override, so export's model registration etc. in the main thread keep MLflow's defaults.

_tls = threading.local()
_patch_lock = threading.Lock()
_patched = False


def _install_http_overrides() -> bool:
    global _patched
    with _patch_lock:
        if _patched:
            return True
        try:
            from mlflow import environment_variables as ev

            pairs = (("timeout", ev.MLFLOW_HTTP_REQUEST_TIMEOUT),
                     ("max_retries", ev.MLFLOW_HTTP_REQUEST_MAX_RETRIES),
                     ("backoff_factor", ev.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR))
            for name, var in pairs:
                orig = var.get

                def get(_orig=orig, _name=name):
                    ov = getattr(_tls, "http", None)
                    if ov is not None and _name in ov:
                        return ov[_name]
                    return _orig()

                var.get = get
        except Exception:  # an MLflow without these objects: fall back to environment defaults
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            return False
        _patched = True
        return True


@contextlib.contextmanager
def _http_limits(timeout: float, max_retries: int = 0):
    old = getattr(_tls, "http", None)
    _tls.http = {"timeout": max(1, int(math.ceil(timeout))), "max_retries": max_retries,
                 "backoff_factor": 0}
    try:
        yield
    finally:
        _tls.http = old


def _is_permanent(e: BaseException) -> bool:
    """A client-side fault (bad key/value, deleted run): retrying cannot help."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(e, MlflowException):
        return False
    try:
        code = int(e.get_http_status_code())
    except Exception:
        return False
    return 400 <= code < 500 and code not in (401, 403, 408, 429)


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    for needle, short in (("Connection refused", "connection refused"),
                          ("Failed to establish a new connection", "connection refused"),
                          ("Read timed out", "no answer (timeout)"), ("timed out", "no answer (timeout)"),
                          ("Name or service not known", "unknown host"),
                          ("Connection reset", "connection reset"), ("Connection aborted", "connection aborted")):
        if needle in s:
            return short
    return (s[:200] + "…") if len(s) > 200 else s


# --------------------------------------------------------------------------------------
# The spool: a JSON-lines write-ahead log of records {"seq": n, "t": kind, ...} and
# acknowledgements {"ack": n} (everything up to n is on the server).


# In memory, unsent records are kept as (seq, JSON line) pairs: bytes and ints are not tracked
# by Python's garbage collector, so a big backlog during an outage does not make the training
# loop's GC pauses longer (50k records as dicts cost ~0.3 s per full collection here).


def _spool_lines(path: Path, marker: tuple[bytes, ...] = ()) -> Iterator[tuple[bytes, dict]]:
    """(raw line, record) of every whole JSON object line in the spool (none if it is absent);
    a torn or garbled line is skipped. With `marker`, lines holding none of those bytes are
    skipped before parsing."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        for raw in f:
            if marker and not any(m in raw for m in marker):
                continue
            try:
                r = json.loads(raw)
            except ValueError:
                continue
            if isinstance(r, dict):
                yield raw, r


def _scan_spool(path: Path, after: int | None = None) -> tuple[int, int, list[tuple[int, bytes]]]:
    """(acked, last_seq, records with seq > max(acked, after) in order as (seq, line))."""
    acked, last, recs = 0, 0, {}
    for raw, r in _spool_lines(path):
        if "ack" in r:
            acked = max(acked, int(r["ack"]))
            last = max(last, acked)
        elif "seq" in r:
            s = int(r["seq"])
            recs[s] = raw if raw.endswith(b"\n") else raw + b"\n"
            last = max(last, s)
    floor = acked if after is None else max(acked, after)
    return acked, last, [(s, recs[s]) for s in sorted(recs) if s > floor]


def _logged_steps(path: Path) -> dict[str, int]:
    """Highest step logged per metric key in this spool (its compaction summaries included)."""
    steps: dict[str, int] = {}
    for _, r in _spool_lines(path, marker=(b'"steps"', b'"t": "m"')):
        items = r.get("steps", {}).items() if "steps" in r else \
            ((m[0], m[3]) for m in r.get("m", ()) if r.get("t") == "m")
        for k, st in items:
            if st > steps.get(k, -1):
                steps[k] = st
    return steps


class RunTracker:
    """One MLflow run, logged from a background thread; see the module docstring."""

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None, *,
                 run_dir: str | os.PathLike | None = None, tags: Mapping[str, Any] | None = None,
                 params: Mapping[str, Any] | None = None, parent_run_id: str | None = None,
                 run_id: str | None = None,
                 description: str | None = None, resume: bool = True, tracking_uri: str | None = None,
                 start_timeout: float = 10.0, finish_timeout: float = 30.0, http_timeout: float = 3.0,
                 artifact_timeout: float = 120.0, flush_interval: float = 1.0,
                 max_memory_records: int = 50_000, system_metrics: bool = False,
                 system_metrics_interval: float = 10.0, skip_logged_steps: bool = False,
                 quiet: bool = False, _attach_only: bool = False):
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
            raise UserError(f"{self.run_dir} is in use by another process logging to MLflow "
                            "(a running training or sync); wait for it to end")

        uri = tracking_uri or globals()["tracking_uri"]()
        info = self._load_info()
        acked, last, pending = _scan_spool(self.spool_path)
        if _attach_only:
            if info is None:
                self._release()
                raise UserError(f"{self.run_dir} has no {RUN_FILE}: not a run directory with MLflow data")
            if tracking_uri:
                info["tracking_uri"] = tracking_uri
        elif info is not None and resume and info.get("tracking_uri") == uri and (
                info.get("run_id") == run_id if run_id else info.get("experiment") == experiment):
            pass  # continue the same run (same id, or still to be created)
        else:
            if info is not None and pending:
                self._release()
                raise UserError(f"{self.run_dir} holds {len(pending)} tracking records not yet on the server; "
                                f"send them first: python -m bulba.tracking sync {self.run_dir}")
            if info is not None and not quiet:
                _say(f"starting a new MLflow run in {self.run_dir} (previous run {info.get('run_id')} "
                     f"was on {info.get('tracking_uri')}, experiment {info.get('experiment')})")
            info = {"format": "bulba-mlflow-run", "version": 1, "tracking_uri": uri, "experiment": experiment,
                    "run_name": run_name, "run_id": run_id, "client_id": uuid.uuid4().hex,
                    "start_time": _now_ms(), "parent_run_id": parent_run_id, "description": description,
                    "tags": {str(k): str(v) for k, v in (tags or {}).items()}}
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
            self._prev_steps = _logged_steps(self.spool_path)
        self._skip_upto = self._prev_steps if skip_logged_steps else {}
        self._steps_seen = dict(self._prev_steps)  # worker only

        # state shared with the worker (guarded by _cv)
        self._cv = threading.Condition()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._acked = acked
        self._seq = last                  # last sequence number assigned (by the worker)
        self._seq_base = last             # record k put by _put gets seq _seq_base + k
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
        self.dropped = 0                  # records the server refused (bad key/value), warned about
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
            threading.Thread(target=self._system_metrics, args=(float(system_metrics_interval),),
                             name="bulba-mlflow-system", daemon=True).start()

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
                    _say(f"tracking server {self.tracking_uri} not reachable ({self.last_error or 'no answer yet'}); "
                         f"training goes on, metrics are kept in {self.spool_path} and sent when it is back")
                    self._warned_offline = True

    # ---------------------------------------------------------------- public API
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

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None,
                    timestamp_ms: int | None = None) -> None:
        """Queue metrics (Python numbers; a CUDA tensor would force a device sync in float())."""
        ts = _now_ms() if timestamp_ms is None else int(timestamp_ms)
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
        self._put({"t": "a", "path": str(Path(local_dir).absolute()), "artifact_path": artifact_path,
                   "dir": True})

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
            self._put({"t": "end", "status": status, "end_time": _now_ms()})
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
                _say(f"still sending to {self.tracking_uri} ({self.backlog} records left)")
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
                _say(f"{left} tracking records not on {self.tracking_uri}{why}; kept in {self.spool_path}; "
                     f"send them later with: python -m bulba.tracking sync {self.run_dir}")

    def _system_metrics(self, interval: float) -> None:
        """MLflow-style `system/...` metrics through the same non-blocking queue."""
        try:
            import psutil
        except ImportError:
            return
        proc = psutil.Process()
        psutil.cpu_percent(None)
        step = self._prev_steps.get("system/cpu_utilization_percentage", -1) + 1  # a resumed run goes on
        while not self._sys_stop.wait(interval):
            try:
                vm = psutil.virtual_memory()
                m = {"system/cpu_utilization_percentage": psutil.cpu_percent(None),
                     "system/system_memory_usage_megabytes": (vm.total - vm.available) / 2**20,
                     "system/system_memory_usage_percentage": vm.percent,
                     "system/process_rss_megabytes": proc.memory_info().rss / 2**20}
                torch = sys.modules.get("torch")
                if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                    for i in range(torch.cuda.device_count()):
                        m[f"system/gpu_{i}_memory_allocated_megabytes"] = torch.cuda.memory_allocated(i) / 2**20
                        m[f"system/gpu_{i}_memory_reserved_megabytes"] = torch.cuda.memory_reserved(i) / 2**20
                self.log_metrics(m, step=step)
                step += 1
            except Exception:
                pass

    # ---- worker thread
    def _write(self, line: dict) -> bytes:
        data = json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n"
        try:
            self._spool_f.write(data)
        except OSError as e:  # disk full etc.: keep going in memory, say it once
            if not getattr(self, "_warned_disk", False):
                self._warned_disk = True
                _say(f"cannot write {self.spool_path}: {e}; tracking data kept in memory only")
        return data

    def _drain(self, block_s: float) -> bool:
        """Move queued records into the spool (and memory); True if a None wake-up came."""
        got = []
        try:
            item = self._q.get(timeout=block_s) if block_s > 0 else self._q.get_nowait()
            got.append(item)
            while True:
                got.append(self._q.get_nowait())
        except queue.Empty:
            pass
        wrote = False
        for rec in got:
            if rec is None:
                continue
            with self._cv:
                self._seq += 1
                seq = rec["seq"] = self._seq
            if rec["t"] == "m":
                seen = self._steps_seen
                for k, _, _, st in rec["m"]:
                    if st > seen.get(k, -1):
                        seen[k] = st
            line = self._write(rec)
            with self._cv:
                if seq == self._mem_upto + 1 and len(self._pending) < self.max_memory_records:
                    self._pending.append((seq, line))
                    self._mem_upto = seq
            wrote = True
        if wrote:
            with contextlib.suppress(OSError):
                self._spool_f.flush()
            now = time.monotonic()
            if not self.online and now - self._last_fsync > 5:
                with contextlib.suppress(OSError):
                    os.fsync(self._spool_f.fileno())
                self._last_fsync = now
        return bool(got)

    def _ack(self, seq: int) -> None:
        with self._cv:
            self._acked = seq
            while self._pending and self._pending[0][0] <= seq:
                self._pending.popleft()
            self._cv.notify_all()
        self._write({"ack": seq})
        with contextlib.suppress(OSError):
            self._spool_f.flush()

    def _maybe_compact(self) -> None:
        """Everything acknowledged and the spool is big: start it afresh (keeps the seq base)."""
        with self._cv:
            if self._acked != self._seq:  # records still queued get later seqs: they are not in the file yet
                return
        try:
            if self._spool_f.tell() < (4 << 20):
                return
            # a fresh spool holding only the summary, swapped in atomically; it keeps the highest
            # step per key, which skip_logged_steps needs after a crash
            line = json.dumps({"ack": self._acked, "steps": self._steps_seen}, ensure_ascii=False)
            write_bytes(self.spool_path, line.encode("utf-8") + b"\n")
            old, self._spool_f = self._spool_f, open(self.spool_path, "ab")
            old.close()
        except OSError:
            pass

    def _ensure_client(self):
        if self._client is None:
            _install_http_overrides()
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _ensure_run(self) -> None:
        if self.info.get("run_id"):
            return
        client = self._ensure_client()
        info = self.info
        if "context_tags" not in info:
            try:
                from mlflow.tracking.context.registry import resolve_tags

                ctx = {k: str(v) for k, v in resolve_tags({}).items()}
            except Exception:
                ctx = {}
            info["context_tags"] = ctx
        exp = client.get_experiment_by_name(info["experiment"])
        if exp is None:
            try:
                exp_id = client.create_experiment(info["experiment"])
            except Exception as e:
                exp = client.get_experiment_by_name(info["experiment"])  # created meanwhile?
                if exp is None:
                    raise e
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        run_id = None
        if self._create_attempted or info.get("create_attempted"):
            # an earlier create may have reached the server without us seeing the answer
            found = client.search_runs([exp_id], filter_string=f"tags.`bulba.client_id` = '{info['client_id']}'",
                                       max_results=1)
            if found:
                run_id = found[0].info.run_id
        if run_id is None:
            tags = dict(info.get("context_tags") or {})
            tags.update(info.get("tags") or {})
            tags["bulba.client_id"] = info["client_id"]
            if info.get("parent_run_id"):
                tags["mlflow.parentRunId"] = info["parent_run_id"]
            if info.get("description"):
                tags["mlflow.note.content"] = info["description"]
            self._create_attempted = True
            info["create_attempted"] = True
            run = client.create_run(exp_id, start_time=info.get("start_time"), tags=tags,
                                    run_name=info.get("run_name"))
            run_id = run.info.run_id
            if not info.get("run_name"):
                info["run_name"] = run.info.run_name
        info["run_id"] = run_id
        info["experiment_id"] = exp_id
        try:
            write_json(self.run_file, info)
        except OSError as e:
            _say(f"cannot record the run id in {self.run_file}: {e}")
        self._run_ready.set()
        if self._warned_offline and not self.quiet:
            _say(f"tracking server is back; created run {run_id}, sending the backlog")
            self._warned_offline = False

    def _batches(self) -> Iterable[tuple[list[dict], str]]:
        """Split the in-memory backlog (a prefix) into log_batch-sized groups, in order."""
        with self._cv:
            lines = [line for _, line in self._pending]
        group: list[dict] = []
        n_m = n_pt = 0
        keys_p: set = set()
        keys_g: set = set()
        for line in lines:
            r = json.loads(line)
            t = r["t"]
            if t in ("m", "p", "g"):
                add_m = len(r["m"]) if t == "m" else 0
                add_pt = len(r["p"]) if t == "p" else len(r["g"]) if t == "g" else 0
                clash = (t == "p" and keys_p & r["p"].keys()) or (t == "g" and keys_g & r["g"].keys())
                if group and (clash or n_m + add_m > _MAX_METRICS or n_pt + add_pt > _MAX_PARAMS_TAGS
                              or n_m + n_pt + add_m + add_pt > _MAX_METRICS):
                    yield group, "batch"
                    group, n_m, n_pt, keys_p, keys_g = [], 0, 0, set(), set()
                group.append(r)
                n_m += add_m
                n_pt += add_pt
                if t == "p":
                    keys_p |= r["p"].keys()
                if t == "g":
                    keys_g |= r["g"].keys()
            else:
                if group:
                    yield group, "batch"
                    group, n_m, n_pt, keys_p, keys_g = [], 0, 0, set(), set()
                yield [r], t
        if group:
            yield group, "batch"

    def _send_batch(self, group: list[dict]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        metrics, params, tags = [], [], []
        for r in group:
            if r["t"] == "m":
                metrics += [Metric(k, v, ts, st) for k, v, ts, st in r["m"]]
            elif r["t"] == "p":
                params += [Param(k, v) for k, v in r["p"].items()]
            else:
                tags += [RunTag(k, v) for k, v in r["g"].items()]
        # MLflow splits metrics >1000 itself; we never exceed the limits per call.
        with _http_limits(self.http_timeout):
            self._client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def _send_one(self, r: dict, kind: str) -> None:
        client = self._client
        if kind == "a":
            p = Path(r["path"])
            if not p.exists():
                self._drop(r, f"artifact {p} no longer exists")
                return
            with _http_limits(self.artifact_timeout):
                if r.get("dir") or p.is_dir():
                    client.log_artifacts(self.run_id, str(p), r.get("artifact_path"))
                else:
                    client.log_artifact(self.run_id, str(p), r.get("artifact_path"))
        elif kind == "end":
            with _http_limits(self.http_timeout):
                client.set_terminated(self.run_id, status=r["status"], end_time=r.get("end_time"))
        elif kind == "status":
            with _http_limits(self.http_timeout):
                client.update_run(self.run_id, status=r["status"])
        elif kind == "d":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            ds = Dataset(**{k: v for k, v in r["ds"].items() if v is not None or k in ("name", "digest")})
            inp = DatasetInput(ds, tags=[InputTag(k, v) for k, v in r["tags"].items()])
            with _http_limits(self.http_timeout):
                client.log_inputs(self.run_id, datasets=[inp])

    def _drop(self, r: dict, why: str) -> None:
        self.dropped += 1
        _say(f"dropped a tracking record the server refuses ({why})")

    def _send_group(self, group: list[dict], kind: str) -> None:
        """Send one group; a permanent refusal of a batch is retried record by record and
        metric by metric, and only the refused pieces are dropped (with a warning)."""
        try:
            if kind == "batch":
                self._send_batch(group)
            else:
                self._send_one(group[0], kind)
            return
        except Exception as e:
            if not _is_permanent(e):
                raise
            err = e
        if kind != "batch":
            self._drop(group[0], _one_line(err))
            return
        pieces = []
        for r in group:
            if r["t"] == "m":
                pieces += [dict(r, m=[x]) for x in r["m"]]
            elif r["t"] == "p":
                pieces += [dict(r, p={k: v}) for k, v in r["p"].items()]
            else:
                pieces += [dict(r, g={k: v}) for k, v in r["g"].items()]
        if len(pieces) <= 1:
            self._drop(group[0], _one_line(err))
            return
        for piece in pieces:
            try:
                self._send_batch([piece])
            except Exception as e:
                if not _is_permanent(e):
                    raise
                self._drop(piece, _one_line(e))

    def _send_backlog(self, stop_at: float | None) -> None:
        while True:
            with self._cv:
                if not self._pending:
                    if self._seq > self._acked and self._mem_upto < self._seq:
                        # memory overflowed while offline: read the rest back from the spool
                        self._spool_f.flush()
                        recs = _scan_spool(self.spool_path, self._acked)[2][: self.max_memory_records]
                        self._pending.extend(recs)
                        self._mem_upto = recs[-1][0] if recs else self._seq
                        if not recs:
                            self._acked = self._seq
                            self._cv.notify_all()
                            return
                    else:
                        return
            for group, kind in self._batches():
                self._send_group(group, kind)
                self._ack(group[-1]["seq"])
                self.online = True
                hard = self._hard_deadline
                if hard is not None and time.monotonic() > hard:
                    return
                # keep the spool moving while a long replay runs
                self._drain(0)

    def _worker(self) -> None:
        backoff = 0.5
        next_try = 0.0  # monotonic time of the next send attempt
        oldest_unsent: float | None = None
        while True:
            try:
                with self._cv:
                    stop_at = self._stop_deadline
                    flush_req = self._flush_req
                now = time.monotonic()
                wait = 0.2
                if oldest_unsent is not None:
                    wait = min(wait, max(0.0, oldest_unsent + self.flush_interval - now))
                if not self.online:
                    wait = min(wait, max(0.0, next_try - now))
                if stop_at is not None or flush_req:
                    wait = 0.0 if (self.online or now >= next_try) else min(0.05, wait)
                if self._drain(wait) and oldest_unsent is None:
                    oldest_unsent = time.monotonic()
                with self._cv:
                    stop_at = self._stop_deadline
                    has_work = self._seq > self._acked or not self.info.get("run_id")
                now = time.monotonic()
                due = (oldest_unsent is not None and now - oldest_unsent >= self.flush_interval) \
                    or stop_at is not None or self._flush_req or not self.info.get("run_id") \
                    or not self.online
                if has_work and due and now >= next_try:
                    try:
                        self._ensure_client()
                        with _http_limits(self.http_timeout):
                            self._ensure_run()
                        self._send_backlog(stop_at)
                        if self._warned_offline and not self.quiet:
                            _say(f"tracking server is back; backlog sent to run {self.run_id}")
                        self._warned_offline = False
                        self.online = True
                        self.last_error = None
                        backoff = 0.5
                        oldest_unsent = None
                        with self._cv:
                            if self._acked >= self._seq:
                                self._flush_req = 0.0
                        self._maybe_compact()
                    except Exception as e:  # server down, timeout, 5xx: keep everything, retry later
                        self.last_error = _one_line(e)
                        if self.online and not self.quiet:
                            _say(f"tracking server unreachable ({self.last_error}); buffering to {self.spool_path}")
                            self._warned_offline = True
                        self.online = False
                        next_try = time.monotonic() + backoff
                        backoff = min(backoff * 2, 2.0)
                    finally:
                        self._first_attempt_done.set()
                elif not has_work:
                    oldest_unsent = None
                    self._first_attempt_done.set()
                    with self._cv:
                        self._flush_req = 0.0
                with self._cv:
                    done = self._acked >= self._seq and self._q.empty()
                    hard = self._hard_deadline
                now = time.monotonic()
                if stop_at is not None and (done or (now >= stop_at and not self.online)
                                            or (hard is not None and now >= hard)):
                    self._drain(0)  # nothing queued may stay outside the spool
                    return
            except Exception as e:  # a bug here must never take training down
                self.last_error = _one_line(e)
                time.sleep(0.5)


def start_run(experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None, **kw) -> RunTracker:
    """Alias of `RunTracker(...)`."""
    return RunTracker(experiment, run_name, **kw)


_live_trackers: "weakref.WeakSet[RunTracker]" = weakref.WeakSet()


@atexit.register
def _finish_forgotten() -> None:
    """A script that exits without finish(): send what we can (briefly), keep the rest spooled."""
    for t in list(_live_trackers):
        with contextlib.suppress(Exception):
            if not t._finished:
                failed = getattr(sys, "last_type", None) is not None  # set for an uncaught exception
                t.finish("FAILED" if failed else "FINISHED", timeout=min(t.finish_timeout, 10.0))


# --------------------------------------------------------------------------------------
# python -m bulba.tracking sync RUN_DIR


def sync(run_dir: str | os.PathLike, tracking_uri: str | None = None, timeout: float = 20.0,
         end_status: str | None = None, quiet: bool = False) -> tuple[bool, RunTracker]:
    """Send a run directory's spooled records; returns (everything sent, tracker)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory")
    t = RunTracker(run_dir=run_dir, tracking_uri=tracking_uri, start_timeout=0, quiet=True,
                   _attach_only=True)
    t.quiet = quiet
    if end_status:
        t._finished = False
        t._put({"t": "end", "status": end_status, "end_time": _now_ms()})
    t._finished = True
    t._close(timeout)
    return t._synced, t


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bulba.tracking",
        description="MLflow tracking helpers for BulbaGPT run directories.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sync", help="send a run's spooled metrics, params, tags and artifacts to MLflow",
                       description="Send what a run could not send while the tracking server was down "
                                   f"({SPOOL_FILE} in RUN_DIR). Safe to repeat: nothing is sent twice.")
    s.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding mlflow_run.json and mlflow_spool.jsonl")
    s.add_argument("--tracking-uri", help="send to this tracking URI instead of the one recorded in the run "
                                          "(e.g. the same server at a new address)")
    s.add_argument("--timeout", type=float, default=20.0,
                   help="give up after this many seconds without reaching the server; while it takes "
                        "data the sync goes on (default: %(default)s)")
    s.add_argument("--end-status", choices=["FINISHED", "FAILED", "KILLED"],
                   help="also mark the run ended with this status (for a run whose process died)")
    st = sub.add_parser("status", help="show a run directory's tracking state")
    st.add_argument("run_dir", metavar="RUN_DIR")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if args.cmd == "status":
        try:
            info = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"{run_dir / RUN_FILE} missing or unreadable: not a run directory with MLflow data")
        acked, last, pending = _scan_spool(run_dir / SPOOL_FILE)
        print(f"run {info.get('run_id') or '(not created yet)'} in experiment {info.get('experiment')} "
              f"on {info.get('tracking_uri')}: {len(pending)} records waiting")
        return 0
    if not (run_dir / RUN_FILE).exists():
        raise UserError(f"{run_dir} has no {RUN_FILE}: not a run directory with MLflow data")
    n_before = len(_scan_spool(run_dir / SPOOL_FILE)[2])
    ok, t = sync(run_dir, tracking_uri=args.tracking_uri, timeout=args.timeout, end_status=args.end_status,
                 quiet=True)
    if ok:
        print(f"synced {n_before} records to run {t.run_id} on {t.tracking_uri}")
        return 0
    left = len(_scan_spool(run_dir / SPOOL_FILE)[2])
    print(f"error: {left} of {n_before} records still not sent to {t.tracking_uri}"
          f" ({t.last_error or 'timed out'}); run the same command again later", file=sys.stderr)
    return 1

