"""`python bench.py train`: a short run on `tiny` fills every row of the table, writes it to
--md / --json, and logs a parent MLflow run (the table) plus one child run per row holding the
same numbers, against a real `mlflow server` (tests/support/mlflow_server.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from support.paths import REPO as ROOT

ROWS = ["hf-trainer-default", "hf-trainer-best", "bulba-eager", "bulba-flash", "bulba-compile", "bulba-both"]

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the HF Trainer needs it


def _bench(args: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), "train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


# Very small shapes: a few steps per row; the compile rows still compile (that is the cost).
SMALL = ["--steps", "2", "--warmup", "1", "--batch-size", "2", "--ctx", "32", "--set", "model.n_layer=1"]


@pytest.mark.slow
def test_bench_train_every_row_and_mlflow(prepared_data, mlflow_uri, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient

    cuda = torch.cuda.is_available()
    experiment = f"bench-train-test-{uuid.uuid4().hex[:8]}"
    md, js = tmp_path / "train.md", tmp_path / "train.json"
    r = _bench(
        [
            "--data",
            str(prepared_data),
            *SMALL,
            "--json",
            str(js),
            "--md",
            str(md),
            "--experiment",
            experiment,
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]

    payload = json.loads(js.read_text(encoding="utf-8"))
    rows = {row["name"]: row for row in payload["rows"]}
    assert list(rows) == ROWS
    for name, row in rows.items():
        if name == "bulba-flash" and not cuda:
            assert row["note"].startswith("n/a") and "CUDA" in row["note"], row
            assert row.get("tokens_per_s") is None  # stated, never faked
            continue
        assert not row["note"].startswith(("failed", "n/a")), row
        assert row["tokens_per_s"] > 0 and row["speedup"] > 0, row
        assert row["mfu"] > 0, row  # (the CPU peak table is an estimate; can exceed 1 on a CPU it underrates)
        assert row["peak_rss_mb"] > 100, row  # a real process with torch in it
        assert math.isfinite(row["loss"]) and row["loss"] > 0, row
        assert row["precision"] in ("fp32", "bf16-mixed", "32-true"), row
        assert row["seconds"] > 0
        if cuda:
            assert row["peak_device_mb"] > 0, row
    assert rows["hf-trainer-default"]["speedup"] == pytest.approx(1.0)
    assert rows["hf-trainer-default"]["precision"] == "fp32"
    assert rows["hf-trainer-best"]["compile"].startswith("torch_compile=True")
    assert rows["bulba-compile"]["compile"] != "no" and rows["bulba-eager"]["compile"] == "no"

    # the table: printed, written to --md, with hardware, versions and the shared settings
    table = md.read_text(encoding="utf-8")
    for name in ROWS:
        assert f"| {name} |" in table and f"| {name} |" in r.stdout
    assert "torch:" in table and "versions:" in table and "batch 2 x ctx 32" in table
    assert "n/a: FlashAttention needs a CUDA GPU" in table or cuda

    # MLflow: a parent run holding the table, one child per row with the same numbers
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags.get("bulba.bench") == "train"
    children = {
        x.data.tags["bulba.bench_row"]: x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == set(ROWS)
    for name, row in rows.items():
        metrics, params = children[name].data.metrics, children[name].data.params
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert metrics[k] == pytest.approx(v, rel=1e-9), (name, k)
            elif k != "name" and v is not None and v != "":
                assert params[k] == str(v)[:500], (name, k)
    local = client.download_artifacts(parent.info.run_id, "table.md", str(tmp_path))
    logged = Path(local).read_text(encoding="utf-8")
    for name in ROWS:
        assert f"| {name} |" in logged


def test_bench_train_bad_input_is_one_line_exit_2(tmp_path):
    r = _bench(["--rows", "bulba-eagre", "--no-mlflow", "--data", str(tmp_path)], timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "bulba-eager" in r.stderr  # names the closest row
    r = _bench(["--rows", "bulba-eager", "--no-mlflow", "--data", str(tmp_path / "nope")], timeout=120)
    assert r.returncode == 2 and "meta.json" in r.stderr and r.stderr.strip().count("\n") == 0
    r = _bench(["--steps", "0", "--no-mlflow"], timeout=120)
    assert r.returncode == 2 and "--steps" in r.stderr
    assert not (tmp_path / "bench_results").exists()
