"""Per-source validation (val/<lang>/bpb): what prepare records per source and split, where the
engine says each val token comes from, and the accounting over real val batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from bulba.config import load_recipe
from bulba.data.format import open_data
from bulba.data.loader import Batches, make_batches_factory
from bulba.train.val_sources import SourceBpb


def test_prepare_records_each_sources_documents_tokens_and_bytes_per_split(prepared_data):
    data = open_data(prepared_data)
    meta = data.meta
    assert meta["sources_version"] == 2
    idx = np.fromfile(data.idx_path("val"), dtype="<u8")
    ids = np.fromfile(data.bin_path("val"), dtype="<u2")
    tok = Tokenizer.from_file(str(prepared_data / "tokenizer.json"))
    expect_first = 0
    for s in meta["sources"]:
        sp = s["splits"]
        for split in ("train", "val"):
            assert sp[split]["tokens"] == s[f"{split}_tokens"]
        v = sp["val"]
        assert v["first_document"] == expect_first  # each source's val documents are contiguous
        expect_first += v["documents"]
        a, b = int(idx[v["first_document"]]), int(idx[v["first_document"] + v["documents"]])
        assert b - a == v["tokens"]
        # The bytes are those of the documents' text (BOS/EOS decode to nothing).
        text = tok.decode(ids[a:b].tolist(), skip_special_tokens=True)
        assert abs(len(text.encode()) - v["bytes"]) <= v["documents"]  # a space between documents at most
    for split in ("train", "val"):
        assert sum(s["splits"][split]["documents"] for s in meta["sources"]) == meta["splits"][split]["documents"]
        assert sum(s["splits"][split]["tokens"] for s in meta["sources"]) == meta["splits"][split]["tokens"]


@pytest.mark.parametrize("sampler", ["stream", "packed", "bucketed"])
def test_offsets_say_where_every_input_token_comes_from(prepared_data, sampler):
    data = open_data(prepared_data)
    ids = np.fromfile(data.bin_path("val"), dtype="<u2")
    b = Batches(data, "val", sampler=sampler, batch_size=4, ctx=64, shuffle=False, infinite=False, drop_last=False)
    for pos in (0, 3, b.batches_per_epoch - 1):
        batch, offs = b.batch(pos), b.offsets(pos)
        assert offs.shape == batch["input_ids"].shape
        real = offs >= 0
        assert (ids[offs[real]] == batch["input_ids"][real]).all()
        assert (~real).sum() == batch["n_pad"]


def test_flat_predictions_score_log2_vocab_over_each_languages_bytes_per_token(prepared_data):
    """A model that spreads its bets evenly pays ln V nats per token: per language that is
    log2(V) * tokens / bytes, which differs between be, ru and en, so a token attributed to
    the wrong language shows."""
    data = open_data(prepared_data)
    acc = SourceBpb.from_data(data)
    assert sorted(acc.names) == ["be", "en", "ru"]
    recipe = load_recipe("tiny", ["model.ctx_len=64", "train.batch_size=4", "train.val_batches=100000"])
    acc.reset("cpu")
    for batch in make_batches_factory(recipe, data, pin=False)("val", 0, 1, 0):
        labels = batch["labels"]
        nll = torch.full((labels.numel(),), math.log(data.vocab_size)) * (labels.reshape(-1) != -100)
        acc.add(batch["offsets"], labels, nll)
    got = acc.metrics()
    tokens = {lang: 0 for lang in acc.names}
    nbytes, docs = dict(tokens), dict(tokens)
    for s in data.meta["sources"]:
        for d, key in ((tokens, "tokens"), (nbytes, "bytes"), (docs, "documents")):
            d[s["language"]] += s["splits"]["val"][key]
    for lang in acc.names:
        assert got[f"val/{lang}/bpb"] == pytest.approx(math.log2(data.vocab_size) * tokens[lang] / nbytes[lang])
    # Overall: every position but each document's last (EOS) is scored; bytes scaled per language.
    scored = {k: tokens[k] - docs[k] for k in acc.names}
    scaled = sum(nbytes[k] * scored[k] / tokens[k] for k in acc.names)
    assert got["val/bpb"] == pytest.approx(math.log2(data.vocab_size) * sum(scored.values()) / scaled)
    ratios = sorted(tokens[k] / nbytes[k] for k in acc.names)
    assert ratios[-1] / ratios[0] > 1.5  # the languages really differ in bytes per token


def test_datasets_without_the_counts_get_no_per_source_curves(prepared_data, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(prepared_data, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["sources_version"]
    for s in meta["sources"]:
        del s["splits"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert SourceBpb.from_data(open_data(old)) is None


def test_an_old_dataset_still_trains_with_val_loss_only(tmp_path):
    """A meta.json from before the per-source counts (sources_version absent): training runs and
    validates as before, without val/<lang>/bpb."""
    from support.train_data import TINY, build_dataset, run_train

    data = build_dataset(tmp_path / "data")
    assert "sources_version" not in json.loads((data / "meta.json").read_text())
    out = tmp_path / "run"
    r = run_train(
        ["--no-mlflow", "tiny", f"data.dir={data}", f"out_dir={out}", *TINY, "train.max_steps=4", "train.val_every=2"],
        env_extra={"OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-1500:]
    vals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val/loss" in x]
    assert [v["step"] for v in vals] == [2, 4]
    assert not [k for v in vals for k in v if k.endswith("bpb")]
    assert (out / "final.safetensors").is_file()
