#!/usr/bin/env python3
"""Benchmarks: `python bench.py {prepare,loader,train,export} [--json FILE] ...`.

Each subcommand measures BulbaGPT against a baseline in one run, prints a Markdown table,
logs it to MLflow, and with --json writes {"rows": [...]} for machines to read.
"""

from __future__ import annotations

import argparse
import importlib

from bulba.errors import ArgumentParser, run_cli

SUBCOMMANDS = {
    "prepare": "encoding throughput and peak RSS of prepare vs datasets.map",
    "loader": "batch assembly throughput of the Rust engine vs np.memmap and DataLoader",
    "train": "training tokens/s, MFU and memory vs the HuggingFace Trainer",
    "export": "time and peak RSS of GGUF export",
}


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    modules = {}
    for name, help_text in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"bulba.benchmarks.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"bulba.benchmarks.{name}":
                raise
            continue  # not built yet
        p = sub.add_parser(
            name, help=help_text, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        mod.add_arguments(p)
        from bulba.benchmarks.common import add_common_arguments

        add_common_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    from bulba.benchmarks.common import report

    mod = modules[args.command]
    rows = mod.run(args)
    report(args.command, rows, args, extra=getattr(mod, "EXTRA", None))
    return 0


if __name__ == "__main__":
    run_cli(main)
