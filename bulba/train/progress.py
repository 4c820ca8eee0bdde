"""Training progress on global rank 0: a tqdm bar on a terminal, ETA on the log lines elsewhere.

On a terminal the bar (step/total, elapsed, ETA, steps/s, tokens/s, loss) redraws in place every
optimizer step, and the module's per-log-step lines are written above it. Elsewhere (a log file,
SLURM, a pipe) a bar's carriage returns would fill the log, so no bar: the per-log-step line itself
carries the ETA and elapsed time (one line per log step, as before).

Nothing here touches the device: `step()` gets host numbers the step already has (the loss is on
the host after the step's one sync), so the bar costs a perf_counter call and tqdm's bookkeeping
(it redraws at most every 0.1 s).
"""

from __future__ import annotations

import math
import sys
import time

_active = None  # the Progress with a live bar (say() writes above it)


def say(msg: str) -> None:
    """print(), or above the bar while one is shown (a plain print would tear the bar's line)."""
    if _active is not None and _active.bar is not None:
        _active.bar.write(msg, file=_active.stream)
        _active.stream.flush()
    else:
        print(msg, flush=True)


def human_s(s: float | None) -> str:
    """Seconds as 0.25s, 4.2s, 45s, 12m05s, 3h07m, 2d04h; '?' when unknown."""
    if s is None or not math.isfinite(s) or s < 0:
        return "?"
    if s < 10:  # short runs (tests, smoke runs) still see the estimate move
        return f"{s:.2f}s" if s < 1 else f"{s:.1f}s"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Progress:
    """Progress of one fit from `start_step` to `total_steps` (and `max_tokens`, if set)."""

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        *,
        max_tokens: int | None = None,
        start_tokens: int = 0,
        max_time: float | None = None,
        start_elapsed: float = 0.0,
        stream=None,
        tty: bool | None = None,
    ):
        global _active
        self.stream = stream or sys.stdout
        self.total, self.start = total_steps, start_step
        self.max_tokens, self.start_tokens = max_tokens, start_tokens
        # A timed run (train.max_time) has no step total: the bar counts steps, the ETA is the
        # budget left (the training time saved in the checkpoint counts as spent).
        self.max_time, self.start_elapsed = max_time, start_elapsed
        self.t0 = time.perf_counter()
        self.step_s: float | None = None  # recent seconds per optimizer step (training only)
        self.bar = None
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=None if max_time is not None else total_steps,
                initial=start_step,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                smoothing=0.05,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
            )
            _active = self
        self._last = self.t0
        self._tok_s: float | None = None
        self._ref: tuple[int, float] | None = None  # (step, time) of the first log step

    def step(self, step: int, loss: float, tokens: int, step_tokens: int) -> None:
        """After optimizer step `step`: `tokens` labelled tokens so far, `step_tokens` in this step
        (all ranks). Host numbers only."""
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        if dt > 0:  # smoothed tokens/s for the bar (the log line uses the module's window figure)
            r = step_tokens / dt
            self._tok_s = r if self._tok_s is None else 0.9 * self._tok_s + 0.1 * r
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self._tok_s or 0:,.0f} tok/s, loss {loss:.4f}", refresh=False)
            self.bar.update(step - self.bar.n)

    def pause(self, seconds: float) -> None:
        """Validation, samples, checkpoints: not training time (keeps tokens/s honest)."""
        self._last += seconds

    def observe(self, step: int, window_step_s: float) -> None:
        """At a log step: the module's seconds per step over its last window (eval excluded).
        The ETA's step time is wall time per step since the first log step, so the first window
        (compilation, warm-up) does not skew it and recurring validation, samples and checkpoints
        are in it; until a second log step, the window's own figure."""
        now = time.perf_counter()
        if self._ref is None:
            self._ref = (step, now)
            self.step_s = window_step_s
        elif step > self._ref[0]:
            self.step_s = (now - self._ref[1]) / (step - self._ref[0])

    def remaining_steps(self, step: int, tokens: int) -> int:
        left = max(0, self.total - step)
        done = step - self.start
        if self.max_tokens is not None and done > 0 and tokens > self.start_tokens:
            per_step = (tokens - self.start_tokens) / done
            left = min(left, max(0, math.ceil((self.max_tokens - tokens) / per_step)))
        return left

    def eta_s(self, step: int, tokens: int) -> float | None:
        """Seconds to the end at the recent step time (None before the first measurement)."""
        if self.max_time is not None:
            return max(0.0, self.max_time - self.start_elapsed - (time.perf_counter() - self.t0))
        left = self.remaining_steps(step, tokens)
        if left == 0:
            return 0.0
        return None if self.step_s is None else left * self.step_s

    def fields(self, step: int, tokens: int) -> str:
        """' | eta 12m05s | elapsed 3m10s' for the log line."""
        return f" | eta {human_s(self.eta_s(step, tokens))} | elapsed {human_s(time.perf_counter() - self.t0)}"

    def close(self) -> None:
        global _active
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if _active is self:
            _active = None
