"""Training on CPU: loss falls, eager == compile, SIGKILL/SIGTERM resume, DDP shards, NaN policy,
bad input. Tiny shapes (2 layers, ctx 64, batch 4, 1 thread) so the whole file stays short."""

from __future__ import annotations

import json
import math
import signal
import time

import pytest
import torch

from bulba.config import load_recipe
from bulba.errors import UserError
from bulba.train.run import TrainingFault, train
from support.train_data import TINY, losses_from, run_train
from support.train_data import start_train as _start
from support.train_data import wait_for_line as _wait_for

RESUME_ARGS = TINY + ["train.max_steps=6", "train.ckpt_every=2", "train.val_every=0", "train.ckpt_keep=0"]


def _recipe(data, out, *extra):
    return load_recipe("tiny", TINY + [f"data.dir={data}", f"out_dir={out}", *extra])


# --------------------------------------------------------------------------- bad input: exit 2


@pytest.mark.parametrize(
    "override,expect",
    [
        ("train.max_step=3", "did you mean 'train.max_steps'"),
        ("modle.n_layer=2", "did you mean 'model'"),
        ("train.mode=compiled", "did you mean 'compile'"),
        ("train.batch_size=abc", "train.batch_size: expected int"),
        ("model.n_embd=0", "model.n_embd must be positive"),
    ],
)
def test_recipe_errors_exit_2_one_line(override, expect):
    p = run_train(["tiny", override], timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], p.stderr


