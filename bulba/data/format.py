"""The token-file contract (docs/contracts.md, "Prepared data"): the one module that writes and
reads a prepared-data directory's files. prepare.py writes through it, the loader and the test
helpers read and write through it.

    DATA_DIR/tokenizer.json      the byte-level BPE tokenizer
    DATA_DIR/{train,val}.bin     token ids, little-endian uint16 (vocab <= 65536) or uint32
    DATA_DIR/{train,val}.idx     uint64 offsets of the documents into the .bin, first 0, last = tokens
    DATA_DIR/{train,val}.mask.bin  version 2 only (`loss_mask` in meta.json, chat data): one
                                 uint8 per token, 1 where the token is a training target (its
                                 label kept), 0 where not (label -100); aligned with the .bin
    DATA_DIR/meta.json           format, version, dtype, vocab_size, special ids, splits, ...;
                                 written last: its presence marks the dataset complete

Versions: 1 (token streams), 2 (1 plus the loss mask). Version 1 is still written for datasets
without a mask, so tools that read only version 1 keep reading them; both are read here.
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
VERSION = 1  # token streams only
MASK_VERSION = 2  # token streams and a loss mask (chat data)
VERSIONS = (VERSION, MASK_VERSION)
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

    def __init__(self, folder: Path, name: str, dtype, loss_mask: bool = False):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.bin = open(Path(folder) / f"{name}.bin", "wb")
        self.idx = open(Path(folder) / f"{name}.idx", "wb")
        self.idx.write(np.zeros(1, "<u8").tobytes())
        self.mask = open(Path(folder) / f"{name}.mask.bin", "wb") if loss_mask else None
        self.sha = hashlib.sha256()
        self.mask_sha = hashlib.sha256()
        self.tokens = 0
        self.documents = 0

    def write(
        self, flat: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None, loss_mask: np.ndarray | None = None
    ) -> int:
        """Append the documents of (flat, lengths) selected by the boolean `mask` (None: all);
        `loss_mask` (uint8, aligned with `flat`) is required when the writer has a mask file."""
        if (loss_mask is None) != (self.mask is None):
            raise ValueError("loss_mask must be given exactly when the split has a mask file")
        lens = lengths if mask is None else lengths[mask]
        if lens.size == 0:
            return 0
        keep = None if lens.size == lengths.size else np.repeat(mask, lengths)
        data = (flat if keep is None else flat[keep]).astype(self.dtype).tobytes()
        self._put(self.bin, data)
        self.sha.update(data)
        if self.mask is not None:
            m = (loss_mask if keep is None else loss_mask[keep]).astype(np.uint8).tobytes()
            self._put(self.mask, m)
            self.mask_sha.update(m)
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
        for f in (self.bin, self.idx) + ((self.mask,) if self.mask is not None else ()):
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise OSError(e.errno, e.strerror, Path(f.name).name) from None
            finally:
                with contextlib.suppress(OSError):
                    f.close()
        info = {"tokens": self.tokens, "documents": self.documents, "sha256": self.sha.hexdigest()}
        if self.mask is not None:
            info["mask_sha256"] = self.mask_sha.hexdigest()
        return info


def write_split(
    folder: Path, split: str, docs: list[np.ndarray], dtype: str, masks: list[np.ndarray] | None = None
) -> dict:
    """Write whole documents (arrays of token ids) as one split, with their loss masks when
    given (uint8 arrays of the same lengths); returns its meta.json entry."""
    w = SplitWriter(folder, split, dtype, loss_mask=masks is not None)
    if docs:
        lm = np.concatenate(masks) if masks is not None else None
        w.write(np.concatenate(docs), np.array([len(d) for d in docs], dtype=np.int64), loss_mask=lm)
    return w.close()


def new_meta(
    *,
    dtype: str,
    vocab_size: int,
    splits: dict,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    loss_mask: bool = False,
    **fields,
) -> dict:
    """meta.json's content: the contract's keys, then whatever else the writer records.
    `loss_mask`: the splits have .mask.bin files (version 2)."""
    return {
        "format": FORMAT,
        "version": MASK_VERSION if loss_mask else VERSION,
        **({"loss_mask": "uint8"} if loss_mask else {}),
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
    def has_loss_mask(self) -> bool:
        """The splits carry a loss mask (.mask.bin; chat data)."""
        return self.meta.get("version") == MASK_VERSION

    @property
    def dataset_digest(self) -> str | None:
        return self.meta.get("dataset_digest")

    def bin_path(self, split: str) -> Path:
        return self.dir / f"{split}.bin"

    def idx_path(self, split: str) -> Path:
        return self.dir / f"{split}.idx"

    def mask_path(self, split: str) -> Path | None:
        """The split's loss mask (None: every target is trained on)."""
        return self.dir / f"{split}.mask.bin" if self.has_loss_mask else None

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
    if meta.get("version") not in VERSIONS:
        raise UserError(
            f"{meta_path} has format version {meta.get('version')!r}; this version reads "
            f"{' and '.join(map(str, VERSIONS))}: re-run prepare.py"
        )
    if meta["version"] == MASK_VERSION and meta.get("loss_mask") != "uint8":
        raise UserError(f"{meta_path}: version {MASK_VERSION} needs loss_mask 'uint8', got {meta.get('loss_mask')!r}")
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
        for path in (data.bin_path(split), data.idx_path(split), data.mask_path(split)):
            if path is not None and not path.is_file():
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
