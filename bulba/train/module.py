"""The LightningModule: one optimizer step per `grad_accum` micro-batches, manual optimization.

Manual optimization because we need, per step and in this order: the gradient norm (logged,
clipped), a NaN/Inf verdict shared by all ranks before the weights move (skip or stop,
train.nan_policy), the lr of our warmup + cosine schedule (a pure function of the step, or of the
step and the training time spent with train.max_time, so a resumed run follows the exact same
curve), and a step boundary at which checkpoints are consistent. Lightning still owns devices,
precision (autocast), the DDP/FSDP wrapping (through bulba.train.strategy) and process launch.

Every counter that resume needs lives in `TrainState` and goes into the checkpoint; the
batch position in particular is counted here (micro-batches consumed), not taken from the
iterator, because Lightning fetches one batch ahead.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

import lightning as L
import torch

from bulba.config import Recipe
from bulba.data.chat import chat_prompt
from bulba.data.loader import document_layout
from bulba.data.tokenizer import EOT
from bulba.memory import rss_mb
from bulba.model import flops
from bulba.model.llama import Llama
from bulba.train.optim import Optimizers, lr_at, make_optimizer, planned_steps
from bulba.train.progress import Progress, say
from bulba.train.val_sources import SourceBpb, token_nll


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed: int = 0  # micro-batches consumed at the last step boundary (per rank)
    tokens: int = 0  # labelled tokens seen, all ranks
    nan_skips: int = 0
    nan_streak: int = 0
    best_val: float | None = None
    # Training time counted toward train.max_time, seconds: the training loop's wall time (the
    # steps with torch.compile's compiles in the first ones, validation, samples, checkpoints),
    # not the setup before it (data checks, model build, MLflow). Saved in checkpoints, so a
    # resumed run continues the budget and the schedule where the killed one stood.
    elapsed: float = 0.0


@dataclass
class Outcome:
    """How fit ended; read by bulba.train.run after trainer.fit returns."""

    reason: str = "running"  # done | max_tokens | max_time | signal | fault
    signal: str | None = None
    fault: str | None = None
    last_val: float | None = None
    samples: list = field(default_factory=list)
    checkpointed: bool = False  # the checkpoint for this ending was written (inside fit)
    checkpoint: object = None  # its path (global rank 0)


class BulbaModule(L.LightningModule):
    def __init__(
        self,
        recipe: Recipe,
        *,
        attention: str = "sdpa",
        batches_factory=None,
        sink=None,
        tokenizer=None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        checkpointer=None,
        progress: bool = False,
        val_sources: SourceBpb | None = None,
        chat: bool = False,
    ):
        super().__init__()
        self.recipe = recipe
        self.model = Llama(recipe.model, attention)  # the backend preflight chose for this machine
        self.automatic_optimization = False
        self.state = TrainState()
        self.outcome = Outcome()
        self._batches_factory = batches_factory  # (split, rank, world, start) -> iterable of torch batches
        self._sink = sink  # metrics sink on global rank 0: sink(dict, step)
        self._tokenizer = tokenizer
        self._bos, self._eos = bos_id, eos_id
        self._chat = chat  # chat data: samples are replies to the prompts as user turns
        self._checkpointer = checkpointer  # (module, reason) -> None, called on every rank
        self._pending_optimizer: dict | None = None
        self._stop_request: str | None = None  # set from signal handlers; acted on at step boundaries
        self._micro = 0
        self._step_tokens = 0
        self._loss_acc = None
        self._t_last = None
        self._window = {"tokens": 0, "pad": 0, "cells": 0, "steps": 0, "t0": None}
        self.fingerprints: list[str] = []  # sha256 of the first input_ids seen (data-shard checks)
        self.losses: dict[int, float] = {}
        self.final_eval = True  # validate and sample at the last step (benchmark() turns it off)
        self.raw_optimizer: Optimizers | None = None  # the unwrapped optimizers (checkpoints)
        # The time source of train.max_time: read once when the training loop starts and once per
        # optimizer step, so a test can drive the schedule deterministically with its own clock.
        self.clock = time.monotonic
        self._clock_last: float | None = None
        self.resumed_world_size: int | None = None
        self.after_step: list = []  # callables run after each optimizer step (benchmark timing)
        self.show_progress = progress  # bar / ETA on global rank 0 (training runs, not benchmarks)
        self._progress: Progress | None = None
        self._val_sources = val_sources  # val/<lang>/bpb and val/bpb (None: data without the counts)
        self.val_bpb: dict[str, float] = {}  # the last validation's

    # ------------------------------------------------------------------ control from outside fit

    @property
    def fit_trainer(self):
        """The Lightning Trainer while attached, else None (Lightning's `trainer` raises then)."""
        return self._trainer

    def restore(self, model_sd: dict, optimizer_sd: dict | None, train_state: dict, world_size: int | None) -> None:
        """Continue from a checkpoint: weights now, optimizer state once configure_optimizers runs."""
        self.model.load_state_dict(model_sd)
        self._pending_optimizer = optimizer_sd
        self.resumed_world_size = world_size
        for k, v in train_state.items():
            setattr(self.state, k, v)

    def request_stop(self, reason: str) -> bool:
        """Stop at the next step boundary with a checkpoint (signal handlers); True if a stop was
        already requested (a second Ctrl-C stops at once)."""
        again = self._stop_request is not None
        self._stop_request = reason
        return again

    def checkpoint(self, reason: str):
        """Write a checkpoint now (outside fit: Lightning's own SIGTERM path); its path on rank 0."""
        return self._checkpointer(self, reason)

    # ------------------------------------------------------------------ setup

    def train_dataloader(self):
        # Built here, after launch, when the rank and world size are final. Not a DataLoader:
        # the Rust engine's iterable, started at the micro-batch the last checkpoint consumed.
        saved = self.resumed_world_size
        if saved is not None and saved != self.trainer.world_size and self.global_rank == 0:
            print(
                f"warning: resuming a run checkpointed with {saved} processes on {self.trainer.world_size}: "
                "training continues, but the data order differs from an uninterrupted run",
                flush=True,
            )
        return self._batches_factory("train", self.global_rank, self.trainer.world_size, self.state.consumed)

    def configure_optimizers(self):
        opt = make_optimizer(self.model, self.recipe.train, self._pending_optimizer)
        self._pending_optimizer = None
        self.raw_optimizer = opt
        return list(opt.optimizers.values())  # Lightning steps each (precision plugin, hooks)

    def on_fit_start(self):
        if self.show_progress and self.global_rank == 0:
            t = self.recipe.train
            self._progress = Progress(
                t.max_steps,
                self.state.step,
                max_tokens=t.max_tokens,
                start_tokens=self.state.tokens,
                max_time=t.max_time_s,
                start_elapsed=self.state.elapsed,
            )
        self._t_last = time.perf_counter()
        self._window["t0"] = self._t_last
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_start(self):
        self._clock_last = self.clock()  # train.max_time counts from here

    # ------------------------------------------------------------------ helpers

    def _ddp_module(self):
        m = self.trainer.strategy.model
        return m if isinstance(m, torch.nn.parallel.DistributedDataParallel) else None

    def _forward_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over labelled tokens, number of labelled tokens) for one micro-batch."""
        h, labels = self._hidden(batch)
        loss_sum = self.model.loss_sum(h, labels)
        n = (labels != -100).sum()
        return loss_sum / n.clamp(min=1), n

    def _hidden(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden states, labels) of one micro-batch."""
        ids = batch["input_ids"].long()
        labels = batch["labels"].long()
        # Stream batches come without cu_seqlens (trainer): one causal sequence per row, positions
        # 0..T-1. Packed/bucketed rows hold several documents: positions restart and attention
        # is masked per document, both derived from cu_seqlens here, on the device; the model
        # builds its attention mask from them once per batch.
        pos = seq_ids = cu = None
        if batch.get("cu_seqlens") is not None:
            cu = batch["cu_seqlens"]
            pos, seq_ids = document_layout(cu, *ids.shape)
        return self.model.hidden(ids, position_ids=pos, seq_ids=seq_ids, cu_seqlens=cu), labels

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    # ------------------------------------------------------------------ the step

    def teardown(self, stage: str) -> None:
        # Always reached (also after a fault or an interruption): the bar gives the terminal back.
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def on_train_batch_start(self, batch, batch_idx):
        # DDP: all-reduce gradients only on the last micro-batch of a step (no_sync must be
        # in effect before DDP's forward, which is why this is here and not in training_step).
        ddp = self._ddp_module()
        if ddp is not None:
            ddp.require_backward_grad_sync = self._micro == self.recipe.train.grad_accum - 1

    def training_step(self, batch, batch_idx):
        t = self.recipe.train
        if len(self.fingerprints) < 8:
            self.fingerprints.append(hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:16])
        loss, _ = self._forward_loss(batch)
        loss = self._fault_hook(loss)
        self.manual_backward(loss / t.grad_accum)
        det = loss.detach()
        self._loss_acc = det if self._loss_acc is None else self._loss_acc + det
        self._step_tokens += batch["n_tokens"]
        w = self._window
        w["tokens"] += batch["n_tokens"]
        w["pad"] += batch["n_pad"]
        w["cells"] += batch["input_ids"].numel()
        self._micro += 1
        if self._micro < t.grad_accum:
            return None
        self._micro = 0
        self._optimizer_step()
        for hook in self.after_step:
            hook()
        return None

    def _fault_hook(self, loss: torch.Tensor) -> torch.Tensor:
        """Identity; tests replace it to inject a NaN at a chosen step."""
        return loss

    def _optimizer_step(self):
        t = self.recipe.train
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        st = self.state
        now = self.clock()
        elapsed = st.elapsed + (now - (self._clock_last if self._clock_last is not None else now))
        self._clock_last = now
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if hasattr(self.trainer.strategy.model, "clip_grad_norm_"):  # FSDP: norm over all shards
            grad_norm = self.trainer.strategy.model.clip_grad_norm_(max_norm)
            clip_here = False
        else:
            # Our own clip: the norm first (needed on the host anyway for the NaN verdict),
            # then a multiply by a Python float. torch's clip_grad_norm_ multiplies by a 0-d
            # tensor, which on CPU takes a slow path (~150x slower than by a float, measured).
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            clip_here = True
        loss = self._loss_acc / t.grad_accum
        self._loss_acc = None
        # One host sync per step: the verdict must be known before the weights move. Gradients
        # are all-reduced, so the norm (and hence the verdict) is identical on every rank. The
        # training time rides along: its mean over the ranks is the same number on every rank,
        # so they follow the same lr and stop at the same step when train.max_time is spent.
        one = torch.ones((), dtype=torch.float64, device=loss.device)
        stats = self._all_reduce(torch.stack([loss.detach().double(), one, one * elapsed])).tolist()
        loss_v = stats[0] / stats[1]
        st.elapsed = stats[2] / stats[1]
        lr = lr_at(st.step, t, planned_steps(self.recipe, self.trainer.world_size), st.elapsed)
        lrs = self.raw_optimizer.set_lr_scale(lr / t.lr)
        gn = float(grad_norm)
        finite = math.isfinite(gn) and math.isfinite(loss_v)
        if finite:
            if clip_here and gn > max_norm:
                torch._foreach_mul_(grads, max_norm / (gn + 1e-6))
            for opt in opts:
                opt.step()
            st.nan_streak = 0
        else:
            st.nan_skips += 1
            st.nan_streak += 1
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        step = st.step + 1
        if not finite:
            self._step_tokens = 0
        world = self.trainer.world_size
        if not finite:
            msg = (
                f"non-finite {'loss' if not math.isfinite(loss_v) else 'gradient norm'} at step {step} "
                f"(loss={loss_v}, grad_norm={gn})"
            )
            if t.nan_policy == "stop" or st.nan_streak >= t.nan_max_skips:
                if t.nan_policy == "skip":
                    msg += f"; {st.nan_streak} non-finite steps in a row (train.nan_max_skips)"
                # The weights are still those of step `st.step` (this update was not applied):
                # the checkpoint written on the way out is from before the fault.
                self.outcome.fault = msg
                self._log({"train/nan_skipped": st.nan_skips}, step)
                self._finish("fault", "fault")
                return
            self._log({"train/nan_skipped": st.nan_skips}, step)
            if self.global_rank == 0:
                say(f"warning: {msg}; update skipped (train.nan_policy=skip)")
        st.step = step
        st.consumed += t.grad_accum
        st.tokens += self._step_tokens * world  # labelled tokens; every rank's shard is alike
        if self._progress is not None:
            self._progress.step(step, loss_v, st.tokens, self._step_tokens * world)
        self._step_tokens = 0
        self.losses[step] = loss_v
        self._maybe_log(step, loss_v, gn, lrs)
        ending = self._budget_spent(step)
        last = ending is not None
        if t.val_every and step % t.val_every == 0 and not last:
            self._validate(step)
        if t.sample_every and step % t.sample_every == 0 and not last:
            self._sample(step)
        if self._checkpointer and t.ckpt_every and step % t.ckpt_every == 0 and not last:
            self._checkpointer(self, "interval")
        if last:
            # The final evaluation and checkpoint happen here, still inside fit: on the training
            # device, under autocast, with the process group alive (after fit Lightning tears
            # down, and FSDP needs every rank to gather the full weights).
            if self.final_eval:
                if t.val_batches:
                    self._validate(step)
                self._sample(step)
            self._finish(ending, "final")

    def _budget_spent(self, step: int) -> str | None:
        """Why training ends after `step` (done | max_time | max_tokens), None to go on. A timed
        run (train.max_time) ends on time, not at train.max_steps; the token budget bounds both."""
        t, st = self.recipe.train, self.state
        budget = t.max_time_s
        if budget is None and step >= t.max_steps:
            return "done"
        if budget is not None and st.elapsed >= budget:
            return "max_time"
        if t.max_tokens is not None and st.tokens >= t.max_tokens:
            return "max_tokens"
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        ddp = self._ddp_module()
        if ddp is not None:
            ddp.require_backward_grad_sync = True
        if self._micro == 0 and self.outcome.reason == "running":
            flag = torch.tensor([1.0 if self._stop_request else 0.0])
            if self.trainer.world_size > 1:  # stop on every rank at the same step
                flag = flag.to(self.device)
                torch.distributed.all_reduce(flag)
            if flag.item() > 0:
                self.outcome.signal = self._stop_request or "signal on another rank"
                self._finish("signal", self.outcome.signal)

    def _finish(self, reason: str, ckpt_reason: str):
        """End training at this step boundary: stop the loop and write the checkpoint (every
        rank takes part, rank 0 writes)."""
        self.outcome.reason = reason
        self.trainer.should_stop = True
        if self._checkpointer is not None:
            self.outcome.checkpoint = self._checkpointer(self, ckpt_reason)
            self.outcome.checkpointed = True

    # ------------------------------------------------------------------ logging

    def _log(self, metrics: dict, step: int):
        if self._sink is not None and self.global_rank == 0:
            self._sink(metrics, step)

    def _maybe_log(self, step: int, loss: float, gn: float, lrs: dict[str, float]):
        t = self.recipe.train
        w = self._window
        w["steps"] += 1
        if step % t.log_every and step != t.max_steps:
            return
        lr = lrs["adamw"]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt = max(now - w["t0"], 1e-9)
        world = self.trainer.world_size
        tok_s = w["cells"] * world / dt  # processed token slots (padding included), all ranks
        seq_len = self.recipe.model.ctx_len
        mfu = flops.mfu(self.recipe.model, tok_s / world, self.device, seq_len, precision=str(self.trainer.precision))
        m = {
            "train/loss": loss,
            "train/lr": lr,
            **({"train/lr_muon": lrs["muon"]} if "muon" in lrs else {}),
            "train/elapsed_s": self.state.elapsed,
            "train/grad_norm": gn,
            "train/tokens_seen": float(self.state.tokens),
            "train/nan_skipped": float(self.state.nan_skips),
            "perf/tokens_per_s": tok_s,
            "perf/mfu": mfu,
            "perf/step_time_s": dt / w["steps"],
            "data/padding_frac": w["pad"] / max(1, w["cells"]),
            "mem/host_rss_mb": rss_mb(),
        }
        if self.device.type == "cuda":
            m["mem/peak_device_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self._log(m, step)
        if self.global_rank == 0:
            eta = ""
            if self._progress is not None:
                self._progress.observe(step, dt / w["steps"])
                eta = self._progress.fields(step, self.state.tokens)
            of = f"/{t.max_steps}" if t.max_time_s is None else ""
            say(
                f"step {step:>6}{of} | loss {loss:.4f} | lr {lr:.2e} | gnorm {gn:.2f} | "
                f"{tok_s:,.0f} tok/s | mfu {100 * mfu:.1f}%{eta}"
            )
        self._window = {"tokens": 0, "pad": 0, "cells": 0, "steps": 0, "t0": time.perf_counter()}

    # ------------------------------------------------------------------ validation, samples

    @torch.no_grad()
    def evaluate(self, n_batches: int | None = None) -> float:
        """Mean val loss per labelled token over the first `val_batches` val batches (fixed set)."""
        n_batches = n_batches or self.recipe.train.val_batches
        was_training = self.model.training
        self.model.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        per_source = self._val_sources
        if per_source is not None:
            per_source.reset(self.device)
        for i, batch in enumerate(self._batches_factory("val", self.global_rank, self.trainer.world_size, 0)):
            if i >= n_batches:
                break
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            if per_source is None:
                loss, n = self._forward_loss(batch)
                tot += torch.stack([loss.double() * n, n.double()])
            else:  # per-position losses, summed per source language as well
                h, labels = self._hidden(batch)
                nll = token_nll(self.model, h, labels)
                tot += torch.stack([nll.sum().double(), (labels != -100).sum().double()])
                per_source.add(batch["offsets"], labels, nll)
        self.model.train(was_training)
        tot = self._all_reduce(tot)
        self.val_bpb = per_source.metrics(self._all_reduce) if per_source is not None else {}
        return (tot[0] / tot[1].clamp(min=1)).item()

    def _validate(self, step: int):
        t0 = time.perf_counter()
        v = self.evaluate()
        self.outcome.last_val = v
        if self.state.best_val is None or v < self.state.best_val:
            self.state.best_val = v
        self._log(
            {
                "val/loss": v,
                "val/ppl": math.exp(min(v, 50)),
                **self.val_bpb,
                "perf/val_time_s": time.perf_counter() - t0,
            },
            step,
        )
        if self.global_rank == 0:
            bpb = "".join(f" | {k[4:]} {x:.3f}" for k, x in self.val_bpb.items())
            say(f"step {step:>6} | val loss {v:.4f}{bpb}")
        self._paused(time.perf_counter() - t0)  # out of tokens/s (the ETA counts wall time: evals recur)

    @torch.no_grad()
    def _sample(self, step: int):
        if self.global_rank != 0 or self._tokenizer is None:
            return
        t0 = time.perf_counter()
        t = self.recipe.train
        was_training = self.model.training
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.recipe.seed + step)
        out = []
        # Generation grows the sequence by one token per call: run the compiled blocks
        # eagerly so the varying shapes do not trigger recompiles.
        with torch.compiler.set_stance("force_eager"):
            for prompt in t.sample_prompts:
                if self._chat:  # the prompt as a user turn, then the assistant header (BOS included)
                    ids = self._tokenizer.encode(chat_prompt(prompt), add_special_tokens=False).ids
                else:
                    ids = self._tokenizer.encode(prompt, add_special_tokens=False).ids
                    ids = ids if self._bos is None else [self._bos] + ids
                x = torch.tensor([ids[-(self.recipe.model.ctx_len - t.sample_tokens) :]], device=self.device)
                eos = self._tokenizer.token_to_id(EOT) if self._chat else self._eos
                y = self.model.generate(x, t.sample_tokens, temperature=0.8, top_k=50, eos_id=eos, generator=gen)
                text = self._tokenizer.decode(y[0, x.shape[1] :].tolist(), skip_special_tokens=True)
                out.append({"step": step, "prompt": prompt, "completion": text})
        self.model.train(was_training)
        self.outcome.samples.extend(out)
        for s in out:
            say(f"sample @{step}: {s['prompt']!r} -> {s['completion']!r}")
        self._paused(time.perf_counter() - t0)

    def _paused(self, seconds: float) -> None:
        self._window["t0"] += seconds
        if self._progress is not None:
            self._progress.pause(seconds)

    # ------------------------------------------------------------------ device transfer

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # Pinned host tensors -> device without blocking the host; int32 travels (half the
        # bytes of int64) and is widened on the device in _forward_loss.
        nb = device.type == "cuda"
        return {k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
