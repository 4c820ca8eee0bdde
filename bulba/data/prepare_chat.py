"""`prepare.py --format chat`: conversations -> token streams with a loss mask (format version 2).

Each valid conversation (bulba.data.chat: parsed, rendered with the Llama-3 template, tokenized
with the pretraining data's tokenizer) is one document of the document index; its loss mask
(`train.mask.bin`, `val.mask.bin`) marks the assistant turns. The tokenizer.json is copied byte
for byte, so its sha256 equals the base data's and `init_from` can tell they are the same.

Split: as prepare's, a seeded hash of the conversation (its messages) below `--val-fraction`
sends it to val; a tiny set that misses val by chance sends the one with the smallest key.
Bad conversations are skipped, counted per kind and named (file:line of the first few) on
stderr and in meta.json (`chat.skipped`); none are dropped without a count.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bulba.atomic import atomic_dir, sha256_file
from bulba.data import corpus as C
from bulba.data.chat import BadConversation, ChatEncoder, Problems, conversation_key, iter_records, parse
from bulba.data.encoding import Keyer
from bulba.data.format import SplitWriter, new_meta, token_dtype, write_meta
from bulba.data.tokenizer import BOS, EOS, SPECIAL_TOKENS, check_tokenizer, load_tokenizer, tokenizer_file
from bulba.errors import UserError

BLOCK_DOCS = 1024  # conversations buffered before a write


def chat_digest(tokenizer_sha: str, splits: dict) -> str:
    """As prepare's dataset digest, over the masks too (same tokens, other mask: other data)."""
    parts = [tokenizer_sha] + [splits[s].get(k, "") for s in ("train", "val") for k in ("sha256", "mask_sha256")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def prepare_chat(cfg) -> dict:
    from bulba.data.prepare import _finish_mlflow, _start_mlflow, check_output, warn

    t0 = time.time()
    out = Path(cfg.out)
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.ctx_len <= 0:
        raise UserError(f"--ctx-len must be positive (the model's model.ctx_len), got {cfg.ctx_len}")
    if cfg.tokenizer is None:
        raise UserError(
            "--format chat needs --tokenizer DATA_DIR (or its tokenizer.json) of the pretraining data: "
            "the token ids must be the base model's"
        )
    tok_path = tokenizer_file(cfg.tokenizer)
    tok = load_tokenizer(tok_path)
    encoder = ChatEncoder(tok, str(tok_path))
    specials = check_tokenizer(tok)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    check_output(out, cfg.force)
    sources, skipped = C.resolve_inputs(cfg.inputs)
    for s in sources:
        C.scan_source(s)
    if skipped and not cfg.quiet:
        warn(f"skipped {skipped} file(s) of unknown type inside the input directories")
    t_scan = time.time()

    with atomic_dir(out) as tmp:
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        splits, stats = _encode(sources, encoder, tmp, cfg.val_fraction, cfg, dtype)
        n = stats["conversations"]
        if n == 0:
            first = "; ".join(stats["problems"].lines()[1:2]).strip() or "the inputs hold no records"
            raise UserError(f"no valid conversation in {', '.join(cfg.inputs)} (e.g. {first})")
        if cfg.val_fraction > 0 and splits["val"]["documents"] == 0 and n >= 2:
            splits, stats = _encode(sources, encoder, tmp, math.nextafter(stats["min_u"], 1.0), cfg, dtype)
        t_enc = time.time()
        tok_sha = sha256_file(tmp / "tokenizer.json")
        problems: Problems = stats.pop("problems")
        meta = new_meta(
            dtype=dtype,
            vocab_size=vocab_size,
            splits=splits,
            bos_id=specials[BOS],
            eos_id=specials[EOS],
            pad_id=specials[EOS],
            loss_mask=True,
            special_tokens={t: specials[t] for t in SPECIAL_TOKENS},
            add_bos_token=True,
            sources=stats["sources"],
            languages={},
            chat={
                "template": "llama3",
                "messages_field": cfg.messages_field,
                "ctx_len": cfg.ctx_len,
                "conversations": n,
                "trained_tokens": stats["trained_tokens"],
                "skipped": problems.as_dict(),
            },
            tokenizer_sha256=tok_sha,
            tokenizer_source=str(tok_path),
            inputs_sha256=hashlib.sha256("\n".join(f"{s.sha256} {s.weight:g}" for s in sources).encode()).hexdigest(),
            dataset_digest=chat_digest(tok_sha, splits),
            params={
                "format": "chat",
                "val_fraction": cfg.val_fraction,
                "messages_field": cfg.messages_field,
                "ctx_len": cfg.ctx_len,
                "seed": cfg.seed,
                "tokenizer": str(cfg.tokenizer),
                "inputs": list(cfg.inputs),
            },
            timings_s={"scan": round(t_scan - t0, 3), "tokenizer": 0.0, "encode": round(t_enc - t_scan, 3)},
            mlflow_run_id=None,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        run = _start_mlflow(cfg, meta, tmp, out) if cfg.mlflow else None
        if run is not None:
            meta["mlflow_run_id"] = run
            _log_chat(meta)
        write_meta(tmp, meta)  # last: it marks the dataset complete
        if run is not None:
            _finish_mlflow(tmp)
    meta["_seconds"] = time.time() - t0
    for line in problems.lines():  # also with --quiet: skipped data is never silent
        print(f"warning: {line}" if not line.startswith(" ") else line, file=sys.stderr)
    if not cfg.quiet:
        print(summary(meta, out))
    return meta


def _encode(sources, encoder: ChatEncoder, folder: Path, val_threshold: float, cfg, dtype) -> tuple[dict, dict]:
    keyer = Keyer(cfg.seed)
    writers = {
        "train": SplitWriter(folder, "train", dtype, loss_mask=True),
        "val": SplitWriter(folder, "val", dtype, loss_mask=True),
    }
    problems = Problems()
    stats = {"conversations": 0, "trained_tokens": 0, "min_u": 1.0, "sources": [], "problems": problems}
    buf: dict[str, list] = {"train": [], "val": []}

    def flush(split: str) -> None:
        docs = buf[split]
        if docs:
            ids = np.concatenate([d[0] for d in docs])
            mask = np.concatenate([d[1] for d in docs])
            lens = np.array([len(d[0]) for d in docs], dtype=np.int64)
            writers[split].write(ids, lens, loss_mask=mask)
            buf[split] = []

    for s in sources:
        st = {"name": s.name, "path": s.location, "kind": s.kind, "weight": s.weight, "sha256": s.sha256}
        st.update(documents=0, tokens=0, skipped=0, train_tokens=0, val_tokens=0, words=0, bytes=s.nbytes)
        for record, where in iter_records(s):
            try:
                messages = parse(record, cfg.messages_field)
                ids, mask = encoder.encode(messages)
                if len(ids) > cfg.ctx_len:
                    raise BadConversation("too_long", f"{len(ids)} tokens > --ctx-len {cfg.ctx_len}")
            except BadConversation as e:
                problems.add(e.kind, where, e.detail)
                st["skipped"] += 1
                continue
            u = keyer.split(conversation_key(messages))
            stats["min_u"] = min(stats["min_u"], u)
            split = "val" if u < val_threshold else "train"
            buf[split].append((ids, mask))
            if len(buf[split]) >= BLOCK_DOCS:
                flush(split)
            st["documents"] += 1
            st["tokens"] += len(ids)
            st[f"{split}_tokens"] += len(ids)
            stats["conversations"] += 1
            stats["trained_tokens"] += int(mask.sum())
        stats["sources"].append(st)
    for split in buf:
        flush(split)
    return {k: w.close() for k, w in writers.items()}, stats


def _log_chat(meta: dict) -> None:
    """The chat figures on the prepare run (best effort, as the rest of its logging)."""
    try:
        import mlflow

        c = meta["chat"]
        mlflow.log_metrics(
            {
                "conversations": float(c["conversations"]),
                "trained_tokens": float(c["trained_tokens"]),
                **{f"skipped_{k}": float(v["count"]) for k, v in c["skipped"].items()},
            }
        )
        mlflow.set_tags({"bulba.data_format": "chat"})
    except Exception as e:  # noqa: BLE001 - tracking never fails a prepare
        print(f"warning: MLflow logging of the chat figures failed ({type(e).__name__})", file=sys.stderr)


def summary(meta: dict, out: Path) -> str:
    tr, va, c = meta["splits"]["train"], meta["splits"]["val"], meta["chat"]
    skipped = sum(v["count"] for v in c["skipped"].values())
    return (
        f"prepared {out} (chat, Llama-3 template): {c['conversations']:,} conversations "
        f"(train {tr['documents']:,} / {tr['tokens']:,} tokens, val {va['documents']:,} / {va['tokens']:,} tokens), "
        f"{c['trained_tokens']:,} assistant tokens trained on, {skipped:,} skipped; vocab {meta['vocab_size']}; "
        f"dataset digest {meta['dataset_digest']}"
        + (f", MLflow run {meta['mlflow_run_id']}" if meta["mlflow_run_id"] else "")
    )
