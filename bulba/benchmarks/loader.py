"""Loader benchmark: batch throughput of the Rust engine vs np.memmap and an HF DataLoader.

On one train.bin (by default the shared be/ru/en corpus, prepared once into a cache folder):

* `bulba-<sampler>-<ctx>`: tokens/s (padding not counted) of assembled batches (B=32, ctx
  1024 and 2048; bucketed: a token budget of 32 x ctx, buckets 16..ctx) from
  `bulba.data.loader.Batches`, converted to torch with `torch.from_numpy` as the trainer does, and
  each sampler's padding fraction on this corpus;
* `np-memmap-<ctx>`: nanoGPT's `get_batch` (np.memmap, random offsets, int64 torch tensors);
* `hf-dataloader-<ctx>`: an HF `datasets` dataset of the same windows through
  `torch.utils.data.DataLoader(num_workers=2, shuffle=True)`;
* `bulba-stream-rss-*`: peak RSS of a fresh process that opens the engine and iterates over a
  10 MB and a 4 GB train.bin (tiled from the corpus in a temp folder, deleted afterwards).

Goals: >= 10x np-memmap, >= 50x the DataLoader, RSS growth between the sizes < 64 MB.
Throughput is the best of 3 windows per row (`tokens_per_s`), and also tokens per CPU-second
of all the system's threads and worker processes (`tokens_per_cpu_s`), which the load of
other work on shared cores does not distort; `x_*` and `x_*_cpu` are the ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bulba.data.format import META_NAME
from bulba.data.loader import SAMPLERS
from bulba.errors import UserError

CTXS = (1024, 2048)
BATCH = 32
# Powers of two from 16: the shared corpus is one sentence per document (~17 tokens).
BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
CACHE = Path(tempfile.gettempdir()) / "bulba-loader-bench"
EXTRA: dict = {}


def add_arguments(p) -> None:
    p.add_argument("--data", help=f"prepared data dir (default: the shared corpus, prepared once into {CACHE}/corpus)")
    p.add_argument(
        "--corpus",
        default=str(Path(__file__).resolve().parents[3] / "shared" / "corpus"),
        help="folder with be.txt ru.txt en.txt (default: %(default)s)",
    )
    p.add_argument(
        "--seconds", type=float, default=3.0, help="measuring time per row, best of 3 windows (default: %(default)s)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="engine background threads (default: %(default)s, as the trainer uses; the thread that "
        "consumes batches assembles later ones itself whenever its next one is not ready)",
    )
    p.add_argument("--big-gb", type=float, default=4.0, help="size of the large train.bin for RSS (default: 4)")
    p.add_argument("--skip-rss", action="store_true", help="skip the 10 MB / 4 GB RSS measurement")
    p.add_argument("--skip-hf", action="store_true", help="skip the HF DataLoader baseline")


# ---------------------------------------------------------------------------- data


def _dataset(args) -> Path:
    if args.data:
        return Path(args.data)
    out = CACHE / "corpus"
    if (out / META_NAME).is_file():
        return out
    corpus = Path(args.corpus)
    inputs = [corpus / f"{lang}.txt" for lang in ("be", "ru", "en")]
    if not all(p.is_file() for p in inputs):
        raise UserError(f"corpus not found in {corpus}: pass --corpus DIR or --data DATA_DIR")
    from bulba.data.prepare import PrepareConfig, prepare

    print(f"preparing {corpus} into {out} (once)...", file=sys.stderr)
    prepare(
        PrepareConfig(
            inputs=[str(p) for p in inputs], out=out, tokenizer_max_mb=3.0, mlflow=False, quiet=True, force=True
        )
    )
    return out


def _cpu_seconds(with_children: bool = False) -> float:
    """CPU time of this process (all threads), plus its live child processes if asked."""
    t = time.process_time()
    if with_children:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                c = child.cpu_times()
                t += c.user + c.system
            except psutil.Error:
                pass
    return t


def _timed(make_iter, seconds: float, tokens_of, windows: int = 3, children: bool = False) -> tuple[float, float]:
    """(tokens/s, tokens per CPU-second): the best of `windows` back-to-back windows of
    `seconds / windows` each, after a short warm-up (thread/worker start-up excluded).

    The best window, for every system alike: the 2 shared cores here are busy with other
    work, which only ever slows a window down. Tokens per CPU-second (all threads, and the
    DataLoader's worker processes) does not depend on that load at all."""
    it = make_iter()
    for _ in range(3):
        next(it)
    best, best_cpu = 0.0, 0.0
    for _ in range(windows):
        n, tokens, t0, c0 = 0, 0, time.perf_counter(), _cpu_seconds(children)
        while True:
            tokens += tokens_of(next(it))
            n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds / windows and n >= 5:
                break
        cpu = _cpu_seconds(children) - c0
        best = max(best, tokens / dt)
        best_cpu = max(best_cpu, tokens / max(cpu, 1e-9))
    return best, best_cpu


# ---------------------------------------------------------------------------- systems


def _bulba(data: Path, sampler: str, ctx: int, args) -> tuple[float, float, float]:
    import warnings

    import torch

    from bulba.data.loader import Batches

    # Stream batches share read-only position_ids/seq_ids/cu_seqlens (docs/loader.md); torch
    # warns once about wrapping a read-only array. Nothing here writes to them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    b = Batches(
        data,
        sampler=sampler,
        batch_size=BATCH,
        ctx=ctx,
        seed=0,
        prefetch=8,
        workers=args.workers,
        buckets=[c for c in BUCKETS if c <= ctx],
    )

    def batches():
        for x in b:  # what the trainer does: zero-copy torch views
            yield {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in x.items()}

    # Count real tokens only: padding is not data (stream and packed have next to none).
    return (*_timed(batches, args.seconds, lambda x: x["input_ids"].numel() - x["n_pad"]), b.padding_frac)


