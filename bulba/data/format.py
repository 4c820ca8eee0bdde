"""The token-file contract (docs/contracts.md, "Prepared data"): the one module that writes and
reads a prepared-data directory's files. prepare.py writes through it, the loader and the test
helpers read and write through it.

    DATA_DIR/tokenizer.json      the byte-level BPE tokenizer
    DATA_DIR/{train,val}.bin     token ids, little-endian uint16 (vocab <= 65536) or uint32
    DATA_DIR/{train,val}.idx     uint64 offsets of the documents into the .bin, first 0, last = tokens
    DATA_DIR/meta.json           format, version, dtype, vocab_size, special ids, splits, ...;
                                 written last: its presence marks the dataset complete
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bulba.errors import UserError

META_NAME = "meta.json"
FORMAT = "bulba-tokens"
VERSION = 1
SPLITS = ("train", "val")
# meta.json's `sources` entries: 2 adds `splits` per source ({train,val}: documents, tokens, bytes;
# val: first_document), which per-source validation (bulba.train.val_sources) needs. Datasets
# without `sources_version` (1) still load; they just get no per-source curves.
SOURCES_VERSION = 2
DTYPES = {"uint16": 2, "uint32": 4}


def token_dtype(vocab_size: int) -> str:
    """The narrowest dtype that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 65536 else "uint32"


# ---------------------------------------------------------------------------- writing


