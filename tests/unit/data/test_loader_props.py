"""Property tests of the samplers over random document-length distributions.

The token files hold `arange(n)` (token id == stream position), so every id in a batch says
exactly which position of the file it came from: coverage, overlap and label checks need no
bookkeeping on the Python side.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bulba.data.format import new_meta, write_meta, write_split
from bulba.data.loader import Batches, document_layout
from bulba.errors import UserError

pytest.importorskip("bulba._rust")

BUCKETS = [8, 16, 32]
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write_positions(d: Path, lengths: list[int]) -> tuple[int, set[int]]:
    """Dataset whose tokens are their own positions; returns (n_tokens, doc last positions)."""

    ends = np.cumsum(lengths)
    starts = ends - np.asarray(lengths)
    docs = [np.arange(s, e) for s, e in zip(starts, ends)]
    n = int(ends[-1])
    info = write_split(d, "train", docs, "uint32")
    write_split(d, "val", docs[:1], "uint32")
    write_meta(d, new_meta(dtype="uint32", vocab_size=n + 1, splits={"train": info}, bos_id=None, eos_id=n, pad_id=n))
    return n, {int(e) - 1 for e in ends}


lengths_st = st.one_of(
    st.lists(st.integers(2, 12), min_size=1, max_size=300),  # many short documents
    st.lists(st.integers(2, 80), min_size=1, max_size=120),  # mixed, some longer than ctx
    st.lists(st.sampled_from([2, 31, 32, 33, 64, 65]), min_size=1, max_size=80),  # around ctx
)


def epoch(d, sampler, world, **kw) -> list[list[dict]]:
    """All batches of epoch 1 for every rank (epoch 1, not 0: a shuffled epoch like any other)."""
    out = []
    for rank in range(world):
        b = Batches(d, sampler=sampler, rank=rank, world_size=world, buckets=BUCKETS, **kw)
        b.seek(b.batches_per_epoch)
        out.append(list(iter(_finite(b))))
    return out


def _finite(b: Batches) -> Batches:
    b.infinite = False
    return b


def check_batch(x: dict, n: int, doc_ends: set[int], sampler: str) -> np.ndarray:
    """Contract checks on one batch; returns the positions (token ids) it covers."""
    ids, labels, cu = x["input_ids"], x["labels"], x["cu_seqlens"]
    assert ids.dtype == labels.dtype == cu.dtype == np.int32
    assert ids.shape == labels.shape
    pos, seq = (t.numpy() for t in document_layout(cu, *ids.shape))
    real = ids != n  # the pad id: no position of the file has it
    assert x["n_pad"] == int((~real).sum())
    assert x["n_tokens"] == int((labels != -100).sum())
    assert (ids[~real] == n).all() and (labels[~real] == -100).all()
    # Labels: the next position, or -100 after a document's last token (not in stream).
    has = labels != -100
    assert (labels[has] == ids[has] + 1).all()
    ends = np.isin(ids, list(doc_ends)) & real
    if sampler == "stream":
        assert has[real].all()
    else:
        assert (~has[ends]).all() and (has[real & ~ends]).all()
    # Segments: cu_seqlens partitions the flattened batch; within one, ids and positions step by 1.
    flat_ids, flat_pos, flat_seq = ids.ravel(), pos.ravel(), seq.ravel()
    assert cu[0] == 0 and cu[-1] == ids.size and (np.diff(cu) > 0).all()
    assert x["max_seqlen"] == int(np.diff(cu).max())
    assert (
        (np.arange(ids.size) // ids.shape[1])[cu[1:] - 1] == (np.arange(ids.size) // ids.shape[1])[cu[:-1]]
    ).all(), "a segment crosses a row"
    for k, (a, z) in enumerate(zip(cu[:-1], cu[1:])):
        assert (flat_seq[a:z] == k).all() and (flat_pos[a:z] == np.arange(z - a)).all()
        seg_real = real.ravel()[a:z]
        assert seg_real.all() or not seg_real.any(), "padding and tokens in one segment"
        if seg_real.all():
            assert (np.diff(flat_ids[a:z]) == 1).all()
    return ids[real]


@SETTINGS
@given(
    lengths=lengths_st,
    sampler=st.sampled_from(["stream", "packed", "bucketed"]),
    world=st.integers(1, 3),
    batch_size=st.integers(1, 4),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_sharding_coverage_and_contract(lengths, sampler, world, batch_size, drop_last, seed):
    ctx = 32
    with tempfile.TemporaryDirectory() as tmp:
        n, doc_ends = write_positions(Path(tmp), lengths)
        try:
            ranks = epoch(
                tmp, sampler, world, batch_size=batch_size, ctx=ctx, seed=seed, drop_last=drop_last, prefetch=2
            )
        except UserError as e:
            assert "fewer than one batch" in str(e)
            assume(False)
        counts = [len(r) for r in ranks]
        assert len(set(counts)) == 1 and counts[0] > 0, f"unequal batch counts {counts}"
        covered = np.concatenate([check_batch(x, n, doc_ends, sampler) for r in ranks for x in r])
        assert len(np.unique(covered)) == len(covered), "a position appears twice in one epoch"
        missing = n - len(covered)
        if sampler == "stream":
            tail = (n - 1) % ctx + 1  # positions after the last full window
            bound = tail + (batch_size * world - 1) * ctx if drop_last else 1  # the last is only a label
        elif sampler == "packed":
            bound = (batch_size * world - 1) * ctx if drop_last else 0
        else:
            budget = batch_size * ctx
            bound = (len(BUCKETS) + world) * budget if drop_last else 0
        assert 0 <= missing <= bound


@SETTINGS
@given(lengths=lengths_st)
def test_padding_bounds(lengths):
    ctx = 32
    with tempfile.TemporaryDirectory() as tmp:
        n, _ = write_positions(Path(tmp), lengths)
        try:
            (packed,) = epoch(tmp, "packed", 1, batch_size=1, ctx=ctx, drop_last=False)
            (bucketed,) = epoch(tmp, "bucketed", 1, batch_size=1, ctx=ctx, drop_last=False)
        except UserError:
            assume(False)
        # Best fit never leaves two rows at most half full (one would have fit the other).
        fills = [int((x["input_ids"] != n).sum()) for x in packed]
        assert sum(f <= ctx // 2 for f in fills) <= 1
        # Bucketed: a document sits in the smallest bucket that holds it.
        lower = {b: a for a, b in zip([0] + BUCKETS, BUCKETS)}
        for x in bucketed:
            for row in x["input_ids"]:
                used = int((row != n).sum())
                assert used == 0 or lower[len(row)] < used <= len(row)


@SETTINGS
@given(
    lengths=lengths_st,
    sampler=st.sampled_from(["stream", "packed", "bucketed"]),
    consumed=st.integers(0, 40),
    seed=st.integers(0, 1000),
    workers=st.integers(1, 3),
)
def test_resume_equivalence(lengths, sampler, consumed, seed, workers):
    """A run stopped after `consumed` batches (with one batch prefetched and lost, as under
    Lightning) and resumed from its state sees exactly the batches of an uninterrupted run."""
    with tempfile.TemporaryDirectory() as tmp:
        write_positions(Path(tmp), lengths)
        kw = dict(sampler=sampler, batch_size=2, ctx=16, seed=seed, buckets=[4, 8, 16], prefetch=3, workers=workers)
        try:
            full = Batches(tmp, **kw)
        except UserError:
            assume(False)
        it = iter(full)
        reference = [next(it) for _ in range(consumed + 3)]
        first = Batches(tmp, **kw)
        it = iter(first)
        for _ in range(consumed + 1):  # one batch more than the model consumed
            next(it)
        state = first.state_dict(consumed=consumed)
        resumed = Batches(tmp, **kw)
        resumed.load_state_dict(state)
        it = iter(resumed)
        for want in reference[consumed:]:
            got = next(it)
            for key in ("input_ids", "labels", "cu_seqlens"):
                np.testing.assert_array_equal(got[key], want[key])
        assert resumed.position == consumed + 3