def _memmap(bin_path: Path, dtype: str, ctx: int, args) -> tuple[float, float]:
    import torch

    def batches():  # nanoGPT train.py get_batch, minus the device transfer
        while True:
            data = np.memmap(bin_path, dtype=dtype, mode="r")
            ix = torch.randint(len(data) - ctx, (BATCH,))
            x = torch.stack([torch.from_numpy((data[i : i + ctx]).astype(np.int64)) for i in ix])
            y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + ctx]).astype(np.int64)) for i in ix])
            yield x, y

    return _timed(batches, args.seconds, lambda xy: xy[0].numel())


def _hf_dataloader(bin_path: Path, dtype: str, ctx: int, args) -> tuple[float, float]:
    import datasets
    from torch.utils.data import DataLoader

    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    n = (len(tokens) - 1) // ctx
    windows = np.lib.stride_tricks.as_strided(tokens, (n, ctx + 1), (ctx * tokens.itemsize, tokens.itemsize))
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"ids": np.ascontiguousarray(windows).astype(np.int32)})
    ds = ds.with_format("torch")

    # Persistent workers: the small corpus is many epochs, and worker start-up is not the point.
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2, drop_last=True, persistent_workers=True)

    def batches():
        while True:
            for b in loader:
                ids = b["ids"]
                yield ids[:, :-1], ids[:, 1:]

    return _timed(batches, args.seconds, lambda xy: xy[0].numel(), children=True)


# ---------------------------------------------------------------------------- RSS

_RSS_PROBE = r"""
import json, sys
from bulba.data.loader import Batches
b = Batches(sys.argv[1], sampler="stream", batch_size=32, ctx=1024, prefetch=8, workers=int(sys.argv[3]))
it = iter(b)
for _ in range(int(sys.argv[2])):
    next(it)
rss = {}
for line in open("/proc/self/status"):
    if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile")):
        k, v = line.split(":")
        rss[k] = int(v.split()[0]) / 1024
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
rss["peak"] = rss["VmHWM"]
print(json.dumps(rss))
"""


