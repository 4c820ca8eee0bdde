"""Preflight: everything train() decides and checks before anything heavy exists.

Cheap, in this order: the data against the recipe (meta.json, both splits opened as training
will), the accelerator and precision, memory for the model and for CPU attention, the devices.
A problem here is a one-line user error (exit 2) before a run directory or an MLflow run exists.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bulba import hardware
from bulba.config import Recipe
from bulba.data.format import TokenData, open_data
from bulba.data.loader import recipe_batches
from bulba.errors import UserError
from bulba.model import flops
from bulba.model.weights import param_count


@dataclass
class Plan:
    """What preflight decided; the later phases only read it."""

    data: TokenData
    accelerator: str  # "cuda" | "cpu"
    precision: str  # Lightning's precision string
    precision_reason: str  # why (train.precision=auto: a measured probe, bulba.hardware)
    attention: str  # the attention backend the model is built with (train.strategy.choose_attention)
    attention_reason: str
    devices: int | list  # Lightning's devices argument
    n_proc: int  # processes in the world (devices x nodes, or what torchrun / SLURM say)
    rank0: bool  # global rank 0 (decided before Lightning launches)
    n_params: int


def preflight(recipe: Recipe) -> Plan:
    """Check `recipe` against its data and this machine; fills model.vocab_size from meta.json."""
    rank0 = early_global_rank() == 0
    data = prepare_recipe(recipe)
    accelerator = resolve_accelerator(recipe)
    if recipe.train.strategy == "fsdp" and accelerator != "cuda":
        raise UserError(
            "train.strategy=fsdp needs CUDA GPUs (torch's FSDP has no CPU backend); use train.strategy=ddp on CPU"
        )
    check_attention_memory(recipe, accelerator)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    choice = resolve_precision(recipe, accelerator)  # after the threads: the probe measures with them
    devices, n_proc = resolve_devices(recipe, accelerator)
    attn = resolve_attention(recipe, accelerator, choice.value)
    return Plan(
        data=data,
        accelerator=accelerator,
        precision=choice.value,
        precision_reason=choice.reason,
        attention=attn.value,
        attention_reason=attn.reason,
        devices=devices,
        n_proc=n_proc,
        rank0=rank0,
        n_params=param_count(recipe.model),
    )


def early_global_rank() -> int:
    """Global rank before Lightning sets up (torchrun: RANK; SLURM: SLURM_PROCID; Lightning's
    own subprocess launcher: LOCAL_RANK/NODE_RANK of the children)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", "0") or 0)
    return local + node  # only tested for == 0, which this gets right


def prepare_recipe(recipe: Recipe):
    """Validate data against the recipe; fill model.vocab_size from meta.json. Returns TokenData."""
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
    for split in ("train", "val"):
        recipe_batches(recipe, data, split, prefetch=1)


def resolve_accelerator(recipe: Recipe) -> str:
    a = recipe.train.accelerator
    if a in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.accelerator={a} but no CUDA device is visible; use train.accelerator=cpu")
        return "cuda"
    if a == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(recipe: Recipe, accelerator: str) -> hardware.Choice:
    """train.precision, with 'auto' decided by what is fastest here (bulba.hardware). Call it after
    the thread count is set: the CPU probe measures with the threads training will use."""
    tokens = recipe.train.batch_size * recipe.model.ctx_len
    return hardware.choose_precision(recipe.train.precision, accelerator, recipe.model, tokens)


def resolve_attention(recipe: Recipe, accelerator: str, precision: str) -> hardware.Choice:
    """The attention backend for this device, precision, speed mode, context and sampler."""
    from bulba.train.strategy import choose_attention

    t = recipe.train
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = choose_attention(t.mode, accelerator, precision, recipe.model.ctx_len, recipe.data.sampler)
    for w in caught:  # one line each, not Python's file:line form
        print(f"warning: {w.message}", file=sys.stderr, flush=True)
    return choice


def resolve_devices(recipe: Recipe, accelerator: str) -> tuple[int | list, int]:
    """(Lightning's devices argument, processes in the world)."""
    devices = recipe.train.devices
    if devices == "auto":
        devices = max(1, torch.cuda.device_count()) if accelerator == "cuda" else 1
    if not (isinstance(devices, int) and devices > 0) and not (isinstance(devices, list) and devices):
        raise UserError(f"train.devices must be 'auto', a positive count or a list of device ids, got {devices!r}")
    n_proc = (devices if isinstance(devices, int) else len(devices)) * recipe.train.num_nodes
    if os.environ.get("WORLD_SIZE", "").isdigit():  # torchrun / SLURM decide the world
        n_proc = max(n_proc, int(os.environ["WORLD_SIZE"]))
    return devices, n_proc


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
    params = param_count(m)
    if limit and params * 16 > limit:  # fp32 weights + gradients + two AdamW moments
        raise UserError(
            f"the model has {flops.human(params)} parameters: weights, gradients and optimizer state "
            f"need ~{params * 16 / 2**30:.0f} GiB, more than this machine's {limit / 2**30:.0f} GiB; "
            "check model.n_layer / n_embd / ffn_hidden / vocab_size"
        )
    need = t.batch_size * m.n_head * m.ctx_len**2 * 4
    if limit and need > limit // 2:
        raise UserError(
            f"model.ctx_len={m.ctx_len} is longer than this machine can train on CPU: attention "
            f"scores alone need ~{need / 2**30:.0f} GiB per layer (batch {t.batch_size} x "
            f"{m.n_head} heads x ctx^2), memory is {limit / 2**30:.0f} GiB; lower model.ctx_len "
            "or train.batch_size"
        )
