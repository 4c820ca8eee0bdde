"""The engine on a dataset written by prepare.py from the real corpus (conftest `prepared_data`)."""

from __future__ import annotations

import numpy as np
import pytest

from bulba.data.format import open_data
from bulba.data.loader import Batches, document_layout

pytest.importorskip("bulba._rust")


@pytest.mark.parametrize("sampler", ["stream", "packed", "bucketed"])
def test_prepared_corpus(prepared_data, sampler):
    data = open_data(prepared_data)
    b = Batches(
        data, sampler=sampler, batch_size=8, ctx=256, buckets=[16, 32, 64, 128, 256], vocab_size=data.vocab_size
    )
    if sampler == "packed":
        assert b.padding_frac < 0.01  # the bound on the shared corpus
    it = iter(b)
    for _ in range(3):
        x = next(it)
        ids = x["input_ids"]
        assert ids.min() >= 0 and ids.max() < data.vocab_size
        assert x["n_tokens"] == int((x["labels"] != -100).sum())
        if sampler != "stream":  # every row starts a document or a piece of one at position 0
            pos, _ = document_layout(x["cu_seqlens"], *ids.shape)
            pos = pos.numpy()
            assert (pos[:, 0] == 0).all()
            starts = ids[(pos == 0) & (ids != data.pad_id)]
            assert np.mean(starts == data.bos_id) > 0.9  # pieces of long documents aside
    val = Batches(
        data,
        split="val",
        sampler=sampler,
        batch_size=2,
        ctx=64,
        buckets=[16, 32, 64],
        shuffle=False,
        infinite=False,
        drop_last=False,
    )
    assert sum(1 for _ in val) == val.batches_per_epoch
