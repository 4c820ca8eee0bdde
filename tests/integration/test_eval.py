"""eval.py end to end: a tiny model trained by train.py (logging to a real `mlflow server`),
exported by export.py to an f32 GGUF and registered, then scored on the held-out text in
PyTorch and in real llama.cpp from every SOURCE form; the figures logged back to MLflow; bad
input as one-line errors. The same training run shows val/<lang>/bpb in MLflow."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from support.train_data import ROOT, TINY

HELDOUT = [ROOT / "data" / "heldout" / f"{lang}.txt" for lang in ("be", "ru", "en")]
MAX_KB = 6  # ~2k tokens per language: a few seconds per backend
NAME = "eval-tiny"


def _env(uri: str) -> dict:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": uri,
        "NO_PROXY": "127.0.0.1,localhost",
    }


def _script(name: str, *args, uri: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / name), *map(str, args)],
        cwd=ROOT,
        env=_env(uri),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def trained(train_data, mlflow_server, tmp_path_factory):
    """(run dir, f32 GGUF, MLflow run id): tiny trained 40 steps, validated every 10."""
    base = tmp_path_factory.mktemp("eval")
    out = base / "run"
    r = _script(
        "train.py",
        "tiny",
        f"data.dir={train_data}",
        f"out_dir={out}",
        *TINY,
        "train.max_steps=40",
        "train.val_batches=8",
        "train.lr=3e-3",
        "train.val_every=10",
        "train.ckpt_every=20",
        "train.mode=eager",
        uri=mlflow_server.uri,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    gguf = base / "tiny-f32.gguf"
    r = _script("export.py", out, "--type", "f32", "--out", gguf, "--register", NAME, uri=mlflow_server.uri)
    assert r.returncode == 0, r.stderr[-2000:]
    run_id = json.loads((out / "config.json").read_text())["mlflow_run_id"]
    assert run_id
    return out, gguf, run_id


def _score(source: str) -> dict[str, float]:
    from bulba.eval.run import run

    return {s.name: s.bits_per_byte for s in run(source, [str(p) for p in HELDOUT], MAX_KB, None, False)}


def test_val_bpb_per_language_reaches_mlflow(trained, mlflow_uri):
    from mlflow import MlflowClient

    _, _, run_id = trained
    client = MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    for lang in ("be", "ru", "en"):
        history = client.get_metric_history(run_id, f"val/{lang}/bpb")
        assert sorted(m.step for m in history) == [10, 20, 30, 40], lang
        assert 0.5 < metrics[f"val/{lang}/bpb"] < 12
    assert "val/bpb" in metrics and "val/loss" in metrics
    # The registered version is ranked by the bits per byte (registry's FIGURES: val_bpb first).
    v = client.get_model_version(NAME, "1")
    assert float(v.tags["val_bpb"]) == pytest.approx(metrics["val/bpb"])


def test_pytorch_and_llamacpp_agree_on_f32(trained):
    from bulba.eval.bpb import read_text
    from bulba.eval.sources import open_model

    run, gguf, _ = trained
    torch_bpb, cpp_bpb = _score(str(run)), _score(str(gguf))
    for lang in ("be", "ru", "en"):
        assert abs(cpp_bpb[lang] / torch_bpb[lang] - 1) < 0.005, (lang, torch_bpb, cpp_bpb)
    # The two sides tokenized the held-out text identically (llama.cpp's own tokenizer).
    a, b = open_model(str(run)), open_model(str(gguf))
    try:
        for p in HELDOUT:
            for doc in read_text(p, MAX_KB).documents:
                assert a.document_ids(doc) == b.document_ids(doc), (p.name, doc)
    finally:
        a.close()
        b.close()


def test_every_source_form(trained, mlflow_uri, tmp_path):
    run, gguf, run_id = trained
    torch_bpb = _score(str(run))
    assert _score(str(run / "final.safetensors")) == torch_bpb
    assert _score(f"runs:/{run_id}") == torch_bpb
    # A run directory still training (no final weights) is scored from its newest checkpoint.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "final.safetensors").unlink()
    assert _score(str(unfinished)) == _score(str(run / "checkpoints" / "step-00000040" / "model.safetensors"))
    cpp_bpb = _score(str(gguf))
    assert _score(f"models:/{NAME}/1") == cpp_bpb
    assert _score(f"models:/{NAME}@best") == cpp_bpb
    assert all(abs(cpp_bpb[k] / torch_bpb[k] - 1) < 0.005 for k in torch_bpb)


def test_untrained_model_scores_log2_vocab_per_token(trained, tmp_path):
    """Random init gives nearly flat logits: log2(V) bits per token, over the bytes per token."""
    import torch
    from safetensors.torch import save_file

    from bulba.config import model_config_from_dict
    from bulba.model.llama import Llama

    run, _, _ = trained
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copyfile(run / f, fresh / f)
    cfg = model_config_from_dict(json.loads((run / "config.json").read_text())["model"])
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in Llama(cfg).state_dict().items()}, str(fresh / "final.safetensors"))
    from bulba.eval.run import run as evaluate

    for s in evaluate(str(fresh), [str(p) for p in HELDOUT], MAX_KB, None, False):
        flat = math.log2(cfg.vocab_size) * s.tokens / s.bytes
        assert s.bits_per_byte == pytest.approx(flat, rel=0.02), s.name


def test_cli_table_json_and_metrics_on_the_training_run(trained, mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    run, gguf, run_id = trained
    out = tmp_path / "eval.json"
    r = _script("eval.py", run, *HELDOUT, "--max-kb", MAX_KB, "--json", out, "--register-metrics", uri=mlflow_uri)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| text | bits/byte | xz -9e bits/byte |" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [x["name"] for x in rows] == ["be", "ru", "en"]
    for x in rows:
        assert set(x) == {"name", "bits_per_byte", "tokens_per_word", "xz_bits_per_byte", "bytes", "tokens"}
        assert 5000 < x["bytes"] <= MAX_KB * 1000 and x["tokens"] > 1000
        assert 1 < x["xz_bits_per_byte"] < 5 and 1 < x["tokens_per_word"] < 10
    # The GGUF's figures go to the same training run (its bulba.source_run), keyed by its type.
    r = _script("eval.py", gguf, *HELDOUT, "--max-kb", MAX_KB, "--register-metrics", uri=mlflow_uri)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = MlflowClient().get_run(run_id).data.metrics
    for x in rows:
        assert metrics[f"eval/{x['name']}/bpb"] == pytest.approx(x["bits_per_byte"], rel=1e-5)
        assert metrics[f"eval/{x['name']}/tokens_per_word"] == pytest.approx(x["tokens_per_word"], rel=1e-5)
        assert metrics[f"eval/{x['name']}/bpb.f32"] == pytest.approx(x["bits_per_byte"], rel=0.005)
    # A registered version gets them as its tags.
    r = _script("eval.py", f"models:/{NAME}/1", *HELDOUT, "--max-kb", MAX_KB, "--register-metrics", uri=mlflow_uri)
    assert r.returncode == 0, r.stderr[-2000:]
    tags = MlflowClient().get_model_version(NAME, "1").tags
    assert float(tags["eval/be/bpb"]) == pytest.approx(metrics["eval/be/bpb.f32"], rel=1e-4)


def test_bad_input_is_one_line_exit_2(trained, tmp_path, mlflow_server):
    run, gguf, _ = trained
    empty, latin1, broken = tmp_path / "empty.txt", tmp_path / "latin1.txt", tmp_path / "broken.gguf"
    empty.write_text(" \n\n", encoding="utf-8")
    latin1.write_bytes("Minsk, caf\xe9\n".encode("latin-1"))
    broken.write_bytes(b"GGUF" + b"\x00" * 100)
    bare = tmp_path / "bare.safetensors"
    shutil.copyfile(run / "final.safetensors", bare)  # no config.json beside it
    cases = [
        ((run, tmp_path / "missing.txt"), "missing.txt does not exist"),
        ((run, empty), "holds no text"),
        ((run, latin1), "is not UTF-8"),
        ((broken, HELDOUT[0]), "broken.gguf"),
        ((tmp_path / "nothing.gguf", HELDOUT[0]), "does not exist"),
        ((HELDOUT[0], HELDOUT[0]), "is not a model eval.py can score"),
        ((tmp_path / "no-such-run", HELDOUT[0]), "does not exist"),
        ((bare, HELDOUT[0]), "config.json"),
        ((run, HELDOUT[0], "--max-kb", "0"), "--max-kb"),
    ]
    for args, needle in cases:
        r = _script("eval.py", *args, uri=mlflow_server.uri)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (args, r.stderr[-1500:])
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
