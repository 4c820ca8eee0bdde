"""export.py under faults (issue 7): a SIGKILL while the GGUF is being written and a full disk
leave the previous GGUF byte-for-byte intact; corrupted GGUF files and unsafe names are
one-line errors (exit 2 for the scripts), never a crash.

The run directories here hold random (untrained) weights in the contract's format: writing,
killing and reading GGUF does not need a trained model. No MLflow, no mocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bulba.errors import UserError  # noqa: E402
from support.cli import assert_one_line_exit_2
from support.paths import REPO

TEXT = (
    "Зубр жыве ў Белавежскай пушчы. Аист вьёт гнездо на крыше. The stork builds a nest. def main():\n    return 42\n"
) * 40


def make_run(out: Path, n_layer=2, n_embd=256, ffn=768, vocab=300) -> Path:
    import torch

    from bulba.config import ModelConfig
    from bulba.data.tokenizer import train_tokenizer
    from bulba.model.llama import Llama
    from bulba.train.run_dir import write_weights_run

    tok = train_tokenizer(TEXT.splitlines(), vocab_size=vocab)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=4,
        n_kv_head=2,
        ffn_hidden=ffn,
        ctx_len=128,
    )
    torch.manual_seed(0)
    model = Llama(cfg)
    return write_weights_run(out, cfg, tok, model.state_dict(), recipe_name="rel", dataset_digest="test")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("rel-export") / "run")


def export_cli(*args, cwd: Path, fsize: int | None = None, popen=False):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "export.py"), *map(str, args)]
    kw = dict(cwd=cwd, env=env, preexec_fn=limit if fsize else None)
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- torn write


# ~100 MB of weights so that the kill lands mid-write (~4 s)
def test_sigkill_during_export_keeps_previous_gguf(tmp_path):
    from bulba.export.gguf import read_back

    run = make_run(tmp_path / "big", n_layer=6, n_embd=512, ffn=1536)
    outdir = tmp_path / "models"
    out = outdir / "m.gguf"
    r = export_cli(run, "--type", "f16", "--out", out, "--no-verify", "--no-mlflow", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    before = sha(out)
    p = export_cli(
        run, "--type", "q8_0", "--out", out, "--no-verify", "--no-mlflow", "--force", cwd=tmp_path, popen=True
    )
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        tmps = [x for x in outdir.iterdir() if x.name.startswith(".tmp-")]
        if tmps and tmps[0].stat().st_size > 1_000_000:  # the new file is being written
            killed_at = tmps[0].stat().st_size
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    p.wait(timeout=60)
    assert killed_at is not None, "export finished before it could be killed mid-write"
    assert p.returncode == -signal.SIGKILL
    assert sha(out) == before  # the previous GGUF, byte for byte
    assert read_back(out)["kv"]["general.file_type"] == 1  # MOSTLY_F16, and it parses
    # only a .tmp- file (which nothing treats as a model) is left; the next export succeeds
    assert sorted(x.name for x in outdir.iterdir() if not x.name.startswith(".tmp-")) == ["m.Modelfile", "m.gguf"]
    r = export_cli(run, "--type", "q8_0", "--out", out, "--no-verify", "--no-mlflow", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_back(out)["kv"]["general.file_type"] == 7  # MOSTLY_Q8_0


# --------------------------------------------------------------------------- disk full


def test_disk_full_during_export_keeps_previous_gguf(small_run, tmp_path):
    out = tmp_path / "models" / "m.gguf"
    r = export_cli(small_run, "--type", "q8_0", "--out", out, "--no-verify", "--no-mlflow", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    before = sha(out)
    # f32 is ~6 MB: a 2 MB file size limit makes the write fail with EFBIG
    r = export_cli(
        small_run, "--type", "f32", "--out", out, "--no-verify", "--no-mlflow", "--force", cwd=tmp_path, fsize=2_000_000
    )
    assert_one_line_exit_2(r, "cannot write", "m.gguf", "unchanged")
    assert sha(out) == before
    assert sorted(x.name for x in out.parent.iterdir()) == ["m.Modelfile", "m.gguf"]  # no temp file left
    # a first export that cannot be written leaves no file and no folder
    fresh = tmp_path / "fresh" / "n.gguf"
    r = export_cli(
        small_run, "--type", "f32", "--out", fresh, "--no-verify", "--no-mlflow", cwd=tmp_path, fsize=2_000_000
    )
    assert_one_line_exit_2(r, "nothing was written")
    assert not fresh.parent.exists()


# --------------------------------------------------------------------------- corrupted GGUF


@pytest.fixture(scope="module")
def good_gguf(small_run, tmp_path_factory) -> Path:
    from bulba.export.pipeline import export

    out = tmp_path_factory.mktemp("gguf") / "good.gguf"
    export(str(small_run), "q8_0", out, verify=False, mlflow=False, quiet=True)
    return out


def corruptions(good: bytes) -> dict[str, bytes]:
    import random

    rnd = random.Random(7)
    flipped = bytearray(good)
    for i in rnd.sample(range(8, min(len(good), 4096)), 64):  # header, key/value and tensor-info area
        flipped[i] ^= 0xFF
    return {
        "empty": b"",
        "garbage": bytes(rnd.getrandbits(8) for _ in range(4096)),
        "bad-magic": b"GGUX" + good[4:],
        "truncated-header": good[:100],
        "truncated-data": good[: len(good) // 2],
        "huge-counts": good[:8] + (2**63 - 1).to_bytes(8, "little") * 2 + good[24:],
        "bit-flips": bytes(flipped),
    }


def test_export_refuses_a_gguf_or_ckpt_as_source(good_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(1000))
    for src in (good_gguf, bad):
        r = export_cli(
            src, "--type", "f16", "--out", tmp_path / "o" / "x.gguf", "--no-mlflow", "--no-verify", cwd=tmp_path
        )
        assert_one_line_exit_2(r, "is not a .safetensors file")
    ckpt = tmp_path / "model.ckpt"
    import torch

    torch.save({"x": torch.zeros(2)}, ckpt)  # a pickle: must never be unpickled
    r = export_cli(
        ckpt, "--type", "f16", "--out", tmp_path / "o" / "x.gguf", "--no-mlflow", "--no-verify", cwd=tmp_path
    )
    assert_one_line_exit_2(r, "model.ckpt", "is not a .safetensors file")
    assert not (tmp_path / "o").exists()


def test_corrupted_gguf_read_back_is_a_user_error(good_gguf, tmp_path):
    from bulba.export.gguf import read_back

    assert read_back(good_gguf)["kv"]["general.architecture"] == "llama"
    for name, data in corruptions(good_gguf.read_bytes()).items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        try:
            read_back(p)  # a flip in a value (not a length) may still parse: that is fine
        except UserError as e:
            assert "\n" not in str(e) and str(p) in str(e), (name, str(e))
    with pytest.raises(UserError, match="does not exist"):
        read_back(tmp_path / "nope.gguf")


_LOAD_SCRIPT = """
import sys
from bulba.errors import run_cli
def main(argv):
    from bulba.export.llamacpp import LlamaCpp
    from bulba.export.pyfunc import GGUFModel
    class Ctx:
        artifacts = {"gguf": sys.argv[1]}
    m = GGUFModel()
    m.load_context(Ctx())          # what mlflow.pyfunc.load_model runs for a registered version
    with LlamaCpp(sys.argv[1], n_ctx=64) as llm:
        print("loaded", llm.n_vocab)
