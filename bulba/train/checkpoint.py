"""Resumable checkpoints without pickle: safetensors for tensors, JSON for everything else.

    out_dir/checkpoints/step-00000050/
        model.safetensors      fp32 weights (bulba.model.llama names)
        optimizer.safetensors  optimizer state tensors, keyed "<param index>.<name>" (AdamW and,
                               with train.optimizer=muon, Muon: one index space, bulba.train.optim)
        rng.safetensors        torch CPU / CUDA generator states, numpy's key array
        state.json             step, consumed batches, tokens, sampler state, optimizer
                               hyperparameters, RNG scalars, MLflow run id, file sha256s

A checkpoint is built in a `.tmp-*` directory and renamed into place (bulba.atomic.atomic_dir),
so a kill at any moment leaves either no `step-N` directory or a complete one; `state.json`
lists the sha256 of every file, so a torn or bit-rotted file is detected at load instead of
silently resuming from garbage. Nothing here unpickles anything.

`Checkpointer` is what the LightningModule calls at step boundaries: it gathers the full state
(all ranks take part), and global rank 0 writes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bulba.atomic import TMP_PREFIX, atomic_dir, sha256_file
from bulba.config import Recipe
from bulba.errors import UserError
from bulba.train.progress import say

FORMAT = "bulba-checkpoint"
VERSION = 1
STEP_RE = re.compile(r"^step-(\d{8})$")


def _save_file(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its I/O failures (disk full, file size limit) as OSError, so
    callers handle a full disk the same whichever writer hit it."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:  # safetensors raises SafetensorError("... I/O error: ... (os error 28)")
        m = re.search(r"os error (\d+)", str(e))
        if m is None and "I/O error" not in str(e):
            raise
        code = int(m.group(1)) if m else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from None


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights) and non-contiguous views: clone.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


# --------------------------------------------------------------------------- optimizer


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return _contiguous(tensors), {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        for key in ("betas", "ns_coefficients"):  # tuples in torch, lists in JSON
            if key in g:
                g[key] = tuple(g[key])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy())
    py = random.getstate()
    meta = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))


# --------------------------------------------------------------------------- save / find / load


def step_dir(ckpt_root: Path, step: int) -> Path:
    return Path(ckpt_root) / f"step-{step:08d}"


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep` complete ones (0: all)."""
    ckpt_root = Path(ckpt_root)
    final = step_dir(ckpt_root, step)
    with atomic_dir(final) as tmp:
        files = {}
        _save_file(_contiguous(model_state), tmp / "model.safetensors", metadata={"format": "pt"})
        files["model.safetensors"] = None
        if optimizer_state is not None:
            opt_t, opt_meta = optimizer_to_flat(optimizer_state)
            _save_file(opt_t, tmp / "optimizer.safetensors")
            files["optimizer.safetensors"] = None
        else:
            opt_meta = None
        rng_t, rng_meta = rng_state()
        _save_file(_contiguous(rng_t), tmp / "rng.safetensors")
        files["rng.safetensors"] = None
        for name in files:
            files[name] = sha256_file(tmp / name)
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "files": files,
            "optimizer": opt_meta,
            "rng": rng_meta,
            **state,
        }
        # state.json last: inside the temp dir until the rename, so its presence in a
        # `step-N` directory means every other file was fully written before it.
        (tmp / "state.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    prune(ckpt_root, keep)
    return final


def complete_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """`step-N` directories holding a state.json, oldest first (temp dirs are ignored)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / "state.json").is_file()]
    return sorted(out, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def prune(ckpt_root: Path, keep: int) -> None:
    # Leftover temp dirs are from writers that died; they hold nothing valid.
    for p in Path(ckpt_root).glob(TMP_PREFIX + "*"):
        if p.is_dir() and not p.name.startswith(TMP_PREFIX + "old-"):
            shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for p in complete_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, device="cpu") -> dict:
    """Verify and read a checkpoint: {"model", "optimizer" (torch format or None), "rng", "state"}."""
    path = Path(path)
    try:
        doc = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is unreadable ({e}); delete it to resume from the previous one") from None
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise UserError(f"checkpoint {path} is not a {FORMAT} v{VERSION} checkpoint")
    for name, digest in doc["files"].items():
        f = path / name
        if not f.is_file() or sha256_file(f) != digest:
            raise UserError(
                f"checkpoint {path} is corrupt ({name} missing or its sha256 differs); "
                "delete that directory to resume from the previous checkpoint"
            )
    try:
        model = load_file(str(path / "model.safetensors"), device=str(device))
        opt = None
        if "optimizer.safetensors" in doc["files"]:
            opt = optimizer_from_flat(
                load_file(str(path / "optimizer.safetensors"), device=str(device)), doc["optimizer"]
            )
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as e:  # safetensors raises its own error types on malformed headers
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    return {"model": model, "optimizer": opt, "rng": (rng, doc["rng"]), "state": doc}


# --------------------------------------------------------------------------- from a training run


def full_state(module) -> tuple[dict, dict | None]:
    """(model state dict, optimizer state dict) with full, unsharded tensors on global rank 0.

    Single device and DDP: the local module (identical on every rank). FSDP: Lightning gathers
    the full weights (a collective: every rank must call this); the sharded optimizer state is
    not saved, so an FSDP resume restarts the AdamW moments (said in docs/training.md)."""
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = module.fit_trainer
    if isinstance(trainer.strategy if trainer else None, FSDPStrategy):
        sd = trainer.strategy.lightning_module_state_dict()
        return {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}, None
    opt = module.raw_optimizer
    return module.model.state_dict(), (opt.state_dict() if opt is not None else None)


class Checkpointer:
    """`checkpointer(module, reason)` writes checkpoint `module.state.step` of out_dir (every rank
    calls it, global rank 0 writes); returns its path (None elsewhere, or when an interval
    checkpoint failed: training goes on and the next interval tries again).

    `get_run_id()`: the MLflow run id to record (it may become known late); `on_save()`: called
    after each write (config.json learns a late run id). `last_model_sd`: the weights of the
    newest checkpoint on rank 0, from which final.safetensors is written."""

    def __init__(self, recipe: Recipe, get_run_id, on_save=None, dataset_digest: str | None = None):
        self.recipe, self.get_run_id, self.on_save, self.dataset_digest = recipe, get_run_id, on_save, dataset_digest
        self.root = Path(recipe.out_dir) / "checkpoints"
        self.last_model_sd: dict | None = None

    def __call__(self, module, reason: str) -> Path | None:
        st = module.state
        trainer = module.fit_trainer
        model_sd, opt_sd = full_state(module)
        self.last_model_sd = model_sd if module.global_rank == 0 else None  # for final.safetensors
        path = None
        if module.global_rank == 0:
            t0 = time.perf_counter()
            try:
                path = self._save(st, model_sd, opt_sd, reason, trainer.world_size if trainer else 1)
            except OSError as e:
                prev = latest_checkpoint(self.root)
                msg = (
                    f"cannot write checkpoint step {st.step} in {self.root} ({e.strerror or e}); "
                    f"the previous checkpoint {prev or '(none)'} is intact"
                )
                if reason != "interval":
                    raise UserError(msg + "; free space and resume with resume=auto") from None
                # Interval checkpoint: keep training (the weights in memory are fine), try
                # again at the next interval, and say so.
                print(f"warning: {msg}; training continues", file=sys.stderr, flush=True)
                return None
            if self.on_save is not None:
                self.on_save()
            say(f"checkpoint ({reason}): {path} [{time.perf_counter() - t0:.1f}s]")  # above a progress bar
        if trainer is not None and trainer.world_size > 1:
            with contextlib.suppress(Exception):
                trainer.strategy.barrier("checkpoint")
        return path

    def _save(self, st, model_sd, opt_sd, reason, world):
        state = {
            "reason": reason,
            "train": dataclasses.asdict(st),
            "mlflow_run_id": self.get_run_id(),
            "dataset_digest": self.dataset_digest,
            "sampler": {"consumed": st.consumed},
            "world_size": world,
            "recipe": self.recipe.to_dict(),
        }
        return save_checkpoint(self.root, st.step, model_sd, opt_sd, state, keep=self.recipe.train.ckpt_keep)
