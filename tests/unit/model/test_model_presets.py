"""Presets, parameter counts, document masking, checkpoints, lr schedule: fast, no training."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bulba.config import ModelConfig, load_recipe
from bulba.data.loader import document_layout
from bulba.errors import UserError
from bulba.model import flops
from bulba.model.llama import Llama
from bulba.model.weights import param_count
from bulba.train import checkpoint as ckpt
from bulba.train.module import TrainState
from bulba.train.optim import lr_at, param_groups

NAMED = {"krolik": 50e6, "aist": 150e6, "zubr": 350e6}


@pytest.mark.parametrize("name,target", sorted(NAMED.items()))
def test_preset_param_count_within_10_percent(name, target):
    r = load_recipe(name)
    m = r.model
    assert m.vocab_size == 32003 and m.ctx_len == 1024 and m.rope_theta == 500000.0
    assert m.n_embd % 256 == 0 and m.ffn_hidden % 256 == 0
    assert m.n_head // m.n_kv_head in (3, 4) and m.n_head % m.n_kv_head == 0
    with torch.device("meta"):  # no memory, exact shapes
        real = Llama(m).num_params()
    assert real == param_count(m)
    assert abs(real - target) / target < 0.10, f"{name}: {real / 1e6:.1f}M params"


def test_tiny_preset_is_small():
    r = load_recipe("tiny", ["model.vocab_size=32003"])
    assert r.model.n_embd % 256 == 0 and r.model.ffn_hidden % 256 == 0
    assert param_count(r.model) < 15e6


def test_flops_and_peaks():
    cfg = ModelConfig(vocab_size=1000, n_layer=2, n_embd=256, n_head=4, n_kv_head=1, ffn_hidden=512, ctx_len=64)
    assert flops.flops_per_token(cfg) > 6 * (param_count(cfg) - 1000 * 256 * 0) * 0.5
    assert flops.gpu_peak_flops("NVIDIA H200") == 989e12
    assert flops.gpu_peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert flops.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    peak, isa = flops.cpu_peak_flops(2)
    assert peak > 1e10 and isa
    assert 0 < flops.mfu(cfg, 1000.0, "cpu") < 1


def _cfg(**kw):
    base = dict(vocab_size=97, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, ctx_len=32)
    return ModelConfig(**{**base, **kw})


def test_document_masking_packed_equals_separate():
    """A packed row (two documents and padding, positions and seq_ids derived from its
    cu_seqlens as the trainer does) gives each document exactly the logits it gets alone: no
    attention across the boundary, RoPE restarted."""
    torch.manual_seed(0)
    model = Llama(_cfg()).eval()
    a = torch.randint(0, 97, (1, 11))
    b = torch.randint(0, 97, (1, 9))
    pad = torch.full((1, 4), 5)
    row = torch.cat([a, b, pad], dim=1)  # T = 24
    pos, seq = document_layout(torch.tensor([0, 11, 20, 24], dtype=torch.int32), 1, 24)
    assert pos.tolist() == [list(range(11)) + list(range(9)) + list(range(4))]
    assert seq.tolist() == [[0] * 11 + [1] * 9 + [2] * 4]
    with torch.no_grad():
        packed = model(row, position_ids=pos, seq_ids=seq)
        la, lb = model(a), model(b)
    torch.testing.assert_close(packed[:, :11], la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 11:20], lb, atol=1e-5, rtol=1e-5)
    # without the mask the second document does see the first
    with torch.no_grad():
        leaky = model(row, position_ids=pos)
    assert not torch.allclose(leaky[:, 11:20], lb, atol=1e-3)


def test_lr_schedule_warmup_cosine():
    r = load_recipe("tiny", ["train.max_steps=100", "train.warmup_steps=10", "train.lr=1e-3", "train.min_lr=1e-4"])
    t = r.train
    assert lr_at(0, t) == pytest.approx(1e-4)
    assert lr_at(9, t) == pytest.approx(1e-3)
    assert lr_at(55, t) == pytest.approx(5.5e-4, rel=1e-3)
    assert lr_at(100, t) == pytest.approx(1e-4)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(10, 100))


def test_weight_decay_groups_exclude_norms():
    model = Llama(_cfg())
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _opt_state(model):
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    model(torch.randint(0, 97, (2, 8))).sum().backward()
    opt.step()
    return opt.state_dict()


def test_checkpoint_roundtrip_and_torn_writes(tmp_path):
    torch.manual_seed(0)
    model = Llama(_cfg(tie_embeddings=False))
    opt = _opt_state(model)
    root = tmp_path / "checkpoints"
    p1 = ckpt.save_checkpoint(root, 1, model.state_dict(), opt, {"train": vars(TrainState(step=1))}, keep=0)
    p2 = ckpt.save_checkpoint(root, 2, model.state_dict(), opt, {"train": vars(TrainState(step=2))}, keep=0)
    # A writer killed mid-way leaves a temp dir, or a step dir without state.json (never
    # produced by atomic_dir, but hand-copied dirs happen): both are ignored.
    (root / ".tmp-step-00000003.abc").mkdir()
    (root / "step-00000004").mkdir()
    assert ckpt.latest_checkpoint(root) == p2
    got = ckpt.load_checkpoint(p2)
    for k, v in model.state_dict().items():
        assert torch.equal(got["model"][k], v)
    o = got["optimizer"]
    assert o["param_groups"][0]["betas"] == opt["param_groups"][0]["betas"]
    for idx, st in opt["state"].items():
        for name, v in st.items():
            assert torch.equal(o["state"][idx][name], v)
    # the optimizer accepts it back
    torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3).load_state_dict(o)
    # a torn / bit-flipped file is detected, the previous checkpoint stays loadable
    f = p2 / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        ckpt.load_checkpoint(p2)
    assert ckpt.load_checkpoint(p1)["state"]["train"]["step"] == 1
    # pruning keeps the newest complete ones and clears dead temp dirs
    ckpt.prune(root, keep=1)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-00000002"]
    assert not list(root.glob(".tmp-*"))


def test_checkpoint_contains_no_pickle(tmp_path):
    model = Llama(_cfg())
    p = ckpt.save_checkpoint(tmp_path, 7, model.state_dict(), _opt_state(model), {"train": {}}, keep=0)
    names = sorted(x.name for x in p.iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    json.loads((p / "state.json").read_text())
    shutil.rmtree(p)
