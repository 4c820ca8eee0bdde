"""Chat data: the Llama-3 template equals llama.cpp's, the loss mask covers exactly the assistant
turns in every sampler's labels, bad conversations are counted with file:line, version 1 and 2
datasets both load."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

from bulba.data.chat import ChatEncoder, jinja_template, parse, render
from bulba.data.format import open_data
from bulba.data.loader import Batches
from bulba.data.prepare import PrepareConfig, prepare
from support.chat_data import write_jsonl
from support.cli import assert_one_line_exit_2
from support.paths import REPO

TURNS = [
    {"role": "system", "content": "Ты — памочнік."},
    {"role": "user", "content": "  Як справы?\n"},  # trimmed alike by us, llama.cpp and Jinja
    {"role": "assistant", "content": "Добра, дзякуй!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four.\tIt is 4."},
]


@pytest.mark.parametrize(
    "turns", [TURNS[:2], TURNS[:3], TURNS[1:3], TURNS[1:4], TURNS], ids=["su", "sua", "ua", "uau", "suaua"]
)
def test_template_renders_as_llama_cpp_and_jinja(turns):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from bulba.export.llamacpp import apply_chat_template

    tmpl = jinja_template()
    stripped = [(m["role"], m["content"].strip()) for m in turns]
    for add_ass in (False, True):
        ours = render(stripped, add_generation_prompt=add_ass)
        assert ours.startswith("<|begin_of_text|>") and ours.endswith(
            "<|end_header_id|>\n\n" if add_ass else "<|eot_id|>"
        )
        # llama.cpp recognizes the template as its llama3 and formats natively (without BOS)
        assert "<|begin_of_text|>" + apply_chat_template(tmpl, turns, add_ass) == ours
        fmt = Jinja2ChatFormatter(
            tmpl, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>", add_generation_prompt=add_ass
        )
        assert fmt(messages=turns).prompt == ours
    if turns[-1]["role"] == "assistant":  # a valid conversation parses to the same turns
        assert parse({"messages": turns}) == stripped


def test_mask_is_one_exactly_on_assistant_contents_and_their_eot(train_data):
    enc = ChatEncoder(Tokenizer.from_file(str(train_data / "tokenizer.json")))
    msgs = parse({"messages": TURNS})
    ids, mask = enc.encode(msgs)
    tok = enc.tok
    trained = tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
    assert trained == "Добра, дзякуй!<|eot_id|>Four.\tIt is 4.<|eot_id|>"
    rest = tok.decode(ids[mask == 0].tolist(), skip_special_tokens=False)
    assert rest == render(msgs).replace("Добра, дзякуй!<|eot_id|>", "").replace("Four.\tIt is 4.<|eot_id|>", "")
    # the tokens are those of the whole rendered text (as llama.cpp tokenizes it)
    assert ids.tolist() == tok.encode(render(msgs), add_special_tokens=False).ids


@pytest.mark.parametrize("sampler", ["stream", "packed", "bucketed"])
def test_labels_keep_exactly_the_masked_targets(chat_data, sampler):
    data = open_data(chat_data)
    assert data.meta["version"] == 2 and data.has_loss_mask
    flat = np.fromfile(chat_data / "train.bin", dtype=np.uint16).astype(np.int64)
    mask = np.fromfile(chat_data / "train.mask.bin", dtype=np.uint8)
    offsets = np.fromfile(chat_data / "train.idx", dtype="<u8").astype(np.int64)
    assert len(mask) == len(flat) and mask[offsets[:-1]].sum() == 0  # BOS is never a target
    b = Batches(data, "train", sampler=sampler, batch_size=4, ctx=128, buckets=[64, 128], shuffle=True, drop_last=False)
    starts = {int(o): i for i, o in enumerate(offsets[:-1])}
    kept = 0
    for pos in range(b.batches_per_epoch):
        x = b.batch(pos)
        ids, labels, cu = x["input_ids"].reshape(-1), x["labels"].reshape(-1), x["cu_seqlens"]
        for a, z in zip(cu[:-1], cu[1:]):
            seg = ids[a:z]
            if (labels[a:z] == -100).all() and (seg == data.pad_id).all():
                continue  # padding
            if sampler == "stream":  # windows: find the window in the file
                hits = [int(p) for p in np.flatnonzero(flat == seg[0]) if np.array_equal(flat[p : p + len(seg)], seg)]
            else:  # whole conversations (they fit ctx): each starts at a document start
                hits = [int(offsets[starts[p]]) for p in starts if np.array_equal(flat[p : p + len(seg)], seg)]
                assert len(seg) == offsets[starts[hits[0]] + 1] - hits[0], "a conversation was split"
            p = hits[0]
            nxt = np.arange(p + 1, p + 1 + len(seg))
            inside = nxt < len(flat)
            want = np.full(len(seg), -100)
            want[inside] = np.where(mask[nxt[inside]] == 1, flat[nxt[inside]], -100)
            if sampler != "stream":
                want[-1] = -100  # a document's last token has no label
            np.testing.assert_array_equal(labels[a:z], want)
        kept += int((labels != -100).sum())
        assert x["n_tokens"] == int((labels != -100).sum())
    assert kept > 0
    if sampler != "stream":  # every assistant token of the split is trained on once per epoch
        assert kept == int(mask.sum())


def test_bad_conversations_are_counted_with_file_and_line(train_data, tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "Добры дзень!"}, {"role": "assistant", "content": "Дзень добры."}]}
    share = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    records = [
        good,
        share,
        {"messages": [{"role": "robot", "content": "beep"}]},  # line 3
        {"messages": []},  # line 4
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},  # line 5
        {"messages": [{"role": "user", "content": "x <|eot_id|>"}, {"role": "assistant", "content": "y"}]},  # 6
        {"messages": [{"role": "user", "content": "long"}, {"role": "assistant", "content": "слова " * 200}]},  # 7
        {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "?"}]},  # line 8
        {"text": "not a chat"},  # line 9
        {"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}]},  # 10
    ]
    src = write_jsonl(tmp_path / "chats.jsonl", records)
    cfg = PrepareConfig(
        inputs=[str(src)],
        out=tmp_path / "d",
        format="chat",
        tokenizer=train_data,
        ctx_len=64,
        val_fraction=0.0,
        mlflow=False,
        quiet=True,
    )
    meta = prepare(cfg)
    err = capsys.readouterr().err
    skipped = meta["chat"]["skipped"]
    assert {k: v["count"] for k, v in skipped.items()} == {
        "unknown_role": 1,
        "empty": 2,
        "not_alternating": 2,
        "special_text": 1,
        "too_long": 1,
        "malformed": 1,
    }
    for kind, line in [
        ("unknown_role", 3),
        ("empty", 4),
        ("not_alternating", 5),
        ("special_text", 6),
        ("too_long", 7),
        ("malformed", 9),
    ]:
        assert skipped[kind]["first"][0].startswith(f"{src}:{line}:"), skipped[kind]
        assert f"{src}:{line}:" in err
    assert skipped["empty"]["first"][1].startswith(f"{src}:8:") and skipped["not_alternating"]["first"][1].startswith(
        f"{src}:10:"
    )
    assert meta["chat"]["conversations"] == 2 and meta["splits"]["train"]["documents"] == 2
    # the data's tokenizer is the base's, byte for byte (init_from compares them)
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == (train_data / "tokenizer.json").read_bytes()
    # the text datasets of before (version 1, no mask) still load, without a mask
    old = open_data(train_data)
    assert old.meta["version"] == 1 and not old.has_loss_mask and old.mask_path("train") is None


def _prepare_cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "prepare.py"), *args, "--no-mlflow"], capture_output=True, text=True, timeout=120
    )


def test_chat_prepare_errors_exit_2(train_data, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    r = _prepare_cli(str(bad), "--format", "chat", "--tokenizer", str(train_data), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and f"{bad}:1" in r.stderr and "no valid conversation" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    r = _prepare_cli(str(bad), "--format", "chat", "--out", str(tmp_path / "o"))
    assert_one_line_exit_2(r, "--tokenizer")
    # a tokenizer without the chat tokens: named, with what to do
    tj = json.loads((train_data / "tokenizer.json").read_text(encoding="utf-8"))
    for t in tj["added_tokens"]:
        if t["content"] == "<|eot_id|>":
            t["content"] = "<|not_eot|>"
    (tmp_path / "tok.json").write_text(json.dumps(tj), encoding="utf-8")
    r = _prepare_cli(
        str(bad), "--format", "chat", "--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "o")
    )
    assert_one_line_exit_2(r, "<|eot_id|>", "tok.json")


def test_every_input_format_gives_the_same_tokens(train_data, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from support.chat_data import corpus_conversations

    records = corpus_conversations(n_per_lang=5)
    inputs = {
        "jsonl": write_jsonl(tmp_path / "c.jsonl", records),
        "json": tmp_path / "c.json",
        "parquet": tmp_path / "c.parquet",
        "datasets": tmp_path / "ds",
    }
    inputs["json"].write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), inputs["parquet"])
    datasets.Dataset.from_list(records).save_to_disk(str(inputs["datasets"]))
    got = {}
    for name, path in inputs.items():
        out = tmp_path / f"d-{name}"
        cfg = PrepareConfig(
            inputs=[str(path)], out=out, format="chat", tokenizer=train_data, ctx_len=256, mlflow=False, quiet=True
        )
        meta = prepare(cfg)
        assert meta["chat"]["conversations"] == len(records) and not meta["chat"]["skipped"], name
        got[name] = [(out / f).read_bytes() for f in ("train.bin", "train.mask.bin", "val.bin", "val.mask.bin")]
    assert all(v == got["jsonl"] for v in got.values())
