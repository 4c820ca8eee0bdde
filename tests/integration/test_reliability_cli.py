"""Command-line mistakes in every script (issue 7): one `error:` line naming the problem, exit 2,
no usage block, no traceback; `--help` still prints the full usage and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import REPO


def _run(script: str, *args: str, cwd: Path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "script,args,needle",
    [
        ("prepare.py", [], "required"),
        ("prepare.py", ["a.txt", "--out", "o", "--vocab-size", "abc"], "invalid int value"),
        ("prepare.py", ["a.txt", "--out", "o", "--encoder", "fast"], "invalid choice"),
        ("train.py", ["tiny", "--bogus"], "unrecognized arguments: --bogus"),
        ("export.py", ["run"], "required: --type, --out"),
        ("export.py", ["run", "--type", "f16", "--out", "x.gguf", "--hf-dtype", "f8"], "invalid choice"),
        (
            "export.py",
            ["run", "--type", "f16", "--out", "x.gguf", "--register", "m", "--no-mlflow"],
            "--register needs MLflow",
        ),
        ("bench.py", ["nosuch"], "invalid choice: 'nosuch'"),
    ],
)
def test_command_line_mistakes_are_one_line_exit_2(tmp_path, script, args, needle):
    r = _run(script, *args, cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "usage:" not in r.stderr, r.stderr
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {script}") and needle in err, err
    assert "--help" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["prepare.py", "train.py", "export.py", "bench.py"])
def test_help_still_prints_usage(tmp_path, script):
    r = _run(script, "--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-2000:]
