"""train.mode=compile on every CPU ISA path torch dispatches to, in the precision `auto` picks.

Issue 12: compiled training gave NaN (or crashed with "free(): invalid next size") once a CPU
had compiled the same graph under another vector ISA. The cause is torch's: Inductor keys its
FX-graph cache without the CPU vector ISA, so C++ tiled for AVX-512 was rebuilt with AVX2 vectors
(half of every tile never written: NaN in the forward) and the other way round (every store
twice its tile: heap corruption). `bulba.hardware.use_isa_inductor_cache` gives each ISA its own
cache. Each test below runs `support/compile_worker.py` in fresh processes, one ISA path after another,
sharing one Inductor cache folder as a user's machine does; every process must get finite loss
and gradients that agree with eager PyTorch, for packed (document-masked) and stream batches.
Without the per-ISA cache the second process of either order fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import REPO as ROOT


def _native_isa() -> str:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    return subprocess.run(
        [sys.executable, "-c", "import torch; print(torch._C._get_cpu_capability().lower())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _other_isa(native: str) -> str:
    return "avx2" if native != "avx2" else "default"


def _run(isa: str | None, cache: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "BULBA_INDUCTOR_CACHE_BASE")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    if isa:
        env["ATEN_CPU_CAPABILITY"] = isa
    # a timeout, not a hang: mismatched kernels have also been seen to spin instead of crash
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])  # this checkout's bulba, support.*
    p = subprocess.run(
        [sys.executable, "-m", "support.compile_worker", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert p.returncode == 0, f"{isa or 'native'}: exit {p.returncode}\n{p.stderr[-3000:]}"
    return json.loads(out.read_text())


def _check(r: dict) -> None:
    bf16 = r["precision"] == "bf16-mixed"
    for case, c in r["cases"].items():
        where = f"{r['isa']} {r['precision']} {case}"
        assert c["finite"], f"{where}: non-finite loss or gradients: {c}"
        assert abs(c["loss_compiled"] - c["loss_eager"]) <= (2e-3 if bf16 else 1e-5) * abs(c["loss_eager"]), where
        # bf16 rounds at 3 significant digits; fused kernels round in other places than eager
        assert c["grad_rel_max"] < (0.05 if bf16 else 1e-4), f"{where}: {c}"


@pytest.mark.slow  # four processes, each compiling two small graphs: ~1-2 min each on 2 cores
@pytest.mark.parametrize("native_first", [True, False], ids=["native-then-other", "other-then-native"])
def test_compiled_matches_eager_on_each_isa_path_sharing_one_cache(tmp_path, native_first):
    native = _native_isa()
    order = [None, _other_isa(native)] if native_first else [_other_isa(native), None]
    results = [_run(isa, tmp_path / "inductor", tmp_path / f"{i}.json") for i, isa in enumerate(order)]
    assert {r["isa"] for r in results} == {native, _other_isa(native)}
    for r in results:
        assert r["attention"] == "math"  # the CPU attention of compiled blocks, masks included
        _check(r)


def test_each_isa_gets_its_own_inductor_cache(tmp_path):
    code = (
        "import os, json; from bulba.hardware import use_isa_inductor_cache as u; "
        "a = u(); b = u(); print(json.dumps([a, b, os.environ['TORCHINDUCTOR_CACHE_DIR']]))"
    )
    seen = {}
    for isa in ("avx2", "default"):
        env = {k: v for k, v in os.environ.items() if k != "BULBA_INDUCTOR_CACHE_BASE"}
        env.update(ATEN_CPU_CAPABILITY=isa, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        )
        a, b, current = json.loads(out.stdout)
        assert a == b == current, "idempotent, and set in the environment for child processes"
        seen[isa] = a
    assert seen["avx2"] != seen["default"]
    assert all(Path(p).parent == tmp_path for p in seen.values()), "inside the user's own cache folder"
