"""The sample-and-bracket arithmetic shared by the CPU and GPU threshold kernels (no kernels here).

A sample of τ at every ``stride``-th position brackets each task's k-th magnitude; the kernels then count
the entries below the bracket and gather those inside it (:mod:`magmax.merging.backends.cpu.threshold`,
:mod:`magmax.merging.backends.gpu.ties`).
"""

from __future__ import annotations

import math

SAMPLE = 1 << 19
"""Target sample size per task (4 MiB of float32 each; fewer when many tasks, see ``SAMPLE_BYTES``)."""

SAMPLE_BYTES = 1 << 28
"""At most this much memory (256 MiB) for the samples of all tasks together."""

KEPT_SAMPLE = 1 << 18
"""At most about this many sampled positions are returned (1 MiB per task)."""

GATHER_CAP = 1 << 23
"""At most this many bracketed magnitudes are kept per task (32 MiB); more means a radix fallback."""


def sample_stride(total: int, count: int) -> int:
    """Every how many positions of the model the sample takes τ (about ``SAMPLE`` values per task)."""
    return max(1, total // min(SAMPLE, SAMPLE_BYTES // (4 * count)))


def bracket_ranks(taken: int, total: int, position: int) -> tuple[int, int]:
    """0-based ranks in the sorted sample of the bracket's ends around the quantile (position − ½)/total:
    five binomial standard deviations and 32 ranks to each side (P(miss) ≈ 3e-7 per side). An end
    outside 0..taken−1 means no bound on that side."""
    quantile = (position - 0.5) / total
    margin = 5.0 * math.sqrt(max(taken * quantile * (1 - quantile), 1.0)) + 32
    return math.floor(quantile * taken - margin), math.ceil(quantile * taken + margin)


def gather_capacity(lo_index: int, hi_index: int, taken: int, total: int) -> int:
    """Room per task for the gathered magnitudes: twice the bracket's share of the model (a little more
    for small models), at most ``GATHER_CAP``."""
    share = (min(hi_index, taken) - max(lo_index, 0)) / max(taken, 1)
    return min(GATHER_CAP, int(2 * share * total) + 1024)
