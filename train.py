#!/usr/bin/env python3
"""Train a Llama-3-style model: `python train.py RECIPE [section.key=value ...]`.

RECIPE is a YAML file or a preset name (bulba/recipes/); overrides are dotted recipe keys.
The run directory (out_dir) receives config.json, tokenizer.json, checkpoints/ and, at the
end, final.safetensors (for export.py). Every run is an MLflow run (MLFLOW_TRACKING_URI or
./mlflow.db). Ctrl-C / SIGTERM write a checkpoint; `resume=auto` continues from the newest one.
`init_from=RUN_DIR|runs:/<id>` starts from a pretrained run's weights (fresh optimizer and schedule).
"""

from __future__ import annotations

import argparse
import sys

from bulba.errors import ArgumentParser, run_cli

EXAMPLES = """\
presets: {presets}

examples:
  python train.py tiny data.dir=data/demo
  python train.py aist data.dir=data/web train.mode=both train.max_steps=5000
  python train.py tiny data.dir=data/mix train.max_time=15m   # a wall-clock budget
  python train.py krolik out_dir=runs/k1 train.batch_size=16 train.grad_accum=4 train.max_tokens=2000000000
  python train.py krolik out_dir=runs/k1 resume=auto            # continue after a crash or preemption
  python train.py zubr train.devices=8 train.strategy=fsdp      # or under torchrun / srun
  python train.py tiny-chat init_from=runs/tiny data.dir=data/demo-chat   # fine-tune on chat data
keys: name out_dir seed resume init_from model.* data.* train.* tracking.*  (see bulba/config.py)
"""


def main(argv=None):
    from bulba.config import RECIPES_DIR

    presets = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    parser = ArgumentParser(
        description=__doc__,
        epilog=EXAMPLES.format(presets=presets),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="recipe YAML path or preset name")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (metrics.jsonl only)")
    args = parser.parse_intermixed_args(argv)  # flags may sit between overrides

    from bulba.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # all validation before anything heavy

    from bulba.train.run import Interrupted, train

    try:
        train(recipe, enable_tracking=not args.no_mlflow)
    except Interrupted as e:
        where = f"checkpoint {e.checkpoint}" if e.checkpoint else "no checkpoint (not rank 0)"
        again = [args.recipe, *(a for a in args.overrides if not a.startswith("resume=")), "resume=auto"]
        if args.no_mlflow:
            again.append("--no-mlflow")
        print(f"stopped by {e.signame}; {where}; continue with: python train.py {' '.join(again)}", file=sys.stderr)
        return 143 if e.signame == "SIGTERM" else 130
    return 0


if __name__ == "__main__":
    run_cli(main)
