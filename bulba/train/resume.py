"""Resume: which checkpoint a run continues from, whether it may, and putting its state back.

`resume=auto` continues the newest complete checkpoint of out_dir in the same MLflow run with the
identical batch sequence; the model must be the same, data or batch changes are allowed (said).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from bulba.config import Recipe
from bulba.errors import UserError
from bulba.train import checkpoint as ckpt


def find(recipe: Recipe, rank0: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); rank 0 also refuses to overwrite a run."""
    if rank0:
        return check_out_dir(recipe)
    return ckpt.latest_checkpoint(Path(recipe.out_dir) / "checkpoints") if recipe.resume == "auto" else None


def load(recipe: Recipe, path: Path | None, data, rank0: bool) -> dict | None:
    """The verified checkpoint at `path` (None: nothing to resume), checked against the recipe."""
    if path is None:
        return None
    loaded = ckpt.load_checkpoint(path)
    budget = recipe.train.max_time_s
    spent = loaded["state"]["train"].get("elapsed", 0.0)
    if budget is not None and spent >= budget:
        raise UserError(
            f"{recipe.out_dir} has already trained {spent:.0f}s >= train.max_time={recipe.train.max_time}; "
            "raise train.max_time to train further"
        )
    if budget is None and loaded["state"]["train"]["step"] >= recipe.train.max_steps:
        raise UserError(
            f"{recipe.out_dir} is already at step {loaded['state']['train']['step']} >= "
            f"train.max_steps={recipe.train.max_steps}; raise train.max_steps to train further"
        )
    check_compatible(path, loaded["state"], recipe, data, rank0)
    loaded["path"] = path
    return loaded


def previous_run_id(recipe: Recipe, loaded: dict | None) -> str | None:
    """The MLflow run a resumed run continues: the checkpoint's, else the one in config.json (a
    run killed before its first checkpoint)."""
    if loaded is not None:
        return loaded["state"].get("mlflow_run_id")
    out = Path(recipe.out_dir)
    if recipe.resume == "auto" and (out / "config.json").is_file():
        with contextlib.suppress(Exception):
            return json.loads((out / "config.json").read_text(encoding="utf-8")).get("mlflow_run_id")
    return None


def restore(module, loaded: dict, rank0: bool) -> None:
    """Weights, optimizer state, counters and RNG streams of the checkpoint into `module`."""
    module.restore(loaded["model"], loaded["optimizer"], loaded["state"]["train"], loaded["state"].get("world_size"))
    ckpt.set_rng_state(*loaded["rng"])
    if rank0:
        print(
            f"resuming from {loaded['path']} (step {module.state.step}, {module.state.consumed} batches consumed)",
            flush=True,
        )


def run_exists(out: Path) -> bool:
    return (out / "config.json").exists() or (out / "checkpoints").exists() or (out / "final.safetensors").exists()


def check_out_dir(recipe: Recipe) -> Path | None:
    """Refuse to overwrite a run; with resume=auto return the checkpoint to resume from."""
    out = Path(recipe.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {out} exists and is not a directory")
    if recipe.resume != "auto":
        if run_exists(out):
            raise UserError(
                f"out_dir {out} already holds a run; pass resume=auto to continue it, "
                f"or out_dir=<new dir> to start another"
            )
        return None
    return ckpt.latest_checkpoint(out / "checkpoints")


def check_compatible(path: Path, state: dict, recipe: Recipe, data, rank0: bool) -> None:
    """A checkpoint continues only the same model; data or batch changes are allowed, said."""
    saved = state.get("recipe") or {}
    old_model, new_model = saved.get("model") or {}, dataclasses.asdict(recipe.model)
    diff = [
        f"{k} {old_model[k]!r} -> {new_model[k]!r}"
        for k in new_model
        if k in old_model and old_model[k] != new_model[k] and k != "init_std"
    ]
    if diff:
        raise UserError(
            f"cannot resume from {path}: the model changed ({', '.join(diff)}); "
            "restore those model.* values or start a new out_dir"
        )
    old_opt = (saved.get("train") or {}).get("optimizer", "adamw")  # older runs: AdamW
    if old_opt != recipe.train.optimizer:
        raise UserError(
            f"cannot resume from {path}: it was trained with train.optimizer={old_opt}, not "
            f"{recipe.train.optimizer}; resume with train.optimizer={old_opt} or start a new out_dir"
        )
    changed = [
        f"{sec}.{k}"
        for sec, keys in (("data", ("sampler", "dir")), ("train", ("batch_size", "grad_accum")))
        for k in keys
        if (saved.get(sec) or {}).get(k) != getattr(getattr(recipe, sec), k)
    ]
    if saved.get("seed") != recipe.seed:
        changed.append("seed")
    if state.get("dataset_digest") not in (None, data.dataset_digest):
        changed.append("dataset (digest)")
    run_tok, data_tok = Path(recipe.out_dir) / "tokenizer.json", data.dir / "tokenizer.json"
    if run_tok.is_file() and token_table(run_tok) != token_table(data_tok):
        # Same vocab size, other ids: the weights would be trained on tokens that mean something
        # else, and the run's tokenizer.json (what export ships) would be replaced. Refuse.
        raise UserError(
            f"cannot resume from {path}: {data.dir} was prepared with another tokenizer than "
            f"{run_tok}; resume with the run's data.dir ({saved.get('data', {}).get('dir')}) or "
            "start a new out_dir"
        )
    if changed and rank0:
        print(
            f"warning: resuming with changed {', '.join(changed)}: training continues, but the batches "
            "differ from those the uninterrupted run would have seen",
            file=sys.stderr,
            flush=True,
        )


def token_table(path: Path):
    """What fixes token ids in a tokenizer.json: the BPE vocab, merges and added tokens."""
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj.get("model") or {}
        return (
            model.get("vocab"),
            model.get("merges"),
            sorted((t.get("id"), t.get("content")) for t in tj.get("added_tokens") or []),
        )
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise UserError(f"{path} is not a readable tokenizer.json ({e})") from None
