"""The Llama-3 architecture, one screen per idea (after nanoGPT's model.py).

Token embedding -> n_layer x [RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output projection (optionally tied).
Weight names follow Meta's reference (see docs/contracts.md); RoPE uses the rotate-half
layout (as HF Llama), which the GGUF writer permutes into llama.cpp's interleaved one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bulba.config import ModelConfig
from bulba.model.attention import make_backend
from bulba.model.loss import chunked_lm_loss_sum


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in fp32 (as Llama does), return in the input's dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope_cache(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [ctx_len, head_dim] for rotate-half RoPE with base rope_theta."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    t = torch.arange(cfg.ctx_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [B, H, T, hd]; cos/sin [B, 1, T, hd] (already gathered at each token's position)."""
    return (x.float() * cos + rotate_half(x.float()) * sin).type_as(x)


class Attention(nn.Module):
    """Grouped-query attention: n_head query heads share n_kv_head key/value heads."""

    def __init__(self, cfg: ModelConfig, attend):
        super().__init__()
        self.attend = attend  # the model's one attention backend (bulba.model.attention)
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attend(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attend):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attention = Attention(cfg, attend)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """`attention`: the backend's name (bulba.model.attention); the trainer picks it for the
    device, precision, speed mode and sampler (train.strategy.choose_attention)."""

    def __init__(self, cfg: ModelConfig, attention: str = "sdpa"):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        self.attend = make_backend(attention)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, self.attend) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rope_cache(cfg)
        self.loss_head = chunked_lm_loss_sum  # the strategy compiles lm_loss_sum instead in compile modes
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                # GPT-2: scale the residual projections so the stream's variance stays put.
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def hidden(self, input_ids, position_ids=None, seq_ids=None, cu_seqlens=None):
        """input_ids [B, T] -> final normed hidden states [B, T, D].

        position_ids restart at every document in packed batches; seq_ids ([B, T]) and
        cu_seqlens (the loader's segment offsets over the flattened batch) mark the documents
        so attention stays inside each (None: one causal sequence per row). The attention mask
        is built here once for the batch and handed to every layer.
        """
        B, T = input_ids.shape
        if T > self.cfg.ctx_len:
            raise ValueError(f"sequence of {T} tokens is longer than ctx_len={self.cfg.ctx_len}")
        if position_ids is None:
            cos, sin = self.rope_cos[:T][None, None], self.rope_sin[:T][None, None]
        else:
            cos, sin = self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]
        mask = self.attend.mask(B, T, input_ids.device, seq_ids, cu_seqlens)
        x = self.tok_embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)

    def forward(self, input_ids, position_ids=None, seq_ids=None, cu_seqlens=None):
        """input_ids [B, T] -> logits [B, T, vocab_size] (see `hidden`)."""
        return F.linear(self.hidden(input_ids, position_ids, seq_ids, cu_seqlens), self.output_weight())

    def loss_sum(self, h, labels):
        """Summed next-token cross-entropy over labelled positions from final hidden states h [B, T, D],
        without ever holding the full fp32 [B*T, vocab] logits: chunked in eager mode, one fused
        Inductor graph in the compile modes (the strategy swaps `loss_head`)."""
        return self.loss_head(h.reshape(-1, h.shape[-1]), self.output_weight(), labels.reshape(-1).long())

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ):
        """Autoregressive sampling (greedy when temperature == 0); no KV cache: small models."""
        for _ in range(max_new_tokens):
            ctx = input_ids[:, -self.cfg.ctx_len :]
            logits = self(ctx)[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            input_ids = torch.cat([input_ids, nxt], dim=1)
            if eos_id is not None and (nxt == eos_id).all():
                break
        return input_ids
