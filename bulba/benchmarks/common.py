"""Shared benchmark plumbing: the Markdown table, --json output, MLflow logging, RSS."""

from __future__ import annotations

import os
import platform
import sys
import time

from bulba.atomic import write_json, write_text


def add_common_arguments(p) -> None:
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    p.add_argument("--md", metavar="FILE", help="also write the Markdown table to FILE")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the result to MLflow")
    p.add_argument("--experiment", default="bulbagpt-bench", help="MLflow experiment (default: %(default)s)")


def hardware() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["cuda"] = torch.version.cuda
            info["device"] = torch.cuda.get_device_name(0)
        else:
            info["device"] = platform.processor() or "cpu"
    except ImportError:
        pass
    return info


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2):
            return f"{v:.3g}"
        return f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def report(command: str, rows: list[dict], args, extra: dict | None = None) -> None:
    hw = hardware()
    table = markdown_table(rows)
    head = f"### bench.py {command}\n\n" + ", ".join(f"{k}: {v}" for k, v in hw.items()) + "\n\n"
    print(head + table)
    if extra:
        print()
        for k, v in extra.items():
            print(f"- {k}: {v}")
    payload = {
        "benchmark": command,
        "hardware": hw,
        "rows": rows,
        "extra": extra or {},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # the notes under the table (shared settings, how figures are measured) travel with it
    notes = "".join(f"- {k}: {v}\n" for k, v in (extra or {}).items())
    text = head + table + "\n" + ("\n" + notes if notes else "")
    if args.json:
        write_json(args.json, payload)
    if args.md:
        write_text(args.md, text)
    if not args.no_mlflow:
        log_to_mlflow(command, rows, payload, text, args.experiment)


def log_to_mlflow(command: str, rows: list[dict], payload: dict, table: str, experiment: str) -> None:
    """A parent run holding the table, one child run per row with its numeric figures."""
    from bulba.tracking import setup_mlflow

    mlflow = setup_mlflow(experiment)
    with mlflow.start_run(run_name=f"bench-{command}") as parent:
        mlflow.set_tag("bulba.stage", "bench")
        mlflow.set_tag("bulba.bench", command)
        mlflow.log_params({f"hw.{k}": v for k, v in payload["hardware"].items()})
        mlflow.log_text(table, "table.md")
        mlflow.log_dict(payload, "bench.json")
        for row in rows:
            with mlflow.start_run(run_name=f"{command}/{row['name']}", nested=True):
                mlflow.set_tag("bulba.bench", command)
                mlflow.set_tag("bulba.bench_row", row["name"])
                for k, v in row.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        mlflow.log_metric(k, float(v))
                    elif k != "name" and v is not None:
                        mlflow.log_param(k, str(v)[:500])
    print(f"\nlogged to MLflow experiment '{experiment}', run {parent.info.run_id}")
