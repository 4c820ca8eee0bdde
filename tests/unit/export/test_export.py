"""export.py end to end: every GGUF type loaded in the real llama.cpp, the HF folder in
transformers, the registry round trip against a real `mlflow server`, and bad inputs.

The model is `tiny` (2 layers, n_embd 256, GQA 4:2, ffn 768, ctx 256) trained 80 steps by
train.py on the `prepared_data` fixture (prepare.py on the shared corpus), so its logits
have a clear top-1 (random init is nearly flat, which makes top-1 agreement a coin toss for
any rounding); without train.py, the same shapes are trained by hand here. Built once per
session (~40 s on 2 busy cores).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bulba.errors import UserError  # noqa: E402
from bulba.export.llamacpp import llama_cpp_available  # noqa: E402
from support.paths import CORPUS
from support.paths import REPO as ROOT

needs_llama = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python not installed")

NUMPY_TYPES = ["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
K_TYPES = ["q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s"]


def _texts(per_lang: int = 1500) -> list[str]:
    lines = []
    for lang in ("be", "ru", "en"):
        lines += (CORPUS / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:per_lang]
    return lines


def _train(model, tok, lines: list[str], steps: int) -> None:
    """A few AdamW steps on the corpus: enough for peaked logits (clear top-1)."""
    import torch

    from bulba.data.tokenizer import EOS

    eos = tok.token_to_id(EOS)
    ids = torch.tensor([i for e in tok.encode_batch(lines[::4]) for i in e.ids + [eos]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ix = torch.randint(0, len(ids) - 65, (4,), generator=g)
        x = torch.stack([ids[i : i + 64] for i in ix])
        y = torch.stack([ids[i + 1 : i + 65] for i in ix])
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), y.view(-1).long(), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        opt.step()


def build_run(
    out: Path,
    steps: int = 30,
    tie: bool = True,
    n_embd: int = 256,
    ffn: int = 768,
    n_head: int = 4,
    vocab: int = 1029,
    mlflow_run_id: str | None = None,
) -> Path:
    """A run directory per docs/contracts.md: config.json, tokenizer.json, final.safetensors."""
    import torch

    from bulba.config import ModelConfig
    from bulba.data.tokenizer import train_tokenizer
    from bulba.model.llama import Llama
    from bulba.train.run_dir import write_weights_run

    lines = _texts()
    tok = train_tokenizer(lines, vocab_size=vocab)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        n_layer=2,
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=2,
        ffn_hidden=ffn,
        ctx_len=256,
        tie_embeddings=tie,
    )
    torch.manual_seed(0)
    model = Llama(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 busy shared cores, 2 threads were 20x slower (spin-waiting)
    try:
        _train(model, tok, lines, steps)
    finally:
        torch.set_num_threads(threads)
    return write_weights_run(
        out, cfg, tok, model.state_dict(), recipe_name="tiny", dataset_digest="test-digest", run_id=mlflow_run_id
    )


def train_with_train_py(data_dir: Path, out: Path, steps: int = 80) -> Path | None:
    """`tiny` trained a few steps by the real train.py (None when train.py is not there)."""
    if not (ROOT / "train.py").is_file():
        return None
    args = [
        "--no-mlflow",
        "tiny",
        f"data.dir={data_dir}",
        f"out_dir={out}",
        f"train.max_steps={steps}",
        "train.mode=eager",  # tiny's compile pays off in long runs, not in 80 steps
        "train.lr=2e-3",
        "model.n_layer=2",
        "model.n_kv_head=2",
        "train.batch_size=4",
        "train.threads=1",
        "train.val_every=0",
        "train.sample_every=0",
        "train.ckpt_every=0",
        "train.warmup_steps=5",
    ]
    # 80 steps: top-1 margins wide enough that f16/bf16 rounding flips under 1% of positions
    # (at 20 steps a tenth of positions were near-ties and q8_0 sat at the 99% edge).
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if r.returncode != 0:
        pytest.fail(f"train.py failed ({r.returncode}): {r.stderr[-1500:]}")
    return out


@pytest.fixture(scope="session")
def tiny_run(request, tmp_path_factory) -> Path:
    """`tiny` (2 layers, GQA 4:2) trained a few steps by train.py on the prepared corpus; without
    train.py or the prepared_data fixture, the same shapes trained by hand (build_run)."""
    if not CORPUS.is_dir():
        pytest.skip(f"corpus not found at {CORPUS}")
    out = tmp_path_factory.mktemp("export") / "tiny"
    try:
        data = Path(request.getfixturevalue("prepared_data"))
    except pytest.FixtureLookupError:
        data = None
    if data is not None and train_with_train_py(data, out) is not None:
        return out
    return build_run(out)


def _export(*args, **kw):
    from bulba.export.pipeline import export

    kw.setdefault("mlflow", False)
    kw.setdefault("quiet", True)
    return export(*args, **kw)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --------------------------------------------------------------------------- every type in llama.cpp


@needs_llama
@pytest.mark.parametrize("type_name", NUMPY_TYPES + K_TYPES)
def test_type_loads_in_llama_cpp_with_parity(tiny_run, tmp_path, type_name):
    from bulba.export.verify import FIDELITY_TOP1_BAR, REL_LOGIT_TOL, TOP1_BAR

    res = _export(str(tiny_run), type_name, tmp_path / f"tiny-{type_name}.gguf")
    print(res.verdict)
    assert res.verdict.startswith(f"verify {type_name} in llama.cpp: PASS")
    assert "tokens identical" in res.verdict
    assert (tmp_path / f"tiny-{type_name}.Modelfile").read_text().startswith(f"FROM ./tiny-{type_name}.gguf\n")
    assert _leftovers(tmp_path) == sorted([f"tiny-{type_name}.gguf", f"tiny-{type_name}.Modelfile"])
    # The figures themselves, so a lax verdict could not hide them.
    rep = res.report
    assert rep.tokens_match and rep.n_positions > 200
    if type_name == "f32":
        assert rep.max_rel_logit_diff <= REL_LOGIT_TOL
        assert rep.greedy_match
    elif type_name in TOP1_BAR:
        assert rep.top1_agreement >= 0.99
    else:  # quantized: llama.cpp computes what the file holds
        assert rep.fidelity_top1 >= FIDELITY_TOP1_BAR
        # and the rounding did not wreck the model (8 bits: it barely moved it)
        assert rep.top1_agreement >= (0.95 if type_name == "q8_0" else 0.5)


@needs_llama
def test_verification_catches_a_wrong_rope_layout(tiny_run, tmp_path, monkeypatch):
    """Without the Q/K permutation the file loads but computes nonsense: the check must fail it."""
    import bulba.export.gguf as ge

    monkeypatch.setattr(ge, "permute_rotate_half", lambda w, n_head: w)
    with pytest.raises(UserError, match="FAIL"):
        _export(str(tiny_run), "f32", tmp_path / "bad.gguf")
    assert _leftovers(tmp_path) == []


def test_gguf_metadata_and_tensors(tiny_run, tmp_path):
    """What llama.cpp reads, exactly; no output.weight when tied; rows == tokens (no llama.cpp needed)."""
    import gguf

    from bulba.export.gguf import read_back
    from bulba.export.source import open_source

    out = tmp_path / "m.gguf"
    _export(str(tiny_run), "q8_0", out, verify=False)
    src = open_source(str(tiny_run))
    cfg, tok = src.model, src.tokenizer
    r = read_back(out)
    kv, tensors = r["kv"], r["tensors"]
    expect = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "llama.context_length": 256,
        "llama.embedding_length": 256,
        "llama.block_count": 2,
        "llama.feed_forward_length": 768,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 64,
        "llama.attention.value_length": 64,
        "llama.rope.dimension_count": 64,
        "llama.rope.freq_base": 500000.0,
        "llama.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    for k, v in expect.items():
        assert kv[k] == v, k
    assert abs(kv["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    assert len(kv["tokenizer.ggml.tokens"]) == cfg.vocab_size == len(set(kv["tokenizer.ggml.tokens"]))
    types = kv["tokenizer.ggml.token_type"]
    assert all(types[i] == gguf.TokenType.CONTROL for i in tok.special.values())
    assert types[0] == gguf.TokenType.NORMAL
    assert "<|start_header_id|>" in kv["tokenizer.chat_template"]
    assert "output.weight" not in tensors
    assert len(tensors) == 2 + 9 * cfg.n_layer
    assert tensors["token_embd.weight"] == ("Q8_0", [256, cfg.vocab_size])  # GGUF order: ne0 first
    assert tensors["blk.0.attn_k.weight"] == ("Q8_0", [256, 128])
    assert tensors["blk.0.attn_norm.weight"] == ("F32", [256])


def test_permutation_matches_llama_cpp_reference():
    """Our permute equals convert_hf_to_gguf's LlamaModel.permute (rotate-half -> interleaved)."""
    from bulba.export.gguf import permute_rotate_half

    hd, n_head, D = 8, 2, 3
    w = np.arange(n_head * hd * D, dtype=np.float32).reshape(n_head * hd, D)
    p = permute_rotate_half(w, n_head)
    # Head 0 rows: rotate-half pairs (j, j + hd/2) become adjacent (2j, 2j + 1).
    assert [int(r[0]) // D for r in p[:hd]] == [0, 4, 1, 5, 2, 6, 3, 7]


@needs_llama
def test_untied_output_weight(tmp_path_factory, tmp_path):
    run = build_run(tmp_path_factory.mktemp("untied") / "untied", steps=10, tie=False)
    out = tmp_path / "u.gguf"
    res = _export(str(run), "f32", out)
    from bulba.export.gguf import read_back

    assert "output.weight" in read_back(out)["tensors"]
    assert "PASS" in res.verdict


# --------------------------------------------------------------------------- HF folder


def test_hf_folder_loads_in_transformers(tiny_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bulba.export.source import load_torch_model, open_source
    from bulba.export.verify import SAMPLE, verify_hf

    hf = tmp_path / "hf"
    _export(str(tiny_run), "f16", tmp_path / "m.gguf", hf_out=hf, verify=False)
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= {p.name for p in hf.iterdir()}
    src = open_source(str(tiny_run))
    rep = verify_hf(hf, src)
    assert rep["tokens_match"] and rep["max_rel_logit_diff"] <= 1e-5, rep
    tok = AutoTokenizer.from_pretrained(str(hf))
    assert tok("Прывітанне")["input_ids"][0] == src.tokenizer.bos_id
    assert tok.eos_token == "<|end_of_text|>"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Добры дзень"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    ids = tok(SAMPLE[:60], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = load_torch_model(src)(ids)
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] >= ids.shape[1] + 1


# --------------------------------------------------------------------------- registry


@needs_llama
def test_registry_round_trip_from_runs_uri(tiny_run, tmp_path, mlflow_uri, monkeypatch):
    """runs:/<id> source -> export run linked to it -> registered version -> models:/ gets the file."""
    import mlflow
    from mlflow import MlflowClient

    from bulba.atomic import sha256_file
    from bulba.export.registry import fetch_gguf

    monkeypatch.chdir(tmp_path)  # output_models/ lands here
    mlflow.set_experiment("export-test")
    with mlflow.start_run(run_name="train-tiny") as train_run:
        run_dir = tmp_path / "logged"
        shutil.copytree(tiny_run, run_dir)
        cfg = json.loads((run_dir / "config.json").read_text())
        cfg["mlflow_run_id"] = train_run.info.run_id
        (run_dir / "config.json").write_text(json.dumps(cfg))
        mlflow.log_artifacts(str(run_dir), "model")
    train_id = train_run.info.run_id

    out = tmp_path / "tiny-q8_0.gguf"
    res = _export(f"runs:/{train_id}", "q8_0", out, register="bulba-tiny", mlflow=True)
    client = MlflowClient()
    m = res.mlflow
    assert m["model_uri"] == "models:/bulba-tiny/1"
    sha = sha256_file(out)
    mv = client.get_model_version("bulba-tiny", "1")
    assert mv.tags["sha256"] == sha and mv.tags["type"] == "q8_0"
    assert mv.tags["vocab_size"] == str(cfg["model"]["vocab_size"]) and mv.tags["context_length"] == "256"
    assert int(mv.tags["param_count"]) > 0 and mv.tags["source_run"] == train_id
    export_run = client.get_run(m["run_id"])
    assert export_run.data.tags["bulba.source_run"] == train_id
    assert export_run.data.tags["mlflow.parentRunId"] == train_id
    assert export_run.data.metrics["verify.top1_agreement"] >= 0.99
    assert (tmp_path / "output_models" / "bulba-tiny-q8_0.gguf").exists()
    # The registered version reaches the very file...
    got = fetch_gguf("models:/bulba-tiny/1", tmp_path / "dl")
    assert sha256_file(got) == sha
    # ...and runs as a pyfunc through llama.cpp.
    model = mlflow.pyfunc.load_model("models:/bulba-tiny/1")
    text = model.predict(["Добры дзень"], params={"max_tokens": 4})
    assert isinstance(text[0], str)
    # A second export is a new version of the same registered model.
    res2 = _export(
        f"runs:/{train_id}", "f16", tmp_path / "tiny-f16.gguf", register="bulba-tiny", mlflow=True, verify=False
    )
    assert res2.mlflow["version"] == "2"


@needs_llama
def test_registry_aliases_latest_and_best(tiny_run, tmp_path, mlflow_uri, monkeypatch, capsys):
    """Four registrations of one model: @latest follows every one (MLflow resolves it; the name is
    reserved); @best only a strictly lower val_loss of the source training run; a version without
    a figure never takes it."""
    import uuid

    import mlflow
    from mlflow import MlflowClient

    from bulba.atomic import sha256_file
    from bulba.export.registry import fetch_gguf

    monkeypatch.chdir(tmp_path)
    name = f"bulba-alias-{uuid.uuid4().hex[:6]}"
    mlflow.set_experiment("export-alias-test")
    client = MlflowClient()

    def trained(val_loss: float | None) -> Path:
        """A training run whose last val/loss is `val_loss`, and a run directory linked to it."""
        with mlflow.start_run(run_name="train-tiny") as r:
            if val_loss is not None:
                mlflow.log_metric("val/loss", val_loss + 1.0, step=40)  # only the last one counts
                mlflow.log_metric("val/loss", val_loss, step=80)
        d = tmp_path / r.info.run_id
        shutil.copytree(tiny_run, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["mlflow_run_id"] = r.info.run_id
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    def register(val_loss, type_name="f16", verify=False):
        capsys.readouterr()
        out = tmp_path / f"{uuid.uuid4().hex[:6]}-{type_name}.gguf"
        res = _export(str(trained(val_loss)), type_name, out, register=name, mlflow=True, verify=verify, quiet=False)
        printed = capsys.readouterr().err
        aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
        aliases["latest"] = client.get_model_version_by_alias(name, "latest").version
        return res.mlflow, printed, aliases, out

    m1, said, aliases, out1 = register(3.0, "q8_0", verify=True)
    assert m1["version"] == "1" and aliases == {"latest": "1", "best": "1"}
    assert f"aliases of {name}: @latest -> v1; @best -> v1" in said
    desc = client.get_model_version(name, "1").description
    digest = json.loads((tiny_run / "config.json").read_text())["dataset_digest"]
    for part in ("preset tiny", f"dataset digest {digest}", "steps: 80", "GGUF q8_0", "val_loss 3.0000"):
        assert part in desc, (part, desc)
    assert "verify q8_0 in llama.cpp: PASS" in desc and "top-1" in desc
    tags = client.get_model_version(name, "1").tags
    assert float(tags["val_loss"]) == 3.0 and tags["preset"] == "tiny" and tags["steps"] == "80"

    _, said, aliases, out2 = register(2.5)  # better: takes @best
    assert aliases == {"latest": "2", "best": "2"}
    assert "@latest -> v2; @best -> v2 from v1 (val_loss 2.5 < 3)" in said

    _, said, aliases, _ = register(None)  # no figure: never takes @best from one with a figure
    assert aliases == {"latest": "3", "best": "2"}
    assert "@best stays v2 (no figure" in said
    assert "Ranked by: no figure" in client.get_model_version(name, "3").description

    _, said, aliases, _ = register(2.9)  # worse: @best stays
    assert aliases == {"latest": "4", "best": "2"}
    assert "@best stays v2 (val_loss 2.9 >= best's 2.5)" in said

    # The aliases resolve to the very files, and @best runs through the pyfunc.
    assert sha256_file(fetch_gguf(f"models:/{name}@best", tmp_path / "dl-best")) == sha256_file(out2)
    text = mlflow.pyfunc.load_model(f"models:/{name}@best").predict(["Добры дзень"], params={"max_tokens": 4})
    assert isinstance(text[0], str)
    assert sha256_file(out1) != sha256_file(out2)


def test_best_figure_rules():
    """Which figure a version carries and when it takes @best (no server needed)."""
    from bulba.export.registry import better, version_figure

    assert version_figure({"val_bpb": "1.25", "val_loss": "2.0"}) == ("val_bpb", 1.25)  # bpb first
    assert version_figure({"val_loss": "2.0"}) == ("val_loss", 2.0)
    assert version_figure({"val_loss": "nonsense"}) is None and version_figure({}) is None
    assert better(("val_loss", 2.0), ("val_loss", 2.5))[0]
    assert not better(("val_loss", 2.5), ("val_loss", 2.5))[0]  # a tie keeps the holder
    assert not better(None, ("val_loss", 2.5))[0]  # no figure never takes it from one with a figure
    assert better(("val_loss", 9.0), None)[0] and better(None, None)[0]  # the holder has none
    assert not better(("val_bpb", 0.1), ("val_loss", 2.5))[0]  # not comparable: the holder keeps it


# --------------------------------------------------------------------------- bad input


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "export.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=300,
    )


def test_cli_errors_are_one_line_exit_2(tiny_run, tmp_path):
    out = tmp_path / "o" / "x.gguf"
    r = _cli(tiny_run, "--type", "q3_z", "--out", out, "--no-mlflow")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: unknown type 'q3_z'") and "q8_0" in line and "f16" in line
    r = _cli(tmp_path / "nope", "--type", "f16", "--out", out, "--no-mlflow")
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.count("\n") == 1
    assert not out.parent.exists()


def _copy_run(tiny_run: Path, dst: Path) -> Path:
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.mark.parametrize(
    "case", ["no-weights", "no-tokenizer", "mismatch", "truncated", "vocab", "nan", "exists", "rows"]
)
def test_bad_inputs_leave_nothing(tiny_run, tmp_path, case):
    import torch
    from safetensors.torch import load_file, save_file

    run = _copy_run(tiny_run, tmp_path / "run")
    outdir = tmp_path / "out"
    out = outdir / "new" / "m.gguf"  # a folder export.py creates, and must remove on failure
    type_name, force, expect = "q8_0", False, ""
    if case == "no-weights":
        (run / "final.safetensors").unlink()
        expect = "has no final.safetensors"
    elif case == "no-tokenizer":
        (run / "tokenizer.json").unlink()
        expect = "tokenizer.json is missing"
    elif case == "mismatch":
        cfg = json.loads((run / "config.json").read_text())
        cfg["model"]["n_layer"] = 3
        (run / "config.json").write_text(json.dumps(cfg))
        expect = "does not match"
    elif case == "truncated":
        data = (run / "final.safetensors").read_bytes()
        (run / "final.safetensors").write_bytes(data[: len(data) // 2])
        expect = "truncated"
    elif case == "vocab":
        cfg = json.loads((run / "config.json").read_text())
        cfg["model"]["vocab_size"] += 3  # a padded vocab: llama.cpp would refuse it
        (run / "config.json").write_text(json.dumps(cfg))
        expect = "tokens but the model's vocab_size"
    elif case == "nan":
        sd = load_file(str(run / "final.safetensors"))
        sd["norm.weight"][3] = float("nan")  # the last tensor written: the file is nearly complete
        save_file(sd, str(run / "final.safetensors"))
        expect = "NaN/Inf"
    elif case == "exists":
        out.parent.mkdir(parents=True)
        out.write_bytes(b"keep me")
        expect = "exists; pass --force"
    elif case == "rows":
        type_name, expect = "q4_0", "multiples of 32"
        cfg = json.loads((run / "config.json").read_text())
        sd = load_file(str(run / "final.safetensors"))
        # ffn 768 -> 784 (not a multiple of 32): pad the FFN weights to match the new config
        for k in list(sd):
            if "w1" in k or "w3" in k:
                sd[k] = torch.cat([sd[k], torch.zeros(16, sd[k].shape[1])])
            elif "w2" in k:
                sd[k] = torch.cat([sd[k], torch.zeros(sd[k].shape[0], 16)], dim=1)
        cfg["model"]["ffn_hidden"] = 784
        save_file(sd, str(run / "final.safetensors"))
        (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        _export(str(run), type_name, out, force=force)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg, msg
    if case == "exists":
        assert _leftovers(out.parent) == ["m.gguf"]
    else:
        assert not outdir.exists(), _leftovers(outdir)
    if case == "exists":
        assert out.read_bytes() == b"keep me"


@needs_llama
def test_k_quant_rows_need_256(tiny_run):
    """K-quants need 256-wide rows; the check runs before anything is written."""
    from bulba.export.gguf import check_type
    from bulba.export.source import open_source

    src = open_source(str(tiny_run))
    src.model = dataclasses.replace(src.model, n_embd=320, n_head=5)
    with pytest.raises(UserError, match="multiples of 256.*n_embd=320"):
        check_type("q4_k_m", src)
    check_type("q8_0", src)  # 320 = 10 x 32: fine for q8_0


def test_checkpoint_source(tiny_run, tmp_path):
    """A checkpoint's model.safetensors exports with the run's config and tokenizer two levels up."""
    ckpts = sorted((tiny_run / "checkpoints").glob("step-*/model.safetensors"))
    if not ckpts:
        pytest.skip("no checkpoint in this run (hand-built fixture)")
    res = _export(str(ckpts[-1]), "f16", tmp_path / "ck.gguf", verify=False)
    from bulba.export.gguf import read_back

    assert read_back(res.out)["kv"]["general.name"] == tiny_run.name
