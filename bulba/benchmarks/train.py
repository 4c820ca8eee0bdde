"""Training throughput: BulbaGPT's speed modes against the HuggingFace Trainer, same model, same data.

Rows (each in its own process, so peak host RSS and peak device memory belong to that row alone):

  hf-trainer-default  transformers' LlamaForCausalLM (our preset's shapes, no download) under the
                      HF Trainer as users run it by default: fp32, standard DataLoader over a
                      tokenized `datasets` dataset of the same tokens (blocks of ctx, labels = input_ids)
  hf-trainer-best     the same with the Trainer's own best switches: bf16 where it is this
                      machine's faster precision (the measured choice of precision=auto),
                      attn_implementation="sdpa", torch_compile=True
  bulba-eager         BulbaGPT, Rust batch engine, no compilation
  bulba-flash         FlashAttention: the flash-attn package if installed, else PyTorch's own
                      (varlen for packed rows, SDPA's flash kernel for stream rows); CUDA only,
                      "n/a" on CPU (never faked)
  bulba-compile       torch.compile (Inductor) on the model's blocks
  bulba-both          compile + FlashAttention (on CPU: what the trainer falls back to, compile +
                      its CPU attention); the `attention` column says what ran

Every row runs warm-up steps (compilation happens there) and then the timed steps; tokens/s is
measured over the timed steps only (steady state). MFU uses the shared FLOPs formula
(6·N·T + attention) against the device's dense peak from `bulba.model.flops` in the row's own
precision (a fp32 row against the fp32 peak). The table, the hardware, torch/CUDA versions and
every setting (shared ones below the table, differing ones as columns) go to stdout, to --md
(default bench_results/train.md), and to MLflow: a parent run with the table, one child run per row.

On CPU the default preset is `tiny`; on CUDA it is `krolik` (`--preset aist`, `zubr`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bulba.errors import UserError
from bulba.memory import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent.parent
ROWS = ["hf-trainer-default", "hf-trainer-best", "bulba-eager", "bulba-flash", "bulba-compile", "bulba-both"]
HF_ROWS = {"hf-trainer-default", "hf-trainer-best"}
FIGURES = ("tokens_per_s", "speedup", "mfu", "peak_device_mb", "peak_rss_mb")

# Filled by run(); bench.py prints it under the table (and common.report logs it).
EXTRA: dict = {}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="recipe preset or YAML path (default: tiny on CPU, krolik on CUDA)")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="prepared data directory (prepare.py output); default: prepare the shared corpus "
        "(or demo/corpus) once into a cache directory",
    )
    p.add_argument("--steps", type=int, help="timed (steady-state) steps per row (default: 20 CPU, 50 CUDA)")
    p.add_argument(
        "--warmup", type=int, help="untimed warm-up steps per row, compilation included (default: 5 CPU, 10 CUDA)"
    )
    p.add_argument("--batch-size", type=int, help="sequences per step (default: the preset's train.batch_size)")
    p.add_argument("--ctx", type=int, help="tokens per sequence (default: the preset's model.ctx_len)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra recipe override for every row, e.g. model.n_layer=2 (repeatable)",
    )
    p.add_argument(
        "--threads", type=int, help="CPU threads for every row (OMP_NUM_THREADS; default: torch's own choice)"
    )
    p.add_argument(
        "--row-timeout", type=float, default=1800.0, help="seconds before a row is given up (default: %(default)s)"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        help="seconds for all rows together: rows are cut to what is left, and rows that would start "
        "with under 20 s left are skipped (stated in the table); the table is always written",
    )
    p.add_argument(
        "--memory-cap-gb",
        type=float,
        help="CUDA: cap every row's device memory at this many GiB (torch.cuda.set_per_process_memory_fraction), "
        "e.g. 12 to show a recipe fits an RTX 3060 12 GB on a larger card",
    )
    p.add_argument("--cache-dir", help="where prepared benchmark data is kept (default: ~/.cache/bulbagpt/bench)")
    # read by common.add_common_arguments, which is added after us: a default table file
    p.set_defaults(md="bench_results/train.md")


# =============================================================================== parent side


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    return choice


def _cache_dir(args) -> Path:
    if args.cache_dir:
        return Path(args.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bulbagpt" / "bench"


def _corpus_files() -> list[Path]:
    for d in (ROOT.parent / "shared" / "corpus", ROOT / "demo" / "corpus"):
        files = sorted(
            f
            for f in d.glob("*")
            if f.is_file()
            and f.suffix in (".txt", ".md", ".jsonl", ".json", ".parquet")
            and f.name.lower() not in ("readme.md", "license.md")
        )
        if files:
            return files
    raise UserError(
        "no corpus to benchmark on: neither ../shared/corpus nor demo/corpus has text files; "
        "pass --data DIR with a prepared dataset (python prepare.py INPUT --out DIR)"
    )


def _prepared_data(args) -> Path:
    """--data, or a dataset prepared once from the shared/demo corpus and cached."""
    if args.data:
        d = Path(args.data)
        if not (d / "meta.json").is_file():
            raise UserError(f"--data {d}: no meta.json there; prepare it first: python prepare.py INPUT --out {d}")
        return d
    import hashlib

    files = _corpus_files()
    key = hashlib.sha256(
        json.dumps([[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in files]).encode()
    ).hexdigest()[:16]
    out = _cache_dir(args) / f"data-{key}"
    if (out / "meta.json").is_file():
        return out
    if not (ROOT / "prepare.py").is_file():
        raise UserError("prepare.py is missing; pass --data DIR with a prepared dataset")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[bench train] preparing {', '.join(f.name for f in files)} -> {out} (once; cached)", file=sys.stderr)
    cmd = [
        sys.executable,
        str(ROOT / "prepare.py"),
        *map(str, files),
        "--out",
        str(out),
        "--force",
        "--no-mlflow",
        "--quiet",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0 or not (out / "meta.json").is_file():
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"preparing benchmark data into {out} failed: {tail}")
    return out


def _hf_dataset(data_dir: Path, meta: dict, ctx: int, cache: Path) -> Path | None:
    """The same training tokens as an HF `datasets` dataset on disk: blocks of `ctx` tokens with
    labels = input_ids (what run_clm's group_texts produces), memory-mapped when loaded."""
    import hashlib

    st = (data_dir / "train.bin").stat()
    key = (
        meta.get("dataset_digest")
        or hashlib.sha256(f"{data_dir.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    )
    out = cache / f"hf-{key[:16]}-ctx{ctx}"
    if (out / "dataset_info.json").is_file():
        return out
    import numpy as np

    try:
        import datasets
    except ImportError:  # e.g. a bare GPU box: the HF rows read the blocks straight from train.bin
        return None

    datasets.disable_progress_bars()
    dtype = np.dtype(meta.get("dtype", "uint16")).newbyteorder("<")
    tokens = np.memmap(data_dir / "train.bin", dtype=dtype, mode="r")
    n = len(tokens) // ctx
    if n == 0:
        raise UserError(f"{data_dir}/train.bin has {len(tokens)} tokens, fewer than one sequence of ctx={ctx}")
    blocks = np.asarray(tokens[: n * ctx], dtype=np.int32).reshape(n, ctx)
    ds = datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-hf-", dir=cache))
    ds.save_to_disk(str(tmp))
    os.replace(tmp, out)
    return out


def _resolve_rows(text: str) -> list[str]:
    rows = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        import difflib

        hint = ""
        if bad:
            close = difflib.get_close_matches(bad[0], ROWS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"--rows: unknown row {bad[0] if bad else '(none)'!r}{hint}; choose from {', '.join(ROWS)}")
    return [r for r in ROWS if r in rows]


def _positive(name: str, v):
    if v is not None and v <= 0:
        raise UserError(f"--{name} must be positive, got {v}")


def run(args) -> list[dict]:
    from bulba.config import load_recipe

    for name in ("steps", "batch_size", "ctx", "threads"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.warmup is not None and args.warmup < 1:
        raise UserError(
            f"--warmup must be at least 1 (compilation and first-step costs happen there), got {args.warmup}"
        )
    rows = _resolve_rows(args.rows)
    device = _device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # so the notes (threads, CPU peak) describe the rows
    preset = args.preset or ("tiny" if device == "cpu" else "krolik")
    steps = args.steps or (20 if device == "cpu" else 50)
    warmup = args.warmup or (5 if device == "cpu" else 10)

    data_dir = _prepared_data(args).resolve()
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))

    # Same for every row: stream windows (contiguous ctx tokens, as HF's group_texts blocks), a
    # one-step lr warm-up then cosine to min_lr over warmup + steps (bulba.train.benchmark.benchmark's
    # schedule), the data's vocabulary.
    overrides = [
        f"data.dir={data_dir}",
        "data.sampler=stream",
        "model.vocab_size=" + str(meta["vocab_size"]),
        "train.warmup_steps=1",
        "train.grad_accum=1",
    ]
    if args.ctx:
        overrides.append(f"model.ctx_len={args.ctx}")
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    overrides += list(args.overrides)
    recipe = load_recipe(preset, overrides)  # validates everything before any row starts
    m, t = recipe.model, recipe.train
    ctx, batch = m.ctx_len, t.batch_size

    cache = _cache_dir(args)
    cache.mkdir(parents=True, exist_ok=True)
    hf_data = _hf_dataset(data_dir, meta, ctx, cache) if HF_ROWS & set(rows) else None

    spec = {
        "preset": preset,
        "overrides": overrides,
        "device": device,
        "steps": steps,
        "warmup": warmup,
        "data_dir": str(data_dir),
        "hf_data": str(hf_data) if hf_data else None,
        "bos_id": meta.get("bos_id"),
        "eos_id": meta.get("eos_id"),
        "pad_id": meta.get("pad_id"),
        "threads": args.threads,
        "memory_cap_gb": args.memory_cap_gb,
    }
    results = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bulba-bench-train-") as tmp:
        # the longest compile (HF's whole model) runs last, so a --time-budget cuts it, not ours
        for row in sorted(rows, key=lambda r: r == "hf-trainer-best"):
            na = _not_applicable(row, device)
            timeout = args.row_timeout
            if args.time_budget is not None and not na:
                left = args.time_budget - (time.monotonic() - t_start)
                if left < 20:
                    na = f"skipped: --time-budget {args.time_budget:.0f} s used up"
                timeout = min(timeout, left)
            if na:
                print(f"[bench train] {row}: {na}", file=sys.stderr, flush=True)
                results.append({"name": row, "note": na})
            else:
                results.append(_run_row(row, spec, Path(tmp), timeout))

    results.sort(key=lambda r: ROWS.index(r["name"]))
    base = next((r for r in results if r["name"] == "hf-trainer-default" and r.get("tokens_per_s")), None)
    for r in results:
        if base and r.get("tokens_per_s"):
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
    out = [_table_row(r, device) for r in results]
    best = {
        side: max(
            (r for r in results if r.get("tokens_per_s") and (r["name"] in HF_ROWS) == (side == "hf")),
            key=lambda r: r["tokens_per_s"],
            default=None,
        )
        for side in ("hf", "bulba")
    }

    params = next((r.get("params") for r in results if r.get("params")), None)
    EXTRA.clear()
    EXTRA.update(
        {
            "preset": f"{preset} ({_fmt_count(params) if params else '?'} params; "
            f"layers {m.n_layer}, n_embd {m.n_embd}, "
            f"heads {m.n_head}/{m.n_kv_head} kv, ffn {m.ffn_hidden}, vocab {m.vocab_size}, "
            f"tied embeddings {m.tie_embeddings})",
            "shape": f"batch {batch} x ctx {ctx} = {batch * ctx} tokens/step, grad_accum 1",
            "steps": f"{warmup} warm-up (untimed, compilation happens here) + {steps} timed; "
            "tokens/s over the timed steps",
            "optimizer": f"AdamW lr {t.lr} (warmup {t.warmup_steps}, cosine to {t.min_lr}), "
            f"betas ({t.beta1}, {t.beta2}), "
            f"weight decay {t.weight_decay}, grad clip {t.grad_clip}",
            "data": f"{data_dir} ({meta.get('splits', {}).get('train', {}).get('tokens', '?')} train tokens, "
            f"digest {str(meta.get('dataset_digest', '?'))[:12]}); contiguous windows of ctx tokens "
            "(bulba: sampler=stream, Rust engine"
            + (
                (
                    "; HF: blocks of ctx from the same train.bin "
                    + (
                        "as a `datasets` dataset on disk"
                        if hf_data
                        else "read through np.memmap (datasets not installed)"
                    )
                    + ", labels = input_ids"
                )
                if HF_ROWS & set(rows)
                else ""
            )
            + ")",
            "device": _device_line(device),
            "mfu": "6*N*T + attention FLOPs per token (bulba.model.flops) x tokens/s / the device's dense peak in the "
            f"row's own precision ({_peak_line(device)})",
            "precision": _precision_line(device, recipe),
            "peak_rss_mb": "peak resident set of the row's own process (VmHWM), imports and data included",
            "seconds, host_load": "wall time of the row's process (start-up, compilation, all steps); the host's "
            f"1-minute load average when it ended ({os.cpu_count()} CPUs: a load above that "
            "means other work shared the cores and the row's tokens/s is low by that much)",
            "versions": _versions(),
        }
    )
    if best["hf"] and best["bulba"]:
        b, h = best["bulba"], best["hf"]
        EXTRA["best vs best"] = (
            f"{b['name']} {b['tokens_per_s']:,.0f} tok/s = {b['tokens_per_s'] / h['tokens_per_s']:.2f}x "
            f"{h['name']} {h['tokens_per_s']:,.0f} tok/s (goal 1.5x); peak RSS "
            f"{b.get('peak_rss_mb') or 0:,.0f} vs {h.get('peak_rss_mb') or 0:,.0f} MB; MFU "
            f"{100 * (b.get('mfu') or 0):.0f}% (goal 60%)"
        )
    return out


def _not_applicable(row: str, device: str) -> str | None:
    """Why a row cannot run on this machine (stated in the table, never faked), or None."""
    if row == "bulba-flash" and device != "cuda":
        return "n/a: FlashAttention needs a CUDA GPU"
    return None


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _device_line(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from bulba.hardware import cpu_isa

    return (
        f"CPU: {name}, {torch.get_num_threads()} torch threads, {cpu_isa()} kernels; peak device memory = "
        "host RSS on CPU (no column)"
    )


def _peak_line(device: str) -> str:
    try:
        from bulba.model import flops

        out = []
        for precision in ("bf16-mixed",) if device == "cuda" else ("bf16-mixed", "32-true"):
            peak, what = flops.device_peak_flops(device, precision)
            out.append(f"{precision}: {what} {peak / 1e12:.3g} TFLOP/s")
        return "; ".join(out)
    except Exception as e:  # noqa: BLE001 - the table still prints
        return f"peak unknown: {e}"


def _precision_line(device: str, recipe) -> str:
    """What precision=auto picks on this machine and why (the bulba rows and hf-trainer-best use it)."""
    try:
        from bulba.hardware import choose_precision

        c = choose_precision("auto", device, recipe.model, recipe.train.batch_size * recipe.model.ctx_len)
        return f"{c.value} ({c.reason})"
    except Exception as e:  # noqa: BLE001 - the table still prints
        return f"unknown: {e}"


def _versions() -> str:
    out = []
    for mod in ("torch", "transformers", "accelerate", "lightning", "datasets", "flash_attn"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - absent or broken optional package
            if mod == "flash_attn":
                out.append("flash_attn absent")
    return ", ".join(out)


def _run_row(row: str, spec: dict, tmp: Path, timeout: float) -> dict:
    """One row in a fresh Python process; returns its result dict (or the reason it has none)."""
    spec_path, out_path, log_path = tmp / f"{row}.spec.json", tmp / f"{row}.out.json", tmp / f"{row}.log"
    spec_path.write_text(json.dumps(dict(spec, row=row)), encoding="utf-8")
    cmd = [sys.executable, "-m", "bulba.benchmarks.train", "--worker", str(spec_path), str(out_path)]
    print(f"[bench train] {row} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        TOKENIZERS_PARALLELISM="false",
    )
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    with open(log_path, "w") as log:
        # own process group: on timeout the row goes with its helpers (Inductor compile workers)
        p = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        except BaseException:  # Ctrl-C: do not leave the row running
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
        if rc is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    wall = time.perf_counter() - t0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if rc == 0 and out_path.is_file():
        res = json.loads(out_path.read_text(encoding="utf-8"))
    else:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        why = (
            f"timed out after {timeout:.0f} s"
            if rc is None
            else f"exit {rc}: " + (lines[-1][:200] if lines else "no output")
        )
        res = {"note": f"failed ({why})"}
        sys.stderr.write(f"[bench train] {row} failed; last lines:\n" + "\n".join(lines[-15:]) + "\n")
    res["name"] = row
    res["seconds"] = wall
    res["host_load"] = load
    status = res.get("note") or f"{res.get('tokens_per_s', 0):,.0f} tokens/s"
    print(f"[bench train] {row}: {status} ({wall:.0f} s)", file=sys.stderr, flush=True)
    return res


def _table_row(r: dict, device: str) -> dict:
    row = {"name": r["name"]}
    for k in ("precision", "attention", "compile", "optimizer", "loader"):
        row[k] = r.get(k, "n/a")
    for k in FIGURES:
        if k == "peak_device_mb" and device != "cuda":
            continue
        row[k] = r.get(k)
    row["loss"] = r.get("loss")
    row["seconds"] = r.get("seconds")
    row["host_load"] = r.get("host_load")
    row["note"] = r.get("note", "")
    return row


# =============================================================================== worker side


def _bf16_faster(device: str, recipe) -> bool:
    """HF's best switches include bf16 only where bf16 is the faster precision: the same measured
    choice as BulbaGPT's precision=auto (bulba.hardware), so both sides get this machine's best."""
    from bulba.hardware import choose_precision

    tokens = recipe.train.batch_size * recipe.model.ctx_len
    return choose_precision("auto", device, recipe.model, tokens).value == "bf16-mixed"


def _mfu(recipe, tokens_per_s: float, device: str, precision: str):
    try:
        from bulba.model import flops
    except ImportError:
        return None
    return flops.mfu(recipe.model, tokens_per_s, device, precision="32-true" if precision == "fp32" else precision)


def _worker(spec_path: str, out_path: str) -> None:
    from bulba.atomic import write_json
    from bulba.config import load_recipe

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    recipe = load_recipe(spec["preset"], spec["overrides"])
    row = spec["row"]
    if spec.get("memory_cap_gb") and spec["device"] == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        # allocations past the cap raise OutOfMemoryError, as on a card of that size
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_cap_gb"] * 2**30 / total), 0)
    if row in HF_ROWS:
        res = _run_hf(spec, recipe, best=(row == "hf-trainer-best"))
    else:
        res = _run_bulba(spec, recipe, mode=row.removeprefix("bulba-"))
    res.setdefault("peak_rss_mb", peak_rss_mb())
    if res.get("tokens_per_s") and res.get("mfu") is None:
        res["mfu"] = _mfu(recipe, res["tokens_per_s"], spec["device"], res.get("precision") or "bf16-mixed")
    write_json(out_path, res)


def _run_hf(spec: dict, recipe, best: bool) -> dict:
    import torch
    import transformers
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    transformers.logging.set_verbosity_error()
    try:
        import datasets
    except ImportError:
        datasets = None
    device = spec["device"]
    m, t = recipe.model, recipe.train
    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps
    torch.manual_seed(recipe.seed)
    cfg = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.n_embd,
        intermediate_size=m.ffn_hidden,
        num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head,
        num_key_value_heads=m.n_kv_head,
        head_dim=m.head_dim,
        max_position_embeddings=m.ctx_len,
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std,
        rope_theta=m.rope_theta,  # transformers 5 maps it to rope_parameters
        bos_token_id=spec.get("bos_id"),
        eos_token_id=spec.get("eos_id"),
        pad_token_id=spec.get("pad_id"),
        use_cache=False,
    )
    bf16 = best and _bf16_faster(device, recipe)
    if best:
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    else:
        model = LlamaForCausalLM(cfg)  # whatever transformers picks by default
    attention = model.config._attn_implementation

    if spec.get("hf_data"):
        train_ds = datasets.load_from_disk(spec["hf_data"])
        loader = "torch DataLoader (datasets, {} workers)"
    else:
        train_ds = _MemmapBlocks(spec["data_dir"], m.ctx_len)
        loader = "torch DataLoader (np.memmap blocks: datasets absent, {} workers)"
    out_dir = tempfile.TemporaryDirectory(prefix="hf-bench-")
    targs = TrainingArguments(
        output_dir=out_dir.name,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=total,
        disable_tqdm=True,
        max_steps=total,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=1,
        dataloader_drop_last=True,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.beta1,
        adam_beta2=t.beta2,
        max_grad_norm=t.grad_clip,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": t.min_lr},
        seed=recipe.seed,
        use_cpu=(device == "cpu"),
        bf16=bf16,
        torch_compile=best,
    )

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.ends.append(time.perf_counter())
            if len(self.ends) == warmup and device == "cuda":
                torch.cuda.reset_peak_memory_stats()  # peak over the timed steps, as bulba.train.benchmark.benchmark

    timer = StepTimer()

    class LossTrainer(Trainer):  # keeps the last step's loss tensor: no extra host sync per step
        last_loss = None

        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            LossTrainer.last_loss = loss
            return loss

    trainer = LossTrainer(model=model, args=targs, train_dataset=train_ds, callbacks=[timer])
    seen = {}
    hook = register_optimizer_step_post_hook(lambda opt, a, kw: seen.setdefault("opt", opt))
    try:
        trainer.train()
    finally:
        hook.remove()
    if len(timer.ends) < total:
        raise RuntimeError(f"HF Trainer ran {len(timer.ends)} steps, expected {total}")
    dt = timer.ends[total - 1] - timer.ends[warmup - 1]
    tokens = steps * t.batch_size * m.ctx_len
    res = {
        "precision": "bf16-mixed" if bf16 else "fp32",
        "attention": attention,
        "compile": "torch_compile=True (whole model)" if best else "no",
        "optimizer": f"{_optimizer_name(seen.get('opt'))} (optim={getattr(targs.optim, 'value', targs.optim)})",
        "loader": loader.format(targs.dataloader_num_workers),
        "tokens_per_s": tokens / dt,
        "loss": float(LossTrainer.last_loss) if LossTrainer.last_loss is not None else None,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if device == "cuda":
        res["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


class _MemmapBlocks:
    """Map-style dataset of ctx-token blocks of train.bin (input_ids = labels, as group_texts)."""

    def __init__(self, data_dir: str, ctx: int):
        import numpy as np

        meta = json.loads((Path(data_dir) / "meta.json").read_text(encoding="utf-8"))
        self.tokens = np.memmap(
            Path(data_dir) / "train.bin", dtype=np.dtype(meta.get("dtype", "uint16")).newbyteorder("<"), mode="r"
        )
        self.ctx, self.n = ctx, len(self.tokens) // ctx

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        block = torch.from_numpy(self.tokens[i * self.ctx : (i + 1) * self.ctx].astype("int64"))
        return {"input_ids": block, "labels": block.clone()}


def _run_bulba(spec: dict, recipe, mode: str) -> dict:
    """The training engineer's `bulba.train.benchmark.benchmark`: the real LightningModule, strategy and
    Rust batch engine, `warmup + steps` optimizer steps, no run directory or tracking."""

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from bulba.train.benchmark import benchmark

    recipe.train.mode = mode
    recipe.train.accelerator = spec["device"]
    seen = {}
    hook = register_optimizer_step_post_hook(lambda opt, a, kw: seen.setdefault("opt", opt))
    try:
        r = benchmark(recipe, steps=spec["steps"], warmup=spec["warmup"])
    finally:
        hook.remove()
    cuda = spec["device"] == "cuda"
    res = {
        "precision": r.get("precision"),
        "attention": r.get("attention"),
        "attention_reason": r.get("attention_reason"),
        "compile": "blocks (Inductor, dynamic=False)" if mode in ("compile", "both") else "no",
        "optimizer": _optimizer_name(seen.get("opt")),
        "loader": f"Rust engine (bulba.data.loader, prefetch {recipe.data.prefetch})",
        "tokens_per_s": r["tokens_per_s"],
        "mfu": r.get("mfu"),
        "peak_rss_mb": r.get("peak_rss_mb"),
        "loss": r.get("final_loss"),
        "params": r.get("params"),
    }
    if cuda:
        res["peak_device_mb"] = r.get("peak_device_mb")
    if mode in ("flash", "both") and "asked for FlashAttention" in (r.get("attention_reason") or ""):  # a fallback
        res["note"] = f"no FlashAttention here: {r.get('attention')} attention ({r.get('attention_reason')})"
    return res


def _optimizer_name(opt) -> str:
    """What actually stepped: the optimizer's class and its implementation (fused / foreach)."""
    if opt is None:
        return "?"
    d = opt.defaults
    impl = (
        "fused"
        if d.get("fused")
        else "foreach"
        if d.get("foreach")
        else "for-loop"
        if d.get("foreach") is False
        else "default"
    )
    return f"{type(opt).__name__} {impl}"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("internal worker entry of `python bench.py train`; run that instead")
