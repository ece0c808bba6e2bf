"""Time left in a continual run: an ETA for the WHOLE run from training steps and evaluations so far.

Training dominates and its cost per step is steady, so the estimate is
    remaining steps × (training seconds / steps run) + remaining evaluations × (other seconds / evaluations),
where "other" is everything after set-up that is not a training step (evaluation, merging, saving state).
Only work done by this process counts, so a resumed run estimates from its own pace.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m07s``, ``12s``; ``?`` when there is nothing to estimate from yet."""
    if seconds is None:
        return "?"
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class RunClock:
    """Counts the steps and evaluations a run has left and how long the done ones took."""

    def __init__(self, total_steps: int, total_evals: int, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.start = clock()
        self.steps_left = total_steps
        self.evals_left = total_evals
        self.steps_done = 0
        self.evals_done = 0
        self.train_seconds = 0.0
        self._step_mark: float | None = None

    def start_training(self) -> None:
        """Training (a task or joint) begins now: the time to its first step counts as training."""
        self._step_mark = self.clock()

    def step(self) -> None:
        now = self.clock()
        if self._step_mark is not None:
            self.train_seconds += now - self._step_mark
        self._step_mark = now
        self.steps_done += 1
        self.steps_left = max(0, self.steps_left - 1)

    def end_training(self) -> None:
        self._step_mark = None

    def evaluated(self) -> None:
        self.evals_done += 1
        self.evals_left = max(0, self.evals_left - 1)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def eta(self) -> float | None:
        """Seconds until the run ends, or None while there is no measured pace for the work left."""
        left = 0.0
        if self.steps_left:
            if not self.steps_done:
                return None
            left += self.steps_left * self.train_seconds / self.steps_done
        if self.evals_left:
            if not self.evals_done:
                return None
            other = max(0.0, self.elapsed() - self.train_seconds)
            left += self.evals_left * other / self.evals_done
        return left

    def summary(self) -> str:
        return f"elapsed {format_duration(self.elapsed())}, ETA run {format_duration(self.eta())}"