def _tile(src: Path, dst: Path, target_bytes: int) -> None:
    """A dataset dir whose train.bin is `src`'s repeated to `target_bytes` (index shifted to match)."""
    from bulba.data.format import DTYPES, open_data, write_meta

    meta = dict(open_data(src).meta)
    itemsize = DTYPES[meta["dtype"]]
    one = (src / "train.bin").read_bytes()
    idx = np.fromfile(src / "train.idx", dtype="<u8")
    n_tok = len(one) // itemsize
    reps = max(1, target_bytes // len(one))
    cut = target_bytes - reps * len(one)  # a whole number of documents from the last copy
    last_docs = int(np.searchsorted(idx, cut // itemsize, side="right") - 1)
    dst.mkdir(parents=True, exist_ok=True)
    with open(dst / "train.bin", "wb") as fb, open(dst / "train.idx", "wb") as fi:
        idx[:1].tofile(fi)
        for r in range(reps + 1):
            docs = len(idx) - 1 if r < reps else last_docs
            if docs <= 0:
                break
            fb.write(one[: int(idx[docs]) * itemsize])
            (idx[1 : docs + 1] + np.uint64(r * n_tok)).astype("<u8").tofile(fi)
    for split in ("val",):
        for ext in ("bin", "idx"):
            shutil.copy(src / f"{split}.{ext}", dst / f"{split}.{ext}")
    total = (dst / "train.bin").stat().st_size // itemsize
    docs = (dst / "train.idx").stat().st_size // 8 - 1
    meta["splits"] = dict(meta["splits"], train={"tokens": total, "documents": docs, "sha256": "tiled"})
    write_meta(dst, meta)


def _rss(data: Path, big_gb: float, workers: int, batches: int = 300) -> list[dict]:
    need = int(big_gb * 1.3 * 2**30)
    tmp_root = Path(tempfile.gettempdir())
    free = shutil.disk_usage(tmp_root).free
    if free < need + 2**30:
        print(
            f"skipping the RSS measurement: {free / 2**30:.1f} GB free in {tmp_root}, need {need / 2**30:.1f}",
            file=sys.stderr,
        )
        return []
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bulba-rss-", dir=tmp_root))
    try:
        for label, size in (("10mb", 10 * 2**20), (f"{big_gb:g}gb", int(big_gb * 2**30))):
            d = work / label
            t0 = time.perf_counter()
            _tile(data, d, size)
            made = time.perf_counter() - t0
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
            out = subprocess.run(
                [sys.executable, "-c", _RSS_PROBE, str(d), str(batches), str(workers)],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
            )
            if out.returncode:
                raise RuntimeError(f"RSS probe failed: {out.stderr.strip()[-500:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "name": f"bulba-stream-rss-{label}",
                    "sampler": "stream",
                    "ctx": 1024,
                    "train_bin_mb": round((d / "train.bin").stat().st_size / 2**20, 1),
                    "peak_rss_mb": round(r["peak"], 1),
                    "rss_anon_mb": round(r["RssAnon"], 1),
                    "rss_file_mb": round(r["RssFile"], 1),
                    "tile_seconds": round(made, 1),
                }
            )
            shutil.rmtree(d)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------- run


def run(args) -> list[dict]:
    from bulba.data.format import open_data

    data_dir = _dataset(args)
    data = open_data(data_dir)
    bin_path, dtype = data.bin_path("train"), data.dtype
    print(
        f"train.bin: {bin_path.stat().st_size / 2**20:.1f} MB, {data.split_info('train').get('tokens')} tokens",
        file=sys.stderr,
    )
    rows, base = [], {}
    for ctx in CTXS:
        systems = [("mm", f"np-memmap-{ctx}", _memmap)] + (
            [] if args.skip_hf else [("hf", f"hf-dataloader-{ctx}", _hf_dataloader)]
        )
        for key, name, fn in systems:
            tps, tpc = fn(bin_path, dtype, ctx, args)
            rows.append({"name": name, "ctx": ctx, "batch_size": BATCH, "tokens_per_s": tps, "tokens_per_cpu_s": tpc})
            base[(key, ctx)] = (tps, tpc)
    for sampler in SAMPLERS:
        for ctx in CTXS:
            tps, tpc, pad = _bulba(data_dir, sampler, ctx, args)
            row = {
                "name": f"bulba-{sampler}-{ctx}",
                "sampler": sampler,
                "ctx": ctx,
                "batch_size": BATCH,
                "tokens_per_s": tps,
                "tokens_per_cpu_s": tpc,
                "padding_frac": pad,
            }
            for key, label in (("mm", "memmap"), ("hf", "dataloader")):
                if (key, ctx) in base:
                    row[f"x_{label}"] = tps / base[(key, ctx)][0]
                    row[f"x_{label}_cpu"] = tpc / base[(key, ctx)][1]
            rows.append(row)
    if not args.skip_rss:
        rss = _rss(data_dir, args.big_gb, args.workers)
        rows += rss
        if len(rss) == 2:
            EXTRA["rss_growth_mb (goal < 64)"] = round(rss[1]["peak_rss_mb"] - rss[0]["peak_rss_mb"], 1)
    bulba_rows = [r for r in rows if r["name"].startswith("bulba-") and "x_memmap" in r]
    for label, goal in (("memmap", 10), ("dataloader", 50)):
        if any(f"x_{label}" in r for r in bulba_rows):
            for suffix, what in (("", "wall"), ("_cpu", "per CPU-second")):
                EXTRA[f"x_{label} {what}, stream / packed / bucketed (goal >= {goal})"] = " / ".join(
                    f"{min(r[f'x_{label}{suffix}'] for r in bulba_rows if r['sampler'] == s):.1f}" for s in SAMPLERS
                )
    for s in SAMPLERS:
        EXTRA[f"padding_frac {s} (shared corpus, ctx 1024/2048)"] = " / ".join(
            f"{r['padding_frac']:.4f}" for r in bulba_rows if r["sampler"] == s
        )
    EXTRA["train_bin_mb"] = round(bin_path.stat().st_size / 2**20, 1)
    return rows
