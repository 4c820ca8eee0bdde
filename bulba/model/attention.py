"""Causal attention backends, all with grouped-query attention and document masking.

A backend is two calls (torchtitan's shape): `mask(B, T, device, seq_ids, cu_seqlens)` builds whatever the
kernel needs to keep each packed document to itself, ONCE per batch (`Llama.hidden`), and
`backend(q, k, v, mask)` runs attention in every layer with that one object. q is
[B, H, T, hd], k/v [B, KV, T, hd], the result [B, H, T, hd]. `mask` is None for stream rows
(one causal sequence per row).

    sdpa        torch's scaled_dot_product_attention. Stream rows: `is_causal`, for which torch
                picks FlashAttention-2 on CUDA (bf16/fp16, sm80+). Packed rows: a boolean
                [B, 1, T, T] block-diagonal causal mask -- correct everywhere, but on CUDA it
                rules out the flash kernel and computes every masked block: the CPU choice.
    math        two matmuls and a softmax written out, so that Inductor fuses scale, mask and
                the fp32 softmax around them: compiled blocks on CPU with short contexts only
                (it holds the [T, T] scores).
    varlen      PyTorch's own FlashAttention for packed rows: torch.nn.attention.varlen
                (torch >= 2.10, CUDA sm80+, bf16/fp16) over the flattened batch with
                `cu_seqlens`, skipping masked blocks. Stream rows go to SDPA's flash kernel.
    flex        FlexAttention with a block mask from `create_block_mask`: skips masked blocks
                on any CUDA GPU and in fp32. No backward on CPU (torch 2.15): tests only.
    flash-attn  the flash-attn package (an optional CUDA extra): its varlen kernel for packed
                rows, its causal kernel for stream rows.

Which backend a run gets is decided before the model is built (`train.strategy.choose_attention`).

Compile-friendliness: whatever reaches the (compiled) blocks has a shape fixed by the batch
shape, so a new document layout is not a recompile: `cu_seqlens` is padded with empty
segments up to a power of two (`pad_segments`), and the varlen kernels get the row length as
their max_seqlen (an upper bound is all they need; the true maximum is a Python int that
dynamo would guard on, i.e. a recompile for each value).
"""

from __future__ import annotations

import inspect
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

try:  # optional CUDA extra
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    HAVE_FLASH_ATTN = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_FLASH_ATTN = False

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - older torch
    _torch_varlen_attn = None

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    create_block_mask = flex_attention = None

HAVE_TORCH_VARLEN = _torch_varlen_attn is not None
HAVE_FLEX = flex_attention is not None


# ---------------------------------------------------------------------------- masks


def document_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids -> [B, 1, T, T] bool mask: causal and within one document."""
    T = seq_ids.shape[1]
    same_doc = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    return (same_doc & causal)[:, None]


def pad_segments(cu_seqlens: torch.Tensor, min_segments: int = 16) -> torch.Tensor:
    """cu_seqlens (int32, [n + 1]) padded with empty segments to a power-of-two n (>= min_segments).

    The number of documents changes from batch to batch; a kernel input whose length changes is
    a recompile of a static graph each time. Padded, a run sees a handful of lengths (the
    document counts of one dataset stay within a factor of two or so): a few graphs, then none.
    Empty trailing segments (equal offsets) are no-ops for the varlen kernels."""
    cu = cu_seqlens.to(torch.int32)
    n = cu.numel() - 1
    size = max(min_segments, 1 << max(0, n - 1).bit_length())
    if size == n:
        return cu
    return torch.cat([cu, cu[-1:].expand(size - n)])


def segments_of(seq_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens of the flattened batch from [B, T] document ids (a segment ends where the id
    changes or a row ends). The trainer has the loader's cu_seqlens and never needs this; it is
    for callers that only have seq_ids (it syncs with the device)."""
    B, T = seq_ids.shape
    flat = seq_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::T] = True
    idx = torch.nonzero(starts).flatten()
    return torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)


# ---------------------------------------------------------------------------- backends


