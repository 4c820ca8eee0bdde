"""prepare: raw corpus → tokenizer.json + train/val token streams + document index + meta.json.

Stages (each streams the corpus; memory is bounded by the block size, not the corpus):
1. resolve and scan the inputs: every file is hashed and checked (UTF-8, not binary) before
   any heavy work, so a bad file fails in seconds, not after an hour of encoding;
2. train the tokenizer (or load `--tokenizer`) on a weighted sample capped by
   `--tokenizer-max-mb`;
3. encode: the parent reads blocks of documents (~`--block-mb`) and hands them to worker
   processes (`bulba.data.encoding.encode_block`: split key, weights, statistics, token ids via
   `DocumentEncoder`), at most two blocks per worker in flight — or runs that itself on
   small corpora and on 2 CPUs; results come back in order as compact arrays and are
   appended to `train.bin`/`val.bin` and their `.idx`, all inside a temporary directory
   renamed into place only when complete;
4. meta.json (written last) and the MLflow run, which never fails the prepare.

Split: a document goes to val when a seeded hash of its text falls below `--val-fraction`, so
the split is deterministic, identical documents always land on the same side, and repeats
made by weights can never leak from train into val. Val holds each document once (it
measures every source at its natural size); weights shape only train.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from bulba.atomic import TMP_PREFIX, atomic_dir, sha256_file
from bulba.data import corpus as C
from bulba.data.encoding import Keyer, encode_block, init_worker
from bulba.data.format import META_NAME, SOURCES_VERSION, SplitWriter, new_meta, token_dtype, write_meta
from bulba.data.tokenizer import (
    BOS,
    DEFAULT_VOCAB,
    EOS,
    SPECIAL_TOKENS,
    check_tokenizer,
    check_vocab_size,
    load_tokenizer,
    tokenizer_file,
    train_tokenizer,
)
from bulba.errors import UserError

DEFAULT_EXPERIMENT = "bulbagpt-prepare"


@dataclass
class PrepareConfig:
    inputs: list[str]
    out: Path
    vocab_size: int = DEFAULT_VOCAB
    val_fraction: float = 0.01
    text_field: str = "text"
    tokenizer: Path | None = None
    tokenizer_max_mb: float = 512.0
    min_frequency: int = 2
    seed: int = 0
    force: bool = False
    mlflow: bool = True
    experiment: str = DEFAULT_EXPERIMENT
    block_mb: float = 0.5
    encoder: str = "cached"  # "cached" (DocumentEncoder's fast path) or "tokenizers" (Rust encode_batch)
    workers: int | None = None  # encoding processes; None: see resolve_workers; 0: in-process
    progress: bool | None = None  # None: only on a terminal
    quiet: bool = False
    format: str = "text"  # "text" (documents) or "chat" (conversations + loss mask: bulba.data.prepare_chat)
    messages_field: str = "messages"  # chat: the field holding a conversation's messages
    ctx_len: int = 256  # chat: longer conversations are skipped (counted)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------- checks


def check_output(out: Path, force: bool) -> None:
    """Refuse to clobber a dataset (or any non-empty folder) and fail early if unwritable."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        if not force:
            if (out / META_NAME).exists():
                raise UserError(f"--out {out} already holds a dataset (meta.json); pass --force to replace it")
            if any(out.iterdir()):
                raise UserError(f"--out {out} exists and is not empty; pass --force to replace it")
    # Probe the nearest existing ancestor: the dataset is built beside `out` and renamed.
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        d = tempfile.mkdtemp(prefix=TMP_PREFIX + "probe.", dir=probe)
        os.rmdir(d)
    except OSError as e:
        raise UserError(f"cannot write --out {out}: {e.strerror or e} ({probe})") from None


# ---------------------------------------------------------------------------- tokenizer input


def training_texts(sources: list[C.Input], cfg: PrepareConfig, bar=None) -> Iterator[list[str]]:
    """Documents for the BPE trainer: each source repeated/sampled by weight × a common scale
    that fits the whole mix into `--tokenizer-max-mb` (sampling, not a prefix: parts of a
    file can differ a lot)."""
    cap = cfg.tokenizer_max_mb * 1e6
    weighted = sum(s.weight * (s.nbytes or cap) for s in sources)
    scale = min(1.0, cap / weighted) if weighted > 0 else 1.0
    keyer = Keyer(cfg.seed)
    fed = 0
    for s in sources:
        m = s.weight * scale
        if m <= 0:
            continue
        for docs in C.iter_documents(s, cfg.text_field, int(cfg.block_mb * 1e6)):
            out = []
            for d in docs:
                raw = d.encode()
                frac = m - math.floor(m)
                n = math.floor(m) + (frac > 0 and keyer.weight(raw) < frac)
                if n:
                    out.extend([d] * n)
                    fed += n * len(raw)
            if bar is not None:
                bar.update(sum(len(d) for d in out))
            if out:
                yield out
            if fed > cap * 1.05:
                return


