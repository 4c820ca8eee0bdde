"""Type stub of the Rust data engine (rust_loader/src/lib.rs, built into bulba/_rust.abi3.so).

Batches are dicts of numpy arrays viewing the engine's buffer (no copy):
input_ids, labels int32 [rows, cols]; cu_seqlens int32 [segments + 1]; max_seqlen, n_tokens, n_pad int.
Errors in the data (corrupt files, a token id >= vocab_size, too little data) raise ValueError.
"""

from collections.abc import Iterator
from os import PathLike
from typing import Any, Literal

__all__ = ["BatchIter", "Block", "Engine", "version"]

Batch = dict[str, Any]

def version() -> str:
    """Version of the Rust engine (matches the Python package)."""

class Block:
    """Owns the memory of one batch while numpy arrays view it (their base object)."""

class Engine:
    """One split of a prepared dataset with one sampler; batches are addressed by global position
    (epoch * batches_per_epoch + index), so any position can be produced or resumed directly."""

    def __init__(
        self,
        bin_path: str | PathLike[str],
        idx_path: str | PathLike[str],
        *,
        dtype: Literal["uint16", "uint32"],
        vocab_size: int,
        sampler: Literal["stream", "packed", "bucketed"],
        batch_size: int,
        ctx: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buckets: list[int] = ...,
        shuffle: bool = True,
        drop_last: bool = True,
        pad_id: int = 0,
        expected_tokens: int | None = None,
        expected_docs: int | None = None,
        mask_path: str | PathLike[str] | None = None,
    ) -> None:
        """`mask_path`: the split's loss mask (one uint8 per token, 1 = a training target);
        labels whose target it marks 0 are -100, in every sampler."""
    @property
    def batches_per_epoch(self) -> int: ...
    @property
    def padding_frac(self) -> float: ...
    @property
    def units(self) -> int:
        """Windows, packed rows or document pieces per epoch (over all ranks)."""
    @property
    def n_tokens(self) -> int: ...
    @property
    def n_docs(self) -> int: ...
    def batch(self, pos: int) -> Batch:
        """The batch at global position `pos`, assembled now on this thread (GIL released)."""
    def offsets(self, pos: int) -> Any:
        """int64 [rows, cols]: the token-file position of each input of batch `pos`, -1 for padding
        (from the plan; no tokens are read)."""
    def iter(self, start: int = 0, stop: int | None = None, prefetch: int = 4, workers: int = 1) -> BatchIter:
        """Positions `start..stop` (forever when stop is None), assembled by `workers` background
        threads up to `prefetch` batches ahead."""

class BatchIter(Iterator[Batch]):
    def __iter__(self) -> BatchIter: ...
    def __next__(self) -> Batch: ...
    @property
    def position(self) -> int:
        """Global position of the next batch."""
