"""Writes prepared-data directories with numpy, exactly as docs/contracts.md specifies.

Independent of prepare.py on purpose: the loader tests check the engine against the contract,
not against another implementation of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BOS, EOS = 1, 2


def make_docs(lengths, vocab_size: int = 1000, seed: int = 0) -> list[np.ndarray]:
    """Documents `BOS tokens... EOS` with the given total lengths (each >= 2)."""
    rng = np.random.default_rng(seed)
    docs = []
    for n in lengths:
        body = rng.integers(3, vocab_size, size=max(0, n - 2))
        docs.append(np.concatenate([[BOS], body, [EOS]]))
    return docs


def write_split(d: Path, split: str, docs, dtype: str) -> dict:
    tokens = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype)
    offsets = np.zeros(len(docs) + 1, dtype="<u8")
    np.cumsum([len(x) for x in docs], out=offsets[1:])
    tokens.astype(np.dtype(dtype).newbyteorder("<")).tofile(d / f"{split}.bin")
    offsets.tofile(d / f"{split}.idx")
    return {"tokens": int(tokens.size), "documents": len(docs), "sha256": "test"}


def write_dataset(d, train_docs, val_docs=None, vocab_size: int = 1000, dtype: str | None = None) -> Path:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    dtype = dtype or ("uint16" if vocab_size <= 65536 else "uint32")
    val_docs = val_docs if val_docs is not None else train_docs[: max(1, len(train_docs) // 10)]
    splits = {"train": write_split(d, "train", train_docs, dtype), "val": write_split(d, "val", val_docs, dtype)}
    meta = {"format": "bulba-tokens", "version": 1, "dtype": dtype, "vocab_size": vocab_size,
            "bos_id": BOS, "eos_id": EOS, "pad_id": EOS, "special_tokens": {"<|begin_of_text|>": BOS},
            "splits": splits, "sources": [], "dataset_digest": "test"}
    (d / "meta.json").write_text(json.dumps(meta))
    return d
