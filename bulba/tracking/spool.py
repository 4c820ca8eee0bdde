"""The spool: a JSON-lines write-ahead log of a run's tracking records, RUN_DIR/mlflow_spool.jsonl.

Records are {"seq": n, "t": kind, ...} and acknowledgements {"ack": n} (everything up to n is on
the server); compaction leaves one summary line {"ack": n, "steps": {key: highest step}}.
RUN_DIR/mlflow_run.json names the run (id, tracking URI, experiment) the spool belongs to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

RUN_FILE = "mlflow_run.json"
SPOOL_FILE = "mlflow_spool.jsonl"
ARTIFACT_STAGE = "mlflow_artifacts"  # log_text/log_dict content waiting for upload
DEFAULT_SPOOL_ROOT = Path("runs") / ".mlflow-spool"


# In memory, unsent records are kept as (seq, JSON line) pairs: bytes and ints are not tracked
# by Python's garbage collector, so a big backlog during an outage does not make the training
# loop's GC pauses longer (50k records as dicts cost ~0.3 s per full collection here).


def spool_lines(path: Path, marker: tuple[bytes, ...] = ()) -> Iterator[tuple[bytes, dict]]:
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


def scan_spool(path: Path, after: int | None = None) -> tuple[int, int, list[tuple[int, bytes]]]:
    """(acked, last_seq, records with seq > max(acked, after) in order as (seq, line))."""
    acked, last, recs = 0, 0, {}
    for raw, r in spool_lines(path):
        if "ack" in r:
            acked = max(acked, int(r["ack"]))
            last = max(last, acked)
        elif "seq" in r:
            s = int(r["seq"])
            recs[s] = raw if raw.endswith(b"\n") else raw + b"\n"
            last = max(last, s)
    floor = acked if after is None else max(acked, after)
    return acked, last, [(s, recs[s]) for s in sorted(recs) if s > floor]


def logged_steps(path: Path) -> dict[str, int]:
    """Highest step logged per metric key in this spool (its compaction summaries included)."""
    steps: dict[str, int] = {}
    for _, r in spool_lines(path, marker=(b'"steps"', b'"t": "m"')):
        items = (
            r.get("steps", {}).items() if "steps" in r else ((m[0], m[3]) for m in r.get("m", ()) if r.get("t") == "m")
        )
        for k, st in items:
            if st > steps.get(k, -1):
                steps[k] = st
    return steps
