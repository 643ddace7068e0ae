"""Training for a time budget: how many steps `--max-time 10m` buys, decided once and saved.

The schedule needs the run's length in steps from the start, the budget gives it in seconds. So the
run begins as if it were endless (the lr schedule of an unbounded run: lr ~0, so the first steps
only time the step and fill the optimizer's moment estimates), and after WARMUP_STEPS (first-step
allocations, thread pools) and MEASURE_STEPS more it fixes

    total_steps = steps so far + floor((budget - training seconds so far) / seconds per step)

with seconds per step the mean of the measured steps. The lr schedule, warmup included, then spans
the steps the budget bought (`schedule_start` on): starting it at step 0 instead would put the run
at the end of its warmup ramp the moment it is decided, a jump from lr ~0 to nearly the peak.
The decision is saved in every checkpoint (`trainer_state.json` -> "budget"), so a resumed run
keeps it and continues bit for bit. The budget counts the training steps' time, as
`elapsed_seconds` does, not evaluation or checkpoint writes.
Under data parallelism every rank decides from the mean over ranks, so all stop at the same step.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError

WARMUP_STEPS = 2  # not timed: the first steps allocate memory and start thread pools
MEASURE_STEPS = 5  # timed steps the decision averages
ENDLESS = 2**53  # the run length the schedule sees before the decision (exact as a float)

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(min|sec|h|m|s)", re.IGNORECASE)
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0, "sec": 1.0}


def parse_duration(text: str) -> float:
    """'10m', '90s', '1.5h', '1h30m' -> seconds. Anything else is a ConfigError saying what to write."""
    cleaned = text.strip().lower()
    parts = list(_DURATION.finditer(cleaned))
    if not parts or "".join(m.group(0) for m in parts).replace(" ", "") != cleaned.replace(" ", ""):
        raise ConfigError(f"--max-time {text!r} is not a duration: write a number with a unit, e.g. 10m, 90s, "
                          "1.5h or 1h30m")
    seconds = sum(float(m.group(1)) * _UNIT_SECONDS[m.group(2)] for m in parts)
    if seconds <= 0:
        raise ConfigError(f"--max-time {text!r} is no time at all: give a positive duration, e.g. 10m")
    return seconds


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


@dataclass(frozen=True)
class BudgetDecision:
    budget_seconds: float
    seconds_per_step: float  # mean over the timed steps (and ranks)
    timed_steps: int
    decided_at_step: int
    total_steps: int
    # the step the lr schedule (warmup included) starts at; 0 in decisions saved before it existed
    schedule_start: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TimeBudget:
    """Turns a budget in seconds into a step count, once, from the steps' measured times.

    `reduce_mean` averages a float64 tensor over ranks (identity on one process), so every rank takes
    the same decision at the same step.
    """

    def __init__(self, budget_seconds: float, reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.budget_seconds = float(budget_seconds)
        self.reduce_mean = reduce_mean or (lambda t: t)
        self.decision: BudgetDecision | None = None
        self._seen = 0  # steps observed by this process (a resumed run warms up again)
        self._times: list[float] = []

    @property
    def total_steps(self) -> int:
        return self.decision.total_steps if self.decision is not None else ENDLESS

    def schedule_position(self, step: int) -> tuple[int, int]:
        """(step within the lr schedule, the schedule's length) at optimizer step `step`: an endless
        run's before the decision, the bought steps' after it."""
        start = self.decision.schedule_start if self.decision is not None else 0
        return step - start, self.total_steps - start

    def observe(self, step: int, step_seconds: float, elapsed_seconds: float) -> int:
        """After each optimizer step (`step` steps done, `elapsed_seconds` of training so far):
        returns the run's length, ENDLESS until decided."""
        if self.decision is not None:
            return self.decision.total_steps
        seconds, elapsed = self.reduce_mean(torch.tensor([step_seconds, elapsed_seconds], dtype=torch.float64)).tolist()
        self._seen += 1
        if self._seen == 1 and step == 1 and seconds > self.budget_seconds:
            raise ConfigError(
                f"--max-time {format_duration(self.budget_seconds)} is shorter than one training step "
                f"({seconds:.1f} s here): give a budget of at least {math.ceil(10 * seconds)} s, or train a "
                "smaller model"
            )
        if self._seen > WARMUP_STEPS:
            self._times.append(seconds)
        if len(self._times) >= MEASURE_STEPS or elapsed >= self.budget_seconds:
            per_step = sum(self._times) / len(self._times) if self._times else elapsed / step
            bought = max(0, math.floor((self.budget_seconds - elapsed) / per_step))
            self.decision = BudgetDecision(self.budget_seconds, per_step, len(self._times), step, step + bought,
                                           schedule_start=step)
        return self.total_steps

    def state_dict(self) -> dict[str, Any] | None:
        return self.decision.to_dict() if self.decision is not None else None

    def load_state_dict(self, state: dict[str, Any] | None, step: int, elapsed_seconds: float) -> None:
        """Restore a saved decision (at `step` with `elapsed_seconds` of training). A budget changed
        on resume (`--set max_minutes=...`) is applied at the saved speed, so the run is not measured
        again mid-way. A run resumed without a decision (a budget added to a step-count run) decides at
        once from its average speed so far, so its schedule never restarts as an endless run's (and,
        as before, runs from step 0). An extended budget keeps the saved schedule_start."""
        if not state:
            if step > 0 and elapsed_seconds > 0:
                state = dict(budget_seconds=-1.0, seconds_per_step=elapsed_seconds / step, timed_steps=step,
                             decided_at_step=step, total_steps=step)
            else:
                return
        saved = BudgetDecision(**state)
        if saved.budget_seconds != self.budget_seconds:
            bought = max(0, math.floor((self.budget_seconds - elapsed_seconds) / saved.seconds_per_step))
            saved = BudgetDecision(self.budget_seconds, saved.seconds_per_step, saved.timed_steps, step, step + bought,
                                   schedule_start=saved.schedule_start)
        self.decision = saved

    def summary(self, steps: int, tokens: int, elapsed_seconds: float) -> str:
        """One line for the end of the run: what the budget bought."""
        budget = format_duration(self.budget_seconds)
        d = self.decision
        if d is None:
            return f"time budget {budget}: stopped at step {steps}, before the step count was decided"
        return (f"time budget {budget} bought {d.total_steps} steps at {d.seconds_per_step:.3f} s/step (measured "
                f"over {d.timed_steps} steps, decided at step {d.decided_at_step}); trained {steps} steps, "
                f"{tokens / 1e6:.2f}M tokens, in {format_duration(elapsed_seconds)} of training steps")
