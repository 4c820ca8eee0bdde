"""Bits per byte of a text under a model, windowed the same way in PyTorch and llama.cpp.

A text file is read as prepare.py reads a training file (bulba.data.corpus.readers): UTF-8,
NFC-normalized (llama.cpp normalizes nothing), cut into documents, one per line (or per
paragraph when the file has blank lines). Each document is scored as the model was trained
on documents: BOS, its tokens, EOS, with the EOS standing for the line end. Scoring the file
as one stream instead asks the model for "\n" tokens and for sentences that continue after
one, neither of which its training data holds: the 15-minute tiny model of
docs/bench/tiny-tuning-2026-12-01.md scored 1.943 bits/byte on held-out Belarusian as a
stream and 1.776 as documents (the figures of issue 14 before this change were streams).

A document longer than the context is cut into windows of `ctx` positions, each starting with
BOS followed by up to ctx - 1 of its tokens; window k starts at token k * stride and scores
only the tokens no earlier window scored, so every token (EOS included) is scored exactly once,
and every token after the first window sees at least ctx - 1 - stride tokens of context:

    bits per byte = sum over tokens of -ln p(token | BOS, context) / ln 2 / bytes

where bytes are those of the documents each followed by its separator ("\n", or "\n\n"
between paragraphs): exactly the bytes the model's code reproduces, which is also the text
`xz -9e` compresses (Python's lzma, preset 9 | PRESET_EXTREME, the .xz container included) for
the floor a model worth training must beat. For a file of clean lines that is the file itself.
"""

from __future__ import annotations

import lzma
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bulba.data.corpus.readers import nfc, split_documents, text_mode
from bulba.errors import UserError


@dataclass
class Text:
    name: str  # the file stem: one language per file
    path: Path
    documents: list[str]  # as prepare would write them (NFC, stripped, non-empty)
    separator: str  # what each document's EOS stands for: "\n" (lines) or "\n\n" (paragraphs)

    @property
    def text(self) -> str:
        return "".join(d + self.separator for d in self.documents)

    @property
    def data(self) -> bytes:
        return self.text.encode("utf-8")


def read_text(path: str | Path, max_kb: float | None = None) -> Text:
    """A text file as documents; with `max_kb`, its first documents that fit in max_kb KB (1000
    bytes of UTF-8 after NFC, separators included), or the first one cut at a whole character."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file {p} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        text = p.read_bytes().decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror or e}") from None
    mode = text_mode(text)
    sep = "\n" if mode == "line" else "\n\n"
    docs = split_documents(nfc(text), mode)
    if not docs:
        raise UserError(f"{p} holds no text; give a file of sentences in one language")
    if max_kb is not None:
        room = int(max_kb * 1000)
        kept = []
        for d in docs:
            room -= len(d.encode("utf-8")) + len(sep)
            if room < 0:
                break
            kept.append(d)
        if not kept:  # the first document alone is too long: its first whole characters
            first = docs[0].encode("utf-8")[: max(1, int(max_kb * 1000) - len(sep))]
            kept = [first.decode("utf-8", "ignore") or docs[0][0]]
        docs = kept
    return Text(p.stem, p, docs, sep)


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
    """Every text under `model` (bulba.eval.sources: document_ids, bos_id, ctx, nll(windows)).

    A scored window is (inputs, first, targets): the model reads `inputs` (BOS, then the
    document's tokens) and position first + i must predict targets[i]."""
    from tqdm import tqdm

    jobs = []
    for t in texts:
        work, n_text = [], 0
        for doc in t.documents:
            ids = model.document_ids(doc)  # its tokens, then EOS
            n_text += len(ids) - 1
            for s, e, first in windows(len(ids), model.ctx, default_stride(model.ctx)):
                work.append(([model.bos_id, *ids[s : e - 1]], first - s, ids[first:e]))
        jobs.append((t, work, n_text))
    bar = tqdm(
        total=sum(len(w) for _, w, _ in jobs),
        desc=f"scoring ({model.kind})",
        unit="window",
        file=sys.stderr,
        disable=None if progress is None else not progress,  # None: only on a terminal
        dynamic_ncols=True,
    )
    out = []
    try:
        for t, work, n_text in jobs:
            nats = model.nll(work, bar.update)
            text = t.text  # the documents joined again: once, for the words and the bytes
            data = text.encode("utf-8")
            words = len(text.split())
            out.append(
                Score(
                    name=t.name,
                    bits_per_byte=nats / math.log(2) / len(data),
                    tokens_per_word=n_text / max(1, words),
                    xz_bits_per_byte=xz_bits_per_byte(data),
                    bytes=len(data),
                    tokens=sum(len(y) for _, _, y in work),  # scored: text tokens and one EOS per document
                )
            )
    finally:
        bar.close()
    return out
