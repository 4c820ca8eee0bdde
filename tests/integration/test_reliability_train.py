"""train.py under bad data and bad sizes (issue 7): corrupted token files, data prepared with
another tokenizer, a ctx_len longer than the data or the machine can hold, zero/negative
sizes, a pickle given where a recipe goes. Each: exit 2, one line on stderr, no traceback,
and nothing created or changed (no half-made run directory, the checkpoint and the run's
tokenizer untouched). Subprocess runs of the real train.py; a small dataset (~300k tokens)
built once per module with the contract's on-disk format.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bulba.errors import UserError  # noqa: E402
from support.cli import assert_one_line_exit_2
from support.train_data import TINY, build_dataset, run_train  # noqa: E402

FAST = TINY + [
    "model.n_layer=1",
    "train.batch_size=2",
    "train.val_every=0",
    "train.val_batches=1",
    "train.ckpt_every=1",
    "train.ckpt_keep=0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("rel-train") / "data")


def tree_digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------- corrupted token files


def _corrupt(d: Path, case: str) -> str:
    if case == "truncated-bin":
        b = (d / "train.bin").read_bytes()
        (d / "train.bin").write_bytes(b[: len(b) // 2 + 1])  # odd size, and fewer tokens than meta says
        return "train.bin"
    if case == "token-past-vocab":
        a = np.fromfile(d / "train.bin", dtype="<u2")
        a[5] = 60000  # inside the first block, which the loader checks when it opens the file
        a.tofile(d / "train.bin")
        return "token id 60000"
    if case == "index-not-increasing":
        ix = np.fromfile(d / "val.idx", dtype="<u8")
        ix[3], ix[4] = ix[4], ix[3]
        ix.tofile(d / "val.idx")
        return "val.idx"
    if case == "bin-replaced-by-other-dataset":  # sizes no longer match meta.json
        a = np.fromfile(d / "train.bin", dtype="<u2")
        a[: len(a) // 3].tofile(d / "train.bin")
        return "train.bin"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "truncated-bin",
        *(
            pytest.param(c, marks=pytest.mark.slow)
            for c in ("token-past-vocab", "index-not-increasing", "bin-replaced-by-other-dataset")
        ),
    ],
)
def test_corrupted_token_files_exit_2_before_the_run_exists(data, tmp_path, case):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    needle = _corrupt(bad, case)
    before = tree_digest(bad)
    out = tmp_path / "run"
    p = run_train(["tiny", "--no-mlflow", f"data.dir={bad}", f"out_dir={out}", *FAST, "train.max_steps=2"], timeout=180)
    assert_one_line_exit_2(p, needle)
    assert not out.exists()  # no half-made run directory that would block the next attempt
    assert tree_digest(bad) == before  # the data is only read


# --------------------------------------------------------------------------- another tokenizer


@pytest.mark.slow  # trains 2 steps first (~10 s)
def test_resume_with_data_of_another_tokenizer_is_refused(data, tmp_path):
    from bulba.config import load_recipe
    from bulba.train.run import train

    out = tmp_path / "run"
    train(
        load_recipe("tiny", [f"data.dir={data}", f"out_dir={out}", *FAST, "train.max_steps=2"]), enable_tracking=False
    )
    before = tree_digest(out)
    # Same vocabulary size, other ids: two tokens swapped (what a re-trained tokenizer looks like).
    other = tmp_path / "other"
    shutil.copytree(data, other)
    tj = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    p = run_train(
        ["tiny", "--no-mlflow", f"data.dir={other}", f"out_dir={out}", *FAST, "train.max_steps=4", "resume=auto"],
        timeout=180,
    )
    assert_one_line_exit_2(p, "another tokenizer", "step-00000002")
    after = tree_digest(out)
    assert {k: v for k, v in after.items() if k != "metrics.jsonl"} == {
        k: v for k, v in before.items() if k != "metrics.jsonl"
    }  # checkpoints, tokenizer.json, weights
    # a vocabulary of another size changes the model: refused as well (in-process, same check)
    with pytest.raises(UserError, match="vocab size mismatch|the model changed"):
        train(
            load_recipe(
                "tiny",
                [
                    f"data.dir={data}",
                    f"out_dir={out}",
                    *FAST,
                    "train.max_steps=4",
                    "resume=auto",
                    "model.vocab_size=2000",
                ],
            ),
            enable_tracking=False,
        )
    # and so does a longer context than the checkpoint's model
    with pytest.raises(UserError, match=r"the model changed \(ctx_len 64 -> 128\)"):
        train(
            load_recipe(
                "tiny",
                [f"data.dir={data}", f"out_dir={out}", *FAST, "train.max_steps=4", "resume=auto", "model.ctx_len=128"],
            ),
            enable_tracking=False,
        )
    assert tree_digest(out) == after


# --------------------------------------------------------------------------- ctx too long


@pytest.mark.parametrize(
    "override,needle",
    [
        # stream windows of ctx+1 tokens: more than the ~300k-token train split holds
        (["data.sampler=stream", "model.ctx_len=400000"], "fewer than one batch"),
        # fits the data (packed) but not the machine: [B, H, T, T] attention scores on CPU
        (["data.sampler=packed", "model.ctx_len=200000", "train.accelerator=cpu"], "longer than this machine"),
        (["data.sampler=bucketed", "data.buckets=[64,128]"], "longer than model.ctx_len"),
        # a typo'd size that no machine here holds: refused instead of an OOM kill
        pytest.param(["model.n_layer=100000", "train.accelerator=cpu"], "parameters", marks=pytest.mark.slow),
    ],
)
def test_ctx_longer_than_data_or_machine_exit_2(data, tmp_path, override, needle):
    out = tmp_path / "run"
    p = run_train(
        ["tiny", "--no-mlflow", f"data.dir={data}", f"out_dir={out}", *FAST, "train.max_steps=2", *override],
        timeout=180,
    )
    assert_one_line_exit_2(p, needle)
    assert not out.exists()


# --------------------------------------------------------------------------- zero / negative sizes


@pytest.mark.parametrize(
    "override",
    [
        "model.n_layer=0",
        "model.n_embd=-256",
        "model.n_head=0",
        "model.n_kv_head=-1",
        "model.ffn_hidden=0",
        "model.ctx_len=0",
        "model.ctx_len=-64",
        "model.vocab_size=0",
        "model.vocab_size=-5",
        "model.rope_theta=0",
        "model.norm_eps=-1e-5",
        "train.batch_size=0",
        "train.batch_size=-4",
        "train.grad_accum=0",
        "train.max_steps=0",
        "train.max_steps=-1",
        "train.max_tokens=0",
        "train.val_batches=0",
        "train.log_every=0",
        "train.warmup_steps=-1",
        "train.ckpt_every=-1",
        "train.ckpt_keep=-1",
        "train.sample_tokens=-1",
        "train.threads=-2",
        "train.lr=0",
        "train.lr=-0.1",
        "train.min_lr=-1",
        "train.grad_clip=-1",
        "train.nan_max_skips=0",
        "data.prefetch=0",
        "data.buckets=[]",
        "data.buckets=[0,128]",
        "data.buckets=[-128]",
        "train.lr=.nan",
        "train.devices=0",
        "train.devices=-1",
        "train.devices=[]",
        "train.devices=[-1]",
        "train.devices=gpu",
        "train.num_nodes=0",
    ],
)
def test_zero_and_negative_sizes_exit_2(override, tmp_path, data):
    out = tmp_path / "run"
    p = run_train(
        ["tiny", "--no-mlflow", f"data.dir={data}", f"out_dir={out}", "train.max_steps=2", override], timeout=180
    )
    assert_one_line_exit_2(p)
    assert not out.exists()


# --------------------------------------------------------------------------- a pickle as the recipe


def test_ckpt_pickle_given_as_recipe_is_not_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ck = tmp_path / "model.ckpt"
    ck.write_bytes(pickle.dumps({"state_dict": Evil()}))
    p = run_train([str(ck), "--no-mlflow", f"out_dir={tmp_path / 'run'}"], timeout=120)
    assert_one_line_exit_2(p, "model.ckpt")
    assert not marker.exists() and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- full disk under metrics.jsonl


def test_metrics_log_on_a_full_disk_warns_once_and_goes_on(capsys):
    """/dev/full: every write fails with ENOSPC (a real device, no mock)."""
    from bulba.train.run_dir import Tracker

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    t = Tracker(False, Path("/dev/full"))
    for step in range(1, 4):
        t.metrics({"train/loss": 1.0}, step)
    t.end()
    err = capsys.readouterr().err
    assert err.count("warning: cannot write /dev/full (No space left on device)") == 1, err


# --------------------------------------------------------------------------- missing files


@pytest.mark.parametrize(
    "missing",
    [
        "recipe",
        pytest.param("tokenizer.json", marks=pytest.mark.slow),
        pytest.param("val.idx", marks=pytest.mark.slow),
        pytest.param("meta.json", marks=pytest.mark.slow),
    ],
)
def test_missing_files_exit_2(data, tmp_path, missing):
    d = tmp_path / "data"
    shutil.copytree(data, d)
    recipe = "tiny"
    if missing == "recipe":
        recipe, needle = str(tmp_path / "nope.yaml"), "not found"
    else:
        (d / missing).unlink()
        needle = missing
    out = tmp_path / "run"
    p = run_train([recipe, "--no-mlflow", f"data.dir={d}", f"out_dir={out}", *FAST, "train.max_steps=2"], timeout=180)
    assert_one_line_exit_2(p, needle)
    assert not out.exists()


@pytest.mark.slow  # ~10 s, like the other train.py start-up checks
def test_val_split_too_small_fails_at_start_not_after_training(data, tmp_path):
    """`prepare.py --val-fraction 0` (or a tiny val split): the final evaluation could never run.
    It used to fail after the last step, before the final checkpoint and weights were written
    (losing the work since the last interval checkpoint); now it is exit 2 before step 1."""
    d = tmp_path / "data"
    shutil.copytree(data, d)
    (d / "val.bin").write_bytes(b"")
    np.zeros(1, dtype="<u8").tofile(d / "val.idx")
    meta = json.loads((d / "meta.json").read_text())
    meta["splits"]["val"] = {"tokens": 0, "documents": 0, "sha256": "e3b0"}
    (d / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    p = run_train(["tiny", "--no-mlflow", f"data.dir={d}", f"out_dir={out}", *FAST, "train.max_steps=2"], timeout=180)
    assert_one_line_exit_2(p, "val.bin")
    assert not out.exists() and "step      1/" not in p.stdout
