#!/usr/bin/env python3
"""Turn a raw mixed corpus into a tokenizer and token streams for train.py.

  python prepare.py INPUT... --out DATA_DIR [--vocab-size N] [options]

INPUT is a file, a directory (searched recursively), a glob ("data/**/*.jsonl"), a local HF
`datasets` folder (save_to_disk) or hf:OWNER/NAME (a hub dataset; needs network).
Formats: .txt/.md (documents are paragraphs separated by blank lines; a file without blank
lines has one document per line), .jsonl/.json (the --text-field of each record),
.parquet (column --text-field), source code (.py .rs .sh ...: one document per file).

Weights: append @WEIGHT to an INPUT to repeat or subsample it, in tokenizer training and in
train.bin, so a small language is not drowned by a big one:
  python prepare.py corpus/be.txt@3 corpus/ru.txt@0.5 corpus/en.txt code/ --out data/mix
(3 = every Belarusian document three times, 0.5 = a deterministic half of the Russian ones).
val.bin holds every source once, unweighted.

Writes DATA_DIR/tokenizer.json, train.bin, val.bin, train.idx, val.idx and, last,
meta.json (see docs/contracts.md), and logs an MLflow run (experiment bulbagpt-prepare).

Chat data (--format chat): conversations for fine-tuning a pretrained run, one per record of
.jsonl/.json/.parquet files or a datasets folder, as a "messages" list of {"role", "content"}
(system, user, assistant) or ShareGPT's "conversations" of {"from", "value"}. Rendered with
the Llama-3 chat template and tokenized with the pretraining data's tokenizer (required):
  python prepare.py demo/chat/dialogues.jsonl --format chat --tokenizer data/demo --out data/demo-chat
Adds train.mask.bin / val.mask.bin (loss only on the assistant turns). Conversations that are
malformed, empty, not alternating, longer than --ctx-len or spell a special token are skipped,
counted and named (file:line) on stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bulba.errors import ArgumentParser, UserError, run_cli


def build_parser() -> argparse.ArgumentParser:
    from bulba.data.prepare import DEFAULT_EXPERIMENT
    from bulba.data.tokenizer import DEFAULT_VOCAB, MIN_VOCAB

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT[@WEIGHT]", help="files, directories, globs, datasets")
    p.add_argument("--out", required=True, type=Path, metavar="DATA_DIR", help="output directory (created)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB,
        help=f"exact number of tokens including the special ones (default %(default)s, min {MIN_VOCAB})",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="share of documents in val.bin, chosen by a hash of their text (default %(default)s)",
    )
    p.add_argument("--text-field", default="text", help="JSON field / column holding the text (default %(default)s)")
    p.add_argument(
        "--tokenizer",
        type=Path,
        metavar="FILE_OR_DATA_DIR",
        help="reuse this tokenizer.json (or a prepared DATA_DIR's) instead of training one; required for chat",
    )
    p.add_argument(
        "--format",
        choices=["text", "chat"],
        default="text",
        help="text: documents for pretraining; chat: conversations with a loss mask (default %(default)s)",
    )
    p.add_argument(
        "--messages-field",
        default="messages",
        help="chat: the field holding a conversation's messages (default %(default)s; "
        "ShareGPT 'conversations' is read too)",
    )
    p.add_argument(
        "--ctx-len",
        type=int,
        default=256,
        help="chat: skip (and count) conversations longer than this many tokens; "
        "set it to the model's model.ctx_len (default %(default)s, the tiny preset's)",
    )
    p.add_argument(
        "--tokenizer-max-mb",
        type=float,
        default=512.0,
        help="at most this much (weighted, sampled) text trains the tokenizer (default %(default)s)",
    )
    p.add_argument(
        "--min-frequency", type=int, default=2, help="BPE: ignore pairs seen fewer times (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="keys the split/sampling hash (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing DATA_DIR")
    p.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default %(default)s)")
    p.add_argument(
        "--encoder",
        choices=["cached", "tokenizers"],
        default="cached",
        help="cached: Python regex + per-piece id cache (same ids, ~3x less CPU); "
        "tokenizers: HF encode_batch for every document (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="encoding processes (default: CPUs - 1 for a corpus over 16 MB on 3+ CPUs, else 0 = in-process)",
    )
    p.add_argument(
        "--block-mb",
        type=float,
        default=0.5,
        help="text per encoding block; memory use is a few times this (default %(default)s)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: only on a terminal)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from bulba.data.prepare import PrepareConfig, prepare

    if args.block_mb <= 0:
        raise UserError("--block-mb must be positive")
    prepare(
        PrepareConfig(
            inputs=args.inputs,
            out=args.out,
            vocab_size=args.vocab_size,
            val_fraction=args.val_fraction,
            text_field=args.text_field,
            tokenizer=args.tokenizer,
            tokenizer_max_mb=args.tokenizer_max_mb,
            min_frequency=args.min_frequency,
            seed=args.seed,
            force=args.force,
            mlflow=not args.no_mlflow,
            experiment=args.experiment,
            block_mb=args.block_mb,
            encoder=args.encoder,
            workers=args.workers,
            progress=args.progress,
            quiet=args.quiet,
            format=args.format,
            messages_field=args.messages_field,
            ctx_len=args.ctx_len,
        )
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
