"""`python -m bulba.tracking sync|status RUN_DIR`: send what a run could not send while the
tracking server was down, or show how much is waiting."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bulba.errors import UserError
from bulba.tracking.spool import RUN_FILE, SPOOL_FILE, scan_spool
from bulba.tracking.tracker import RunTracker


def sync(
    run_dir: str | os.PathLike,
    tracking_uri: str | None = None,
    timeout: float = 20.0,
    end_status: str | None = None,
    quiet: bool = False,
) -> tuple[bool, RunTracker]:
    """Send a run directory's spooled records; returns (everything sent, tracker)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory")
    t = RunTracker.attach(run_dir, tracking_uri=tracking_uri, quiet=quiet)
    return t.finish(end_status, timeout=timeout), t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bulba.tracking", description="MLflow tracking helpers for BulbaGPT run directories."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser(
        "sync",
        help="send a run's spooled metrics, params, tags and artifacts to MLflow",
        description="Send what a run could not send while the tracking server was down "
        f"({SPOOL_FILE} in RUN_DIR). Safe to repeat: nothing is sent twice.",
    )
    s.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding mlflow_run.json and mlflow_spool.jsonl")
    s.add_argument(
        "--tracking-uri",
        help="send to this tracking URI instead of the one recorded in the run (e.g. the same server at a new address)",
    )
    s.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        help="give up after this many seconds without reaching the server; while it takes "
        "data the sync goes on (default: %(default)s)",
    )
    s.add_argument(
        "--end-status",
        choices=["FINISHED", "FAILED", "KILLED"],
        help="also mark the run ended with this status (for a run whose process died)",
    )
    st = sub.add_parser("status", help="show a run directory's tracking state")
    st.add_argument("run_dir", metavar="RUN_DIR")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if args.cmd == "status":
        try:
            info = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"{run_dir / RUN_FILE} missing or unreadable: not a run directory with MLflow data")
        acked, last, pending = scan_spool(run_dir / SPOOL_FILE)
        print(
            f"run {info.get('run_id') or '(not created yet)'} in experiment {info.get('experiment')} "
            f"on {info.get('tracking_uri')}: {len(pending)} records waiting"
        )
        return 0
    if not (run_dir / RUN_FILE).exists():
        raise UserError(f"{run_dir} has no {RUN_FILE}: not a run directory with MLflow data")
    n_before = len(scan_spool(run_dir / SPOOL_FILE)[2])
    ok, t = sync(run_dir, tracking_uri=args.tracking_uri, timeout=args.timeout, end_status=args.end_status, quiet=True)
    if ok:
        print(f"synced {n_before} records to run {t.run_id} on {t.tracking_uri}")
        return 0
    left = len(scan_spool(run_dir / SPOOL_FILE)[2])
    print(
        f"error: {left} of {n_before} records still not sent to {t.tracking_uri}"
        f" ({t.last_error or 'timed out'}); run the same command again later",
        file=sys.stderr,
    )
    return 1
