"""Wiring: recipe + prepared data -> Lightning Trainer + BulbaModule -> run directory + MLflow run.

`train(recipe)` is everything `python train.py` does after parsing; `benchmark(recipe, ...)`
trains a few steps without writing a run and returns tokens/s, MFU and peak memory
(`bench.py train` reuses it).

Run directory (docs/contracts.md, "Runs"):

    out_dir/config.json        written at start (export.py can read any checkpoint of the run)
    out_dir/tokenizer.json     copy of the data's tokenizer
    out_dir/recipe.yaml        the resolved recipe
    out_dir/metrics.jsonl      every logged metric, also when the tracking server is down
    out_dir/samples.jsonl      generated samples
    out_dir/checkpoints/step-N resumable state (bulba.checkpoint)
    out_dir/final.safetensors  fp32 weights, written last, only from finite weights
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

from . import checkpoint as ckpt
from . import flops, hardware
from .atomic import atomic_open, write_json, write_text
from .config import Recipe
from .errors import UserError

RUN_FORMAT = "bulba-run"
RUN_VERSION = 1


class TrainingFault(UserError):
    """The run stopped on a numerical fault (a checkpoint from before it was written)."""


class Interrupted(Exception):
    def __init__(self, signame: str, checkpoint: Path | None):
        super().__init__(signame)
        self.signame, self.checkpoint = signame, checkpoint


# --------------------------------------------------------------------------- rank (before launch)


def early_global_rank() -> int:
    """Global rank before Lightning sets up (torchrun: RANK; SLURM: SLURM_PROCID; Lightning's
    own subprocess launcher: LOCAL_RANK/NODE_RANK of the children)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", "0") or 0)
    return local + node  # only tested for == 0, which this gets right


# --------------------------------------------------------------------------- tracking adapter


class Tracker:
    """The one place training talks to MLflow: bulba.tracking.RunTracker (queued, spooled to
    out_dir/mlflow_spool.jsonl, replayed after an outage; `python -m bulba.tracking sync
    OUT_DIR` sends what a dead server never got). Metrics also go to out_dir/metrics.jsonl, the
    plain local record the tests and quick scripts read."""

    def __init__(self, enabled: bool, metrics_file: Path | None):
        self.enabled = enabled
        self._rt = None
        self._metrics_file = metrics_file
        self._fh = open(metrics_file, "a", encoding="utf-8") if metrics_file else None

    @property
    def run_id(self) -> str | None:
        return self._rt.run_id if self._rt is not None else None

    def start(self, experiment: str, run_name: str | None, run_dir: Path, run_id: str | None,
              tags: dict, params: dict | None) -> str | None:
        if not self.enabled:
            return None
        from .tracking import RunTracker

        # resume=True + run_dir: a run dir holding mlflow_run.json continues that run (same id).
        self._rt = RunTracker(experiment, run_name, run_dir=run_dir, run_id=run_id, tags=tags, params=params,
                              resume=True, system_metrics=True)
        return self._rt.run_id

    def tags(self, d: dict):
        if self._rt is not None:
            self._rt.set_tags({k: str(v) for k, v in d.items()})

    def metrics(self, d: dict, step: int):
        if self._fh is not None:
            try:
                self._fh.write(json.dumps({"step": step, "time": time.time(), **d}) + "\n")
                self._fh.flush()
            except OSError as e:  # disk full: the weights matter more than the local log; say it once
                if not getattr(self, "_warned", False):
                    self._warned = True
                    print(f"warning: cannot write {self._metrics_file} ({e.strerror or e}); training continues"
                          + (", metrics still go to MLflow" if self._rt is not None else ""),
                          file=sys.stderr, flush=True)
        if self._rt is not None:
            clean = {k: float(v) for k, v in d.items() if v is not None and math.isfinite(float(v))}
            self._rt.log_metrics(clean, step=step)

    def artifact(self, path: Path, artifact_path: str | None = None):
        if self._rt is not None:
            self._rt.log_artifact(str(path), artifact_path)

    def log_input(self, dataset, context: str):
        if self._rt is not None:
            self._rt.log_input(dataset, context=context)

    def end(self, status: str = "FINISHED"):
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        if self._rt is not None:
            self._rt.finish(status)
            self._rt = None


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, tuple)) else v
    return out


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------- data


