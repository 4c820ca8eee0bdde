"""Bits per byte of a text under a model, windowed the same way in PyTorch and llama.cpp.

The text is read as UTF-8, NFC-normalized (as prepare normalizes training text; llama.cpp
normalizes nothing) and tokenized whole, without BOS, by the model's own tokenizer (for a
GGUF, llama.cpp's). The tokens are then cut into windows of `ctx` positions, each starting
with BOS followed by up to ctx - 1 text tokens; window k starts at text token k * stride and
scores only the tokens no earlier window scored, so every token is scored exactly once, and
every token after the first window sees at least ctx - 1 - stride tokens of context:

    bits per byte = sum over tokens of -ln p(token | BOS, context) / ln 2 / UTF-8 bytes

The same bytes compressed by `xz -9e` (Python's lzma, preset 9 | PRESET_EXTREME, the .xz
container included) give the floor a model worth training must beat.
"""

from __future__ import annotations

import lzma
import math
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bulba.errors import UserError


@dataclass
class Text:
    name: str  # the file stem: one language per file
    path: Path
    text: str  # NFC

    @property
    def data(self) -> bytes:
        return self.text.encode("utf-8")


def read_text(path: str | Path, max_kb: float | None = None) -> Text:
    """A text file as NFC text; with `max_kb`, its first max_kb KB (1000 bytes of UTF-8 after
    NFC), cut after the last whole line that fits (or the last whole character)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file {p} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror or e}") from None
    text = unicodedata.normalize("NFC", text)
    if max_kb is not None:
        data = text.encode("utf-8")
        cap = int(max_kb * 1000)
        if len(data) > cap:
            cut = data[:cap]
            line_end = cut.rfind(b"\n")
            text = (cut[: line_end + 1] if line_end > 0 else cut).decode("utf-8", "ignore")
    if not text.strip():
        raise UserError(f"{p} holds no text; give a file of sentences in one language")
    return Text(p.stem, p, text)


def windows(n: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) over text tokens 0..n: the window holds BOS + tokens[start:end]
    and scores tokens[first_scored:end]. Consecutive windows' scored ranges tile 0..n."""
    if ctx < 2:
        raise UserError(f"context length {ctx} is too short to score text (need >= 2)")
    span = ctx - 1
    stride = max(1, min(stride, span))
    out, done, start = [], 0, 0
    while done < n:
        end = min(start + span, n)
        out.append((start, end, done))
        done = end
        start += stride
    return out


def default_stride(ctx: int) -> int:
    """Half the context: each token after the first window sees >= ctx/2 - 1 tokens of context,
    for twice the compute of disjoint windows."""
    return max(1, ctx // 2)


def xz_bits_per_byte(data: bytes) -> float:
    return 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)


@dataclass
class Score:
    name: str
    bits_per_byte: float
    tokens_per_word: float
    xz_bits_per_byte: float
    bytes: int
    tokens: int

    def row(self) -> dict:
        return {
            "name": self.name,
            "bits_per_byte": round(self.bits_per_byte, 6),
            "tokens_per_word": round(self.tokens_per_word, 6),
            "xz_bits_per_byte": round(self.xz_bits_per_byte, 6),
            "bytes": self.bytes,
            "tokens": self.tokens,
        }


def nll_of_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log softmax(logits)[target] over rows: exp in float32 after subtracting the row's
    max (terms <= 1), sums in float64 (3x faster than all-float64 at vocab 32003, same to 1e-6)."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1, dtype=np.float64)) + m[:, 0]
    return float((lse - x[np.arange(len(targets)), targets]).sum(dtype=np.float64))


def evaluate(model, texts: list[Text], progress: bool | None = None) -> list[Score]:
    """Every text under `model` (bulba.eval.sources.Model: tokenize, bos_id, ctx, nll(windows))."""
    from tqdm import tqdm

    jobs = []
    for t in texts:
        ids = model.tokenize(t.text)
        if not ids:
            raise UserError(f"{t.path} tokenizes to nothing; give a file of sentences")
        jobs.append((t, ids, windows(len(ids), model.ctx, default_stride(model.ctx))))
    bar = tqdm(
        total=sum(len(w) for _, _, w in jobs),
        desc=f"scoring ({model.kind})",
        unit="window",
        file=sys.stderr,
        disable=None if progress is None else not progress,  # None: only on a terminal
        dynamic_ncols=True,
    )
    out = []
    try:
        for t, ids, wins in jobs:
            nats = model.nll(ids, wins, bar.update)
            words = len(t.text.split())
            out.append(
                Score(
                    name=t.name,
                    bits_per_byte=nats / math.log(2) / len(t.data),
                    tokens_per_word=len(ids) / max(1, words),
                    xz_bits_per_byte=xz_bits_per_byte(t.data),
                    bytes=len(t.data),
                    tokens=len(ids),
                )
            )
    finally:
        bar.close()
    return out
