"""The tracker's background thread: moves queued records into the spool, sends the backlog in
order with MlflowClient.log_batch (batched up to MLflow's limits; artifacts, dataset inputs and
the end status in their place), acknowledges what was delivered, backs off while the server is
down. A mixin of RunTracker (bulba.tracking.tracker), whose state it shares."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import time
from pathlib import Path
from typing import Iterable

from bulba.atomic import write_bytes, write_json
from bulba.tracking.http import install_overrides, is_permanent, limits, one_line
from bulba.tracking.spool import scan_spool
from bulba.tracking.store import ensure_experiment, say

# MLflow's log_batch limits (mlflow.utils.validation)
_MAX_METRICS = 1000
_MAX_PARAMS_TAGS = 100


class Sender:
    """Worker-thread half of RunTracker (see there for the attributes)."""

    def _write(self, line: dict) -> bytes:
        data = json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n"
        try:
            self._spool_f.write(data)
        except OSError as e:  # disk full etc.: keep going in memory, say it once
            if not getattr(self, "_warned_disk", False):
                self._warned_disk = True
                say(f"cannot write {self.spool_path}: {e}; tracking data kept in memory only")
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
            install_overrides()
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
        exp_id = ensure_experiment(client, info["experiment"])
        run_id = None
        if self._create_attempted or info.get("create_attempted"):
            # an earlier create may have reached the server without us seeing the answer
            found = client.search_runs(
                [exp_id], filter_string=f"tags.`bulba.client_id` = '{info['client_id']}'", max_results=1
            )
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
            run = client.create_run(exp_id, start_time=info.get("start_time"), tags=tags, run_name=info.get("run_name"))
            run_id = run.info.run_id
            if not info.get("run_name"):
                info["run_name"] = run.info.run_name
        info["run_id"] = run_id
        info["experiment_id"] = exp_id
        try:
            write_json(self.run_file, info)
        except OSError as e:
            say(f"cannot record the run id in {self.run_file}: {e}")
        self._run_ready.set()
        if self._warned_offline and not self.quiet:
            say(f"tracking server is back; created run {run_id}, sending the backlog")
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
                if group and (
                    clash
                    or n_m + add_m > _MAX_METRICS
                    or n_pt + add_pt > _MAX_PARAMS_TAGS
                    or n_m + n_pt + add_m + add_pt > _MAX_METRICS
                ):
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
        with limits(self.http_timeout):
            self._client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def _send_one(self, r: dict, kind: str) -> None:
        client = self._client
        if kind == "a":
            p = Path(r["path"])
            if not p.exists():
                self._drop(r, f"artifact {p} no longer exists")
                return
            with limits(self.artifact_timeout):
                if r.get("dir") or p.is_dir():
                    client.log_artifacts(self.run_id, str(p), r.get("artifact_path"))
                else:
                    client.log_artifact(self.run_id, str(p), r.get("artifact_path"))
        elif kind == "end":
            with limits(self.http_timeout):
                client.set_terminated(self.run_id, status=r["status"], end_time=r.get("end_time"))
        elif kind == "status":
            with limits(self.http_timeout):
                client.update_run(self.run_id, status=r["status"])
        elif kind == "d":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            ds = Dataset(**{k: v for k, v in r["ds"].items() if v is not None or k in ("name", "digest")})
            inp = DatasetInput(ds, tags=[InputTag(k, v) for k, v in r["tags"].items()])
            with limits(self.http_timeout):
                client.log_inputs(self.run_id, datasets=[inp])

    def _drop(self, r: dict, why: str) -> None:
        self.dropped += 1
        say(f"dropped a tracking record the server refuses ({why})")

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
            if not is_permanent(e):
                raise
            err = e
        if kind != "batch":
            self._drop(group[0], one_line(err))
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
            self._drop(group[0], one_line(err))
            return
        for piece in pieces:
            try:
                self._send_batch([piece])
            except Exception as e:
                if not is_permanent(e):
                    raise
                self._drop(piece, one_line(e))

    def _send_backlog(self, stop_at: float | None) -> None:
        while True:
            with self._cv:
                if not self._pending:
                    if self._seq > self._acked and self._mem_upto < self._seq:
                        # memory overflowed while offline: read the rest back from the spool
                        self._spool_f.flush()
                        recs = scan_spool(self.spool_path, self._acked)[2][: self.max_memory_records]
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
                # Sleep until the next moment there is something to do: the flush deadline, but
                # while offline never before the next try. (The flush deadline alone passes during
                # an outage and made this loop spin holding the GIL: every torch op of the training
                # step then waited for it, Muon's ~300 small ops 2.5 s per step, measured.)
                ready_at = None if oldest_unsent is None else oldest_unsent + self.flush_interval
                if not self.online:
                    ready_at = next_try if ready_at is None else max(ready_at, next_try)
                if ready_at is not None:
                    wait = min(wait, max(0.0, ready_at - now))
                if stop_at is not None or flush_req:
                    wait = 0.0 if (self.online or now >= next_try) else min(0.05, wait)
                if self._drain(wait) and oldest_unsent is None:
                    oldest_unsent = time.monotonic()
                with self._cv:
                    stop_at = self._stop_deadline
                    has_work = self._seq > self._acked or not self.info.get("run_id")
                now = time.monotonic()
                due = (
                    (oldest_unsent is not None and now - oldest_unsent >= self.flush_interval)
                    or stop_at is not None
                    or self._flush_req
                    or not self.info.get("run_id")
                    or not self.online
                )
                if has_work and due and now >= next_try:
                    try:
                        self._ensure_client()
                        with limits(self.http_timeout):
                            self._ensure_run()
                        self._send_backlog(stop_at)
                        if self._warned_offline and not self.quiet:
                            say(f"tracking server is back; backlog sent to run {self.run_id}")
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
                        self.last_error = one_line(e)
                        if self.online and not self.quiet:
                            say(f"tracking server unreachable ({self.last_error}); buffering to {self.spool_path}")
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
                if stop_at is not None and (
                    done or (now >= stop_at and not self.online) or (hard is not None and now >= hard)
                ):
                    self._drain(0)  # nothing queued may stay outside the spool
                    return
            except Exception as e:  # a bug here must never take training down
                self.last_error = one_line(e)
                time.sleep(0.5)
