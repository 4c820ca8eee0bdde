"""Subprocess worker of tests/integration/test_compile_isa.py: compiled blocks against eager, one ISA path.

    PYTHONPATH=.:tests python -m support.compile_worker OUT.json

Runs in its own process so that ATEN_CPU_CAPABILITY (read once, when torch starts) selects the
ISA path. Builds a small Llama, applies `train.mode=compile` exactly as the trainer does (the
CPU math attention, the per-ISA Inductor cache), and compares loss and every gradient with the
eager model in the precision `precision=auto` picks here, for a packed batch (document masks,
positions restarting per document) and a stream batch (plain causal). Writes the figures.
"""

from __future__ import annotations

import json
import math
import sys

import torch

from bulba.config import ModelConfig
from bulba.hardware import choose_precision, cpu_isa
from bulba.model.llama import Llama
from bulba.train.strategy import apply_speed_mode, choose_attention

B, T, V = 4, 64, 512


def batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    # packed: documents of 20, 30 and 14 tokens in every row, positions restart at each
    lengths = [20, 30, 14]
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).expand(B, T)
    pos = torch.cat([torch.arange(n) for n in lengths]).expand(B, T)
    ends = torch.tensor(lengths).cumsum(0) - 1
    packed_labels = labels.clone()
    packed_labels[:, ends] = -100  # no loss across a document boundary
    return {"packed": (ids, packed_labels, pos, seq_ids), "stream": (ids, labels, None, None)}


def loss_and_grads(model, batch, precision):
    ids, labels, pos, seq_ids = batch
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        h = model.hidden(ids, position_ids=pos, seq_ids=seq_ids)
        loss = model.loss_sum(h, labels) / (labels != -100).sum()
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def main(out_path: str) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, n_layer=2, n_embd=128, n_head=4, n_kv_head=1, ffn_hidden=256, ctx_len=T)
    precision = choose_precision("auto", "cpu", cfg, B * T).value
    eager = Llama(cfg)
    # built as the trainer builds it: with the backend choose_attention picks (math, here)
    compiled = Llama(cfg, choose_attention("compile", "cpu", precision, T, "packed").value)
    compiled.load_state_dict(eager.state_dict())
    speed = apply_speed_mode(compiled, "compile", torch.device("cpu"))
    result = {"isa": cpu_isa(), "precision": precision, "attention": speed["attention"], "cases": {}}
    for name, batch in batches().items():
        le, ge = loss_and_grads(eager, batch, precision)
        for _ in range(2):  # the second call runs the cached graph: steady state, no recompile
            lc, gc = loss_and_grads(compiled, batch, precision)
        rel = {n: ((gc[n] - ge[n]).norm() / ge[n].norm().clamp_min(1e-12)).item() for n in ge}
        result["cases"][name] = {
            "loss_eager": le,
            "loss_compiled": lc,
            "finite": math.isfinite(lc) and all(bool(torch.isfinite(g).all()) for g in gc.values()),
            "grad_rel_max": max(rel.values()),
            "grad_rel_worst": max(rel, key=rel.get),
        }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
