"""The optimizers and their schedule.

AdamW (fused, decoupled weight decay on matrices only) for every parameter, or with
train.optimizer=muon: torch.optim.Muon for the 2-D matrices of the blocks (attention and MLP)
and AdamW for the rest (embedding / tied output, norms), each group with its own lr. Both sit in
one `Optimizers`, which the module steps and the checkpoint saves as one torch-format state dict.

The schedule is warmup + cosine: a pure function of the step for a step budget, of the step
(warmup) and the fraction of train.max_time spent (cosine) for a time budget; the time spent is
saved in checkpoints, so a resumed run follows the same curve in both cases.
"""

from __future__ import annotations

import math

import torch

from bulba.config import Recipe


def planned_steps(recipe: Recipe, world_size: int = 1) -> int:
    """Steps the schedule spans: train.max_steps, or fewer when the token budget ends first
    (budget / token slots per step; padding makes the real count a little later, and the lr
    then stays at min_lr)."""
    t = recipe.train
    if t.max_tokens is None:
        return t.max_steps
    per_step = t.batch_size * t.grad_accum * recipe.model.ctx_len * world_size
    return max(1, min(t.max_steps, math.ceil(t.max_tokens / per_step)))


def lr_at(step: int, t, total_steps: int | None = None, elapsed_s: float | None = None) -> float:
    """Linear warmup to train.lr over warmup_steps, then cosine decay to min_lr at the end.

    Step budget: the cosine runs over the steps after warmup to `total_steps`. Time budget
    (train.max_time, `elapsed_s` = training time spent): the cosine runs over the fraction of
    the budget spent, and the warmup ramp multiplies it during the first warmup_steps (the two
    meet without a jump; warmup stays in steps because what it protects against, the first
    large updates, is counted in steps)."""
    budget = t.max_time_s
    if budget is not None:
        progress = min(1.0, max(0.0, (elapsed_s or 0.0) / budget))
        lr = t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))
        if t.warmup_steps and step < t.warmup_steps:
            lr *= (step + 1) / t.warmup_steps
        return lr
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, (total_steps or t.max_steps) - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on matrices only; norms (1-D) are not decayed (nanoGPT / Llama)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Muon's parameters: the hidden 2-D matrices (the blocks' attention and MLP weights). The
    embedding (also the tied output) and the output are looked up / read out, not hidden
    transforms, and norms are 1-D: those stay with AdamW (as in Keller Jordan's Muon)."""
    return p.dim() == 2 and name.startswith("layers.")


class Optimizers:
    """The optimizers of one model, stepped together; `base_lr` per optimizer, scaled by the
    schedule. state_dict() is one torch-format optimizer state dict (parameter indices numbered
    across the optimizers in order, each group tagged with its optimizer's name), so the
    checkpoint stores it like a single AdamW's."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], base_lr: dict[str, float]):
        self.optimizers, self.base_lr = optimizers, base_lr

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def set_lr_scale(self, scale: float) -> dict[str, float]:
        """Every group's lr = its optimizer's base lr x `scale`; the lr per optimizer."""
        lrs = {}
        for name, opt in self.optimizers.items():
            lrs[name] = self.base_lr[name] * scale
            for g in opt.param_groups:
                g["lr"] = lrs[name]
        return lrs

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for name, opt in self.optimizers.items():
            sd = opt.state_dict()
            n = sum(len(g["params"]) for g in sd["param_groups"])
            state.update({offset + i: v for i, v in sd["state"].items()})
            groups += [
                {**g, "params": [offset + i for i in g["params"]], "optimizer": name} for g in sd["param_groups"]
            ]
            offset += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        names = [g.get("optimizer", "adamw") for g in sd["param_groups"]]  # untagged: one AdamW (older runs)
        if sorted(set(names)) != sorted(self.optimizers):
            raise ValueError(f"the saved optimizer state is for {sorted(set(names))}, not {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            mine = [g for g, o in zip(sd["param_groups"], names) if o == name]
            groups = [{k: v for k, v in g.items() if k != "optimizer"} for g in mine]
            ids = [i for g in groups for i in g["params"]]
            local = {i: k for k, i in enumerate(ids)}
            opt.load_state_dict(
                {
                    "state": {local[i]: v for i, v in sd["state"].items() if i in local},
                    "param_groups": [{**g, "params": [local[i] for i in g["params"]]} for g in groups],
                }
            )


def _adamw(groups: list[dict], t) -> torch.optim.Optimizer:
    kwargs = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    # Fused: one kernel for the whole update on CUDA, and on CPU too (torch >= 2.4), where
    # it is ~30x faster than the foreach path measured here (2 cores, tiny).
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # a device/dtype without a fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def make_optimizer(model: torch.nn.Module, t, state: dict | None = None) -> Optimizers:
    """The optimizers per the recipe's train section; `state`: a checkpoint's optimizer state."""
    if t.optimizer == "muon":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        hidden = [p for n, p in named if is_muon_param(n, p)]
        rest = [(n, p) for n, p in named if not is_muon_param(n, p)]
        adamw = _adamw(
            [
                {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
                {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0},
            ],
            t,
        )
        muon_lr = t.muon_lr if t.muon_lr is not None else t.lr
        # match_rms_adamw: the orthogonalized update scaled to AdamW's typical RMS (0.2 sqrt(max
        # dim)), so AdamW's lr and weight decay carry over (Moonshot, "Muon is Scalable").
        muon = torch.optim.Muon(
            hidden,
            lr=muon_lr,
            weight_decay=t.weight_decay,
            momentum=0.95,
            nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )
        opts = Optimizers({"adamw": adamw, "muon": muon}, {"adamw": t.lr, "muon": muon_lr})
    else:
        opts = Optimizers({"adamw": _adamw(param_groups(model, t.weight_decay), t)}, {"adamw": t.lr})
    if state is not None:
        opts.load_state_dict(state)
    return opts
