"""prepare.py: the on-disk format of docs/contracts.md, input formats, weights, MLflow."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from bulba.data.prepare import PrepareConfig, dataset_digest, prepare
from support.paths import REPO

PROSE = {
    "be": "Зубр жыве ў Белавежскай пушчы.\nЁн есць траву і кару дрэў.\n\nЗімой зубры ходзяць статкамі.\n",
    "ru": "Аист строит гнездо на крыше.\nВесной аисты возвращаются домой.\n",
    "en": "Rabbits dig burrows in sandy soil.\nThey eat grass at dusk.\n",
}


def load_split(d: Path, split: str, meta: dict):
    tokens = np.fromfile(d / f"{split}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
    idx = np.fromfile(d / f"{split}.idx", dtype="<u8")
    return tokens, idx


def test_meta_idx_bin_consistent(prepared_data):
    d = prepared_data
    meta = json.loads((d / "meta.json").read_text())
    assert meta["format"] == "bulba-tokens" and meta["version"] == 1
    assert meta["vocab_size"] == 1024 and meta["dtype"] == "uint16"
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == 1024
    bos, eos = meta["bos_id"], meta["eos_id"]
    assert bos == tok.token_to_id("<|begin_of_text|>") and eos == tok.token_to_id("<|end_of_text|>")
    assert meta["pad_id"] == eos
    assert meta["special_tokens"]["<|eot_id|>"] == tok.token_to_id("<|eot_id|>")
    assert meta["tokenizer_sha256"] == hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest()
    for split in ("train", "val"):
        tokens, idx = load_split(d, split, meta)
        info = meta["splits"][split]
        assert (d / f"{split}.bin").stat().st_size == info["tokens"] * 2
        assert len(idx) == info["documents"] + 1 and idx[0] == 0 and idx[-1] == len(tokens)
        assert np.all(np.diff(idx.astype(np.int64)) > 0)
        assert info["documents"] > 0
        starts, ends = idx[:-1].astype(np.int64), idx[1:].astype(np.int64) - 1
        assert np.all(tokens[starts] == bos) and np.all(tokens[ends] == eos)
        assert (tokens == bos).sum() == info["documents"] == (tokens == eos).sum()
        assert tokens.max() < meta["vocab_size"]
        assert hashlib.sha256((d / f"{split}.bin").read_bytes()).hexdigest() == info["sha256"]
    assert meta["dataset_digest"] == dataset_digest(meta["tokenizer_sha256"], meta["splits"])
    # every document once in total (no weights here), split about 1 % / 99 %
    total_docs = sum(s["documents"] for s in meta["sources"])
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == total_docs
    assert 0.005 < meta["splits"]["val"]["documents"] / total_docs < 0.02
    assert set(meta["languages"]) >= {"be", "ru", "en"}
    for lang in ("be", "ru", "en"):
        assert 1.0 < meta["languages"][lang]["tokens_per_word"] < 10


def test_documents_decode_to_corpus_lines(prepared_data, corpus_dir):
    meta = json.loads((prepared_data / "meta.json").read_text())
    tok = Tokenizer.from_file(str(prepared_data / "tokenizer.json"))
    lines = set()
    for lang in ("be", "ru", "en"):
        for line in (corpus_dir / f"{lang}.txt").read_text(encoding="utf-8").split("\n"):
            if line.strip():
                lines.add(unicodedata.normalize("NFC", line).strip())
    tokens, idx = load_split(prepared_data, "val", meta)
    docs = [tokens[a + 1 : b - 1].tolist() for a, b in zip(idx[:-1], idx[1:])]
    decoded = tok.decode_batch(docs, skip_special_tokens=False)
    assert all(x in lines for x in decoded)


def write_corpus(root: Path) -> Path:
    """One of each input format (own text), in a directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = root / "corpus"
    (c / "code").mkdir(parents=True)
    for lang, text in PROSE.items():
        (c / f"{lang}.txt").write_text(text, encoding="utf-8")
    (c / "notes.md").write_text("# Title\n\nFirst paragraph\nstill first.\n\n  \nSecond paragraph.\n")
    (c / "recs.jsonl").write_text(
        "\n".join(
            json.dumps({"text": t, "id": i}) for i, t in enumerate(["Першы запіс.", "Второй запись.", "Third record."])
        )
        + "\n"
    )
    (c / "list.json").write_text(json.dumps([{"text": "Item one."}, "Item two.", {"text": None}]))
    pq.write_table(pa.table({"text": ["Parquet row one.", "Parquet row two."], "n": [1, 2]}), c / "rows.parquet")
    (c / "code" / "a.py").write_text("def add(a, b):\n    return a + b\n")
    (c / "code" / "b.rs").write_text('fn main() {\n    println!("hi");\n}\n')
    (c / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")  # unknown type inside a directory: skipped
    return c


def run_prepare(inputs, out, **kw):
    kw.setdefault("vocab_size", 300)
    kw.setdefault("mlflow", False)
    kw.setdefault("quiet", True)
    return prepare(PrepareConfig(inputs=[str(x) for x in inputs], out=out, **kw))


def test_formats_and_documents(tmp_path):
    c = write_corpus(tmp_path)
    meta = run_prepare([c], tmp_path / "out", val_fraction=0.0)
    docs = {Path(s["name"]).name: s["documents"] for s in meta["sources"]}
    assert docs["be.txt"] == 2  # blank line → paragraphs
    assert docs["ru.txt"] == 2 and docs["en.txt"] == 2  # no blank line → lines
    assert docs["notes.md"] == 3
    assert docs["recs.jsonl"] == 3 and docs["list.json"] == 2 and docs["rows.parquet"] == 2
    code = [s for s in meta["sources"] if s["kind"] == "code"]
    assert len(code) == 1 and code[0]["documents"] == 2 and code[0]["language"] == "code"
    assert meta["splits"]["train"]["documents"] == sum(docs.values())
    langs = {Path(s["name"]).name: s["language"] for s in meta["sources"]}
    assert langs["be.txt"] == "be" and langs["ru.txt"] == "ru" and langs["en.txt"] == "en"


def test_hf_datasets_folder_and_glob(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["Dataset row one.", "Dataset row two.", "Трэці радок."]}).save_to_disk(
        str(tmp_path / "ds")
    )
    c = write_corpus(tmp_path)
    meta = run_prepare([tmp_path / "ds", str(c / "*.txt")], tmp_path / "out", text_field="body", val_fraction=0)
    assert [s["documents"] for s in meta["sources"]] == [3, 2, 2, 2]


