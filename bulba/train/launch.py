"""The one Lightning Trainer construction (training runs and benchmarks alike): devices, strategy
(bulba.train.strategy: compile / flash-attn / DDP / FSDP), precision, and none of Lightning's
own loops we replace (checkpointing, logging, progress bars, samplers)."""

from __future__ import annotations

import logging
import warnings

import torch

from bulba.train.strategy import make_strategy


def quiet_lightning() -> None:
    """Keep training output to our own lines: Lightning's info logs and known-harmless warnings off."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__`.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")  # Lightning vs torch 2.10+


def make_trainer(
    mode: str,
    accelerator: str,
    precision: str,
    *,
    strategy: str = "auto",
    devices=1,
    n_proc: int = 1,
    num_nodes: int = 1,
    root: str | None = None,
):
    """(L.Trainer, our strategy) for `train.mode` on `accelerator`; the strategy's `resolved`
    says after setup which attention backend and compilation it picked."""
    import lightning as L

    device = torch.device(accelerator, 0) if accelerator == "cuda" else torch.device("cpu")
    strat = make_strategy(strategy, mode, device, n_proc)
    quiet_lightning()
    trainer = L.Trainer(
        accelerator="gpu" if accelerator == "cuda" else "cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strat,
        precision=precision,
        max_epochs=1,
        max_steps=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        deterministic=False,
        default_root_dir=root,
    )
    return trainer, strat
