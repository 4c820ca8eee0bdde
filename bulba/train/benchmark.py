"""`benchmark(recipe)`: the real LightningModule, strategy and Trainer (launch.make_trainer, as
train() uses) for a few steps, without a run directory, tracking or checkpoints; `bench.py
train` runs it once per row in its own process."""

from __future__ import annotations

import time

import torch

from bulba.config import Recipe
from bulba.data.loader import make_batches_factory
from bulba.errors import UserError
from bulba.memory import peak_rss_mb
from bulba.model import flops
from bulba.model.weights import param_count
from bulba.train.launch import make_trainer
from bulba.train.preflight import prepare_recipe, resolve_accelerator, resolve_attention, resolve_precision


def benchmark(recipe: Recipe, steps: int = 20, warmup: int = 5) -> dict:
    """Train `warmup + steps` steps of `recipe` (no run directory, no tracking, no checkpoints);
    returns steady-state tokens_per_s, mfu, peak_device_mb, peak_rss_mb over the timed steps."""
    import lightning as L

    from bulba.train.module import BulbaModule

    t = recipe.train
    t.max_steps = warmup + steps
    t.val_every = t.sample_every = t.ckpt_every = 0
    t.log_every = 10**9
    t.warmup_steps = min(t.warmup_steps, 1)
    data = prepare_recipe(recipe)
    accelerator = resolve_accelerator(recipe)
    if t.threads:
        torch.set_num_threads(t.threads)
    choice = resolve_precision(recipe, accelerator)  # after the threads: the probe measures with them
    precision = choice.value
    attn = resolve_attention(recipe, accelerator, precision)
    L.seed_everything(recipe.seed, verbose=False)
    module = BulbaModule(
        recipe, attention=attn.value, batches_factory=make_batches_factory(recipe, data, pin=accelerator == "cuda")
    )
    module.final_eval = False
    times: list[float] = []

    def timed_step():
        if accelerator == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        if len(times) == warmup + 1 and accelerator == "cuda":
            torch.cuda.reset_peak_memory_stats()

    module.after_step.append(timed_step)
    trainer, strategy = make_trainer(t.mode, accelerator, precision)
    trainer.fit(module)
    # Per-step durations of the timed steps; the median resists the noise of a shared machine.
    stamps = times[max(warmup - 1, 0) :]
    durations = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    n = len(durations)
    if n == 0:
        raise UserError("benchmark: need at least one timed step after warm-up")
    median = durations[n // 2] if n % 2 else 0.5 * (durations[n // 2 - 1] + durations[n // 2])
    per_step = t.batch_size * t.grad_accum * recipe.model.ctx_len
    tps = per_step / median
    tps_mean = per_step * n / sum(durations)
    device = torch.device(accelerator, 0) if accelerator == "cuda" else torch.device("cpu")
    return {
        "mode": t.mode,
        "precision": precision,
        "precision_reason": choice.reason,
        "attention": strategy.resolved["attention"],
        "attention_reason": attn.reason,
        "tokens_per_s": tps,
        "mfu": flops.mfu(recipe.model, tps, device, recipe.model.ctx_len, precision=precision),
        "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if accelerator == "cuda" else None,
        "peak_rss_mb": peak_rss_mb(),
        "tokens_per_s_mean": tps_mean,
        "step_time_s": median,
        "steps_timed": n,
        "final_loss": module.losses.get(module.state.step),
        "params": param_count(recipe.model),
    }
