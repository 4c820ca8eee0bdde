"""bulba.model.weights, the one weight-layout table, against the model, transformers and itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bulba.config import ModelConfig
from bulba.model.llama import Llama
from bulba.model.weights import (
    by_gguf_name,
    expected_shapes,
    layout,
    min_tensors,
    param_count,
    permute_rotate_half,
    unpermute_rotate_half,
)


@pytest.mark.parametrize("tie", [True, False])
def test_weight_table_is_the_model(tie):
    """bulba.model.weights names every tensor of Llama, in state-dict order, with its shape; its
    HF names are transformers' LlamaForCausalLM's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bulba.model.weights import hf_name

    cfg = ModelConfig(
        vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, ctx_len=32, tie_embeddings=tie
    )
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Llama(cfg).state_dict().items()}
        hf = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=300,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=tie,
            )
        )
    assert list(ours.items()) == list(expected_shapes(cfg).items())
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert {hf_name(k): s for k, s in ours.items()} == hf_shapes


def test_gguf_names_and_rope_permutation_round_trip():
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, ctx_len=32)
    tensors = layout(cfg)
    assert len(tensors) == min_tensors(cfg) and param_count(cfg) == sum(int(np.prod(t.shape)) for t in tensors)
    assert {t.gguf for t in tensors if t.rope_heads} == {
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.1.attn_q.weight",
        "blk.1.attn_k.weight",
    }
    assert by_gguf_name(cfg)["blk.1.attn_k.weight"].rope_heads == cfg.n_kv_head
    rng = np.random.default_rng(0)
    for t in tensors:
        if t.rope_heads:
            w = rng.standard_normal(t.shape).astype(np.float32)
            p = permute_rotate_half(w, t.rope_heads)
            assert not np.array_equal(p, w) and np.array_equal(unpermute_rotate_half(p, t.rope_heads), w)
