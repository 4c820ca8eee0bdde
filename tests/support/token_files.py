"""Writes prepared-data directories from given token ids through bulba.data.format (the contract's
one writer), without prepare.py: the loader tests choose every document's tokens themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bulba.data.format import new_meta, token_dtype, write_meta, write_split

BOS, EOS = 1, 2


def make_docs(lengths, vocab_size: int = 1000, seed: int = 0) -> list[np.ndarray]:
    """Documents `BOS tokens... EOS` with the given total lengths (each >= 2)."""
    rng = np.random.default_rng(seed)
    docs = []
    for n in lengths:
        body = rng.integers(3, vocab_size, size=max(0, n - 2))
        docs.append(np.concatenate([[BOS], body, [EOS]]))
    return docs


def write_dataset(d, train_docs, val_docs=None, vocab_size: int = 1000, dtype: str | None = None) -> Path:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    dtype = dtype or token_dtype(vocab_size)
    val_docs = val_docs if val_docs is not None else train_docs[: max(1, len(train_docs) // 10)]
    splits = {"train": write_split(d, "train", train_docs, dtype), "val": write_split(d, "val", val_docs, dtype)}
    write_meta(
        d,
        new_meta(
            dtype=dtype,
            vocab_size=vocab_size,
            splits=splits,
            bos_id=BOS,
            eos_id=EOS,
            pad_id=EOS,
            special_tokens={"<|begin_of_text|>": BOS},
            sources=[],
            dataset_digest="test",
        ),
    )
    return d
