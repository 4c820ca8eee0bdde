"""Encoding throughput and peak RSS: prepare's encoding stage vs datasets.map + numpy.

The shared corpus (be/ru/en) is repeated into one text file of at least --mb MB (in a
temporary directory, deleted afterwards) and a 32003-token tokenizer is trained on the
original corpus. Then each system turns that same text file into token ids on disk with
the same tokenizer, each in its own subprocess so peak RSS is its own:

- bulba-prepare: `prepare.py FILE --tokenizer tokenizer.json` (scan, NFC, encode in
  blocks in worker processes, write train/val .bin/.idx and meta.json; no MLflow); its
  peak RSS is the parent's plus every worker's;
- hf-datasets-map: `datasets.load_dataset("text")`, `.map(tokenizer, batched=True)` with
  the same tokenizer as a transformers fast tokenizer, then `np.concatenate` of the ids
  and one `.tofile` (the usual nanoGPT-style recipe).

mb_per_s is MB of input text per second of wall time, including reading and writing;
cpu_seconds counts all threads and child processes (a fairer figure on a shared machine).
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

from bulba.memory import peak_rss_mb

REPO = Path(__file__).resolve().parents[2]
EXTRA: dict = {}


def default_corpus() -> Path:
    env = os.environ.get("BULBA_CORPUS")
    return Path(env) if env else REPO.parent / "shared" / "corpus"


def add_arguments(p) -> None:
    p.add_argument("--mb", type=float, default=200.0, help="size of the repeated corpus in MB (default %(default)s)")
    p.add_argument(
        "--corpus", type=Path, default=None, help="folder with be.txt ru.txt en.txt (default ../shared/corpus)"
    )
    p.add_argument("--vocab-size", type=int, default=32003, help="tokenizer size (default %(default)s)")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the big temporary file goes")
    p.add_argument("--systems", default="bulba-prepare,hf-datasets-map", help="comma-separated rows to run")


def _make_corpus(src: Path, dst: Path, mb: float) -> int:
    files = [src / f"{lang}.txt" for lang in ("be", "ru", "en")]
    from bulba.errors import UserError

    if not all(f.is_file() for f in files):
        raise UserError(f"corpus not found: {src} needs be.txt, ru.txt, en.txt (set --corpus or BULBA_CORPUS)")
    parts = [f.read_bytes().rstrip(b"\n") + b"\n" for f in files]
    block = b"".join(parts)
    n = 0
    with open(dst, "wb") as f:
        while n < mb * 1e6:
            f.write(block)
            n += len(block)
    return n


def _train_tokenizer(src: Path, out: Path, vocab_size: int) -> None:
    from bulba.data.prepare import PrepareConfig, prepare

    prepare(
        PrepareConfig(
            inputs=[str(src / f"{lang}.txt") for lang in ("be", "ru", "en")],
            out=out,
            vocab_size=vocab_size,
            tokenizer_max_mb=64,
            mlflow=False,
            quiet=True,
        )
    )


def run(args) -> list[dict]:
    corpus = args.corpus or default_corpus()
    work = Path(tempfile.mkdtemp(prefix="bulba-bench-prepare-", dir=args.tmp))
    rows = []
    try:
        text = work / "corpus.txt"
        nbytes = _make_corpus(corpus, text, args.mb)
        t0 = time.time()
        _train_tokenizer(corpus, work / "tok", args.vocab_size)
        print(
            f"corpus {nbytes / 1e6:.0f} MB in {text}; tokenizer ({args.vocab_size}) trained in "
            f"{time.time() - t0:.0f} s",
            file=sys.stderr,
        )
        tok = work / "tok" / "tokenizer.json"
        results = {}
        for system in args.systems.split(","):
            out = work / system
            cmd = [sys.executable, "-m", "bulba.benchmarks.prepare", system, str(text), str(tok), str(out)]
            env = dict(
                os.environ,
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                HF_DATASETS_CACHE=str(work / "hf-cache"),
                HF_HUB_OFFLINE="1",
            )
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{system} failed:\n{r.stderr[-3000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            results[system] = res
            rows.append(
                {
                    "name": system,
                    "mb_per_s": nbytes / 1e6 / res["seconds"],
                    "peak_rss_mb": res["peak_rss_mb"],
                    "seconds": res["seconds"],
                    "tokens_per_s": res["text_tokens"] / res["seconds"],
                    "cpu_seconds": res["cpu_s"],
                    "mb_per_cpu_s": nbytes / 1e6 / res["cpu_s"],
                    "tokens": res["text_tokens"],
                }
            )
            print(f"{system}: {rows[-1]['mb_per_s']:.2f} MB/s, peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
        EXTRA.clear()
        EXTRA.update({"corpus_mb": round(nbytes / 1e6, 1), "vocab_size": args.vocab_size})
        if {"bulba-prepare", "hf-datasets-map"} <= results.keys():
            b, h = results["bulba-prepare"], results["hf-datasets-map"]
            EXTRA["speedup"] = round(h["seconds"] / b["seconds"], 2)
            EXTRA["rss_ratio"] = round(b["peak_rss_mb"] / h["peak_rss_mb"], 3)
            EXTRA["cpu_ratio"] = round(h["cpu_s"] / b["cpu_s"], 2)
            # prepare strips each line's outer whitespace; the baseline keeps it
            EXTRA["token_count_difference"] = f"{(b['text_tokens'] - h['text_tokens']) / h['text_tokens']:+.5%}"
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the big file never outlives the run
    return rows


# ---------------------------------------------------------------------------- workers (subprocesses)


def _cpu_s() -> float:
    import resource

    return sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def worker_bulba(text: str, tok: str, out: str) -> dict:
    from bulba.data.prepare import PrepareConfig, prepare

    t0, c0 = time.perf_counter(), _cpu_s()
    meta = prepare(PrepareConfig(inputs=[text], out=Path(out), tokenizer=Path(tok), mlflow=False, quiet=True))
    seconds = time.perf_counter() - t0
    docs = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    # the encoding workers are separate processes: their peaks count too
    rss = peak_rss_mb() + meta["_workers_peak_rss_mb"]
    return {"seconds": seconds, "text_tokens": tokens - 2 * docs, "peak_rss_mb": rss, "cpu_s": _cpu_s() - c0}


def worker_hf(text: str, tok: str, out: str) -> dict:
    import datasets
    import numpy as np
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    t0, c0 = time.perf_counter(), _cpu_s()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=tok)
    ds = datasets.load_dataset("text", data_files=text, split="train")
    ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)  # as prepare: no empty documents
    ds = ds.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    # numpy concatenation of the Arrow chunks (flattened without a Python object per row):
    # the fastest way to get the ids out; `np.concatenate(ds.with_format("numpy")["input_ids"])`
    # as in nanoGPT's prepare.py makes one array per row and is several times slower.
    ids = np.concatenate([c.flatten().to_numpy() for c in ds.data.column("input_ids").chunks]).astype(np.uint16)
    Path(out).mkdir(parents=True, exist_ok=True)
    ids.tofile(Path(out) / "train.bin")
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "text_tokens": int(ids.size) - len(ds),
        "peak_rss_mb": peak_rss_mb(),
        "cpu_s": _cpu_s() - c0,
    }


if __name__ == "__main__":
    system, text, tok, out = sys.argv[1:5]
    fn = {"bulba-prepare": worker_bulba, "hf-datasets-map": worker_hf}[system]
    print(json.dumps(fn(text, tok, out)))
