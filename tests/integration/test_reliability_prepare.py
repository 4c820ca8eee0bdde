"""Disk full while prepare.py writes train.bin: one-line error naming the file, exit 2, the
previous dataset intact and nothing half-written left beside it (issue 7).

Two real write failures, no mocks:
- ENOSPC on a 1 MB tmpfs (needs root and mount; skipped elsewhere);
- EFBIG from RLIMIT_FSIZE in the child (SIGXFSZ ignored, so the write fails instead of the
  process being killed): works for any user.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import assert_one_line_exit_2
from support.paths import CORPUS, REPO


def _run_prepare(args, cwd: Path, fsize: int | None = None):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [sys.executable, str(REPO / "prepare.py"), *map(str, args), "--no-mlflow", "-q", "--vocab-size", "400"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=limit if fsize else None,
    )


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture
def texts(tmp_path):
    if not (CORPUS / "be.txt").is_file():
        pytest.skip("shared corpus missing")
    small = tmp_path / "small.txt"
    small.write_bytes((CORPUS / "be.txt").read_bytes()[:200_000].rsplit(b"\n", 1)[0] + b"\n")
    big = tmp_path / "big.txt"
    big.write_bytes(
        b"".join((CORPUS / f"{x}.txt").read_bytes()[:1_200_000].rsplit(b"\n", 1)[0] + b"\n" for x in ("be", "ru", "en"))
    )
    return small, big


def _check_disk_full(parent: Path, texts, fsize=None, errno_text=""):
    small, big = texts
    out = parent / "data"
    r = _run_prepare([small, "--out", out], parent)
    assert r.returncode == 0, r.stderr[-2000:]
    before = _digest(out)
    r = _run_prepare([big, "--out", out, "--force"], parent, fsize=fsize)
    assert_one_line_exit_2(r, "cannot write", "train.bin", errno_text, "previous dataset", "intact")
    assert _digest(out) == before  # the previous dataset, byte for byte
    assert sorted(p.name for p in parent.iterdir()) == ["data"]  # no .tmp-* left beside it
    # and it still loads
    from bulba.data.format import open_data

    assert open_data(out).meta["splits"]["train"]["tokens"] > 0
    # a first prepare (no previous dataset) that hits the limit leaves nothing at all
    r = _run_prepare([big, "--out", parent / "fresh"], parent, fsize=fsize)
    assert_one_line_exit_2(r, "train.bin", "nothing was left")
    assert sorted(p.name for p in parent.iterdir()) == ["data"]


def test_disk_full_efbig_keeps_previous_dataset(tmp_path, texts):
    parent = tmp_path / "vol"
    parent.mkdir()
    _check_disk_full(parent, texts, fsize=300_000, errno_text="File too large")


def test_disk_full_enospc_tmpfs_keeps_previous_dataset(tmp_path, texts):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()[:100]})")
    try:
        _check_disk_full(mnt, texts, errno_text="No space left on device")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--vocab-size", "0"], "--vocab-size"),
        (["--vocab-size", "-5"], "--vocab-size"),
        (["--vocab-size", "99999999999"], "--vocab-size"),
        (["--val-fraction", "-0.1"], "--val-fraction"),
        (["--val-fraction", "1"], "--val-fraction"),
        (["--val-fraction", "nan"], "--val-fraction"),
        (["--block-mb", "0"], "--block-mb"),
        (["--block-mb", "-1"], "--block-mb"),
        (["--block-mb", "nan"], "--block-mb"),
        (["--tokenizer-max-mb", "0"], "--tokenizer-max-mb"),
        (["--tokenizer-max-mb", "nan"], "--tokenizer-max-mb"),
        (["--min-frequency", "-1"], "--min-frequency"),
        (["--min-frequency", "99999999999999999999999"], "--min-frequency"),
    ],
)
def test_zero_negative_and_absurd_sizes_exit_2(tmp_path, args, needle):
    src = tmp_path / "a.txt"
    src.write_text("Зубр жыве ў пушчы.\n\nThe stork builds a nest.\n\nАист вьёт гнездо.\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "prepare.py"),
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--no-mlflow",
            "-q",
            *args,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_exit_2(r, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
