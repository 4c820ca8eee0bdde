"""Training progress: on a non-terminal, each log line carries an ETA that shrinks to 0; on a
terminal, a tqdm bar with tokens/s and loss. Real tiny trainings through train.py."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest

from bulba.train.progress import Progress, human_s
from support.train_data import ROOT, TINY, run_train

ARGS = ["tiny", *TINY, "train.val_every=0", "train.ckpt_every=0", "train.sample_every=0", "--no-mlflow"]
LINE = re.compile(r"^step +(\d+)/(\d+) \|.* tok/s \| mfu .*\| eta (\S+) \| elapsed (\S+)$")


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?", text)
    assert m and text, text
    d, h, mi, s = (float(x or 0) for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def test_log_lines_carry_a_shrinking_eta(train_data, tmp_path):
    steps = 30
    p = run_train(ARGS + ["train.max_steps=30", f"data.dir={train_data}", f"out_dir={tmp_path / 'run'}"])
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("step ") and "val loss" not in ln]
    found = [LINE.match(ln) for ln in lines]
    assert all(found), [ln for ln, m in zip(lines, found) if not m]
    # One line per logged step (log_every=1), no bar and no carriage returns in a pipe.
    assert [int(m.group(1)) for m in found] == list(range(1, steps + 1))
    assert "\r" not in p.stdout
    eta = [_seconds(m.group(3)) for m in found]
    assert eta[-1] == 0.0
    third = steps // 3
    assert eta[1] > eta[-2] > 0, eta  # from the second log step on the estimate counts down
    assert sum(eta[:third]) > sum(eta[-third:]), eta


def test_terminal_gets_a_bar(train_data, tmp_path):
    """On a pseudo-terminal: tqdm's bar (steps, tok/s, loss) redrawn with \\r, the log lines above it."""
    master, slave = pty.openpty()
    # A real terminal has a size; a fresh pty is 0x0 and tqdm would draw a zero-width bar.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *ARGS, "train.max_steps=8", "train.log_every=4"]
        + [f"data.dir={train_data}", f"out_dir={tmp_path / 'run'}"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    os.close(slave)
    out = b""
    while True:
        r, _, _ = select.select([master], [], [], 300)
        if not r:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(60) == 0, proc.stderr.read().decode()[-2000:]
    text = out.decode("utf-8", "replace")
    assert "\r" in text and "8/8" in text and "tok/s, loss " in text, text[-2000:]
    assert re.search(r"step +8/8 \|.*\| eta 0\.00s", text), text[-2000:]


def test_eta_bounded_by_max_tokens():
    pr = Progress(100, 0, max_tokens=1000, tty=False)
    assert pr.eta_s(0, 0) is None  # nothing measured yet
    pr.observe(10, 0.5)
    assert pr.remaining_steps(10, 400) == 15  # 40 tokens/step: 600 left -> 15 steps, not 90
    assert pr.eta_s(100, 4000) == 0.0
    assert human_s(3.25) == "3.2s" and human_s(125) == "2m05s" and human_s(None) == "?"
    pr.close()


@pytest.mark.parametrize(
    "s,text",
    [(0, "0.00s"), (0.25, "0.25s"), (59, "59s"), (3600 * 3 + 60 * 7, "3h07m"), (86400 * 2 + 3600 * 4, "2d04h")],
)
def test_human_seconds(s, text):
    assert human_s(s) == text and _seconds(text) == pytest.approx(s, abs=0.05)