class TorchBatches:
    """bulba.data.Batches -> host torch tensors (pinned on CUDA), starting at a given batch."""

    def __init__(self, batches, start: int, pin: bool, stream: bool, limit: int | None = None):
        self.batches, self.start, self.pin, self.stream, self.limit = batches, start, pin, stream, limit

    def __iter__(self):
        from .lit_module import batch_to_torch

        self.batches.seek(self.start)
        for i, b in enumerate(self.batches):
            if self.limit is not None and i >= self.limit:
                return
            yield batch_to_torch(b, pin=self.pin, documents=not self.stream)


def make_batches_factory(recipe: Recipe, data, pin: bool):
    from .data import Batches

    d, m, t = recipe.data, recipe.model, recipe.train

    def factory(split: str, rank: int, world: int, start: int):
        train = split == "train"
        b = Batches(data, split=split, sampler=d.sampler, batch_size=t.batch_size, ctx=m.ctx_len,
                    seed=recipe.seed, rank=rank, world_size=world, buckets=d.buckets, prefetch=d.prefetch,
                    shuffle=train, infinite=train, drop_last=train)
        return TorchBatches(b, start, pin, d.sampler == "stream", None if train else t.val_batches)

    return factory


# --------------------------------------------------------------------------- checks before anything heavy


def resolve_precision(recipe: Recipe, accelerator: str) -> hardware.Choice:
    """train.precision, with 'auto' decided by what is fastest here (bulba.hardware). Call it after
    the thread count is set: the CPU probe measures with the threads training will use."""
    tokens = recipe.train.batch_size * recipe.model.ctx_len
    return hardware.choose_precision(recipe.train.precision, accelerator, recipe.model, tokens)


def resolve_accelerator(recipe: Recipe) -> str:
    a = recipe.train.accelerator
    if a in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.accelerator={a} but no CUDA device is visible; use train.accelerator=cpu")
        return "cuda"
    if a == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def memory_limit_bytes() -> int | None:
    """Physical memory, or the cgroup's limit when lower (containers, SLURM jobs)."""
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        limit = None
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            v = int(Path(f).read_text().strip())
            limit = v if limit is None else min(limit, v)
    return limit


def check_attention_memory(recipe: Recipe, accelerator: str) -> None:
    """A ctx_len longer than this machine can train: refuse it (exit 2) instead of being OOM-killed.

    On CPU, PyTorch's SDPA backward (and the document mask of packed batches) materializes the
    [batch, heads, T, T] score matrix; one layer's fp32 copy of it must fit in memory with room
    to spare. GPUs use fused kernels that never build it, so nothing is checked there."""
    if accelerator != "cpu":
        return
    m, t = recipe.model, recipe.train
    limit = memory_limit_bytes()
    params = flops.param_count(m)
    if limit and params * 16 > limit:  # fp32 weights + gradients + two AdamW moments
        raise UserError(f"the model has {flops.human(params)} parameters: weights, gradients and optimizer state "
                        f"need ~{params * 16 / 2**30:.0f} GiB, more than this machine's {limit / 2**30:.0f} GiB; "
                        "check model.n_layer / n_embd / ffn_hidden / vocab_size")
    need = t.batch_size * m.n_head * m.ctx_len ** 2 * 4
    if limit and need > limit // 2:
        raise UserError(f"model.ctx_len={m.ctx_len} is longer than this machine can train on CPU: attention "
                        f"scores alone need ~{need / 2**30:.0f} GiB per layer (batch {t.batch_size} x "
                        f"{m.n_head} heads x ctx^2), memory is {limit / 2**30:.0f} GiB; lower model.ctx_len "
                        "or train.batch_size")


