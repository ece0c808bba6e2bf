"""Mini-batch index streams: seeded, epoch-based, reproducible from (seed, task) alone."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


def steps_per_task(num_samples: int, batch_size: int, epochs: float | None, steps: int | None) -> int:
    """The reference trains ``epochs × len(loader)`` steps with a loader that keeps the last partial batch."""
    if steps is not None:
        return steps
    assert epochs is not None
    return max(1, math.ceil(epochs * math.ceil(num_samples / batch_size)))


def batch_indices(num_samples: int, batch_size: int, total_steps: int, generator: torch.Generator) -> Iterator[np.ndarray]:
    """``total_steps`` batches: a fresh permutation each epoch, the last batch of an epoch may be short."""
    produced = 0
    while produced < total_steps:
        perm = torch.randperm(num_samples, generator=generator).numpy()
        for start in range(0, num_samples, batch_size):
            yield perm[start : start + batch_size]
            produced += 1
            if produced == total_steps:
                return


def take(items: Sequence, idx: np.ndarray) -> Sequence:
    """Items at ``idx``: a fancy-indexed array slice for arrays, a list otherwise."""
    if isinstance(items, np.ndarray):
        return items[idx]
    return [items[int(i)] for i in idx]
