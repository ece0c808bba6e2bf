"""The learning-rate schedule of the MagMax reference (and of the task-vectors code it builds on).

    lr(s) = lr_max·(s + 1)/W                          for s < W       (linear warm-up)
    lr(s) = lr_max·½·(1 + cos(π·(s − W)/(S − W)))     for W ≤ s < S   (cosine to 0)

W is an ABSOLUTE number of warm-up steps per task (500 in the paper) and S the task's number of
steps. Quirk kept on purpose (protocol §3): when S ≤ W the schedule never leaves warm-up, so the peak
LR is lr_max·S/W (≈8e-6 on CIFAR-100/10, 1.6e-6 on /50); the paper's numbers depend on it.
"""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    elapsed = step - warmup_steps
    span = total_steps - warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * elapsed / span)) * base_lr


def peak_lr(base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The largest LR a task of ``total_steps`` steps actually reaches under this schedule."""
    if warmup_steps <= 0 or total_steps > warmup_steps:
        return base_lr
    return warmup_cosine_lr(total_steps - 1, base_lr, warmup_steps, total_steps)