def run_exists(out: Path) -> bool:
    return (out / "config.json").exists() or (out / "checkpoints").exists() or (out / "final.safetensors").exists()


def check_out_dir(recipe: Recipe) -> Path | None:
    """Refuse to overwrite a run; with resume=auto return the checkpoint to resume from."""
    out = Path(recipe.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {out} exists and is not a directory")
    if recipe.resume != "auto":
        if run_exists(out):
            raise UserError(f"out_dir {out} already holds a run; pass resume=auto to continue it, "
                            f"or out_dir=<new dir> to start another")
        return None
    return ckpt.latest_checkpoint(out / "checkpoints")


def prepare_recipe(recipe: Recipe):
    """Validate data against the recipe; fill model.vocab_size from meta.json. Returns TokenData."""
    from .data import open_data

    data = open_data(recipe.data.dir, recipe.model.vocab_size)
    if recipe.model.vocab_size is None:
        recipe.model.vocab_size = data.vocab_size
    if not (data.dir / "tokenizer.json").is_file():
        raise UserError(f"{data.dir}/tokenizer.json is missing: re-run prepare.py")
    # bos_id / eos_id / pad_id were checked against the vocabulary by open_data.
    check_splits(recipe, data)
    return data


def check_splits(recipe: Recipe, data) -> None:
    """Open both splits as training will (cheap: mmap, sizes, index, the vocabulary check of the
    first and last blocks, enough tokens for ctx_len), so a truncated or corrupted token file or
    a ctx_len longer than the data holds fails before the run directory or MLflow run exists."""
    from .data import Batches

    d, m, t = recipe.data, recipe.model, recipe.train
    for split in ("train", "val"):
        train = split == "train"
        Batches(data, split=split, sampler=d.sampler, batch_size=t.batch_size, ctx=m.ctx_len, seed=recipe.seed,
                buckets=d.buckets, prefetch=1, shuffle=train, infinite=train, drop_last=train)


# --------------------------------------------------------------------------- the run


def run_config(recipe: Recipe, data, run_id: str | None) -> dict:
    return {
        "format": RUN_FORMAT, "version": RUN_VERSION,
        "model": dataclasses.asdict(recipe.model),
        "tokenizer": {"bos_id": data.bos_id, "eos_id": data.eos_id, "pad_id": data.pad_id, "add_bos_token": True},
        "recipe": recipe.to_dict(),
        "dataset_digest": data.dataset_digest,
        "mlflow_run_id": run_id,
    }


def _signal_handlers(module):
    """SIGTERM (SLURM preemption, `kill`) and SIGINT (Ctrl-C): finish the current step, write a
    checkpoint, exit. A second Ctrl-C stops at once."""
    old = {}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if module._stop_request and signum == signal.SIGINT:
            raise KeyboardInterrupt
        module._stop_request = name
        print(f"\n{name} received: stopping after this step and writing a checkpoint "
              f"(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    for s in (signal.SIGTERM, signal.SIGINT):
        old[s] = signal.signal(s, handler)
    return old


def full_state(module) -> tuple[dict, dict | None]:
    """(model state dict, optimizer state dict) with full, unsharded tensors on global rank 0.

    Single device and DDP: the local module (identical on every rank). FSDP: Lightning gathers
    the full weights (a collective: every rank must call this); the sharded optimizer state is
    not saved, so an FSDP resume restarts the AdamW moments (said in docs/training.md)."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = module.trainer.strategy if module._trainer is not None else None
    if isinstance(strategy, FSDPStrategy):
        sd = strategy.lightning_module_state_dict()
        return {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}, None
    opt = getattr(module, "raw_optimizer", None)
    return module.model.state_dict(), (opt.state_dict() if opt is not None else None)


def _make_checkpointer(recipe: Recipe, get_run_id, on_save=None, dataset_digest: str | None = None):
    root = Path(recipe.out_dir) / "checkpoints"

    def save(module, reason: str) -> Path | None:
        st = module.state
        strategy = module.trainer.strategy if module._trainer is not None else None
        model_sd, opt_sd = full_state(module)
        module._last_model_sd = model_sd if module.global_rank == 0 else None  # for final.safetensors
        path = None
        if module.global_rank == 0:
            t0 = time.perf_counter()
            try:
                world = module.trainer.world_size if module._trainer is not None else 1
                path = _save(st, model_sd, opt_sd, reason, world)
            except OSError as e:
                prev = ckpt.latest_checkpoint(root)
                msg = (f"cannot write checkpoint step {st.step} in {root} ({e.strerror or e}); "
                       f"the previous checkpoint {prev or '(none)'} is intact")
                if reason != "interval":
                    raise UserError(msg + "; free space and resume with resume=auto") from None
                # Interval checkpoint: keep training (the weights in memory are fine), try
                # again at the next interval, and say so.
                print(f"warning: {msg}; training continues", file=sys.stderr, flush=True)
                return None
            if on_save is not None:
                on_save()
            print(f"checkpoint ({reason}): {path} [{time.perf_counter() - t0:.1f}s]", flush=True)
        if strategy is not None and module.trainer.world_size > 1:
            with contextlib.suppress(Exception):
                strategy.barrier("checkpoint")
        return path

    def _save(st, model_sd, opt_sd, reason, world):
        state = {"reason": reason, "train": dataclasses.asdict(st), "mlflow_run_id": get_run_id(),
                 "dataset_digest": dataset_digest,
                 "sampler": {"consumed": st.consumed}, "world_size": world, "recipe": recipe.to_dict()}
        return ckpt.save_checkpoint(root, st.step, model_sd, opt_sd, state, keep=recipe.train.ckpt_keep)

    return save


def train(recipe: Recipe, *, module_hook=None, enable_tracking: bool = True) -> dict:
    """Train per `recipe`; returns a summary dict. `module_hook(module)` lets tests patch."""
    import lightning as L

    from .lit_module import BulbaModule

    t_start = time.perf_counter()
    rank0 = early_global_rank() == 0
    data = prepare_recipe(recipe)
    resume_from = check_out_dir(recipe) if rank0 else (
        ckpt.latest_checkpoint(Path(recipe.out_dir) / "checkpoints") if recipe.resume == "auto" else None)
    accelerator = resolve_accelerator(recipe)
    if recipe.train.strategy == "fsdp" and accelerator != "cuda":
        raise UserError("train.strategy=fsdp needs CUDA GPUs (torch's FSDP has no CPU backend); "
                        "use train.strategy=ddp on CPU")
    check_attention_memory(recipe, accelerator)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    choice = resolve_precision(recipe, accelerator)
    precision = choice.value
    out = Path(recipe.out_dir)

    loaded = None
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(resume_from)
        if loaded["state"]["train"]["step"] >= recipe.train.max_steps:
            raise UserError(f"{out} is already at step {loaded['state']['train']['step']} >= "
                            f"train.max_steps={recipe.train.max_steps}; raise train.max_steps to train further")
        _check_resume(resume_from, loaded["state"], recipe, data, rank0)

    # ---- model (same init on every rank: seeded before construction)
    L.seed_everything(recipe.seed, verbose=False)
    n_params = flops.param_count(recipe.model)
    if rank0:
        print(f"{recipe.name}: {n_params:,} parameters ({flops.human(n_params)}), "
              f"{recipe.model.n_layer} layers, d={recipe.model.n_embd}, heads {recipe.model.n_head}/"
              f"{recipe.model.n_kv_head} (GQA 1:{recipe.model.n_head // recipe.model.n_kv_head}), "
              f"ctx {recipe.model.ctx_len}, vocab {recipe.model.vocab_size}; "
              f"{accelerator} {precision}, mode {recipe.train.mode}", flush=True)
        print(f"precision {precision}: {choice.reason}", flush=True)
        if accelerator == "cpu":
            print(f"threads: {hardware.thread_reason(recipe.train.threads)}", flush=True)

    # ---- run directory and tracking (global rank 0 only)
    run_id = None
    if loaded is not None:
        run_id = loaded["state"].get("mlflow_run_id")
    elif recipe.resume == "auto" and (out / "config.json").is_file():
        with contextlib.suppress(Exception):
            run_id = json.loads((out / "config.json").read_text(encoding="utf-8")).get("mlflow_run_id")
    tracker = None
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        tracker = Tracker(enable_tracking, out / "metrics.jsonl")
        new_run = run_id is None and not (out / "mlflow_run.json").exists()
        commit = git_commit()
        tags = {"bulba.stage": "train", "bulba.git_commit": commit,
                "mlflow.source.git.commit": commit.removesuffix("-dirty"),
                "bulba.dataset_digest": data.dataset_digest or "unknown",
                "bulba.prepare_run_id": data.meta.get("mlflow_run_id") or "none",
                "bulba.data_dir": str(data.dir.resolve()), "bulba.params": n_params,
                "bulba.preset": recipe.name, "bulba.precision": precision,
                "bulba.precision_reason": choice.reason[:4000],
                **({"bulba.cpu": hardware.cpu_model(), "bulba.cpu_isa": hardware.cpu_isa(),
                    "bulba.threads": hardware.thread_reason(recipe.train.threads)} if accelerator == "cpu" else {}),
                "bulba.accelerator": accelerator, "bulba.out_dir": str(out.resolve())}
        run_id = tracker.start(recipe.tracking.experiment, recipe.tracking.run_name or f"{recipe.name}-{out.name}",
                               out, run_id, tags, flatten(recipe.to_dict()) if new_run else None) or run_id
        shutil.copyfile(data.dir / "tokenizer.json", out / ".tmp-tokenizer.json")
        os.replace(out / ".tmp-tokenizer.json", out / "tokenizer.json")
        write_json(out / "config.json", run_config(recipe, data, run_id))
        recipe_yaml = yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
        write_text(out / "recipe.yaml", recipe_yaml)
        if new_run:
            tracker.artifact(out / "recipe.yaml")
            tracker.artifact(out / "tokenizer.json")
            _log_dataset(tracker, data)
        else:
            step0 = loaded["state"]["train"]["step"] if loaded else 0
            write_text(out / f"recipe-resume-{step0:08d}.yaml", recipe_yaml)
            tracker.artifact(out / f"recipe-resume-{step0:08d}.yaml")
            tracker.tags({f"bulba.resumed_at_step_{step0}": commit})

    written_id = [run_id]

    def current_run_id():
        return (tracker.run_id if tracker else None) or run_id

    def refresh_config():
        # The MLflow run id may only become known after start (server slow or down): put it
        # into config.json as soon as it is, so export.py links to the right run.
        rid = current_run_id()
        if rank0 and rid and rid != written_id[0]:
            write_json(out / "config.json", run_config(recipe, data, rid))
            written_id[0] = rid

    # ---- the module
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data.dir / "tokenizer.json"))
    module = BulbaModule(recipe, batches_factory=make_batches_factory(recipe, data, pin=accelerator == "cuda"),
                         sink=tracker.metrics if tracker else None, tokenizer=tok,
                         bos_id=data.bos_id, eos_id=data.eos_id,
                         checkpointer=_make_checkpointer(recipe, current_run_id, refresh_config,
                                                                 data.dataset_digest))
    if loaded is not None:
        module.model.load_state_dict(loaded["model"])
        module._pending_optimizer = loaded["optimizer"]
        module.resumed_world_size = loaded["state"].get("world_size")
        ts = loaded["state"]["train"]
        for k, v in ts.items():
            setattr(module.state, k, v)
        ckpt.set_rng_state(*loaded["rng"])
        if rank0:
            print(f"resuming from {resume_from} (step {module.state.step}, "
                  f"{module.state.consumed} batches consumed)", flush=True)
        del loaded
    if module_hook is not None:
        module_hook(module)

    # ---- Lightning
    from .strategy import make_strategy

    devices = recipe.train.devices
    if devices == "auto":
        devices = max(1, torch.cuda.device_count()) if accelerator == "cuda" else 1
    if not (isinstance(devices, int) and devices > 0) and not (isinstance(devices, list) and devices):
        raise UserError(f"train.devices must be 'auto', a positive count or a list of device ids, got {devices!r}")
    n_proc = (devices if isinstance(devices, int) else len(devices)) * recipe.train.num_nodes
    if os.environ.get("WORLD_SIZE", "").isdigit():  # torchrun / SLURM decide the world
        n_proc = max(n_proc, int(os.environ["WORLD_SIZE"]))
    device = torch.device(accelerator, 0) if accelerator == "cuda" else torch.device("cpu")
    strategy = make_strategy(recipe.train.strategy, recipe.train.mode, device, n_proc)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__`.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")  # Lightning vs torch 2.10+
    trainer = L.Trainer(
        accelerator="gpu" if accelerator == "cuda" else "cpu",
        devices=devices,
        num_nodes=recipe.train.num_nodes, strategy=strategy, precision=precision,
        max_epochs=1, max_steps=-1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, deterministic=False, default_root_dir=str(out),
    )
    old_handlers = _signal_handlers(module)
    status = "FAILED"
    try:
        try:
            trainer.fit(module)
        except BaseException as e:  # Lightning's own SIGTERM path raises SIGTERMException
            if type(e).__name__ == "SIGTERMException":
                module.outcome.reason, module.outcome.signal = "signal", "SIGTERM"
            elif isinstance(e, KeyboardInterrupt):
                module.outcome.reason, module.outcome.signal = "signal", "SIGINT"
            else:
                raise
        oc = module.outcome
        if strategy.resolved and tracker:
            tracker.tags({"bulba.mode": recipe.train.mode, "bulba.attention_backend": strategy.resolved["attention"],
                          "bulba.attention_reason": strategy.resolved["attention_reason"],
                          "bulba.compiled": strategy.resolved["compiled"]})
        _write_rank_log(out, module, trainer)
        if oc.reason == "signal":
            # Normally written inside fit at the step boundary; Lightning's own SIGTERM path can
            # raise before our hook sees the signal, then it is written here (same state: the
            # counters only move at step boundaries).
            path = oc.checkpoint if oc.checkpointed else module._checkpointer(module, oc.signal or "signal")
            status = "KILLED"
            raise Interrupted(oc.signal or "signal", path)
        if oc.reason == "fault":
            path = oc.checkpoint
            raise TrainingFault(f"{oc.fault}; stopped, no final weights written; checkpoint from before the fault: "
                                f"{path}. Lower train.lr or set train.nan_policy=skip and resume with resume=auto")
        if oc.reason == "running":
            raise RuntimeError("training ended before train.max_steps (the data iterator ran dry?)")
        # ---- finished (the final validation and samples ran at the last step): checkpoint, weights
        val = oc.last_val
        summary = {"step": module.state.step, "tokens": module.state.tokens, "val_loss": val,
                   "losses": module.losses, "run_id": run_id, "out_dir": str(out), "params": n_params,
                   "seconds": time.perf_counter() - t_start, "nan_skips": module.state.nan_skips,
                   "precision": precision}
        if rank0:
            run_id = (tracker.run_id if tracker else None) or run_id  # known late if the server was down
            summary["run_id"] = run_id
            _write_final(out, module, recipe, data, run_id, tracker)
        status = "FINISHED"
        return summary
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if rank0 and tracker:
            if module.outcome.samples:
                with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
                    for s in module.outcome.samples:
                        f.write(json.dumps(s, ensure_ascii=False) + "\n")
                tracker.artifact(out / "samples.jsonl")
            tracker.end(status)


def _check_resume(path: Path, state: dict, recipe: Recipe, data, rank0: bool) -> None:
    """A checkpoint continues only the same model; data or batch changes are allowed, said."""
    saved = state.get("recipe") or {}
    old_model, new_model = saved.get("model") or {}, dataclasses.asdict(recipe.model)
    diff = [f"{k} {old_model[k]!r} -> {new_model[k]!r}" for k in new_model
            if k in old_model and old_model[k] != new_model[k] and k != "init_std"]
    if diff:
        raise UserError(f"cannot resume from {path}: the model changed ({', '.join(diff)}); "
                        "restore those model.* values or start a new out_dir")
    changed = [f"{sec}.{k}" for sec, keys in (("data", ("sampler", "dir")), ("train", ("batch_size", "grad_accum")))
               for k in keys if (saved.get(sec) or {}).get(k) != getattr(getattr(recipe, sec), k)]
    if saved.get("seed") != recipe.seed:
        changed.append("seed")
    if state.get("dataset_digest") not in (None, data.dataset_digest):
        changed.append("dataset (digest)")
    run_tok, data_tok = Path(recipe.out_dir) / "tokenizer.json", data.dir / "tokenizer.json"
    if run_tok.is_file() and _token_table(run_tok) != _token_table(data_tok):
        # Same vocab size, other ids: the weights would be trained on tokens that mean something
        # else, and the run's tokenizer.json (what export ships) would be replaced. Refuse.
        raise UserError(f"cannot resume from {path}: {data.dir} was prepared with another tokenizer than "
                        f"{run_tok}; resume with the run's data.dir ({saved.get('data', {}).get('dir')}) or "
                        "start a new out_dir")
    if changed and rank0:
        print(f"warning: resuming with changed {', '.join(changed)}: training continues, but the batches "
              "differ from those the uninterrupted run would have seen", file=sys.stderr, flush=True)


def _token_table(path: Path):
    """What fixes token ids in a tokenizer.json: the BPE vocab, merges and added tokens."""
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj.get("model") or {}
        return (model.get("vocab"), model.get("merges"),
                sorted((t.get("id"), t.get("content")) for t in tj.get("added_tokens") or []))
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise UserError(f"{path} is not a readable tokenizer.json ({e})") from None


def _write_rank_log(out: Path, module, trainer):
    """Per-rank record of what data this rank consumed (fingerprints of its first batches)."""
    with contextlib.suppress(OSError):
        (out / "logs").mkdir(parents=True, exist_ok=True)
        write_json(out / "logs" / f"rank-{trainer.global_rank}.json",
                   {"rank": trainer.global_rank, "world_size": trainer.world_size,
                    "consumed": module.state.consumed, "first_batches_sha256": module.fingerprints})


def _log_dataset(tracker: Tracker, data):
    """Link the prepare run's dataset as an MLflow dataset input (best effort)."""
    try:
        import numpy as np
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.types import Schema, TensorSpec

        # Same name, digest and schema as prepare.py logs: MLflow shows both runs on one dataset.
        schema = Schema([TensorSpec(np.dtype(data.dtype), (-1,), "tokens")])
        ds = MetaDataset(source=LocalArtifactDatasetSource(str(data.dir.resolve())), name=data.dir.name,
                         digest=(data.dataset_digest or "unknown")[:36], schema=schema)  # MLflow's limit
        tracker.log_input(ds, context="training")
    except Exception as e:  # noqa: BLE001 - the tag bulba.dataset_digest carries the same link
        print(f"warning: could not log the dataset input to MLflow ({e})", file=sys.stderr)


def _write_final(out: Path, module, recipe: Recipe, data, run_id, tracker):
    from safetensors.torch import save

    src = getattr(module, "_last_model_sd", None) or module.model.state_dict()  # the final checkpoint's
    sd = {k: v.detach().float().cpu().contiguous().clone() for k, v in src.items()}
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise TrainingFault(f"final weights contain NaN/Inf ({', '.join(bad[:3])}); not writing final.safetensors")
    V = recipe.model.vocab_size
    assert sd["tok_embeddings.weight"].shape[0] == V
    try:
        with atomic_open(out / "final.safetensors", "wb") as f:
            f.write(save(sd, metadata={"format": "pt", "bulba.step": str(module.state.step)}))
    except OSError as e:
        raise UserError(f"cannot write {out / 'final.safetensors'} ({e.strerror or e}); the final checkpoint "
                        f"in {out / 'checkpoints'} holds the same weights") from None
    write_json(out / "config.json", run_config(recipe, data, run_id))
    print(f"wrote {out / 'final.safetensors'} ({len(sd)} tensors, step {module.state.step})", flush=True)
    if tracker:
        tracker.artifact(out / "final.safetensors", "model")
        tracker.artifact(out / "config.json", "model")
        tracker.artifact(out / "tokenizer.json", "model")


# --------------------------------------------------------------------------- benchmark


def benchmark(recipe: Recipe, steps: int = 20, warmup: int = 5) -> dict:
    """Train `warmup + steps` steps of `recipe` (no run directory, no tracking, no checkpoints);
    returns steady-state tokens_per_s, mfu, peak_device_mb, peak_rss_mb over the timed steps."""
    import lightning as L

    from .lit_module import BulbaModule
    from .strategy import make_strategy

    t = recipe.train
    t.max_steps = warmup + steps
    t.val_every = t.sample_every = t.ckpt_every = 0
    t.log_every = 10**9
    t.warmup_steps = min(t.warmup_steps, 1)
    data = prepare_recipe(recipe)
    accelerator = resolve_accelerator(recipe)
    if t.threads:
        torch.set_num_threads(t.threads)
    choice = resolve_precision(recipe, accelerator)
    precision = choice.value
    L.seed_everything(recipe.seed, verbose=False)
    module = BulbaModule(recipe, batches_factory=make_batches_factory(recipe, data, pin=accelerator == "cuda"))
    module.final_eval = False
    times: list[float] = []
    orig_step = module._optimizer_step

    def timed_step():
        orig_step()
        if accelerator == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        if len(times) == warmup + 1 and accelerator == "cuda":
            torch.cuda.reset_peak_memory_stats()

    module._optimizer_step = timed_step
    device = torch.device(accelerator, 0) if accelerator == "cuda" else torch.device("cpu")
    strategy = make_strategy("auto", t.mode, device, 1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    trainer = L.Trainer(accelerator="gpu" if accelerator == "cuda" else "cpu", devices=1, strategy=strategy,
                        precision=precision, max_epochs=1, max_steps=-1, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module)
    # Per-step durations of the timed steps; the median resists the noise of a shared machine.
    stamps = times[max(warmup - 1, 0):]
    durations = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    n = len(durations)
    if n == 0:
        raise UserError("benchmark: need at least one timed step after warm-up")
    median = durations[n // 2] if n % 2 else 0.5 * (durations[n // 2 - 1] + durations[n // 2])
    per_step = t.batch_size * t.grad_accum * recipe.model.ctx_len
    tps = per_step / median
    tps_mean = per_step * n / sum(durations)
    import resource

    return {
        "mode": t.mode, "precision": precision, "precision_reason": choice.reason,
        "attention": strategy.resolved["attention"],
        "tokens_per_s": tps, "mfu": flops.mfu(recipe.model, tps, device, recipe.model.ctx_len, precision=precision),
        "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if accelerator == "cuda" else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "tokens_per_s_mean": tps_mean, "step_time_s": median, "steps_timed": n, "final_loss": module.losses.get(module.state.step), "params": flops.param_count(recipe.model),
    }
