"""`init_from=RUN_DIR|runs:/<id>`: start a run from a pretrained run's weights (fine-tuning).

The parent's weights (its final.safetensors, else its newest complete checkpoint) go into the
new model; the optimizer, the schedule and the counters start fresh (step 0, warmup again).
The parent must be the same model and have been trained on the same tokenizer as this run's
data: a different tokenizer.json (by content hash) or a different architecture is refused in
one line naming both, before anything is written.

Only a fresh run reads the parent: a fine-tuning run resumed with `resume=auto` continues from
its own checkpoints (its weights have moved on since). The MLflow run records the parent
(`bulba.parent_run_id`, `bulba.init_from`), so the lineage reads base run -> chat run -> GGUF.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from bulba.atomic import sha256_file
from bulba.config import Recipe
from bulba.errors import UserError

# Fields that must match: they fix the weights' shapes or what the weights mean. ctx_len may
# differ (RoPE positions are computed, not learned); init_std only matters for a fresh init.
ARCH_FIELDS = (
    "vocab_size",
    "n_layer",
    "n_embd",
    "n_head",
    "n_kv_head",
    "ffn_hidden",
    "tie_embeddings",
    "rope_theta",
    "norm_eps",
)


@dataclass
class Parent:
    spec: str  # as given in the recipe
    weights_path: str  # where the weights came from (the local copy for runs:/)
    run_dir: str
    mlflow_run_id: str | None
    step: int | None  # the parent's step of those weights, when known
    state_dict: dict


def weights_source(spec: str) -> str:
    """What bulba.export.source.open_source should open for `spec`: a run directory with
    final.safetensors as is, else its newest complete checkpoint."""
    if spec.startswith("runs:/"):
        return spec
    p = Path(spec)
    if not p.is_dir():
        raise UserError(f"init_from={spec}: not a run directory (give RUN_DIR or runs:/<run_id>)")
    if (p / "final.safetensors").is_file() or (p / "model.safetensors").is_file():
        return spec
    from bulba.train.checkpoint import latest_checkpoint

    ck = latest_checkpoint(p / "checkpoints")
    if ck is None:
        raise UserError(f"init_from={spec}: no final.safetensors and no complete checkpoint in {p}")
    return str(ck)


def load(recipe: Recipe, data) -> Parent:
    """The parent's weights, checked against this run's model and data (model.vocab_size is
    already filled from the data)."""
    import torch
    from safetensors.torch import load_file

    from bulba.export.source import open_source

    spec = recipe.init_from
    src = open_source(weights_source(spec))
    try:
        ours, theirs = dataclasses.asdict(recipe.model), dataclasses.asdict(src.model)
        diff = [f"{k} {theirs[k]!r} vs {ours[k]!r}" for k in ARCH_FIELDS if theirs[k] != ours[k]]
        if diff:
            raise UserError(
                f"init_from={spec}: the parent is another model than this recipe's ({', '.join(diff)}; parent vs "
                f"recipe); set those model.* values to the parent's ({src.run_dir / 'config.json'})"
            )
        data_tok = Path(data.dir) / "tokenizer.json"
        if sha256_file(src.tokenizer_path) != sha256_file(data_tok):
            raise UserError(
                f"init_from={spec}: the parent's tokenizer {src.tokenizer_path} differs from the data's {data_tok}; "
                f"prepare the data with --tokenizer {src.tokenizer_path} so the token ids are the parent's"
            )
        sd = {k: v.float() for k, v in load_file(str(src.weights)).items()}
        if not all(torch.isfinite(v).all() for v in sd.values()):
            raise UserError(f"init_from={spec}: {src.weights} holds NaN/Inf weights; pick another run or checkpoint")
        step = None
        try:
            from safetensors import safe_open

            with safe_open(str(src.weights), framework="np") as f:
                meta = f.metadata() or {}
            step = int(meta["bulba.step"]) if "bulba.step" in meta else None
        except (OSError, ValueError):
            pass
        return Parent(
            spec=spec,
            weights_path=str(src.weights) if not spec.startswith("runs:/") else spec,
            run_dir=str(src.run_dir) if not spec.startswith("runs:/") else spec,
            mlflow_run_id=src.mlflow_run_id,
            step=step,
            state_dict=sd,
        )
    finally:
        src.cleanup()


def tags(parent: Parent) -> dict:
    """The MLflow tags that link a fine-tuning run to its parent."""
    return {
        "bulba.init_from": parent.spec,
        "bulba.parent_run_id": parent.mlflow_run_id or "unknown",
        "bulba.parent_weights": parent.weights_path,
        **({"bulba.parent_step": parent.step} if parent.step is not None else {}),
    }