# ---------------------------------------------------------------------------- writing


@dataclass
class Stats:
    """Per-source and per-language counts (natural sizes: each document once, no BOS/EOS)."""

    sources: list[dict] = field(default_factory=list)
    languages: dict = field(default_factory=dict)
    min_u: float = 1.0
    workers_rss_mb: dict = field(default_factory=dict)  # worker pid → its peak RSS


class BlockRunner:
    """Runs `encode_block` over jobs, in order, in `n` spawned worker processes (0: here),
    with at most 2 blocks per worker in flight so memory stays bounded. ("spawn" re-imports
    the caller's main module: scripts calling `prepare()` with workers need the usual
    `if __name__ == "__main__":` guard, as prepare.py has.)"""

    def __init__(self, n: int, tokenizer_json: str, fast: bool, seed: int):
        self.n = n
        self.pool = None
        if n > 0:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(n, initializer=init_worker, initargs=(tokenizer_json, fast, seed))
        else:
            init_worker(tokenizer_json, fast, seed)

    def run(self, jobs: Iterable[tuple]) -> Iterator[tuple]:
        """jobs yield (tag, job); results come back as (tag, result) in the same order."""
        if self.pool is None:
            for tag, job in jobs:
                yield tag, encode_block(job)
            return
        pending: deque = deque()
        for tag, job in jobs:
            pending.append((tag, self.pool.apply_async(encode_block, (job,))))
            if len(pending) >= 2 * self.n:
                t, r = pending.popleft()
                yield t, r.get()
        while pending:
            t, r = pending.popleft()
            yield t, r.get()

    def close(self, ok: bool = True) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None


def resolve_workers(cfg: PrepareConfig, total_bytes: int) -> int:
    if cfg.workers is not None:
        return max(0, cfg.workers)
    if total_bytes < 16e6:  # starting processes costs more than it saves
        return 0
    # The parent reads and writes on one core. One worker only moves the same work to
    # another process (measured slower on 2 CPUs, and a second tokenizer's memory).
    n = min((os.cpu_count() or 1) - 1, 16)
    return n if n >= 2 else 0


def encode_corpus(
    sources: list[C.Input], tokenizer_json: str, folder: Path, val_threshold: float, cfg: PrepareConfig, dtype
) -> tuple[dict, Stats]:
    """Stream every source, block by block, through the workers into FOLDER/{train,val}.{bin,idx}."""
    train, val = SplitWriter(folder, "train", dtype), SplitWriter(folder, "val", dtype)
    stats = Stats()
    block = int(cfg.block_mb * 1e6)
    total = sum(s.nbytes * max(1.0, s.weight) for s in sources)
    bar = _bar(total or None, "encoding", cfg)
    src_stats = []
    for s in sources:
        src_stats.append(
            {
                "name": s.name,
                "path": s.location,
                "kind": s.kind,
                "weight": s.weight,
                "documents": 0,
                "tokens": 0,
                "words": 0,
                "bytes": 0,
                "language": s.language,
                "train_tokens": 0,
                "val_tokens": 0,
                "sha256": s.sha256,
                # per split: documents, tokens (BOS/EOS included) and UTF-8 bytes as written;
                # val also where the source's (contiguous) documents start (SOURCES_VERSION)
                "splits": {
                    "train": {"documents": 0, "tokens": 0, "bytes": 0},
                    "val": {"first_document": None, "documents": 0, "tokens": 0, "bytes": 0},
                },
            }
        )
    stats.sources = src_stats

    def jobs():
        for i, s in enumerate(sources):
            for k in range(max(1, math.ceil(s.weight))):  # pass k writes the k-th copy of each document
                for docs in C.iter_documents(s, cfg.text_field, block):
                    yield (i, k), (docs, k, s.weight, val_threshold, s.language, s.kind == "code")

    runner = BlockRunner(resolve_workers(cfg, total), tokenizer_json, cfg.encoder == "cached", cfg.seed)
    ok = False
    try:
        for (i, k), r in runner.run(jobs()):
            st = src_stats[i]
            flat = np.frombuffer(r["flat"], dtype=np.uint32)
            lengths = np.frombuffer(r["lengths"], dtype=np.int64)
            dest = np.frombuffer(r["dest"], dtype=np.int8)
            sp = st["splits"]
            if sp["val"]["first_document"] is None:  # sources are written one after another
                sp["val"]["first_document"] = val.documents
            for name, w, to in (("train", train, 0), ("val", val, 1)):
                n = w.write(flat, lengths, dest == to)
                st[f"{name}_tokens"] += n
                sp[name]["tokens"] += n
                sp[name]["documents"] += int((dest == to).sum())
                sp[name]["bytes"] += r["split_bytes"][to]
            if k == 0:
                stats.min_u = min(stats.min_u, r["min_u"])
                if "lang_docs" in r:
                    for j in np.flatnonzero(np.asarray(r["lang_docs"])):
                        a = stats.languages.setdefault(
                            C.LANGUAGES[j], {"documents": 0, "words": 0, "tokens": 0, "bytes": 0}
                        )
                        for key in ("documents", "words", "tokens", "bytes"):
                            a[key] += int(r["lang_" + ("docs" if key == "documents" else key)][j])
                    st["documents"] += sum(r["lang_docs"])
                    st["words"] += sum(r["lang_words"])
                    st["tokens"] += sum(r["lang_tokens"])
                    st["bytes"] += sum(r["lang_bytes"])
            stats.workers_rss_mb[r["pid"]] = max(stats.workers_rss_mb.get(r["pid"], 0.0), r["rss_mb"])
            if bar is not None:
                bar.update(r["nbytes"])
        ok = True
    finally:
        runner.close(ok)
        if bar is not None:
            bar.close()
    stats.workers_rss_mb.pop(os.getpid(), None)  # in-process: already this process's RSS
    return {"train": train.close(), "val": val.close()}, stats


