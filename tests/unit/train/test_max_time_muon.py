"""train.max_time (a wall-clock budget) and train.optimizer=muon, on real tiny models and the real
corpus. The budget's clock is the module's `clock` attribute: these tests give it a clock that
advances one second per reading, so "time" and hence the schedule are exact and repeatable."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from bulba.config import load_recipe
from bulba.errors import UserError
from bulba.train.optim import lr_at
from bulba.train.run import Interrupted, train
from support.train_data import TINY, losses_from, run_train


class TickClock:
    """A clock that reads 0, 1, 2, ... seconds: one second per reading. The module reads it once
    when the training loop starts and once per optimizer step, so step k ends at k seconds."""

    def __init__(self):
        self.now = -1.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _recipe(data, out, *extra):
    base = ["train.val_every=0", "train.ckpt_keep=0", "train.warmup_steps=3", "train.lr=3e-3", "train.min_lr=3e-4"]
    return load_recipe("tiny", TINY + base + [f"data.dir={data}", f"out_dir={out}", *extra])


def _hooks(lrs: dict, stop_after: int | None = None):
    """module_hook: the tick clock, the lr of every group after each step, and a stop request
    (what SIGTERM does) after step `stop_after`."""

    def hook(module):
        module.clock = TickClock()

        def after():
            lrs[module.state.step] = [g["lr"] for g in module.raw_optimizer.param_groups]
            if module.state.step == stop_after:
                module.request_stop("SIGTERM")

        module.after_step.append(after)

    return hook


def test_time_schedule_warmup_then_cosine_over_the_fraction_spent():
    t = load_recipe("tiny", ["train.max_time=100", "train.warmup_steps=10", "train.lr=1e-3", "train.min_lr=1e-4"]).train
    assert lr_at(0, t, elapsed_s=0.0) == pytest.approx(1e-4)  # warmup: 1/10 of the lr
    assert lr_at(10, t, elapsed_s=0.0) == pytest.approx(1e-3)
    assert lr_at(10, t, elapsed_s=50.0) == pytest.approx(5.5e-4)  # half the budget: halfway down
    assert lr_at(10_000, t, elapsed_s=100.0) == pytest.approx(1e-4)
    assert lr_at(10, t, elapsed_s=500.0) == pytest.approx(1e-4)  # past the budget: min_lr
    # the step no longer matters after warmup: time does
    assert lr_at(11, t, elapsed_s=30.0) == lr_at(5000, t, elapsed_s=30.0)


def test_max_time_stops_on_time_with_final_weights(train_data, tmp_path):
    out = tmp_path / "run"
    lrs: dict = {}
    # max_steps=3 would end a step-budget run at step 3: a timed run is not cut short by it
    r = _recipe(train_data, out, "train.max_time=10s", "train.max_steps=3", "train.ckpt_every=0")
    s = train(r, enable_tracking=False, module_hook=_hooks(lrs))
    assert s["step"] == 10  # step k ends at k ticks: the budget is spent at step 10
    assert s["val_loss"] is not None and math.isfinite(s["val_loss"])  # the final validation ran
    assert (out / "final.safetensors").is_file()
    state = json.loads((out / "checkpoints" / "step-00000010" / "state.json").read_text())
    assert state["reason"] == "final" and state["train"]["elapsed"] == pytest.approx(10.0)
    # the lr of step k follows the time spent when it was applied (k ticks), not the step
    for step, got in lrs.items():
        # every group (AdamW's two, Muon's with tiny's default optimizer: muon_lr null = lr)
        assert got == pytest.approx([lr_at(step - 1, r.train, elapsed_s=float(step))] * len(got)), step


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_time_budget_and_schedule(train_data, tmp_path, optimizer):
    """Killed at step 5 of a 12 s budget and resumed: the same lr (every group) and the same
    losses at every step as the uninterrupted run, and it ends at the same step."""
    args = ["train.max_time=12s", "train.ckpt_every=4", f"train.optimizer={optimizer}"]
    ref_lrs: dict = {}
    ref = train(_recipe(train_data, tmp_path / "ref", *args), enable_tracking=False, module_hook=_hooks(ref_lrs))
    assert ref["step"] == 12

    out = tmp_path / "run"
    lrs: dict = {}
    with pytest.raises(Interrupted):
        train(_recipe(train_data, out, *args), enable_tracking=False, module_hook=_hooks(lrs, stop_after=5))
    saved = json.loads((out / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert saved["train"]["elapsed"] == pytest.approx(5.0)
    if optimizer == "muon":  # Muon's momentum is in the checkpoint next to AdamW's moments
        opt = load_file(str(out / "checkpoints" / "step-00000005" / "optimizer.safetensors"))
        assert any(k.endswith("momentum_buffer") for k in opt) and any(k.endswith("exp_avg") for k in opt)
        with pytest.raises(UserError, match="train.optimizer=muon"):  # the state would not fit AdamW
            train(_recipe(train_data, out, *args[:-1], "train.optimizer=adamw", "resume=auto"), enable_tracking=False)

    got = train(_recipe(train_data, out, *args, "resume=auto"), enable_tracking=False, module_hook=_hooks(lrs))
    assert got["step"] == 12
    assert sorted(lrs) == sorted(ref_lrs) == list(range(1, 13))
    for step in ref_lrs:
        assert lrs[step] == pytest.approx(ref_lrs[step], rel=1e-12), step
    want, have = losses_from(tmp_path / "ref"), losses_from(out)
    for step in want:
        assert have[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), (step, have[step], want[step])


def test_muon_trains(train_data, tmp_path):
    s = train(
        _recipe(train_data, tmp_path / "run", "train.optimizer=muon", "train.max_steps=30", "train.ckpt_every=0"),
        enable_tracking=False,
    )
    losses = [s["losses"][i] for i in sorted(s["losses"])]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 1.0, losses
    assert s["val_loss"] < losses[0] - 1.0


def test_muon_with_a_real_time_budget_from_the_command_line(train_data, tmp_path):
    """The real clock: a 4-second budget ends the run cleanly with final weights and the time
    spent (at least the budget, not much more: the loop stops at the first step past it)."""
    out = tmp_path / "run"
    p = run_train(
        ["tiny", f"data.dir={train_data}", f"out_dir={out}", "--no-mlflow", *TINY]
        + ["train.max_time=4s", "train.max_steps=1", "train.optimizer=muon", "train.val_every=0", "train.ckpt_every=0"],
        timeout=180,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "final.safetensors").is_file()
    (ckpt,) = (out / "checkpoints").glob("step-*")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["train"]["step"] > 1 and 4.0 <= state["train"]["elapsed"] < 30.0, state["train"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/lr_muon" in r for r in records)


@pytest.mark.parametrize(
    "overrides,expect",
    [
        (["train.max_time=15x"], "train.max_time: cannot read '15x' as a duration"),
        (["train.max_time=0"], "train.max_time must be a positive duration"),
        (["train.optimizer=muon", "train.strategy=fsdp"], "optimizer=muon does not work with train.strategy=fsdp"),
    ],
)
def test_bad_max_time_and_muon_with_fsdp_exit_2_one_line(overrides, expect, tmp_path):
    p = run_train(["tiny", f"out_dir={tmp_path / 'r'}", *overrides], timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], p.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # two processes + gloo rendezvous: ~30-40 s on 2 cores
def test_ddp_ranks_stop_together_on_time_with_muon(train_data, tmp_path):
    """Two gloo ranks, each with its own clock: they agree on the time spent (its mean, reduced
    with the loss), so they step, decay the lr and stop at the same step (a rank that stopped
    alone would leave the other waiting in a collective)."""
    out = tmp_path / "run"
    p = run_train(
        ["tiny", f"data.dir={train_data}", f"out_dir={out}", "--no-mlflow", *TINY]
        + ["train.max_time=6s", "train.optimizer=muon", "train.val_every=0", "train.ckpt_every=0"]
        + ["train.devices=2", "train.strategy=ddp", "train.accelerator=cpu"],
        timeout=400,
    )
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    r0 = json.loads((out / "logs" / "rank-0.json").read_text())
    r1 = json.loads((out / "logs" / "rank-1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["consumed"] == r1["consumed"] > 1
    assert (out / "final.safetensors").is_file()
