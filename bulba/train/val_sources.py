"""Validation per source language: `val/<lang>/bpb` and `val/bpb`, bits per UTF-8 byte.

A loss per token of our own tokenizer does not compare across vocabularies or languages; bits
per byte do (and compare with `eval.py` and xz). prepare records, per input source, its
language, where its documents start in val.bin and their tokens and UTF-8 bytes (meta.json
`sources[].splits`, `sources_version` 2). Validation scores the same fixed val batches as
`val/loss`; each labelled position is attributed to the source of the token it predicts (the
engine says where every input position comes from in val.bin, `Batches.offsets`), and its
nats are summed per language. A language's bytes are scaled by the share of its tokens that
were scored, so scoring only the first `train.val_batches` batches still estimates the whole:

    bpb = nats / ln 2 / (bytes * scored / tokens)

Datasets from before `sources_version` 2 have none of this: `from_data` returns None and
validation logs `val/loss` only.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

from bulba.data.format import SOURCES_VERSION, TokenData


def metric_key(language: str | None) -> str:
    """A source's language as the middle of `val/<key>/bpb` (MLflow-safe characters only)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", language or "other") or "other"


class SourceBpb:
    def __init__(self, names: list[str], starts, ends, group, tokens, nbytes):
        self.names = names  # one per group (language)
        self._starts = torch.tensor(starts, dtype=torch.long)  # token ranges in val.bin, sorted
        self._ends = torch.tensor(ends, dtype=torch.long)
        self._group = torch.tensor(group, dtype=torch.long)  # range -> group
        self.tokens = np.asarray(tokens, dtype=np.float64)  # val tokens per group
        self.bytes = np.asarray(nbytes, dtype=np.float64)  # val bytes per group
        self._acc: torch.Tensor | None = None

    @classmethod
    def from_data(cls, data: TokenData) -> SourceBpb | None:
        meta = data.meta
        if not isinstance(meta.get("sources_version"), int) or meta["sources_version"] < SOURCES_VERSION:
            return None
        idx = np.fromfile(data.idx_path("val"), dtype="<u8")
        names: list[str] = []
        ranges = []
        tokens: dict[str, int] = {}
        nbytes: dict[str, int] = {}
        for s in meta.get("sources") or []:
            v = ((s.get("splits") or {}).get("val")) or {}
            first, n = v.get("first_document"), v.get("documents") or 0
            if not n or first is None or first + n >= len(idx):
                continue
            key = metric_key("code" if s.get("kind") == "code" else s.get("language"))
            if key not in tokens:
                names.append(key)
                tokens[key] = nbytes[key] = 0
            tokens[key] += int(v["tokens"])
            nbytes[key] += int(v["bytes"])
            ranges.append((int(idx[first]), int(idx[first + n]), names.index(key)))
        if not ranges:
            return None
        ranges.sort()
        return cls(
            names,
            [a for a, _, _ in ranges],
            [b for _, b, _ in ranges],
            [g for _, _, g in ranges],
            [tokens[k] for k in names],
            [nbytes[k] for k in names],
        )

    def reset(self, device) -> None:
        self._acc = torch.zeros(2, len(self.names), dtype=torch.float64, device=device)  # nats, positions
        for name in ("_starts", "_ends", "_group"):
            setattr(self, name, getattr(self, name).to(device))

    def add(self, offsets: torch.Tensor, labels: torch.Tensor, nll: torch.Tensor) -> None:
        """offsets, labels [B, T]; nll [B*T] (0 where unlabelled): one val batch."""
        target = offsets.reshape(-1).long() + 1  # the position predicts the token after it
        keep = (labels.reshape(-1) != -100) & (offsets.reshape(-1) >= 0)
        r = torch.searchsorted(self._starts, target, right=True) - 1
        keep &= (r >= 0) & (target < self._ends[r.clamp(min=0)])
        g = self._group[r.clamp(min=0)][keep]
        self._acc[0].index_add_(0, g, nll[keep].double())
        self._acc[1].index_add_(0, g, torch.ones_like(g, dtype=torch.float64))

    def metrics(self, reduce=lambda t: t) -> dict[str, float]:
        """`val/<lang>/bpb` for every language scored, and `val/bpb` over all of them; `reduce`
        sums across ranks (the module's all-reduce)."""
        nats, scored = reduce(self._acc).cpu().numpy()
        out = {}
        seen = scored > 0
        for i in np.flatnonzero(seen):
            out[f"val/{self.names[i]}/bpb"] = float(
                nats[i] / math.log(2) / (self.bytes[i] * scored[i] / self.tokens[i])
            )
        if seen.any():
            scaled = (self.bytes[seen] * scored[seen] / self.tokens[seen]).sum()
            out["val/bpb"] = float(nats[seen].sum() / math.log(2) / scaled)
        return out


def token_nll(model, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy [B*T] (fp32, 0 where unlabelled) from hidden states, some rows of
    fp32 logits at a time (as bulba.model.loss, whose fused heads return only the sum): ~16 MiB of
    them on CPU (loss.py's measured sweet spot), 1 GiB on a GPU."""
    h = h.reshape(-1, h.shape[-1])
    y = labels.reshape(-1).long()
    w = model.output_weight()
    chunk_bytes = (16 << 20) if h.device.type == "cpu" else (1 << 30)
    rows = max(64, chunk_bytes // (4 * w.shape[0]))
    parts = [
        F.cross_entropy(F.linear(h[s : s + rows], w).float(), y[s : s + rows], ignore_index=-100, reduction="none")
        for s in range(0, h.shape[0], rows)
    ]
    return torch.cat(parts)
