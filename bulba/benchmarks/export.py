"""Time and peak RSS of GGUF export for `zubr` (~350M parameters, random weights).

Each measurement runs in its own subprocess (peak RSS is per process). Rows:
- `bulba-export-<type>`: export.py's streaming writer (one tensor in memory at a time);
- `gguf-in-memory-<type>` (baseline): the usual converter pattern, every tensor converted
  and handed to GGUFWriter.add_tensor, then written at once (holds the whole model twice).
Verification and MLflow logging are off: this measures the writer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bulba.memory import peak_rss_mb

ZUBR_FALLBACK = dict(n_layer=24, n_embd=1024, n_head=16, n_kv_head=4, ffn_hidden=2816, ctx_len=2048, vocab_size=32003)


def add_arguments(p) -> None:
    p.add_argument("--types", default="f16,q8_0", help="comma-separated GGUF types (default %(default)s)")
    p.add_argument("--recipe", default="zubr", help="recipe whose model shapes to use (default %(default)s)")
    p.add_argument("--no-baseline", action="store_true", help="skip the in-memory GGUFWriter baseline")
    p.add_argument("--workdir", help="where to put the random run and outputs (default: a temp dir, removed)")


def model_config(recipe: str):
    from bulba.config import ModelConfig

    try:
        from bulba.config import load_recipe

        cfg = load_recipe(recipe).model
        if cfg.vocab_size is None:
            cfg.vocab_size = ZUBR_FALLBACK["vocab_size"]
        return cfg, f"bulba/recipes/{recipe}.yaml"
    except Exception:  # recipe not written yet: the shapes the issue names
        return ModelConfig(**ZUBR_FALLBACK), "built-in zubr shapes"


def make_random_run(run_dir: Path, cfg) -> None:
    """config.json + tokenizer.json (exactly vocab_size tokens) + random final.safetensors."""
    import torch

    from bulba.data.tokenizer import train_tokenizer
    from bulba.model.weights import expected_shapes
    from bulba.train.run_dir import write_weights_run

    texts = [f"{w} {i}" for i, w in enumerate(("zubr bulba kot aist krolik " * 200).split())]
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size)  # small text: reserved tokens fill up
    g = torch.Generator().manual_seed(0)
    state = {
        k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02)
        for k, s in expected_shapes(cfg).items()
    }
    write_weights_run(run_dir, cfg, tok, state, recipe_name="zubr-random")


def _child(mode: str, run_dir: str, type_name: str, out: str) -> None:
    """Runs in the subprocess: one export, then prints {"seconds", "peak_rss_mb"}."""
    t0 = time.perf_counter()
    if mode == "bulba":
        from bulba.export.pipeline import export

        export(run_dir, type_name, out, verify=False, mlflow=False, force=True, quiet=True)
    else:
        _in_memory_export(run_dir, type_name, out)
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "peak_rss_mb": peak_rss_mb()}))


def _in_memory_export(run_dir: str, type_name: str, out: str) -> None:
    """Baseline: load everything, convert everything, add_tensor everything, then write."""
    import gguf
    from safetensors.torch import load_file

    from bulba.export.gguf import add_metadata, convert, gguf_rows, numpy_types
    from bulba.export.source import open_source
    from bulba.model.weights import layout

    src = open_source(run_dir)
    qtype, ftype = numpy_types()[type_name]
    state = {k: v.float().numpy() for k, v in load_file(str(src.weights)).items()}
    w = gguf.GGUFWriter(out, "llama")
    add_metadata(w, src, ftype, "baseline", quantized=type_name not in ("f32", "f16", "bf16"))
    for t in layout(src.model):
        arr = gguf_rows(t, state[t.name])
        qt = qtype if arr.ndim == 2 else gguf.GGMLQuantizationType.F32
        w.add_tensor(t.gguf, convert(arr, qt), raw_dtype=qt)  # uint8 data: GGUFWriter derives the shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _measure(mode: str, run_dir: Path, type_name: str, out: Path) -> dict:
    code = (
        "import sys; from bulba.benchmarks.export import _child; "
        f"_child({mode!r}, {str(run_dir)!r}, {type_name!r}, {str(out)!r})"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} {type_name} export failed: {r.stderr.strip()[-2000:]}")
    fig = json.loads(r.stdout.strip().splitlines()[-1])
    size = out.stat().st_size
    out.unlink()
    return {
        "seconds": fig["seconds"],
        "peak_rss_mb": fig["peak_rss_mb"],
        "file_mb": size / 1e6,
        "mb_per_s": size / 1e6 / fig["seconds"],
    }


EXTRA: dict = {}


def run(args) -> list[dict]:
    from bulba.model.weights import param_count

    cfg, where = model_config(args.recipe)
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=args.workdir) as tmp:
        run_dir = Path(tmp) / "zubr-random"
        t0 = time.perf_counter()
        make_random_run(run_dir, cfg)
        n_params = param_count(cfg)
        src_mb = (run_dir / "final.safetensors").stat().st_size / 1e6
        EXTRA.update(
            {
                "model": f"{args.recipe} ({where}): {n_params / 1e6:.0f}M parameters, "
                f"{cfg.n_layer} layers, n_embd {cfg.n_embd}, ffn {cfg.ffn_hidden}, vocab {cfg.vocab_size}",
                "source": f"final.safetensors fp32, {src_mb:.0f} MB (made in {time.perf_counter() - t0:.0f} s)",
            }
        )
        rows = []
        for type_name in [t.strip() for t in args.types.split(",") if t.strip()]:
            out = Path(tmp) / f"zubr-{type_name}.gguf"
            rows.append(
                {"name": f"bulba-export-{type_name}", "type": type_name, **_measure("bulba", run_dir, type_name, out)}
            )
            if not args.no_baseline and type_name not in ("q4_k_m", "q5_k_m", "q6_k", "q4_k_s", "q5_k_s"):
                rows.append(
                    {
                        "name": f"gguf-in-memory-{type_name}",
                        "type": type_name,
                        **_measure("baseline", run_dir, type_name, out),
                    }
                )
    return rows
