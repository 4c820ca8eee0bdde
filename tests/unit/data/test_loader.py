"""The Rust data engine through `bulba.data.loader`: files written by numpy per docs/contracts.md,
batch contents, determinism, resuming, and clean errors for broken data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bulba.data.format import open_data
from bulba.data.loader import Batches, document_layout
from bulba.errors import UserError
from support.token_files import BOS, EOS, make_docs, write_dataset

pytest.importorskip("bulba._rust")

KEYS = ("input_ids", "labels", "cu_seqlens")


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    docs = make_docs(rng.integers(2, 150, size=400), vocab_size=1000)
    return write_dataset(tmp_path / "data", docs), docs


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("vocab_size", [1000, 70000])  # uint16 and uint32 files
def test_reads_what_numpy_wrote(tmp_path, vocab_size):
    docs = make_docs([5, 40, 7, 100, 3] * 20, vocab_size=vocab_size, seed=1)
    d = write_dataset(tmp_path, docs, vocab_size=vocab_size)
    assert open_data(d).dtype == ("uint16" if vocab_size <= 65536 else "uint32")
    stream = np.concatenate(docs)
    b = Batches(d, sampler="stream", batch_size=3, ctx=16, shuffle=False)
    x = b.batch(0)
    for r in range(3):  # unshuffled: window r starts at r * ctx
        np.testing.assert_array_equal(x["input_ids"][r], stream[r * 16 : (r + 1) * 16])
        np.testing.assert_array_equal(x["labels"][r], stream[r * 16 + 1 : (r + 1) * 16 + 1])
    np.testing.assert_array_equal(x["cu_seqlens"], [0, 16, 32, 48])
    assert set(x) == {*KEYS, "max_seqlen", "n_tokens", "n_pad"}
    assert (x["max_seqlen"], x["n_tokens"], x["n_pad"]) == (16, 48, 0)


def test_packed_rows_hold_whole_documents(data):
    d, docs = data
    b = Batches(d, sampler="packed", batch_size=4, ctx=128, infinite=False, drop_last=False)
    assert b.padding_frac < 0.03  # a small set; the shared corpus packs below 1%
    seen = []
    for x in b:
        assert x["input_ids"].shape == (4, 128)
        position_ids, seq_ids = (t.numpy() for t in document_layout(x["cu_seqlens"], 4, 128))
        for ids, labels, pos, seq in zip(x["input_ids"], x["labels"], position_ids, seq_ids):
            for s in np.unique(seq):
                m = seq == s
                if (labels[m] == -100).all() and (ids[m] == b.data.pad_id).all():
                    continue  # the row's padding
                doc = ids[m]
                np.testing.assert_array_equal(pos[m], np.arange(m.sum()))
                np.testing.assert_array_equal(labels[m][:-1], doc[1:])
                if doc[0] == BOS and doc[-1] == EOS:
                    seen.append(tuple(doc))
                    assert labels[m][-1] == -100
                else:  # a piece of a document longer than ctx: its last label is the next token
                    assert labels[m][-1] != -100 or doc[-1] == EOS
    assert sorted(seen) == sorted(tuple(doc) for doc in docs if len(doc) <= 128)


@pytest.mark.parametrize("sampler", ["stream", "packed", "bucketed"])
def test_zero_copy_arrays(data, sampler):
    d, _ = data
    b = Batches(d, sampler=sampler, batch_size=2, ctx=32, buckets=[16, 32])
    it = iter(b)
    x, y = next(it), next(it)
    for key in KEYS:
        arr = x[key]
        # Views of the Rust buffer (numpy's base object), not a numpy copy.
        assert not arr.flags["OWNDATA"] and arr.base is not None and arr.flags["C_CONTIGUOUS"]
    for key in ("input_ids", "labels"):
        assert x[key].flags["WRITEABLE"]  # torch.from_numpy without a warning
        assert not np.shares_memory(x[key], y[key])
    if sampler == "stream":
        # Full windows: the segments are the same for every batch, shared and read-only.
        assert x["cu_seqlens"] is y["cu_seqlens"] and not x["cu_seqlens"].flags["WRITEABLE"]
    else:
        assert not np.shares_memory(x["cu_seqlens"], y["cu_seqlens"])


@pytest.mark.parametrize("sampler", ["stream", "packed", "bucketed"])
def test_held_batches_keep_their_contents(data, sampler):
    """Buffers are reused once Python drops a batch: batches still held must not change."""
    d, _ = data
    b = Batches(d, sampler=sampler, batch_size=2, ctx=32, buckets=[16, 32], prefetch=2, workers=2)
    it = iter(b)
    held = {}
    for p in range(3 * b.batches_per_epoch):
        x = next(it)
        if p % 5 == 0:
            held[p] = x  # the others are dropped at once and their buffers reused
    for p, x in held.items():
        want = b.batch(p)
        for key in KEYS:
            np.testing.assert_array_equal(x[key], want[key])


def test_deterministic_given_seed_and_epoch(data):
    d, _ = data
    a = Batches(d, sampler="packed", batch_size=2, ctx=64, seed=3)
    b = Batches(d, sampler="packed", batch_size=2, ctx=64, seed=3)
    c = Batches(d, sampler="packed", batch_size=2, ctx=64, seed=4)
    np.testing.assert_array_equal(a.batch(5)["input_ids"], b.batch(5)["input_ids"])
    assert not np.array_equal(a.batch(5)["input_ids"], c.batch(5)["input_ids"])
    n = a.batches_per_epoch
    assert not np.array_equal(a.batch(5)["input_ids"], a.batch(n + 5)["input_ids"])  # reshuffled


def test_iteration_matches_positions_and_state(data):
    d, _ = data
    b = Batches(d, sampler="bucketed", batch_size=2, ctx=128, buckets=[32, 64, 128], prefetch=2, workers=2)
    it = iter(b)
    got = [next(it) for _ in range(b.batches_per_epoch + 3)]  # across an epoch boundary
    for p in (0, 7, b.batches_per_epoch + 2):
        for key in KEYS:
            np.testing.assert_array_equal(got[p][key], b.batch(p)[key])
    s = b.state_dict(consumed=b.batches_per_epoch + 1)
    assert (s["epoch"], s["batch"]) == (1, 1)
    with pytest.raises(TypeError):
        len(b)


def test_finite_passes_repeat_unshuffled(data):
    d, _ = data
    v = Batches(d, split="val", batch_size=2, ctx=32, shuffle=False, infinite=False, drop_last=False)
    first = [x["input_ids"] for x in v]
    assert len(first) == len(v) == v.batches_per_epoch
    it = iter(v)
    next(it)  # an abandoned pass (as with limit_val_batches)
    again = [x["input_ids"] for x in v]
    assert len(again) == len(first)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_resume_rejects_changed_settings(data):
    d, _ = data
    state = Batches(d, batch_size=2, ctx=32).state_dict(consumed=5)
    with pytest.raises(UserError) as e:
        Batches(d, batch_size=4, ctx=32).load_state_dict(state)
    one_line_error(e, "batch_size")
    other = Batches(d, batch_size=4, ctx=32)
    other.load_state_dict(state, strict=False)
    assert other.position == 5
    # DDP: rank 0's checkpoint restores every rank.
    saved = Batches(d, batch_size=2, ctx=32, rank=0, world_size=2).state_dict(consumed=3)
    rank1 = Batches(d, batch_size=2, ctx=32, rank=1, world_size=2)
    rank1.load_state_dict(saved)
    assert rank1.position == 3


# ---------------------------------------------------------------------------- broken data


def test_missing_dataset(tmp_path):
    with pytest.raises(UserError) as e:
        Batches(tmp_path / "nope")
    one_line_error(e, "run prepare.py first")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError) as e:
        open_data(tmp_path / "half")
    one_line_error(e, "meta.json", "run prepare.py first")


def test_truncated_token_file(data):
    d, _ = data
    raw = (d / "train.bin").read_bytes()
    (d / "train.bin").write_bytes(raw[:-1])
    with pytest.raises(UserError) as e:
        Batches(d)
    one_line_error(e, "train.bin", "multiple")
    (d / "train.bin").write_bytes(raw[:-2])
    with pytest.raises(UserError) as e:
        Batches(d)
    one_line_error(e, "train.bin", "meta.json")


@pytest.mark.parametrize("case", ["not_monotonic", "last_wrong", "past_end", "short"])
def test_corrupt_index(data, case):
    d, _ = data
    idx = np.fromfile(d / "train.idx", dtype="<u8")
    n = int(idx[-1])
    if case == "not_monotonic":
        idx[5], idx[6] = idx[6], idx[5]
    elif case == "last_wrong":
        idx[-1] = n - 1
    elif case == "past_end":
        idx[3] = n + 10
    idx.tofile(d / "train.idx")
    if case == "short":
        (d / "train.idx").write_bytes((d / "train.idx").read_bytes()[:-3])
    for sampler in ("stream", "packed"):
        with pytest.raises(UserError) as e:
            Batches(d, sampler=sampler)
        one_line_error(e, "train.idx")


def test_token_id_past_vocabulary(tmp_path):
    docs = make_docs([50] * 4000, vocab_size=1000)
    d = write_dataset(tmp_path, docs, vocab_size=1000)
    toks = np.fromfile(d / "train.bin", dtype="<u2")
    # Deep inside: a file this small is checked whole on open; above 64 MB, where only the ends
    # are, batch assembly finds it (cargo test covers that path).
    toks[len(toks) // 2] = 5000
    toks.tofile(d / "train.bin")
    with pytest.raises(UserError) as e:
        for _ in Batches(d, batch_size=8, ctx=64, shuffle=False, infinite=False):
            pass
    one_line_error(e, "train.bin", "5000", "vocab_size 1000")
    toks[3] = 5000  # near the start: caught on open
    toks.tofile(d / "train.bin")
    with pytest.raises(UserError) as e:
        Batches(d)
    one_line_error(e, "train.bin", "vocab_size")


def test_vocab_mismatch(data):
    d, _ = data
    with pytest.raises(UserError) as e:
        Batches(d, vocab_size=32000)
    one_line_error(e, "vocab", "1000", "32000")


def test_bad_meta(data):
    d, _ = data
    meta = json.loads((d / "meta.json").read_text())
    meta["dtype"] = "int8"
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        Batches(d)
    one_line_error(e, "dtype")
    (d / "meta.json").write_text("{not json")
    with pytest.raises(UserError) as e:
        Batches(d)
    one_line_error(e, "meta.json")


def test_wrong_dtype_in_meta_is_caught_by_size(data):
    d, _ = data
    meta = json.loads((d / "meta.json").read_text())
    meta["dtype"] = "uint32"  # the file is uint16: token count no longer matches meta
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        Batches(d)
    one_line_error(e, "train.bin")


def test_too_little_data_and_bad_arguments(data, tmp_path):
    d, _ = data
    with pytest.raises(UserError) as e:
        Batches(d, ctx=100_000)
    one_line_error(e, "train.bin", "batch")
    with pytest.raises(UserError) as e:
        Batches(d, sampler="shuffled")
    one_line_error(e, "stream")
    with pytest.raises(UserError):
        Batches(d, rank=2, world_size=2)
    shutil.rmtree(d)
    with pytest.raises(UserError):
        Batches(d)


def _rss_file_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc needed")
def test_rss_stays_flat_over_a_large_file(tmp_path):
    """Random windows over a file larger than the release threshold must not leave the file
    mapped into this process (RSS growing towards the file size)."""
    d = write_dataset(tmp_path, make_docs([1000] * 10, vocab_size=1000))
    one = (d / "train.bin").read_bytes()
    reps = (160 << 20) // len(one) + 1  # 160 MB of tokens: above the 64 MB threshold
    (d / "train.bin").write_bytes(one * reps)
    n = len(one) // 2
    idx = np.concatenate([[0], np.arange(1, reps + 1, dtype=np.uint64) * n]).astype("<u8")
    idx.tofile(d / "train.idx")
    meta = json.loads((d / "meta.json").read_text())
    meta["splits"]["train"] = {"tokens": n * reps, "documents": reps}
    (d / "meta.json").write_text(json.dumps(meta))
    before = _rss_file_mb()
    it = iter(Batches(d, batch_size=32, ctx=1024, workers=2))
    for _ in range(200):  # 6400 random windows: most of the file without the release
        next(it)
    assert _rss_file_mb() - before < 64


def test_empty_split_is_a_clear_error(tmp_path):
    d = write_dataset(tmp_path, make_docs([30] * 50), val_docs=[])
    with pytest.raises(UserError) as e:
        Batches(d, split="val", batch_size=2, ctx=16, infinite=False, drop_last=False)
    one_line_error(e, "val.bin", "0 windows")