def test_weights_repeat_and_drop(tmp_path):
    c = write_corpus(tmp_path)
    base = run_prepare([c / "ru.txt", c / "en.txt"], tmp_path / "a", val_fraction=0)
    tok = tmp_path / "a" / "tokenizer.json"
    w = run_prepare([f"{c / 'ru.txt'}@3", f"{c / 'en.txt'}@0"], tmp_path / "b", val_fraction=0, tokenizer=tok)
    ru, en = w["sources"]
    assert ru["weight"] == 3 and en["weight"] == 0
    assert ru["train_tokens"] == 3 * base["sources"][0]["train_tokens"] and en["train_tokens"] == 0
    assert w["splits"]["train"]["documents"] == 3 * 2


def test_deterministic_and_force(tmp_path):
    c = write_corpus(tmp_path)
    a = run_prepare([c], tmp_path / "a", val_fraction=0.3)
    b = run_prepare([c], tmp_path / "b", val_fraction=0.3)
    assert a["dataset_digest"] == b["dataset_digest"]
    assert a["splits"]["val"]["documents"] >= 1
    c2 = run_prepare([c / "en.txt"], tmp_path / "a", force=True)
    assert c2["dataset_digest"] != a["dataset_digest"]
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["dataset_digest"] == c2["dataset_digest"]


def test_workers_and_encoders_agree(tmp_path, corpus_dir):
    """Worker processes, in-process encoding and the plain `tokenizers` encoder write
    byte-identical datasets."""
    c = write_corpus(tmp_path)
    inputs = [c, corpus_dir / "be.txt"]
    a = run_prepare(inputs, tmp_path / "a", workers=0, block_mb=0.1)
    tok = tmp_path / "a" / "tokenizer.json"
    b = run_prepare(inputs, tmp_path / "b", workers=2, block_mb=0.1, tokenizer=tok)
    r = run_prepare(inputs, tmp_path / "r", workers=0, encoder="tokenizers", tokenizer=tok)
    assert a["dataset_digest"] == b["dataset_digest"] == r["dataset_digest"]
    assert a["sources"] == b["sources"] == r["sources"]
    assert a["languages"] == b["languages"]


def test_small_corpus_still_gets_val(tmp_path):
    c = write_corpus(tmp_path)
    meta = run_prepare([c / "en.txt"], tmp_path / "out", val_fraction=0.001)
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 1


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    from bulba.data import prepare as P

    c = write_corpus(tmp_path)

    def boom(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(P.SplitWriter, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        run_prepare([c], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_mlflow_run_and_dataset_input(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # artifacts land in ./mlruns
    c = write_corpus(tmp_path)
    meta = run_prepare([c], tmp_path / "out", mlflow=True, experiment="test-prepare")
    run_id = meta["mlflow_run_id"]
    assert run_id and json.loads((tmp_path / "out" / "meta.json").read_text())["mlflow_run_id"] == run_id
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["vocab_size"] == "300"
    assert "fertility_be" in run.data.metrics and run.data.metrics["train_documents"] > 0
    assert run.data.tags["bulba.dataset_digest"] == meta["dataset_digest"]
    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.digest == meta["dataset_digest"]
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"tokenizer.json", "meta.json"} <= arts


def test_mlflow_down_does_not_fail(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    c = write_corpus(tmp_path)
    meta = run_prepare([c / "en.txt"], tmp_path / "out", mlflow=True)
    assert meta["mlflow_run_id"] is None
    assert (tmp_path / "out" / "meta.json").is_file()
    assert "MLflow logging failed" in capsys.readouterr().err


def test_demo_corpus(tmp_path):
    """The shipped demo corpus prepares as scripts/demo.py runs it: four languages, exact vocab."""
    demo = REPO / "demo" / "corpus"
    meta = run_prepare([demo], tmp_path / "demo", vocab_size=2048)
    assert meta["vocab_size"] == 2048
    assert {"be", "ru", "en", "code"} <= set(meta["languages"])
    assert meta["splits"]["val"]["documents"] >= 1
    be = next(s for s in meta["sources"] if s["name"].endswith("be.txt"))
    assert be["language"] == "be" and be["bytes"] > 8000
