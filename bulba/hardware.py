"""Choices made by the machine: training precision, torch.compile's CPU code cache, threads.

Every choice here is measured or proven on the machine it runs on, never guessed from CPU flags
alone, and comes with a one-line reason that the trainer prints and logs as an MLflow tag:

- `choose_precision`: on CUDA, bf16 where the GPU has it. On CPU, a short probe times this
  model's own matmul shapes in fp32 and in bf16 and picks the faster (cached per machine, torch
  version, ISA path, thread count and shapes). The flags cannot tell: an AMD EPYC with
  AVX512-BF16 ran bf16 ~2x faster than fp32, an Intel Xeon with the same flags and no AMX ran it
  at about half the fp32 rate (2048^3 on 2 threads: 158 vs 314 GFLOP/s).
- `use_isa_inductor_cache`: torch.compile on CPU gets a code cache of its own per vector ISA.
  Inductor (torch 2.15) keys its FX-graph cache without the CPU vector ISA, although the C++ it
  generates is tiled for one vector width: a graph generated under AVX-512 and reused under
  `ATEN_CPU_CAPABILITY=avx2` is recompiled with 8-lane vectors for 16-element tiles, so half of
  every tile is never written (uninitialised memory: NaN in the forward); the other way round
  every store writes twice its tile (heap corruption, "free(): invalid next size", and with
  several threads garbage in a neighbour's rows: NaN gradients, or a hang). The scalar path
  (`ATEN_CPU_CAPABILITY=default`) compiles and trains too once it has a cache of its own.
  tests/integration/test_compile_isa.py reproduces both orders.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PROBE_VERSION = 1
# bf16 must beat fp32 by this much to be chosen: the probe times bare matmuls, while bf16
# training also pays the fp32 -> bf16 weight casts of autocast, and fp32 is exact.
BF16_MARGIN = 1.15


# --------------------------------------------------------------------------- the machine


def cpu_isa() -> str:
    """The vector ISA torch's CPU kernels dispatch to: 'avx512', 'avx2', 'default', ... (lowercase).
    Follows ATEN_CPU_CAPABILITY, so it is the ISA that really runs, not just what the CPU has."""
    try:
        return torch._C._get_cpu_capability().lower()
    except Exception:  # noqa: BLE001 - very old or unusual builds
        return "unknown"


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bulbagpt"


# --------------------------------------------------------------------------- torch.compile on CPU

_INDUCTOR_BASE_ENV = "BULBA_INDUCTOR_CACHE_BASE"


def use_isa_inductor_cache() -> str:
    """Point Inductor's cache at a folder of its own for the ISA in use (see the module doc).

    Idempotent, and inherited by child processes without nesting: the user's base folder
    (TORCHINDUCTOR_CACHE_DIR, else Inductor's default) is remembered in BULBA_INDUCTOR_CACHE_BASE.
    Returns the folder."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = os.environ.get(_INDUCTOR_BASE_ENV) or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    os.environ[_INDUCTOR_BASE_ENV] = base
    path = os.path.join(base, f"isa-{cpu_isa()}")
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != path:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        try:  # drop in-memory caches that still point at the old folder
            from torch._inductor.utils import clear_caches

            clear_caches()
        except Exception:  # noqa: BLE001 - a torch without it has no such caches
            pass
    return path


# --------------------------------------------------------------------------- precision


@dataclass
class Choice:
    value: str
    reason: str


def _matmul_shapes(cfg, tokens: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of the forward matmuls of one step: per layer wq, wk+wv, wo, w1+w3, w2,
    then the output projection. The backward repeats each shape twice more (transposed)."""
    M = max(64, min(tokens, 2048))  # enough rows for a steady rate, short enough to stay quick
    D, L, hd = cfg.n_embd, cfg.n_layer, cfg.head_dim
    return [
        (M, D, cfg.n_head * hd, L),
        (M, D, cfg.n_kv_head * hd, 2 * L),
        (M, cfg.n_head * hd, D, L),
        (M, D, cfg.ffn_hidden, 2 * L),
        (M, cfg.ffn_hidden, D, L),
        (M, D, cfg.vocab_size, 1),
    ]


def _time_matmuls(M: int, K: int, N: int, budget_s: float) -> dict[str, float]:
    """Seconds per (M x K) @ (K x N) matmul in fp32 and in bf16: the medians of repeats that
    alternate between the two, so that load from other processes slows both alike."""
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    args = {"fp32": (a32, b32), "bf16": (a32.bfloat16(), b32.bfloat16())}
    for a, b in args.values():
        torch.nn.functional.linear(a, b)  # warm-up: oneDNN primitive creation, page faults
    times: dict[str, list[float]] = {name: [] for name in args}
    end = time.perf_counter() + budget_s
    while len(times["fp32"]) < 3 or (time.perf_counter() < end and len(times["fp32"]) < 50):
        for name, (a, b) in args.items():
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, b)
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def probe_cpu_precision(cfg, tokens: int, budget_s: float = 1.5) -> dict:
    """Time this model's matmul shapes in fp32 and bf16 on this CPU (~budget_s seconds)."""
    shapes = _matmul_shapes(cfg, tokens)
    total = {"fp32": 0.0, "bf16": 0.0}
    flop = 0.0
    for M, K, N, count in shapes:
        for name, t in _time_matmuls(M, K, N, budget_s / len(shapes)).items():
            total[name] += count * t
        flop += count * 2.0 * M * K * N
    return {name: {"seconds": t, "gflops": flop / t / 1e9} for name, t in total.items()}


def _probe_key(cfg, tokens: int) -> str:
    return _machine_key("matmuls", _matmul_shapes(cfg, tokens))


def _machine_key(*parts) -> str:
    parts = (PROBE_VERSION, cpu_model(), cpu_isa(), torch.__version__, torch.get_num_threads()) + parts
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def _cached(key: str, compute) -> tuple[dict, bool]:
    """`compute()` once per machine key, kept in ~/.cache/bulbagpt/precision-probe.json. (result, cached).

    Under a file lock: DDP ranks on one machine start together, and they must not probe at
    once (each would slow the other's timing) nor choose different precisions."""
    import fcntl

    from bulba.atomic import write_json

    path = cache_root() / "precision-probe.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 - held until the end of the block
    except OSError:
        lock = None  # a read-only home: probe without a cache
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cache = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(cache, dict):
                cache = {}
        except (OSError, ValueError):
            cache = {}
        if isinstance(cache.get(key), dict) and {"fp32", "bf16"} <= set(cache[key]):
            return cache[key], True
        result = compute()
        cache[key] = dict(
            result, cpu=cpu_model(), isa=cpu_isa(), torch=torch.__version__, threads=torch.get_num_threads()
        )
        if lock is not None:
            try:
                write_json(path, cache)
            except OSError:
                pass  # probe again next time
        return result, False
    finally:
        if lock is not None:
            lock.close()


def _cached_probe(cfg, tokens: int) -> tuple[dict, bool]:
    return _cached(_probe_key(cfg, tokens), lambda: probe_cpu_precision(cfg, tokens))


def measured_peak_flops(precision: str) -> float:
    """The best dense matmul rate this CPU reaches in `precision` (2048^3, FLOP/s), measured once
    per machine, ISA path, torch version and thread count. A floor under the true peak: MFU
    against the data-sheet peak alone read over 100% on an AMD EPYC, whose /proc/cpuinfo clock
    is the nominal one while it runs at boost clocks."""
    n = 2048

    def compute():
        t = _time_matmuls(n, n, n, budget_s=1.0)
        return {name: {"seconds": s, "gflops": 2.0 * n**3 / s / 1e9} for name, s in t.items()}

    r, _ = _cached(_machine_key("peak", n), compute)
    return r["bf16" if precision.startswith("bf16") else "fp32"]["gflops"] * 1e9


def _cpu_bf16_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001
        return False


def choose_precision(requested: str, accelerator: str, cfg, tokens: int) -> Choice:
    """Resolve `train.precision` ('auto' | 'bf16-mixed' | '32-true') and say why."""
    if requested != "auto":
        return Choice(requested, "set in the recipe (train.precision)")
    if accelerator == "cuda":
        if torch.cuda.is_bf16_supported():
            return Choice("bf16-mixed", "auto: the GPU has bf16 tensor cores")
        return Choice("32-true", "auto: the GPU has no bf16")
    if not _cpu_bf16_available():
        return Choice("32-true", f"auto: no native bf16 matmul on this CPU ({cpu_isa()} path)")
    r, cached = _cached_probe(cfg, tokens)
    ratio = r["fp32"]["seconds"] / r["bf16"]["seconds"]
    value = "bf16-mixed" if ratio >= BF16_MARGIN else "32-true"
    how = "cached probe" if cached else "probe"
    return Choice(
        value,
        f"auto: {how} of this model's matmuls on {cpu_model()} ({cpu_isa()}, "
        f"{torch.get_num_threads()} threads): bf16 {r['bf16']['gflops']:.0f} vs fp32 "
        f"{r['fp32']['gflops']:.0f} GFLOP/s ({ratio:.2f}x; bf16 needs {BF16_MARGIN}x)",
    )


def thread_reason(requested: int) -> str:
    n = torch.get_num_threads()
    if requested:
        return f"{n} (train.threads)"
    return f"{n} (torch's default: one per physical core; set train.threads to change)"