def _bar(total, desc, cfg):
    if cfg.quiet:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=None if cfg.progress is None else not cfg.progress,
        dynamic_ncols=True,
    )


# ---------------------------------------------------------------------------- main flow


def dataset_digest(tokenizer_sha: str, splits: dict) -> str:
    """sha256 over the tokenizer and both splits, truncated to 32 hex digits (128 bits) so the
    same string fits MLflow's dataset digest column (36 characters)."""
    h = hashlib.sha256(f"{tokenizer_sha}\n{splits['train']['sha256']}\n{splits['val']['sha256']}".encode())
    return h.hexdigest()[:32]


def prepare(cfg: PrepareConfig) -> dict:
    if cfg.format == "chat":
        from bulba.data.prepare_chat import prepare_chat

        return prepare_chat(cfg)
    if cfg.format != "text":
        raise UserError(f"--format must be text or chat, got {cfg.format!r}")
    t0 = time.time()
    out = Path(cfg.out)
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.tokenizer is None:
        check_vocab_size(cfg.vocab_size)
    if not cfg.tokenizer_max_mb > 0:  # also NaN
        raise UserError("--tokenizer-max-mb must be positive")
    if not (cfg.block_mb > 0 and math.isfinite(cfg.block_mb)):
        raise UserError(f"--block-mb must be a positive number, got {cfg.block_mb}")
    if not 0 <= cfg.min_frequency < 2**63:
        raise UserError(f"--min-frequency must be in [0, 2**63), got {cfg.min_frequency}")
    check_output(out, cfg.force)
    sources, skipped = C.resolve_inputs(cfg.inputs)
    for s in sources:
        C.scan_source(s)
    if sum(s.nbytes for s in sources) == 0 and not any(s.kind == "hf-hub" for s in sources):
        raise UserError(f"empty corpus: the inputs ({', '.join(cfg.inputs)}) hold no text")
    if skipped and not cfg.quiet:
        warn(f"skipped {skipped} file(s) of unknown type inside the input directories")
    t_scan = time.time()

    if cfg.tokenizer is not None:
        tok = load_tokenizer(tokenizer_file(cfg.tokenizer))
        if cfg.vocab_size not in (None, DEFAULT_VOCAB) and tok.get_vocab_size() != cfg.vocab_size:
            raise UserError(
                f"--tokenizer has {tok.get_vocab_size()} tokens but --vocab-size {cfg.vocab_size} was asked"
            )
    else:
        cap = cfg.tokenizer_max_mb * 1e6
        weighted = sum(s.weight * (s.nbytes or cap) for s in sources)
        bar = _bar(min(cap, weighted), "tokenizer", cfg)
        counter = {"docs": 0}
        notes: list[str] = []  # warnings wait until we know the corpus is not empty

        def texts():
            for docs in training_texts(sources, cfg, bar):
                counter["docs"] += len(docs)
                yield docs

        tok = train_tokenizer(
            texts(),
            cfg.vocab_size,
            cfg.min_frequency,
            show_progress=bool(bar is not None and not bar.disable),
            warn=notes.append,
        )
        if bar is not None:
            bar.close()
        if counter["docs"] == 0:
            if all(s.weight == 0 for s in sources):
                raise UserError("every input has weight 0: nothing to train on")
            raise UserError(f"empty corpus: the inputs ({', '.join(cfg.inputs)}) hold no text")
        for n in notes if not cfg.quiet else ():
            warn(n)
    specials = check_tokenizer(tok)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    t_tok = time.time()

    had_dataset = (out / META_NAME).is_file()
    holder = [tok]
    del tok  # _write_dataset drops it once the workers have the JSON: keeps this process small
    try:
        return _write_dataset(cfg, out, holder, specials, vocab_size, dtype, sources, (t0, t_scan, t_tok))
    except OSError as e:  # disk full / file too large while writing: atomic_dir removed the partial copy
        name = Path(e.filename).name if getattr(e, "filename", None) else None
        where = out / name if name else out
        keep = f"the previous dataset in {out} is intact" if had_dataset else f"nothing was left in {out}"
        raise UserError(
            f"cannot write {where} ({e.strerror or e}); {keep}; free space (or raise the file size "
            "limit) and run prepare.py again"
        ) from None


