#!/usr/bin/env python3
"""The whole pipeline on the shipped demo corpus, as a user runs it: `make demo`.

prepare.py (demo/corpus -> data/demo) -> train.py (the tiny preset) -> export.py
(GGUF f16, verified in llama.cpp, registered in the MLflow Model Registry), then a short
generation in llama.cpp. Each run gets a fresh timestamped directory, so nothing a user
already has is overwritten. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def step(title: str, cmd: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        sys.exit(f"demo: step '{title}' failed with exit code {rc}")
    print(f"--- {title}: {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="training steps (default: %(default)s)")
    ap.add_argument("--type", default="f16", help="GGUF type to export (default: %(default)s)")
    args = ap.parse_args()

    py = sys.executable
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = ROOT / "data" / "demo"
    run = ROOT / "runs" / f"demo-{stamp}"
    gguf = ROOT / "output_models" / f"demo-{stamp}-{args.type}.gguf"

    if (data / "meta.json").is_file():
        print(f"\n=== prepare: reusing {data.relative_to(ROOT)} (delete it to prepare again)")
    else:
        step("prepare", [py, "prepare.py", "demo/corpus", "--out", str(data.relative_to(ROOT)), "--vocab-size", "2048"])
    step(
        "train",
        [
            py,
            "train.py",
            "tiny",
            f"data.dir={data.relative_to(ROOT)}",
            f"out_dir={run.relative_to(ROOT)}",
            f"train.max_steps={args.steps}",
        ],
    )
    step(
        "export",
        [
            py,
            "export.py",
            str(run.relative_to(ROOT)),
            "--type",
            args.type,
            "--out",
            str(gguf.relative_to(ROOT)),
            "--register",
            "bulba-demo",
        ],
    )
    step("generate in llama.cpp", [py, "-c", GENERATE, str(gguf)])
    print(
        f"\nDone. Model: {gguf.relative_to(ROOT)}\nSee every run with:  mlflow ui   (then open http://127.0.0.1:5000)"
    )


# Run the exported file in real llama.cpp, the way LM Studio / Ollama would.
GENERATE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)
for prompt in ["Зубр жыве ў", "Аист летит", "The bison"]:
    out = llm(prompt, max_tokens=24, temperature=0.0)
    print(repr(prompt), "->", repr(out["choices"][0]["text"]))
"""

if __name__ == "__main__":
    main()
