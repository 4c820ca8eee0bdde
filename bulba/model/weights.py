"""THE weight layout: every tensor of `bulba.model.llama.Llama`, in file order, with its shape and
its names in HF transformers and in GGUF (llama.cpp), and the Q/K permutation GGUF needs.

Everything that knows weight names or shapes derives from this table: the checks of an export
source (`expected_shapes`), the parameter count behind MFU (`param_count`), the GGUF writer's
tensor plan and its inverse in verification (`layout`, `by_gguf_name`), and the HF folder's
names (`hf_name`). The Llama module tree itself is the other side of the contract; a test builds
it and compares its state dict with `expected_shapes`.

Pure Python + numpy (no torch): the export path reads it without paying torch's ~300 MB RSS.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bulba.config import ModelConfig


@dataclass(frozen=True)
class Weight:
    name: str  # ours (Meta's reference names), without ".weight"
    gguf: str  # llama.cpp's
    hf: str  # transformers' LlamaForCausalLM
    shape: Callable[[ModelConfig], tuple[int, ...]]
    # Q and K: heads of the rotate-half -> interleaved RoPE permutation GGUF needs (K has the KV heads)
    rope_heads: Callable[[ModelConfig], int] | None = None


def _q(c):
    return c.n_head * c.head_dim


def _kv(c):
    return c.n_kv_head * c.head_dim


EMBEDDING = Weight("tok_embeddings", "token_embd", "model.embed_tokens", lambda c: (c.vocab_size, c.n_embd))
# One transformer block, in file order; "layers.{i}." / "blk.{i}." / "model.layers.{i}." prefix each.
BLOCK = (
    Weight("attention_norm", "attn_norm", "input_layernorm", lambda c: (c.n_embd,)),
    Weight("attention.wq", "attn_q", "self_attn.q_proj", lambda c: (_q(c), c.n_embd), lambda c: c.n_head),
    Weight("attention.wk", "attn_k", "self_attn.k_proj", lambda c: (_kv(c), c.n_embd), lambda c: c.n_kv_head),
    Weight("attention.wv", "attn_v", "self_attn.v_proj", lambda c: (_kv(c), c.n_embd)),
    Weight("attention.wo", "attn_output", "self_attn.o_proj", lambda c: (c.n_embd, _q(c))),
    Weight("ffn_norm", "ffn_norm", "post_attention_layernorm", lambda c: (c.n_embd,)),
    Weight("feed_forward.w1", "ffn_gate", "mlp.gate_proj", lambda c: (c.ffn_hidden, c.n_embd)),
    Weight("feed_forward.w3", "ffn_up", "mlp.up_proj", lambda c: (c.ffn_hidden, c.n_embd)),
    Weight("feed_forward.w2", "ffn_down", "mlp.down_proj", lambda c: (c.n_embd, c.ffn_hidden)),
)
FINAL_NORM = Weight("norm", "output_norm", "model.norm", lambda c: (c.n_embd,))
# Untied models only: tied ones reuse tok_embeddings (and GGUF must then omit output.weight).
OUTPUT = Weight("output", "output", "lm_head", lambda c: (c.vocab_size, c.n_embd))


@dataclass(frozen=True)
class Tensor:
    """One tensor of a concrete model: the table's row with the layer filled in."""

    name: str  # "layers.3.attention.wq.weight"
    gguf: str  # "blk.3.attn_q.weight"
    hf: str  # "model.layers.3.self_attn.q_proj.weight"
    shape: tuple[int, ...]
    rope_heads: int | None


def _tensor(w: Weight, cfg: ModelConfig, layer: int | None) -> Tensor:
    if layer is None:
        names = (w.name, w.gguf, w.hf)
    else:
        names = (f"layers.{layer}.{w.name}", f"blk.{layer}.{w.gguf}", f"model.layers.{layer}.{w.hf}")
    return Tensor(*(n + ".weight" for n in names), w.shape(cfg), w.rope_heads(cfg) if w.rope_heads else None)


def layout(cfg: ModelConfig) -> list[Tensor]:
    """Every tensor of Llama(cfg) in file order (GGUF and safetensors alike); nothing else."""
    out = [_tensor(EMBEDDING, cfg, None)]
    out += [_tensor(w, cfg, i) for i in range(cfg.n_layer) for w in BLOCK]
    out.append(_tensor(FINAL_NORM, cfg, None))
    if not cfg.tie_embeddings:
        out.append(_tensor(OUTPUT, cfg, None))
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Weight names and shapes of `Llama(cfg).state_dict()` (docs/contracts.md)."""
    return {t.name: t.shape for t in layout(cfg)}


def min_tensors(cfg: ModelConfig) -> int:
    """How many tensors a file for `cfg` holds at least: checked before listing n_layer blocks of
    names, so an absurd n_layer in a hand-edited config fails fast."""
    return cfg.n_layer * len(BLOCK) + 2


def param_count(cfg: ModelConfig) -> int:
    """Exact parameter count of Llama(cfg), without building it."""
    return sum(math.prod(t.shape) for t in layout(cfg))


_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_BLOCK_BY_NAME = {w.name: w for w in BLOCK}
_GLOBAL_BY_NAME = {w.name: w for w in (EMBEDDING, FINAL_NORM, OUTPUT)}


def hf_name(name: str) -> str:
    """Our weight name -> HF Llama's (no shape needed: HF uses our rotate-half layout as is)."""
    m = _LAYER.match(name)
    if m:
        return f"model.layers.{m.group(1)}.{_BLOCK_BY_NAME[m.group(2)].hf}.weight"
    return _GLOBAL_BY_NAME[name.removesuffix(".weight")].hf + ".weight"


def by_gguf_name(cfg: ModelConfig) -> dict[str, Tensor]:
    """GGUF tensor name -> the tensor (for reading a GGUF back into our names)."""
    return {t.gguf: t for t in layout(cfg)}


def permute_rotate_half(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF/rotate-half RoPE rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute).

    Per head, rotate-half pairs dimension j with j + hd/2; llama.cpp pairs 2j with 2j+1.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotate_half(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_rotate_half`: interleaved pairs back to rotate-half halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