class SplitWriter:
    """Appends documents to NAME.bin (token ids) and NAME.idx (uint64 offsets, first 0)."""

    def __init__(self, folder: Path, name: str, dtype):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.bin = open(Path(folder) / f"{name}.bin", "wb")
        self.idx = open(Path(folder) / f"{name}.idx", "wb")
        self.idx.write(np.zeros(1, "<u8").tobytes())
        self.sha = hashlib.sha256()
        self.tokens = 0
        self.documents = 0

    def write(self, flat: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> int:
        """Append the documents of (flat, lengths) selected by the boolean `mask` (None: all)."""
        lens = lengths if mask is None else lengths[mask]
        if lens.size == 0:
            return 0
        data = flat if lens.size == lengths.size else flat[np.repeat(mask, lengths)]
        data = data.astype(self.dtype).tobytes()
        self._put(self.bin, data)
        self.sha.update(data)
        self._put(self.idx, (np.cumsum(lens) + self.tokens).astype("<u8").tobytes())
        n = int(lens.sum())
        self.tokens += n
        self.documents += int(lens.size)
        return n

    @staticmethod
    def _put(f, data: bytes) -> None:
        try:
            f.write(data)
        except OSError as e:  # disk full (ENOSPC), file size limit (EFBIG): name the file
            raise OSError(e.errno, e.strerror, Path(f.name).name) from None

    def close(self) -> dict:
        """Flush, fsync and close; returns the split's entry of meta.json."""
        for f in (self.bin, self.idx):
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise OSError(e.errno, e.strerror, Path(f.name).name) from None
            finally:
                with contextlib.suppress(OSError):
                    f.close()
        return {"tokens": self.tokens, "documents": self.documents, "sha256": self.sha.hexdigest()}


def write_split(folder: Path, split: str, docs: list[np.ndarray], dtype: str) -> dict:
    """Write whole documents (arrays of token ids) as one split; returns its meta.json entry."""
    w = SplitWriter(folder, split, dtype)
    if docs:
        w.write(np.concatenate(docs), np.array([len(d) for d in docs], dtype=np.int64))
    return w.close()


def new_meta(
    *, dtype: str, vocab_size: int, splits: dict, bos_id: int | None, eos_id: int | None, pad_id: int | None, **fields
) -> dict:
    """meta.json's content: the contract's keys, then whatever else the writer records."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "splits": splits,
        **fields,
    }


def write_meta(folder: Path, meta: dict) -> None:
    """Write meta.json; callers write it last (prepare: inside the directory renamed into place)."""
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    (Path(folder) / META_NAME).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TokenData:
    """A validated prepared-data directory (its meta.json and the paths of its files)."""

    dir: Path
    meta: dict

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def bos_id(self) -> int | None:
        return self.meta.get("bos_id")

    @property
    def eos_id(self) -> int | None:
        return self.meta.get("eos_id")

    @property
    def pad_id(self) -> int:
        """Token that fills padding positions (their labels are -100 anyway)."""
        for key in ("pad_id", "eos_id"):
            if isinstance(self.meta.get(key), int):
                return self.meta[key]
        return 0

    @property
    def dataset_digest(self) -> str | None:
        return self.meta.get("dataset_digest")

    def bin_path(self, split: str) -> Path:
        return self.dir / f"{split}.bin"

    def idx_path(self, split: str) -> Path:
        return self.dir / f"{split}.idx"

    def split_info(self, split: str) -> dict:
        return (self.meta.get("splits") or {}).get(split) or {}


def open_data(data_dir: str | Path, vocab_size: int | None = None) -> TokenData:
    """Validates `data_dir` (meta.json and the presence of the token files) → TokenData.

    The byte-level checks (sizes, index, token ids) happen when the Rust engine opens a split.
    `vocab_size`, when given, is what the model expects; a different data vocabulary is an error.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"data directory {d} does not exist: run prepare.py first (prepare.py INPUT... --out {d})")
    meta_path = d / META_NAME
    if not meta_path.is_file():
        raise UserError(f"{d} has no {META_NAME} (missing or unfinished dataset): run prepare.py first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path} is not readable JSON ({e}): re-run prepare.py") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_path} is not a BulbaGPT dataset (format != '{FORMAT}'): re-run prepare.py")
    if meta.get("version") != VERSION:
        raise UserError(
            f"{meta_path} has format version {meta.get('version')!r}; this version reads {VERSION}: re-run prepare.py"
        )
    vocab = meta.get("vocab_size")
    if not _is_count(vocab, 1 << 32) or vocab == 0:
        raise UserError(f"{meta_path}: vocab_size must be a positive integer, got {vocab!r}")
    dtype = meta.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UserError(f"{meta_path}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "uint16" and vocab > 1 << 16:
        raise UserError(f"{meta_path}: vocab_size {vocab} does not fit dtype uint16: re-run prepare.py")
    _check_meta_types(meta_path, meta, vocab)
    if vocab_size is not None and vocab_size != vocab:
        raise UserError(
            f"vocab size mismatch: {d} was prepared with vocab_size {vocab} but the model expects {vocab_size}; "
            f"set model.vocab_size={vocab} (or leave it unset) or re-run prepare.py with --vocab-size {vocab_size}"
        )
    data = TokenData(d, meta)
    for split in SPLITS:
        for path in (data.bin_path(split), data.idx_path(split)):
            if not path.is_file():
                raise UserError(f"{path} is missing although {META_NAME} exists: re-run prepare.py")
    return data


def _is_count(v, limit: int = 1 << 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < limit


def _check_meta_types(meta_path: Path, meta: dict, vocab: int) -> None:
    """A hand-edited or foreign meta.json must fail here, in one line, not deep in the engine."""
    for key in ("bos_id", "eos_id", "pad_id"):
        if key in meta and meta[key] is not None and not _is_count(meta[key], vocab):
            raise UserError(
                f"{meta_path}: {key} must be a token id in [0, {vocab}), got {meta[key]!r}: re-run prepare.py"
            )
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        raise UserError(f"{meta_path}: 'splits' must be an object with train and val entries: re-run prepare.py")
    for name, info in splits.items():
        if not isinstance(info, dict):
            raise UserError(f"{meta_path}: splits.{name} must be an object, got {info!r}: re-run prepare.py")
        for key in ("tokens", "documents"):
            if key in info and not _is_count(info[key]):
                raise UserError(
                    f"{meta_path}: splits.{name}.{key} must be a non-negative integer, "
                    f"got {info[key]!r}: re-run prepare.py"
                )