run_cli(main)
"""


# one llama.cpp process per corrupted file (~1-2 s each)
def test_corrupted_gguf_in_llama_cpp_and_registry_pyfunc_is_exit_2(good_gguf, tmp_path):
    from bulba.export.llamacpp import llama_cpp_available

    if not llama_cpp_available():
        pytest.skip("llama-cpp-python not installed")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(good_gguf)], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr[-2000:]
    for name, data in corruptions(good_gguf.read_bytes()).items():
        if name == "bit-flips":
            continue  # flips in values can load fine; flips in lengths are covered by the others
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        r = subprocess.run(
            [sys.executable, "-c", _LOAD_SCRIPT, str(p)], capture_output=True, text=True, env=env, timeout=120
        )
        assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])  # not a crash (negative rc)
        err = r.stderr.strip().splitlines()
        assert "Traceback" not in r.stderr and err[-1].startswith("error: ") and str(p) in err[-1], (name, r.stderr)


# --------------------------------------------------------------------------- names that are paths


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/abs/path", "..", ".hidden", "a\\b", "x\ny"])
def test_register_name_cannot_escape_output_models(small_run, tmp_path, name):
    out = tmp_path / "x.gguf"
    r = export_cli(small_run, "--type", "f16", "--out", out, "--register", name, "--no-verify", cwd=tmp_path)
    assert_one_line_exit_2(r, "--register")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere
    from bulba.export.registry import place_in_output_models

    f = tmp_path / "f.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(UserError, match="outside"):
        place_in_output_models(f, "../../evil", "f16", root=tmp_path / "root")
    assert not (tmp_path / "evil-f16.gguf").exists() and not (tmp_path.parent / "evil-f16.gguf").exists()


# --------------------------------------------------------------------------- fuzz: what export reads


def _json_values():
    from hypothesis import strategies as st

    return st.recursive(
        st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=6),
        lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=5), x, max_size=3),
        max_leaves=5,
    )


def _set_path(obj, path: list, value):
    for k in path[:-1]:
        if isinstance(obj, dict) and k in obj:
            obj = obj[k]
        elif isinstance(obj, list) and isinstance(k, int) and -len(obj) <= k < len(obj):
            obj = obj[k]
        else:
            return
    if isinstance(obj, dict):
        obj[path[-1]] = value
    elif isinstance(obj, list) and isinstance(path[-1], int) and -len(obj) <= path[-1] < len(obj):
        obj[path[-1]] = value


def test_export_source_fuzz(small_run, tmp_path_factory):
    """config.json, tokenizer.json and the safetensors header, mutated: open_source gives a valid
    Source or a one-line UserError, never another exception (hypothesis)."""
    import shutil

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from bulba.export.source import open_source

    paths = st.sampled_from(
        [
            ["model"],
            ["model", "vocab_size"],
            ["model", "n_layer"],
            ["model", "n_embd"],
            ["model", "tie_embeddings"],
            ["tokenizer"],
            ["tokenizer", "bos_id"],
            ["tokenizer", "eos_id"],
            ["tokenizer", "pad_id"],
            ["recipe"],
            ["format"],
            ["mlflow_run_id"],
        ]
    )
    tok_paths = st.sampled_from(
        [
            ["model"],
            ["model", "type"],
            ["model", "vocab"],
            ["model", "merges"],
            ["model", "vocab", "a"],
            ["added_tokens"],
            ["added_tokens", 0],
            ["added_tokens", 0, "id"],
            ["added_tokens", 0, "content"],
            ["pre_tokenizer"],
            ["pre_tokenizer", "pretokenizers"],
            ["pre_tokenizer", "pretokenizers", 0],
        ]
    )
    edit = st.one_of(
        st.tuples(st.just("config.json"), paths, _json_values()),
        st.tuples(st.just("tokenizer.json"), tok_paths, _json_values()),
        st.tuples(st.just("final.safetensors"), st.integers(0, 1500), st.binary(min_size=1, max_size=16)),
    )
    work = tmp_path_factory.mktemp("fuzz-src")

    @settings(
        max_examples=int(os.environ.get("BULBA_FUZZ_EXAMPLES", "150")),
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(edits=st.lists(edit, min_size=1, max_size=3))
    def check(edits):
        d = work / "run"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(small_run, d)
        for f, where, what in edits:
            p = d / f
            if f.endswith(".json"):
                obj = json.loads(p.read_text(encoding="utf-8"))
                _set_path(obj, where, what)
                p.write_text(json.dumps(obj), encoding="utf-8")
            else:
                b = bytearray(p.read_bytes())
                b[where : where + len(what)] = what
                p.write_bytes(bytes(b))
        try:
            src = open_source(str(d))
        except UserError as e:
            assert "\n" not in " ".join(str(e).split())
            return
        assert src.model.vocab_size == len(src.tokenizer.tokens)

    check()


@pytest.mark.parametrize("case", ["n_layer-huge", "token-id-huge", "token-id-inf"])
def test_absurd_numbers_in_run_files_are_errors_not_oom(small_run, tmp_path, case):
    """Found by the fuzz above: a config.json with n_layer=10**12 or a token id of 2**60 made
    open_source list 10**12 names / a 2**60-element set (OOM kill); now a one-line error."""
    import shutil

    from bulba.export.source import open_source

    d = tmp_path / "run"
    shutil.copytree(small_run, d)
    if case == "n_layer-huge":
        cfg = json.loads((d / "config.json").read_text())
        cfg["model"]["n_layer"] = 10**12
        (d / "config.json").write_text(json.dumps(cfg))
    else:
        tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        tj["model"]["vocab"]["a"] = 2**60 if case == "token-id-huge" else float("inf")
        (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(UserError) as e:
        open_source(str(d))
    assert "\n" not in str(e.value)


def test_pyfunc_asked_for_more_than_the_context_stays_inside_it(good_gguf):
    """The registered model's predict() with max_tokens beyond the GGUF's context_length (and a
    prompt longer than it): clamped to the context, no llama.cpp error or crash."""
    from bulba.export.llamacpp import llama_cpp_available

    if not llama_cpp_available():
        pytest.skip("llama-cpp-python not installed")
    from bulba.export.pyfunc import GGUFModel

    class Ctx:
        artifacts = {"gguf": str(good_gguf)}

    m = GGUFModel()
    m.load_context(Ctx())
    assert m.ctx_len == 128
    out = m.predict(None, ["Зубр " * 400, "x"], {"max_tokens": 1000})
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    with pytest.raises(ValueError, match="max_tokens"):
        m.predict(None, ["x"], {"max_tokens": "many"})


def test_dead_tracking_server_export_still_writes_and_register_fails_early(small_run, tmp_path):
    """A tracking server that is down: a plain export writes the GGUF and warns; --register
    (which needs the server) is exit 2 before anything is written."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    out = tmp_path / "m.gguf"
    run = [sys.executable, str(REPO / "export.py"), str(small_run), "--type", "f16", "--out", str(out), "--no-verify"]
    r = subprocess.run(
        [*run, "--register", "bulba-x"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert_one_line_exit_2(r, "not reachable")
    assert list(tmp_path.iterdir()) == []
    t0 = time.time()
    r = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning:" in r.stderr and "not reachable" in r.stderr and out.is_file()
    assert time.time() - t0 < 60  # no minutes of MLflow retries