def test_data_errors_exit_2(train_data, tmp_path):
    p = run_train(["tiny", f"data.dir={tmp_path / 'nope'}", f"out_dir={tmp_path / 'r'}"], timeout=120)
    assert p.returncode == 2 and "prepare.py" in p.stderr, p.stderr
    p = run_train(
        ["tiny", f"data.dir={train_data}", "model.vocab_size=32003", f"out_dir={tmp_path / 'r'}"], timeout=120
    )
    assert p.returncode == 2 and "vocab size mismatch" in p.stderr, p.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_refuses_to_overwrite_a_run(train_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(UserError, match="resume=auto"):
        train(_recipe(train_data, out, "train.max_steps=1"), enable_tracking=False)


# --------------------------------------------------------------------------- learning


def test_tiny_loss_falls(train_data, tmp_path):
    out = tmp_path / "run"
    s = train(
        _recipe(
            train_data,
            out,
            "train.max_steps=40",
            "train.lr=3e-3",
            "train.val_every=0",
            "train.sample_every=20",
            "train.ckpt_every=0",
        ),
        enable_tracking=False,
    )
    losses = [s["losses"][i] for i in sorted(s["losses"])]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 1.0, losses
    assert s["val_loss"] < losses[0] - 1.0
    from safetensors.torch import load_file

    w = load_file(str(out / "final.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "bulba-run" and cfg["version"] == 1
    assert w["tok_embeddings.weight"].shape[0] == cfg["model"]["vocab_size"]
    assert all(v.dtype == torch.float32 for v in w.values())
    assert (out / "tokenizer.json").is_file() and (out / "samples.jsonl").is_file()


@pytest.mark.slow  # Inductor compiles a C++ kernel set: ~30-50 s on 2 cores
def test_eager_and_compile_agree(train_data, tmp_path):
    import torch._dynamo.utils as du

    got, graphs = {}, []

    def count_graphs(module):
        orig = module._optimizer_step

        def step():
            orig()
            graphs.append(du.counters["stats"]["unique_graphs"])

        module._optimizer_step = step

    # The precision users get (train.precision=auto: bf16 where this CPU measures it faster),
    # not a convenient fp32: an fp32-only test hid the compiled bf16 NaN of issue 12.
    precision = None
    for mode in ("eager", "compile"):
        s = train(
            _recipe(
                train_data,
                tmp_path / mode,
                "train.max_steps=3",
                "train.val_every=0",
                "train.val_batches=1",
                "train.ckpt_every=0",
                "model.n_layer=2",
                f"train.mode={mode}",
            ),
            enable_tracking=False,
            module_hook=count_graphs if mode == "compile" else None,
        )
        got[mode] = [s["losses"][i] for i in (1, 2, 3)]
        precision = s["precision"]
    tol = 1e-3 if precision == "32-true" else 1e-2
    for a, b in zip(got["eager"], got["compile"]):
        assert math.isfinite(b) and abs(a - b) < tol * abs(a), got
    # compiled in step 1, no recompilation in steady state (step 3 adds the no-grad
    # validation graph at the end, which is fine)
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs


# --------------------------------------------------------------------------- interruption


@pytest.fixture(scope="module")
def reference(train_data, tmp_path_factory):
    """An uninterrupted run: the losses every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    p = run_train(["tiny", f"data.dir={train_data}", f"out_dir={out}", "--no-mlflow", *RESUME_ARGS])
    assert p.returncode == 0, p.stderr[-2000:]
    return losses_from(out)


def test_sigterm_writes_checkpoint_and_resumes(train_data, tmp_path, reference):
    out = tmp_path / "run"
    args = ["tiny", f"data.dir={train_data}", f"out_dir={out}", "--no-mlflow", *RESUME_ARGS]
    proc = _start(args)
    try:
        _wait_for(proc, "step      3/6")
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, rest
    assert "resume=auto" in rest
    states = [json.loads(p.read_text()) for p in (out / "checkpoints").glob("step-*/state.json")]
    assert any(s["reason"] == "SIGTERM" for s in states), states
    p = run_train(args + ["resume=auto"])
    assert p.returncode == 0, p.stderr[-2000:]
    got = losses_from(out)
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), (step, got, reference)


# --------------------------------------------------------------------------- DDP


@pytest.mark.slow  # two processes + gloo rendezvous: ~30-40 s on 2 cores
def test_ddp_two_processes_gloo_disjoint_shards(train_data, tmp_path):
    out = tmp_path / "run"
    p = run_train(
        [
            "tiny",
            f"data.dir={train_data}",
            f"out_dir={out}",
            "--no-mlflow",
            *TINY,
            "train.max_steps=3",
            "train.val_every=0",
            "train.ckpt_every=0",
            "train.devices=2",
            "train.strategy=ddp",
            "train.accelerator=cpu",
        ],
        timeout=400,
    )
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    r0 = json.loads((out / "logs" / "rank-0.json").read_text())
    r1 = json.loads((out / "logs" / "rank-1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["first_batches_sha256"]) == len(r1["first_batches_sha256"]) == 3
    assert not set(r0["first_batches_sha256"]) & set(r1["first_batches_sha256"])
    assert (out / "final.safetensors").is_file()
    assert all(math.isfinite(v) for v in losses_from(out).values())


# --------------------------------------------------------------------------- numerical faults


def _nan_at(step_to_fault: int):
    def hook(module):
        orig = module._fault_hook

        def fault(loss):
            if module.state.step + 1 == step_to_fault:
                return loss * float("nan")
            return orig(loss)

        module._fault_hook = fault

    return hook


def test_nan_stop_checkpoints_before_fault_and_writes_no_weights(train_data, tmp_path):
    out = tmp_path / "run"
    r = _recipe(
        train_data, out, "train.max_steps=5", "train.val_every=0", "train.ckpt_every=0", "train.nan_policy=stop"
    )
    with pytest.raises(TrainingFault, match="non-finite loss at step 3"):
        train(r, module_hook=_nan_at(3), enable_tracking=False)
    assert not (out / "final.safetensors").exists()
    from bulba.train import checkpoint as ckpt

    last = ckpt.latest_checkpoint(out / "checkpoints")
    state = ckpt.load_checkpoint(last)
    assert state["state"]["train"]["step"] == 2 and state["state"]["reason"] == "fault"
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_skip_skips_the_step_and_finishes(train_data, tmp_path):
    out = tmp_path / "run"
    r = _recipe(
        train_data, out, "train.max_steps=4", "train.val_every=0", "train.ckpt_every=0", "train.nan_policy=skip"
    )
    s = train(r, module_hook=_nan_at(2), enable_tracking=False)
    assert s["nan_skips"] == 1 and s["step"] == 4
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(out / "final.safetensors")).values())


# --------------------------------------------------------------------------- disk full


def test_disk_full_during_checkpoint_keeps_previous(train_data, tmp_path, monkeypatch):
    import errno

    from bulba.train import checkpoint as ckpt

    real = ckpt.save_file

    def full(tensors, filename, metadata=None):
        if "step-00000004" in filename or ".tmp-step-00000004" in filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full)
    out = tmp_path / "run"
    r = _recipe(train_data, out, "train.max_steps=6", "train.val_every=0", "train.ckpt_every=2", "train.ckpt_keep=0")
    # step 4 (an interval checkpoint) fails: a warning, training goes on; step 6 (final) works
    s = train(r, enable_tracking=False)
    assert s["step"] == 6 and (out / "final.safetensors").is_file()
    names = [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")]
    assert names == ["step-00000002", "step-00000006"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    # the final checkpoint failing is an error; the previous checkpoint stays loadable
    out2 = tmp_path / "run2"
    r2 = _recipe(train_data, out2, "train.max_steps=4", "train.val_every=0", "train.ckpt_every=2", "train.ckpt_keep=0")
    with pytest.raises(UserError, match="No space left on device.*step-00000002 is intact"):
        train(r2, enable_tracking=False)
    assert not (out2 / "final.safetensors").exists()
    assert ckpt.load_checkpoint(out2 / "checkpoints" / "step-00000002")["state"]["train"]["step"] == 2


def test_corrupt_checkpoint_on_resume_is_exit_2_and_kept(train_data, tmp_path):
    out = tmp_path / "run"
    train(
        _recipe(train_data, out, "train.max_steps=2", "train.val_every=0", "train.ckpt_every=1", "train.val_batches=1"),
        enable_tracking=False,
    )
    last = out / "checkpoints" / "step-00000002" / "optimizer.safetensors"
    last.write_bytes(last.read_bytes()[:-100])  # torn by something outside our atomic writes
    with pytest.raises(UserError, match="step-00000002 is corrupt.*delete that directory"):
        train(_recipe(train_data, out, "train.max_steps=3", "resume=auto"), enable_tracking=False)
    assert last.exists() and (out / "final.safetensors").exists()  # nothing destroyed
    # the previous checkpoint resumes, but only the same model
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-00000002")
    with pytest.raises(UserError, match=r"the model changed \(n_layer 2 -> 3\)"):
        train(_recipe(train_data, out, "train.max_steps=3", "resume=auto", "model.n_layer=3"), enable_tracking=False)


@pytest.mark.slow  # the tracker waits finish_timeout (30 s) for a server that never comes back
def test_dead_tracking_server_training_finishes_metrics_spooled(train_data, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    t0 = time.time()
    p = run_train(
        [
            "tiny",
            f"data.dir={train_data}",
            f"out_dir={out}",
            *TINY,
            "train.max_steps=3",
            "train.val_every=0",
            "train.ckpt_every=0",
        ],
        {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert time.time() - t0 < 150
    assert (out / "final.safetensors").is_file() and sorted(losses_from(out)) == [1, 2, 3]
    spool = (out / "mlflow_spool.jsonl").read_text()
    assert "train/loss" in spool and "bulba.tracking sync" in p.stderr
