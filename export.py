#!/usr/bin/env python3
"""Export a trained model to GGUF for llama.cpp, LM Studio, Ollama and text-generation-webui.

  python export.py runs/demo --type q8_0 --out output_models/demo-q8_0.gguf
  python export.py runs/demo/final.safetensors --type f16 --out demo.gguf --hf-out demo-hf
  python export.py runs:/<run_id> --type q4_k_m --out demo-q4.gguf --register bulba-demo

SOURCE is a run directory, a final.safetensors (config.json and tokenizer.json beside it)
or runs:/<run_id> (the training run's artifacts in MLflow). The GGUF is verified in
llama.cpp against PyTorch when llama-cpp-python is installed, logged as an MLflow run
linked to its training run, and with --register added to the Model Registry.
"""

from __future__ import annotations

import argparse

from bulba.errors import ArgumentParser, run_cli


def main(argv=None):
    from bulba.export.gguf import all_types

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="run directory, .safetensors file, or runs:/<run_id>")
    p.add_argument(
        "--type",
        required=True,
        metavar="TYPE",
        help=f"one of: {', '.join(all_types())} (K-quants need llama-cpp-python)",
    )
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="output file")
    p.add_argument("--register", metavar="NAME", help="register the GGUF as a new version of model NAME in MLflow")
    p.add_argument("--hf-out", metavar="DIR", help="also write a HuggingFace LlamaForCausalLM folder")
    p.add_argument(
        "--hf-dtype", default="f32", choices=["f32", "f16", "bf16"], help="HF weights dtype (default %(default)s)"
    )
    p.add_argument("--name", help="model name inside the GGUF (default: --register NAME or the run's name)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--no-verify", action="store_true", help="skip the llama.cpp / transformers parity checks")
    p.add_argument("--no-mlflow", action="store_true", help="do not log an export run (not with --register)")
    p.add_argument("--experiment", help="MLflow experiment (default: the training run's, else 'bulbagpt')")
    args = p.parse_args(argv)
    if args.no_mlflow and args.register:
        p.error("--register needs MLflow; drop --no-mlflow")

    from bulba.export.pipeline import export

    export(
        args.source,
        args.type.lower(),
        args.out,
        register=args.register,
        hf_out=args.hf_out,
        hf_dtype=args.hf_dtype,
        force=args.force,
        verify=False if args.no_verify else None,
        name=args.name,
        mlflow=not args.no_mlflow,
        experiment=args.experiment,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
