"""Causal attention backends, all with grouped-query attention and document masking.

`attend(q, k, v, ...)` takes q [B, H, T, hd], k/v [B, KV, T, hd] and returns [B, H, T, hd].

- `sdpa`: PyTorch scaled_dot_product_attention; torch picks flash / cuDNN / efficient / math.
  Packed batches (several documents per row) get a boolean block-diagonal causal mask built
  from `seq_ids`, so a token never sees another document. Works on CPU too.
- `flash`: the flash-attn package (CUDA only). Packed batches use the varlen kernel with
  `cu_seqlens`, which skips the masked blocks instead of computing and discarding them.
- `math`: two batched matmuls and a softmax, written out so that torch.compile fuses the
  scale, mask and fp32 softmax around them. Chosen only for compiled blocks on CPU with short
  contexts (`strategy.MATH_ATTENTION_MAX_CTX`), where it beats the CPU SDPA kernel; it holds
  the [T, T] scores, so it is no choice for long contexts or GPUs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # optional CUDA extra
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    HAVE_FLASH_ATTN = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_FLASH_ATTN = False


def document_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids -> [B, 1, T, T] bool mask: causal and within one document."""
    T = seq_ids.shape[1]
    same_doc = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    return (same_doc & causal)[:, None]


def sdpa_attention(q, k, v, seq_ids=None):
    if seq_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(seq_ids), enable_gqa=True)


def math_attention(q, k, v, seq_ids=None):
    """Causal (and document-masked) attention as plain tensor ops, for Inductor to fuse.

    GQA without copying K/V: the G query heads that share a KV head are stacked along the
    query axis ([B, KV, G*T, hd]), so one matmul per KV head serves the whole group.
    """
    B, H, T, hd = q.shape
    KV = k.shape[1]
    G = H // KV
    scores = (q.reshape(B, KV, G * T, hd) @ k.transpose(-1, -2)).view(B, KV, G, T, T) * (1.0 / math.sqrt(hd))
    if seq_ids is None:
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    else:
        allowed = document_mask(seq_ids)[:, :, None]  # [B, 1, 1, T, T]
    # Softmax in at least fp32, as SDPA does for bf16/fp16 inputs. The mask value is finite:
    # exp(finfo.min - max) is exactly 0 like exp(-inf), but a row with nothing allowed (never
    # built here; the diagonal is always allowed) would give a uniform row instead of NaN.
    dtype = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.to(dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B, KV, G * T, T)
    return (probs @ v).view(B, H, T, hd)


# Left out of torch.compile graphs: cu_seqlens changes length with the number of documents
# in a batch, which would recompile a static graph every step; a graph break per layer is
# the cheaper price, and the kernel itself is already fused.
@torch.compiler.disable
def flash_attention(q, k, v, cu_seqlens=None, max_seqlen=None):
    B, H, T, hd = q.shape
    # flash-attn wants [B, T, H, hd] and handles GQA (fewer KV heads) itself.
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if cu_seqlens is None:
        y = flash_attn_func(q, k, v, causal=True)
    else:
        y = flash_attn_varlen_func(
            q.reshape(B * T, H, hd),
            k.reshape(B * T, k.shape[2], hd),
            v.reshape(B * T, v.shape[2], hd),
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            causal=True,
        ).view(B, T, H, hd)
    return y.transpose(1, 2)


def attend(q, k, v, backend: str = "sdpa", seq_ids=None, cu_seqlens=None, max_seqlen=None):
    if backend == "flash":
        if not (HAVE_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
            raise RuntimeError("flash attention needs flash-attn, a CUDA device and fp16/bf16 tensors")
        return flash_attention(q, k, v, cu_seqlens if seq_ids is not None else None, max_seqlen)
    if backend == "math":
        return math_attention(q, k, v, seq_ids)
    return sdpa_attention(q, k, v, seq_ids)
