"""Training data: a prepared dataset on disk and the batches the Rust engine assembles from it.

`open_data(dir)` (bulba.data.format, the token-file contract) validates a directory written by
prepare.py; `Batches(...)` is the iterable the LightningModule uses instead of a torch DataLoader.
Batches are dicts of numpy arrays that the Rust engine (`bulba._rust`) assembled on background
threads and handed over without a copy:

    input_ids, labels            int32 [B, T]
    cu_seqlens                   int32 [segments + 1]   (documents and padding runs)
    max_seqlen, n_tokens, n_pad  int

Position ids and the document mask follow from `cu_seqlens`; the trainer derives them on its
device with `document_layout` (see there for why they are not assembled on the host).

Positions: batches are numbered globally, `position = epoch * batches_per_epoch + index`, and
batch `p` depends only on (files, sampler settings, seed, rank, world_size, p). Resuming is
therefore "seek to the number of batches the model consumed": Lightning fetches one batch
ahead, so the module must count consumed batches itself and save
`batches.state_dict(consumed=that_count)`; `load_state_dict` puts the iterable back there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from bulba.data.format import SPLITS, TokenData, open_data
from bulba.errors import UserError

SAMPLERS = ("stream", "packed", "bucketed")
STATE_VERSION = 1
# Settings that change what batch N is: a state saved under other values cannot be resumed.
# Not the rank: every rank is at the same position, so rank 0's saved state serves them all.
_STATE_KEYS = ("sampler", "seed", "batch_size", "ctx", "world_size", "batches_per_epoch")


def _engine_module():
    try:
        from bulba import _rust
    except ImportError as e:
        raise UserError(
            f"the Rust data engine is not built ({e}): run `pip install -e .` in the project root"
        ) from None
    return _rust


class Batches:
    """Batches of one split, assembled in Rust; the train/val iterable for the LightningModule.

    `infinite=True` (training): iteration never ends; it continues from the current position
    across epochs (a new shuffle each epoch). `infinite=False` (evaluation): each `iter()`
    yields one epoch, from an explicitly set position (`seek`/`load_state_dict`) or from the
    start of the next epoch; with `shuffle=False` every pass yields the same batches.

    `drop_last=True` drops the incomplete tail of an epoch (under one global batch, a different
    random part every epoch); `drop_last=False` pads it with all-padding rows (and, when the
    batch count does not divide by world_size, all-padding batches with n_tokens == 0).
    """

    def __init__(
        self,
        data: str | Path | TokenData,
        split: str = "train",
        sampler: str = "stream",
        batch_size: int = 8,
        ctx: int = 256,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
        buckets: Sequence[int] = (128, 256, 512, 1024),
        prefetch: int = 4,
        workers: int = 1,
        shuffle: bool = True,
        infinite: bool = True,
        drop_last: bool = True,
        vocab_size: int | None = None,
    ):
        self.data = data if isinstance(data, TokenData) else open_data(data, vocab_size)
        if isinstance(data, TokenData) and vocab_size is not None and vocab_size != data.vocab_size:
            open_data(data.dir, vocab_size)  # raises the mismatch error
        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        # The sampler name is checked once, by the engine (Rust's Sampler enum): a ValueError below.
        for name, value in (
            ("batch_size", batch_size),
            ("ctx", ctx),
            ("world_size", world_size),
            ("prefetch", prefetch),
            ("workers", workers),
        ):
            if value <= 0:
                raise UserError(f"{name} must be positive, got {value}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in 0..world_size-1 ({world_size})")
        self.split, self.sampler, self.batch_size, self.ctx = split, sampler, batch_size, ctx
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.buckets = [int(b) for b in buckets]
        self.prefetch, self.workers = prefetch, workers
        self.shuffle, self.infinite, self.drop_last = shuffle, infinite, drop_last
        info = self.data.split_info(split)
        try:
            self._engine = _engine_module().Engine(
                str(self.data.bin_path(split)),
                str(self.data.idx_path(split)),
                dtype=self.data.dtype,
                vocab_size=self.data.vocab_size,
                sampler=sampler,
                batch_size=batch_size,
                ctx=ctx,
                seed=seed % (1 << 64),
                rank=rank,
                world_size=world_size,
                buckets=self.buckets,
                shuffle=shuffle,
                drop_last=drop_last,
                pad_id=self.data.pad_id,
                expected_tokens=info.get("tokens"),
                expected_docs=info.get("documents"),
                # Chat data: the labels of targets outside the assistant turns become -100.
                mask_path=None if self.data.mask_path(split) is None else str(self.data.mask_path(split)),
            )
        except ValueError as e:  # corrupt/truncated files, vocab mismatch, too little data
            raise UserError(str(e)) from None
        self._position = 0
        self._explicit = False  # position set by seek/load_state_dict: the next iter() starts there
        self._generation = 0

    # ------------------------------------------------------------------ sizes and figures

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self._engine.batches_per_epoch

    @property
    def padding_frac(self) -> float:
        """Padding slots / all slots over one epoch (0 for stream)."""
        return self._engine.padding_frac

    @property
    def n_tokens(self) -> int:
        """Tokens in the split."""
        return self._engine.n_tokens

    @property
    def position(self) -> int:
        """Global index of the next batch this iterable yields (batches yielded so far)."""
        return self._position

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite Batches has no length; see batches_per_epoch")
        return self.batches_per_epoch

    # ------------------------------------------------------------------ resuming

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Position to resume from: `consumed` batches (default: all yielded so far).

        Pass the count of batches the model actually trained on; Lightning's one-batch prefetch
        makes `position` one ahead of it.
        """
        n = self._position if consumed is None else int(consumed)
        return {
            "version": STATE_VERSION,
            "consumed": n,
            "epoch": n // self.batches_per_epoch,
            "batch": n % self.batches_per_epoch,
            "sampler": self.sampler,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "ctx": self.ctx,
            "rank": self.rank,
            "world_size": self.world_size,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Positions the iterable at `state["consumed"]` batches; the next iter() starts there.

        With `strict`, settings that change the batch sequence must match the saved ones.
        """
        if state.get("version") != STATE_VERSION or "consumed" not in state:
            raise UserError(f"sampler state has version {state.get('version')!r}, expected {STATE_VERSION}")
        if strict:
            mine = self.state_dict()
            diff = [f"{k} {state[k]!r} -> {mine[k]!r}" for k in _STATE_KEYS if k in state and state[k] != mine[k]]
            if diff:
                raise UserError(
                    "cannot resume the data order exactly, the data settings changed: "
                    + ", ".join(diff)
                    + "; restore them or start a new run"
                )
        self.seek(int(state["consumed"]))

    def seek(self, consumed: int) -> None:
        """The next iter() yields batch number `consumed` first."""
        if consumed < 0:
            raise UserError(f"cannot seek to batch {consumed}")
        self._position = consumed
        self._explicit = True
        self._generation += 1  # detach any running iterator from the position

    # ------------------------------------------------------------------ iteration

    def batch(self, position: int) -> dict[str, Any]:
        """Batch number `position`, assembled synchronously (for tests and inspection)."""
        try:
            return self._engine.batch(position)
        except ValueError as e:
            raise UserError(str(e)) from None

    def offsets(self, position: int) -> np.ndarray:
        """Where each input position of batch `position` comes from in the split's .bin (int64
        [rows, cols], -1 for padding): validation attributes scored tokens to their sources."""
        return self._engine.offsets(position)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, per_epoch = self._position, self.batches_per_epoch
        stop = None
        if not self.infinite:
            if not self._explicit and start % per_epoch:
                start = (start // per_epoch + 1) * per_epoch  # an abandoned pass: next epoch
            stop = (start // per_epoch + 1) * per_epoch
        self._position, self._explicit = start, False
        self._generation += 1
        return self._run(self._engine.iter(start, stop, self.prefetch, self.workers), self._generation)

    def _run(self, it, generation: int) -> Iterator[dict[str, Any]]:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except ValueError as e:  # e.g. a token id past the vocabulary deep in the file
                raise UserError(str(e)) from None
            if generation == self._generation:
                self._position += 1
            yield batch


def document_layout(cu_seqlens, rows: int, cols: int):
    """(position_ids, seq_ids), int64 torch tensors [rows, cols] on cu_seqlens' device, of a
    batch from its cu_seqlens (numpy or torch).

    Positions restart at 0 at every segment start (RoPE sees each document from 0); seq_ids
    number the segments of the flattened batch (documents and padding runs), so attention
    limited to equal seq_ids stays inside each document. Segments never cross rows, so ids
    are unique within a row as well.

    Why on the device and not in the Rust engine: these two arrays would double the bytes
    assembled, pinned and copied per token, and cost stores per document on the host; on the
    device they are three vector ops, without a host sync (`output_size` is static).
    """
    import torch

    cu = cu_seqlens.long() if isinstance(cu_seqlens, torch.Tensor) else torch.tensor(cu_seqlens, dtype=torch.long)
    n = rows * cols
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=n)
    pos = torch.arange(n, device=cu.device) - cu[seq]  # cu[seq]: where the token's segment starts
    return pos.view(rows, cols), seq.view(rows, cols)


# --------------------------------------------------------------------------- the torch side


def batch_to_torch(b: dict, pin: bool = False, documents: bool = True) -> dict:
    """Rust engine batch (numpy, int32) -> torch tensors on the host, plus token counts.
    `documents=False` (stream windows: one causal sequence per row) leaves out cu_seqlens, so
    the model neither masks nor restarts positions."""
    import torch

    out = {}
    for k in ("input_ids", "labels", "cu_seqlens") if documents else ("input_ids", "labels"):
        if k in b and b[k] is not None:
            t = torch.from_numpy(np.ascontiguousarray(b[k]))
            out[k] = t.pin_memory() if pin else t
    out["max_seqlen"] = int(b["max_seqlen"]) if "max_seqlen" in b else None
    labels = b["labels"]
    out["n_tokens"] = int(b["n_tokens"]) if "n_tokens" in b else int((labels != -100).sum())
    out["n_pad"] = int(b["n_pad"]) if "n_pad" in b else 0
    return out


class TorchBatches:
    """bulba.data.loader.Batches -> host torch tensors (pinned on CUDA), starting at a given batch."""

    def __init__(self, batches, start: int, pin: bool, stream: bool, limit: int | None = None):
        self.batches, self.start, self.pin, self.stream, self.limit = batches, start, pin, stream, limit

    def __iter__(self):
        self.batches.seek(self.start)
        for i, b in enumerate(self.batches):
            if self.limit is not None and i >= self.limit:
                return
            out = batch_to_torch(b, pin=self.pin, documents=not self.stream)
            if not self.batches.infinite:  # evaluation: which file positions (sources) it scores
                import torch

                out["offsets"] = torch.from_numpy(self.batches.offsets(self.start + i))
            yield out


def recipe_batches(recipe, data, split: str, rank: int = 0, world: int = 1, prefetch: int | None = None) -> Batches:
    """The Batches of `split` a recipe trains (train: shuffled, endless) or validates on."""
    d, m, t = recipe.data, recipe.model, recipe.train
    train = split == "train"
    return Batches(
        data,
        split=split,
        sampler=d.sampler,
        batch_size=t.batch_size,
        ctx=m.ctx_len,
        seed=recipe.seed,
        rank=rank,
        world_size=world,
        buckets=d.buckets,
        prefetch=d.prefetch if prefetch is None else prefetch,
        # val too: a fixed seeded sample (every evaluation the same batches) drawn from the whole
        # split; unshuffled, the first train.val_batches would be the first source's documents
        # (val.bin is in source order) and val/<lang>/bpb would miss the later languages.
        shuffle=True,
        infinite=train,
        drop_last=train,
    )


def make_batches_factory(recipe, data, pin: bool):
    """(split, rank, world, start) -> iterable of torch batches, as the LightningModule asks for them."""

    def factory(split: str, rank: int, world: int, start: int):
        b = recipe_batches(recipe, data, split, rank, world)
        limit = None if split == "train" else recipe.train.val_batches
        return TorchBatches(b, start, pin, recipe.data.sampler == "stream", limit)

    return factory
