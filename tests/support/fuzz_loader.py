"""Child process of tests/integration/test_reliability_fuzz.py: fuzz the token-file reader.

    PYTHONPATH=.:tests python -m support.fuzz_loader bytes|meta N_EXAMPLES WORKDIR

`bytes`: a valid dataset whose train/val .bin/.idx are truncated, extended, overwritten with
random bytes or bit-flipped. `meta`: meta.json fields replaced by random JSON values. Each
example opens the data (`open_data`), builds `Batches` for a random sampler/shape and reads a
few batches (iteration and `batch(position)`). Allowed outcomes: valid batches or UserError.
Anything else is printed with the example and exits 1; a crash in the native engine kills this
process, which the parent reports.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulba.data.format import open_data
from bulba.data.loader import Batches
from bulba.errors import UserError
from support.token_files import make_docs, write_dataset

WHAT, N, WORK = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
BASE = WORK / "base"
write_dataset(BASE, make_docs([5, 9, 17, 33, 64, 3, 120, 7, 2, 40] * 6, vocab_size=500, seed=1), vocab_size=500)
FILES = ["train.bin", "train.idx", "val.bin", "val.idx"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=8),
    lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=6), x, max_size=3),
    max_leaves=6,
)
META_KEYS = [
    "format",
    "version",
    "dtype",
    "vocab_size",
    "bos_id",
    "eos_id",
    "pad_id",
    "splits",
    "dataset_digest",
    "special_tokens",
]

byte_edit = st.tuples(
    st.sampled_from(FILES),
    st.sampled_from(["truncate", "extend", "random", "flip", "zero"]),
    st.integers(0, 4000),
    st.binary(min_size=1, max_size=64),
)
meta_edit = st.one_of(
    st.tuples(st.sampled_from(META_KEYS), json_values),
    st.tuples(
        st.sampled_from(["splits.train.tokens", "splits.train.documents", "splits.val.tokens", "splits.train"]),
        json_values,
    ),
    st.tuples(st.just("<delete>"), st.sampled_from(META_KEYS)),
)
shape = st.fixed_dictionaries(
    {
        "sampler": st.sampled_from(["stream", "packed", "bucketed"]),
        "batch_size": st.integers(1, 9),
        "ctx": st.integers(1, 300),
        "buckets": st.lists(st.integers(1, 300), min_size=1, max_size=3),
        "split": st.sampled_from(["train", "val"]),
        "seed": st.integers(0, 2**64 - 1),
        "world_size": st.integers(1, 3),
        "shuffle": st.booleans(),
        "drop_last": st.booleans(),
        "positions": st.lists(st.integers(0, 2**40), max_size=2),
    }
)
counter = [0]


def apply_bytes(d: Path, edits) -> None:
    for name, op, at, blob in edits:
        p = d / name
        b = bytearray(p.read_bytes())
        if op == "truncate":
            b = b[: at % (len(b) + 1)]
        elif op == "extend":
            b += blob
        elif op == "random" and b:
            i = at % len(b)
            b[i : i + len(blob)] = blob
        elif op == "flip" and b:
            b[at % len(b)] ^= 1 << (blob[0] % 8)
        elif op == "zero":
            b = bytearray(len(b))
        p.write_bytes(bytes(b))


def apply_meta(d: Path, edits) -> None:
    meta = json.loads((d / "meta.json").read_text())
    for key, value in edits:
        if key == "<delete>":
            meta.pop(value, None)
            continue
        node, *rest = key.split(".")
        if not rest:
            meta[node] = value
            continue
        tgt = meta
        for part in key.split(".")[:-1]:
            if not isinstance(tgt, dict):
                break
            tgt = tgt.setdefault(part, {})
        if isinstance(tgt, dict):
            tgt[key.split(".")[-1]] = value
    (d / "meta.json").write_text(json.dumps(meta))


def exercise(d: Path, sh: dict) -> None:
    try:
        data = open_data(d)
        b = Batches(
            data,
            split=sh["split"],
            sampler=sh["sampler"],
            batch_size=sh["batch_size"],
            ctx=sh["ctx"],
            seed=sh["seed"],
            world_size=sh["world_size"],
            rank=sh["world_size"] - 1,
            buckets=sh["buckets"],
            prefetch=2,
            shuffle=sh["shuffle"],
            infinite=False,
            drop_last=sh["drop_last"],
        )
        for i, batch in enumerate(b):
            assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].ndim == 2
            assert int(batch["input_ids"].max(initial=0)) < data.vocab_size
            if i >= 2:
                break
        for pos in sh["positions"]:
            b.batch(pos)
    except UserError as e:
        assert str(e).strip(), "empty error message"


def _run(edits, sh, apply) -> None:
    counter[0] += 1
    d = WORK / "ex"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(BASE, d)
    apply(d, edits)
    try:
        exercise(d, sh)
    except Exception:
        print(f"FAILED on example {counter[0]}: edits={edits!r} shape={sh!r}")
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
        raise


FUZZ = settings(
    max_examples=N,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


@FUZZ
@given(edits=st.lists(byte_edit, min_size=1, max_size=3), sh=shape)
def fuzz_bytes(edits, sh):
    _run(edits, sh, apply_bytes)


@FUZZ
@given(edits=st.lists(meta_edit, min_size=1, max_size=3), sh=shape)
def fuzz_meta(edits, sh):
    _run(edits, sh, apply_meta)


if __name__ == "__main__":
    try:
        {"bytes": fuzz_bytes, "meta": fuzz_meta}[WHAT]()
    except Exception as e:  # hypothesis re-raises the shrunk failure
        print(f"fuzz FAILED: {type(e).__name__}: {e}")
        sys.exit(1)
    print(f"fuzz ok ({counter[0]} examples)")
