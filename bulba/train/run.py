"""`train(recipe)`: everything `python train.py` does after parsing, as named phases.

    preflight   data against the recipe, accelerator, precision, memory, devices (preflight.py)
    resume      the checkpoint to continue, checked against the recipe (resume.py)
    open run    out_dir and its MLflow run on global rank 0 (run_dir.py)
    module      the LightningModule, restored from the checkpoint (module.py, checkpoint.py)
    fit         the Lightning Trainer (launch.py, strategy.py) under our signal handlers
    finish      how fit ended: final weights, a fault, or an interruption with its checkpoint

The run directory's files are listed in run_dir.py; `benchmark()` (benchmark.py) reuses the
module and the Trainer factory without a run directory.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from bulba import hardware
from bulba.config import Recipe
from bulba.data.loader import make_batches_factory
from bulba.model import flops
from bulba.train import init_from, resume
from bulba.train.checkpoint import Checkpointer
from bulba.train.launch import make_trainer
from bulba.train.preflight import Plan, preflight
from bulba.train.run_dir import RunDir, TrainingFault, open_run

__all__ = ["Interrupted", "TrainingFault", "train"]


class Interrupted(Exception):
    def __init__(self, signame: str, checkpoint: Path | None):
        super().__init__(signame)
        self.signame, self.checkpoint = signame, checkpoint


def train(recipe: Recipe, *, module_hook=None, enable_tracking: bool = True) -> dict:
    """Train per `recipe`; returns a summary dict. `module_hook(module)` lets tests patch."""
    import lightning as L

    t_start = time.perf_counter()
    plan = preflight(recipe)
    loaded = resume.load(recipe, resume.find(recipe, plan.rank0), plan.data, plan.rank0)
    # A fine-tuning run reads its parent only when it starts; resumed, it has its own checkpoints.
    parent = init_from.load(recipe, plan.data) if recipe.init_from and loaded is None else None
    L.seed_everything(recipe.seed, verbose=False)  # same init on every rank: seeded before construction
    _announce(recipe, plan)
    run = open_run(recipe, plan, loaded, resume.previous_run_id(recipe, loaded), enable_tracking)
    if parent is not None:
        run.tags(init_from.tags(parent))
    module, checkpointer = _build_module(recipe, plan, run, loaded)
    if parent is not None:
        module.model.load_state_dict(parent.state_dict)
        if plan.rank0:
            print(f"initialized from {parent.weights_path} (fresh optimizer and schedule)", flush=True)
    del loaded, parent  # the module holds the weights now; do not keep a second copy through fit
    if module_hook is not None:
        module_hook(module)
    trainer, strategy = make_trainer(
        recipe.train.mode,
        plan.accelerator,
        plan.precision,
        strategy=recipe.train.strategy,
        devices=plan.devices,
        n_proc=plan.n_proc,
        num_nodes=recipe.train.num_nodes,
        root=str(run.out),
    )
    status = "FAILED"
    old_handlers = _signal_handlers(module)
    try:
        _fit(trainer, module)
        if strategy.resolved:
            run.tags(
                {
                    "bulba.mode": recipe.train.mode,
                    "bulba.attention_backend": strategy.resolved["attention"],
                    "bulba.attention_reason": plan.attention_reason,
                    "bulba.compiled": strategy.resolved["compiled"],
                }
            )
        run.write_rank_log(module, trainer)
        status, summary = _finish(recipe, plan, run, module, checkpointer, t_start)
        return summary
    except Interrupted:
        status = "KILLED"
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        run.close(status, module.outcome.samples)


def _announce(recipe: Recipe, plan: Plan) -> None:
    if plan.rank0:
        m = recipe.model
        print(
            f"{recipe.name}: {plan.n_params:,} parameters ({flops.human(plan.n_params)}), "
            f"{m.n_layer} layers, d={m.n_embd}, heads {m.n_head}/{m.n_kv_head} (GQA 1:{m.n_head // m.n_kv_head}), "
            f"ctx {m.ctx_len}, vocab {m.vocab_size}; "
            f"{plan.accelerator} {plan.precision}, mode {recipe.train.mode}",
            flush=True,
        )
        print(f"precision {plan.precision}: {plan.precision_reason}", flush=True)
        print(f"attention {plan.attention}: {plan.attention_reason}", flush=True)
        if plan.accelerator == "cpu":
            print(f"threads: {hardware.thread_reason(recipe.train.threads)}", flush=True)


def _build_module(recipe: Recipe, plan: Plan, run: RunDir, loaded: dict | None):
    from tokenizers import Tokenizer

    from bulba.train.module import BulbaModule
    from bulba.train.val_sources import SourceBpb

    data = plan.data
    tok = Tokenizer.from_file(str(data.dir / "tokenizer.json"))
    checkpointer = Checkpointer(recipe, lambda: run.run_id, run.refresh_config, data.dataset_digest)
    module = BulbaModule(
        recipe,
        attention=plan.attention,
        batches_factory=make_batches_factory(recipe, data, pin=plan.accelerator == "cuda"),
        sink=run.tracker.metrics if run.tracker else None,
        tokenizer=tok,
        bos_id=data.bos_id,
        eos_id=data.eos_id,
        checkpointer=checkpointer,
        progress=True,
        val_sources=SourceBpb.from_data(data),
        chat=data.has_loss_mask,
    )
    if loaded is not None:
        resume.restore(module, loaded, plan.rank0)
    return module, checkpointer


def _fit(trainer, module) -> None:
    try:
        trainer.fit(module)
    except BaseException as e:  # Lightning's own SIGTERM path raises SIGTERMException
        if type(e).__name__ == "SIGTERMException":
            module.outcome.reason, module.outcome.signal = "signal", "SIGTERM"
        elif isinstance(e, KeyboardInterrupt):
            module.outcome.reason, module.outcome.signal = "signal", "SIGINT"
        else:
            raise


def _finish(recipe: Recipe, plan: Plan, run: RunDir, module, checkpointer: Checkpointer, t_start: float):
    """(MLflow status, summary) of a finished run; an interruption or a fault raises."""
    oc = module.outcome
    if oc.reason == "signal":
        # Normally written inside fit at the step boundary; Lightning's own SIGTERM path can
        # raise before our hook sees the signal, then it is written here (same state: the
        # counters only move at step boundaries).
        path = oc.checkpoint if oc.checkpointed else module.checkpoint(oc.signal or "signal")
        raise Interrupted(oc.signal or "signal", path)
    if oc.reason == "fault":
        raise TrainingFault(
            f"{oc.fault}; stopped, no final weights written; checkpoint from before the fault: "
            f"{oc.checkpoint}. Lower train.lr or set train.nan_policy=skip and resume with resume=auto"
        )
    if oc.reason == "running":
        raise RuntimeError("training ended before train.max_steps (the data iterator ran dry?)")
    # finished (the final validation and samples ran at the last step): checkpoint, weights
    summary = {
        "step": module.state.step,
        "tokens": module.state.tokens,
        "val_loss": oc.last_val,
        "losses": module.losses,
        "run_id": run.run_id,
        "out_dir": str(run.out),
        "params": plan.n_params,
        "seconds": time.perf_counter() - t_start,
        "nan_skips": module.state.nan_skips,
        "precision": plan.precision,
    }
    if plan.rank0:
        run.write_final(module, checkpointer.last_model_sd)
    return "FINISHED", summary


def _signal_handlers(module):
    """SIGTERM (SLURM preemption, `kill`) and SIGINT (Ctrl-C): finish the current step, write a
    checkpoint, exit. A second Ctrl-C stops at once."""
    old = {}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if module.request_stop(name) and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(
            f"\n{name} received: stopping after this step and writing a checkpoint (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    for s in (signal.SIGTERM, signal.SIGINT):
        old[s] = signal.signal(s, handler)
    return old