class SDPA:
    name = "sdpa"

    def mask(self, B, T, device, seq_ids=None, cu_seqlens=None):
        return None if seq_ids is None else document_mask(seq_ids)

    def __call__(self, q, k, v, mask):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class Math:
    """Causal (and document-masked) attention as plain tensor ops, for Inductor to fuse.

    GQA without copying K/V: the G query heads that share a KV head are stacked along the
    query axis ([B, KV, G*T, hd]), so one matmul per KV head serves the whole group.
    """

    name = "math"

    def mask(self, B, T, device, seq_ids=None, cu_seqlens=None):
        # [B, 1, 1, T, T] against scores [B, KV, G, T, T]; stream rows build theirs in the graph.
        return None if seq_ids is None else document_mask(seq_ids)[:, :, None]

    def __call__(self, q, k, v, mask):
        B, H, T, hd = q.shape
        KV = k.shape[1]
        G = H // KV
        scores = (q.reshape(B, KV, G * T, hd) @ k.transpose(-1, -2)).view(B, KV, G, T, T) * (1.0 / math.sqrt(hd))
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() if mask is None else mask
        # Softmax in at least fp32, as SDPA does for bf16/fp16 inputs. The mask value is finite:
        # exp(finfo.min - max) is exactly 0 like exp(-inf), but a row with nothing allowed (never
        # built here; the diagonal is always allowed) would give a uniform row instead of NaN.
        dtype = torch.promote_types(scores.dtype, torch.float32)
        scores = scores.to(dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B, KV, G * T, T)
        return (probs @ v).view(B, H, T, hd)


def _flat(x):
    """[B, n, T, hd] -> [B*T, n, hd], the varlen kernels' packed layout."""
    B, n, T, hd = x.shape
    return x.transpose(1, 2).reshape(B * T, n, hd)


@lru_cache(maxsize=None)
def _varlen_keywords() -> tuple[dict, bool]:
    """Causal and GQA keywords of this torch's varlen_attn: its signature moved between
    releases (2.10: `is_causal=`; later: `window_size=(-1, 0)` and `enable_gqa=`)."""
    params = inspect.signature(_torch_varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params


def torch_varlen(q, k, v, cu, max_seqlen):
    """torch's varlen FlashAttention on packed [N, H, hd] / [N, KV, hd] tensors, causal."""
    causal, has_gqa = _varlen_keywords()
    if k.shape[1] != q.shape[1]:
        if has_gqa:
            causal = {**causal, "enable_gqa": True}
        else:  # older torch: give every query head its KV head
            G = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return _torch_varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **causal)


class Varlen:
    """Packed rows through a varlen kernel with cu_seqlens; stream rows through `stream`.

    `kernel(q, k, v, cu, max_seqlen)` on [B*T, heads, hd] tensors: torch's (`torch_varlen`) by
    default; tests on CPU hand in a per-segment reference to check everything around it.
    """

    name = "varlen"

    def __init__(self, kernel=None, stream=None):
        self.kernel = kernel or torch_varlen
        self.stream = stream or SDPA()

    def mask(self, B, T, device, seq_ids=None, cu_seqlens=None):
        if cu_seqlens is None and seq_ids is not None:
            cu_seqlens = segments_of(seq_ids)
        return None if cu_seqlens is None else pad_segments(cu_seqlens)

    def __call__(self, q, k, v, mask):
        if mask is None:
            return self.stream(q, k, v, None)
        B, H, T, hd = q.shape
        y = self.kernel(_flat(q), _flat(k), _flat(v), mask, T)
        return y.view(B, T, H, hd).transpose(1, 2)


def flash_attn_varlen(q, k, v, cu, max_seqlen):
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)


class FlashAttnStream:
    """Stream rows through the flash-attn package's causal kernel (it handles GQA itself)."""

    def __call__(self, q, k, v, mask):
        y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return y.transpose(1, 2)


class FlashAttn(Varlen):
    name = "flash-attn"

    def __init__(self):
        super().__init__(kernel=flash_attn_varlen, stream=FlashAttnStream())


class Flex:
    """FlexAttention; the block mask (which 128x128 tiles hold any allowed pair) is built once
    per batch, so masked tiles are skipped rather than computed."""

    name = "flex"

    def __init__(self):
        self._causal = {}
        self._attend = None

    def mask(self, B, T, device, seq_ids=None, cu_seqlens=None):
        if self._attend is None:
            # Flex must be compiled to be fast; inside an already compiled block this is inlined.
            cuda = torch.device(device).type == "cuda"
            self._attend = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
        if seq_ids is None:
            key = (T, str(device))
            if key not in self._causal:  # the same for every stream batch of a length: kept (one length)
                self._causal = {key: create_block_mask(_causal, None, None, T, T, device=device)}
            return self._causal[key]

        def document_causal(b, h, q_idx, kv_idx):
            return (seq_ids[b, q_idx] == seq_ids[b, kv_idx]) & (q_idx >= kv_idx)

        return create_block_mask(document_causal, B, None, T, T, device=device, _compile=seq_ids.is_cuda)

    def __call__(self, q, k, v, mask):
        return self._attend(q, k, v, block_mask=mask, enable_gqa=True)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


BACKENDS = {b.name: b for b in (SDPA, Math, Varlen, Flex, FlashAttn)}


def make_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (one of {', '.join(BACKENDS)})")
    return BACKENDS[name]()
