"""The encoding stage's unit of work: one block of documents → ids, split and statistics.

`encode_block` runs in worker processes (or in-process for small corpora). It does all the
per-document work — the split key, which copies a weight keeps, language and word counts,
and the token ids — and returns compact numpy arrays, so the parent only routes blocks
and appends bytes to the files. Workers are started with "spawn" (a fork after
`tokenizers` used its thread pool can deadlock) and get the tokenizer as a JSON string.
"""

from __future__ import annotations

import hashlib
import math
import os
import zlib
from array import array
from itertools import chain

from bulba.data import corpus as C
from bulba.memory import peak_rss_mb

_STATE: dict = {}


class Keyer:
    """Deterministic uniform numbers in [0,1) per document, from its text and the seed: a
    CRC-32 for the split (fast; the usual choice for hash-based splits) and, only when a
    weight has a fractional part, a keyed BLAKE2b for which copies to keep."""

    def __init__(self, seed: int):
        self.key = f"bulba-split-{seed}".encode()
        self.crc_seed = zlib.crc32(self.key)

    def split(self, raw: bytes) -> float:
        return zlib.crc32(raw, self.crc_seed) / 2**32

    def weight(self, raw: bytes) -> float:
        d = hashlib.blake2b(raw, digest_size=8, key=self.key).digest()
        return int.from_bytes(d, "little") / 2**64


def copies_in_pass(weight: float, k: int, u) -> bool:
    """Is a train document written in pass k? floor(w) full passes, then a share frac(w) of
    the documents, picked by u() (called only then: hashing costs)."""
    full = math.floor(weight)
    if k < full:
        return True
    return k == full and weight > full and u() < weight - full


def init_worker(tokenizer_json: str, fast: bool, seed: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from bulba.data.tokenizer import DocumentEncoder

    _STATE["enc"] = DocumentEncoder(tokenizer_json, fast=fast)
    _STATE["keyer"] = Keyer(seed)


def encode_block(job: tuple) -> dict:
    """job = (docs, k, weight, val_threshold, default_language, is_code).

    Returns, for the documents written in pass k, in order: `flat` ids (uint32), `lengths`,
    `dest` (1 val, 0 train, -1 encoded for statistics only); and in pass 0 per-language sums
    (`lang_docs`, `lang_words`, `lang_tokens`, `lang_bytes`, indexed like C.LANGUAGES).
    Arrays are `array.array`s (ids "I", lengths "q", dest "b")."""
    docs, k, weight, val_threshold, default_lang, is_code = job
    enc, keyer = _STATE["enc"], _STATE["keyer"]
    sel, dest, langs, words, nbytes = [], [], [], [], []
    min_u = 1.0
    code_id = C.LANG_ID["code"]
    for d in docs:
        raw = d.encode()
        u = keyer.split(raw)
        if u < min_u:
            min_u = u
        v = u < val_threshold
        if v and k > 0:
            continue
        to = 1 if v else 0
        if not v and not copies_in_pass(weight, k, lambda: keyer.weight(raw)):
            if k > 0:
                continue
            to = -1  # pass 0 encodes every document once for the statistics
        sel.append(d)
        dest.append(to)
        nbytes.append(len(raw))
        if k == 0:
            langs.append(code_id if is_code else C.LANG_ID[C.guess_language(d, default_lang)])
            words.append(len(d.split()))
    ids = enc.encode(sel) if sel else []
    # stdlib arrays, not numpy: workers stay ~15 MB smaller; the parent views them with numpy
    lengths = array("q", map(len, ids))
    out = {
        "flat": array("I", chain.from_iterable(ids)),
        "lengths": lengths,
        "dest": array("b", dest),
        "nbytes": sum(nbytes),
        # UTF-8 bytes written to (train, val): what val/<source>/bpb divides by
        "split_bytes": [sum(b for t, b in zip(dest, nbytes) if t == to) for to in (0, 1)],
        "min_u": min_u,
        "rss_mb": peak_rss_mb(),
        "pid": os.getpid(),
    }
    if k == 0 and sel:
        n = len(C.LANGUAGES)
        docs_, words_, tokens_, bytes_ = [0] * n, [0] * n, [0] * n, [0] * n
        for lang, w, t, b in zip(langs, words, lengths, nbytes):
            docs_[lang] += 1
            words_[lang] += w
            tokens_[lang] += t - 2
            bytes_[lang] += b
        out.update(lang_docs=docs_, lang_words=words_, lang_tokens=tokens_, lang_bytes=bytes_)
    return out
