#!/usr/bin/env python3
"""Bits per byte per language of a model, in PyTorch (checkpoints) or llama.cpp (GGUF).

  python eval.py runs/demo data/heldout/be.txt data/heldout/ru.txt data/heldout/en.txt
  python eval.py output_models/demo-f16.gguf data/heldout/*.txt --json eval.json
  python eval.py models:/bulba-demo@best data/heldout/*.txt --register-metrics

SOURCE is a run directory (final weights, else its newest checkpoint), a .safetensors file,
runs:/<run_id>, a .gguf file or models:/NAME/VERSION (or models:/NAME@ALIAS). Each TEXT_FILE
holds one language and is named after it (be.txt -> "be"); it is cut into documents as
prepare.py cuts a training file (one per line, or per paragraph if it has blank lines), and
each document is scored as training saw it: BOS, its tokens, EOS for its line end (windows of
the model's context, half a context apart, if it is longer). For each file: bits per UTF-8
byte, tokens per word, and xz -9e bits per byte of the same bytes, the floor a model must
beat. Checkpoints and their GGUFs are windowed alike, so their figures compare directly.
With --register-metrics the figures go to MLflow: metrics eval/<name>/bpb on the training run
that made the model (a GGUF's with its type appended: eval/<name>/bpb.q8_0), or tags on the
registered version for models:/. OMP_NUM_THREADS sets the threads of both backends.
"""

from __future__ import annotations

import argparse

from bulba.errors import ArgumentParser, run_cli


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="run dir, .safetensors, runs:/<id>, .gguf or models:/NAME/VERSION")
    p.add_argument("texts", metavar="TEXT_FILE", nargs="+", help="UTF-8 text, one language per file")
    p.add_argument("--max-kb", type=float, metavar="N", help="score only the first N KB of each file (whole lines)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE (the benchmarks' form)")
    p.add_argument(
        "--register-metrics",
        action="store_true",
        help="log the figures to MLflow: on the training run, or as tags of a registered version",
    )
    args = p.parse_args(argv)
    if args.max_kb is not None and not args.max_kb > 0:
        p.error(f"--max-kb must be a positive number, got {args.max_kb}")

    from bulba.eval.run import run

    run(args.source, args.texts, args.max_kb, args.json, args.register_metrics)
    return 0


if __name__ == "__main__":
    run_cli(main)