def _write_dataset(
    cfg: PrepareConfig,
    out: Path,
    holder: list,
    specials: dict,
    vocab_size: int,
    dtype: str,
    sources: list,
    times: tuple,
) -> dict:
    """Steps 3-4 inside a temporary directory renamed to `out` when complete (OSError on a full disk)."""
    t0, t_scan, t_tok = times
    tok = holder.pop()
    with atomic_dir(out) as tmp:
        try:
            tok.save(str(tmp / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own type on I/O errors
            raise OSError(0, str(e).splitlines()[0] if str(e) else "write failed", "tokenizer.json") from None
        tokenizer_json = tok.to_str()
        del tok  # the workers build their own encoder: keeps this process small
        splits, stats = encode_corpus(sources, tokenizer_json, tmp, cfg.val_fraction, cfg, dtype)
        ndocs = splits["train"]["documents"] + splits["val"]["documents"]
        if sum(s["documents"] for s in stats.sources) == 0:
            raise UserError(f"empty corpus: the inputs ({', '.join(cfg.inputs)}) hold no text")
        if cfg.val_fraction > 0 and splits["val"]["documents"] == 0 and ndocs >= 2:
            # A tiny corpus can miss val by chance: move the document with the smallest key
            # there, still deterministically, and write the streams again.
            splits, stats = encode_corpus(sources, tokenizer_json, tmp, math.nextafter(stats.min_u, 1.0), cfg, dtype)
        if splits["train"]["documents"] == 0:
            raise UserError("the train split is empty: give more text, lower --val-fraction, or raise the weights")
        t_enc = time.time()
        tok_sha = sha256_file(tmp / "tokenizer.json")
        meta = new_meta(
            dtype=dtype,
            vocab_size=vocab_size,
            splits=splits,
            bos_id=specials[BOS],
            eos_id=specials[EOS],
            pad_id=specials[EOS],
            special_tokens={t: specials[t] for t in SPECIAL_TOKENS},
            add_bos_token=True,
            sources=stats.sources,
            sources_version=SOURCES_VERSION,
            languages={
                k: dict(v, tokens_per_word=round(v["tokens"] / v["words"], 4) if v["words"] else None)
                for k, v in sorted(stats.languages.items())
            },
            tokenizer_sha256=tok_sha,
            inputs_sha256=hashlib.sha256("\n".join(f"{s.sha256} {s.weight:g}" for s in sources).encode()).hexdigest(),
            dataset_digest=dataset_digest(tok_sha, splits),
            params={
                "val_fraction": cfg.val_fraction,
                "text_field": cfg.text_field,
                "seed": cfg.seed,
                "tokenizer_max_mb": cfg.tokenizer_max_mb,
                "min_frequency": cfg.min_frequency,
                "tokenizer": str(cfg.tokenizer) if cfg.tokenizer else None,
                "inputs": list(cfg.inputs),
            },
            timings_s={
                "scan": round(t_scan - t0, 3),
                "tokenizer": round(t_tok - t_scan, 3),
                "encode": round(t_enc - t_tok, 3),
            },
            mlflow_run_id=None,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        run = _start_mlflow(cfg, meta, tmp, out) if cfg.mlflow else None
        if run is not None:
            meta["mlflow_run_id"] = run
        write_meta(tmp, meta)  # last: it marks the dataset complete
        if run is not None:
            _finish_mlflow(tmp)
    meta["_seconds"] = time.time() - t0
    meta["_workers_peak_rss_mb"] = sum(stats.workers_rss_mb.values())
    if not cfg.quiet:
        print(summary(meta, out))
    return meta


# ---------------------------------------------------------------------------- MLflow


def _start_mlflow(cfg: PrepareConfig, meta: dict, tmp: Path, out: Path) -> str | None:
    """Log the run; any failure becomes a warning (the dataset matters more than the log)."""
    # A dead tracking server would otherwise retry for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    try:
        from bulba.tracking import check_reachable, setup_mlflow

        check_reachable("cannot log the dataset")
        mlflow = setup_mlflow(cfg.experiment)
        run = mlflow.start_run(run_name=f"prepare-{out.name}")
        mlflow.set_tags(
            {
                "bulba.stage": "prepare",
                "bulba.dataset_digest": meta["dataset_digest"],
                "bulba.data_dir": str(out.resolve()),
            }
        )
        mlflow.log_params(
            {
                "inputs": " ".join(cfg.inputs)[:500],
                "out": str(out)[:500],
                "vocab_size": meta["vocab_size"],
                "dtype": meta["dtype"],
                "val_fraction": cfg.val_fraction,
                "text_field": cfg.text_field,
                "tokenizer_max_mb": cfg.tokenizer_max_mb,
                "min_frequency": cfg.min_frequency,
                "seed": cfg.seed,
                "tokenizer": str(cfg.tokenizer) if cfg.tokenizer else "trained",
                "n_sources": len(meta["sources"]),
            }
        )
        metrics = {
            f"{split}_{k}": float(v)
            for split, d in meta["splits"].items()
            for k, v in d.items()
            if not k.endswith("sha256")
        }
        for lang, d in meta["languages"].items():
            for k in ("documents", "words", "tokens", "bytes"):
                metrics[f"{lang}_{k}"] = float(d[k])
            if d["tokens_per_word"] is not None:
                metrics[f"fertility_{lang}"] = float(d["tokens_per_word"])
        for k, v in meta["timings_s"].items():
            metrics[f"seconds_{k}"] = float(v)
        mlflow.log_metrics(metrics)
        _log_dataset_input(mlflow, meta, out)
        mlflow.log_artifact(str(tmp / "tokenizer.json"))
        return run.info.run_id
    except Exception as e:  # noqa: BLE001 - tracking must never fail a prepare
        warn(
            f"MLflow logging failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            f"the dataset is written anyway"
        )
        _end_run("FAILED")
        return None


def _log_dataset_input(mlflow, meta: dict, out: Path) -> None:
    from bulba.tracking.lineage import dataset_input

    ds = dataset_input(out, meta["dtype"], meta["dataset_digest"])
    mlflow.log_input(ds, context="prepare", tags={"bulba.format": f"{meta['format']}/{meta['version']}"})


def _finish_mlflow(tmp: Path) -> None:
    try:
        import mlflow

        mlflow.log_artifact(str(tmp / META_NAME))
        mlflow.end_run()
    except Exception as e:  # noqa: BLE001
        warn(f"MLflow logging failed ({type(e).__name__}); the dataset is written anyway")
        _end_run("FAILED")


def _end_run(status: str) -> None:
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run(status)
    except Exception:  # noqa: BLE001
        pass


# ---------------------------------------------------------------------------- summary


def summary(meta: dict, out: Path) -> str:
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    lines = [
        f"prepared {out}: vocab {meta['vocab_size']} ({meta['dtype']}), "
        f"train {tr['documents']:,} docs / {tr['tokens']:,} tokens, "
        f"val {va['documents']:,} docs / {va['tokens']:,} tokens",
        f"{'language':<9}{'documents':>11}{'words':>13}{'tokens':>13}{'tok/word':>10}{'bytes/tok':>11}",
    ]
    for lang, d in meta["languages"].items():
        tpw = f"{d['tokens_per_word']:.3f}" if d["tokens_per_word"] else "-"
        bpt = f"{d['bytes'] / d['tokens']:.2f}" if d["tokens"] else "-"
        lines.append(f"{lang:<9}{d['documents']:>11,}{d['words']:>13,}{d['tokens']:>13,}{tpw:>10}{bpt:>11}")
    t = meta["timings_s"]
    lines.append(
        f"time: scan {t['scan']:.1f}s, tokenizer {t['tokenizer']:.1f}s, encode {t['encode']:.1f}s, "
        f"total {meta['_seconds']:.1f}s; dataset digest {meta['dataset_digest']}"
        + (f", MLflow run {meta['mlflow_run_id']}" if meta["mlflow_run_id"] else "")
    )
    return "\n".join(lines)
