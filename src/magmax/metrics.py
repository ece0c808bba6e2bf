"""Continual-learning metrics from an accuracy matrix.

A[i, j] is the accuracy on task j's test set of the model obtained after training task i (0-based,
T×T; entries j > i are the accuracy on tasks not yet seen, kept because they show forward transfer
and zero-shot behaviour). ``sizes[j]`` is the number of test samples of task j.

* final accuracy      = Σ_j sizes_j·A[T−1, j] / Σ_j sizes_j   (the whole test set; the paper's headline)
* average incremental = (1/T) Σ_i acc_seen(i),  acc_seen(i) = Σ_{j≤i} sizes_j·A[i, j] / Σ_{j≤i} sizes_j
                        (Rebuffi et al., iCaRL, CVPR 2017)
* forgetting          = (1/(T−1)) Σ_{j<T−1} max_{j≤l<T−1} A[l, j] − A[T−1, j]   (Chaudhry et al., ECCV 2018)
* backward transfer   = (1/(T−1)) Σ_{j<T−1} A[T−1, j] − A[j, j]                (Lopez-Paz & Ranzato, NeurIPS 2017)

Forgetting and BWT are undefined for T = 1 (reported as None).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(acc: np.ndarray, sizes: np.ndarray) -> None:
    if acc.ndim != 2 or acc.shape[0] > acc.shape[1] or acc.shape[1] != sizes.shape[0]:
        raise ValueError(f"accuracy matrix of shape {acc.shape} does not fit {sizes.shape[0]} task sizes")


def seen_accuracy(acc: np.ndarray, sizes: np.ndarray, step: int) -> float:
    """Sample-weighted accuracy over the test sets of tasks 0..step after training task ``step``."""
    w = sizes[: step + 1].astype(float)
    return float((acc[step, : step + 1] * w).sum() / w.sum())


def final_accuracy(acc: np.ndarray, sizes: np.ndarray) -> float:
    _check(acc, sizes)
    w = sizes.astype(float)
    return float((acc[-1] * w).sum() / w.sum())


def average_incremental_accuracy(acc: np.ndarray, sizes: np.ndarray) -> float:
    _check(acc, sizes)
    return float(np.mean([seen_accuracy(acc, sizes, i) for i in range(acc.shape[0])]))


def forgetting_per_task(acc: np.ndarray) -> list[float]:
    """max_{j≤l<T−1} A[l, j] − A[T−1, j] for every task j < T−1 (empty for T = 1); their mean is the forgetting."""
    last = acc.shape[0] - 1
    return [float(acc[j:last, j].max() - acc[last, j]) for j in range(last)]


def forgetting(acc: np.ndarray) -> float | None:
    drops = forgetting_per_task(acc)
    return float(np.mean(drops)) if drops else None


def backward_transfer(acc: np.ndarray) -> float | None:
    steps = acc.shape[0]
    if steps < 2:
        return None
    last = steps - 1
    return float(np.mean([acc[last, j] - acc[j, j] for j in range(last)]))


def summarize(acc: Sequence[Sequence[float]], sizes: Sequence[int]) -> dict[str, float | None]:
    """All metrics of one model series; ``acc`` may have fewer rows than tasks (a run in progress)."""
    a = np.asarray(acc, dtype=float)
    s = np.asarray(sizes, dtype=int)
    complete = a.shape[0] == a.shape[1]
    return {
        "final_accuracy": final_accuracy(a, s),
        "average_incremental_accuracy": average_incremental_accuracy(a, s),
        "forgetting": forgetting(a) if complete else None,
        "backward_transfer": backward_transfer(a) if complete else None,
    }
