"""Exact top-k magnitude thresholds of T whole task vectors at once, in about one pass over the models.

TIES keeps, per task vector τ_t (all tensors of the model flattened, d entries), the entries with
|τ_t| >= κ_t, κ_t = the ``r``-th smallest |τ_t| (1-based), r = d − int(d·K). The exact radix select of
:mod:`magmax.merging._sparsify` needs two full passes per task, each with a 65,536-bin histogram
update per entry. Here all tasks are served together, and the histogram is replaced by a bracket:

1. **Sample** (reads about 1/``stride`` of the memory): τ_t at every ``stride``-th position of the
   concatenated model (the same positions for every task), about ``SAMPLE`` values per task. From the
   sorted magnitudes, a bracket [lo_t, hi_t] around the quantile r/d, five binomial standard deviations
   (plus 32 ranks) to each side.
2. **Count and gather** (one pass): below_t = #{|τ_t| < lo_t}, and the magnitudes inside the
   bracket (about 0.6% of the entries) are copied out.
3. **Select**: when below_t < r <= below_t + gathered_t, κ_t is the (r − below_t)-th smallest gathered
   value (``np.partition``) — exactly ``kthvalue`` of the concatenation, whatever the sample was.
   Otherwise (a bracket missed, or more than ``GATHER_CAP`` entries fell inside it) that task falls
   back to the exact radix select. The sample only decides the speed, never the result.

A subsample of the sample goes back to the caller (TIES guesses its majority sign from it). The
kernels are numba's (:mod:`magmax.merging.backends.cpu.native`), all tasks of a tensor in one call when its inputs
are in memory already, else in groups of ``GROUP``; blocks of tasks run on torch's threads.
Tensors that are not float32/bfloat16 on the CPU (or no numba) take the radix select for every task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from magmax.merging.backends import select
from magmax.merging.backends.brackets import KEPT_SAMPLE, bracket_ranks, gather_capacity, sample_stride
from magmax.merging.backends.cpu import native as _native
from magmax.merging.backends.fold import GROUP, groups
from magmax.merging.backends.gpu import ties as gpu_ties
from magmax.merging.backends.gpu import triton as _gpu
from magmax.merging.backends.registry import register_hook

if TYPE_CHECKING:
    from magmax.merging.base import TaskSlices

SlicesStream = Callable[[], Iterator[tuple[str, "TaskSlices"]]]


class _NotNative(Exception):
    """A tensor the native kernels do not take (not float32 / not on the CPU)."""


def _native_groups(slices: "TaskSlices", first: int, count: int) -> Iterator[tuple[int, int, Tensor | None, list[Tensor]]]:
    """Groups of the tasks first..first+count−1 (``start``, ``stop`` counted from ``first``)."""
    size = count if slices.resident else GROUP  # in memory already: every task in one call
    operands = slices.operands if first == 0 else (lambda t: slices.operands(first + t))
    for start, stop, base, xs, _ in groups(operands, count, size):
        if not _native.accepts_inputs(base, xs, size):
            raise _NotNative
        yield start, stop, base, xs
        del xs, base  # before the next group is read: at most one group of raw tensors at a time


@register_hook("ties", "thresholds")
def bracketed_thresholds(stream: SlicesStream, count: int, total: int,
                         position: int) -> tuple[list[float | None], np.ndarray | Tensor] | None:
    """κ_t (1-based ascending rank ``position`` of |τ_t| over the ``total`` entries of the model) for
    t = 0..count−1 by sample → bracket → count and gather, on the GPU when every tensor's inputs are in
    GPU memory, else by the numba kernels; and the sample (count × S) that bracketed them. A κ_t is None
    where its bracket did not decide (the caller's exact radix select does); the whole answer is None
    where neither backend takes the inputs."""
    on_gpu = _gpu_bracketed(stream, position)
    if on_gpu is not None:
        return on_gpu
    if not _native.enabled():
        return None
    try:
        return _bracketed(stream, count, total, position)
    except _NotNative:
        return None
    except Exception as exc:  # the native kernels are an optimisation: the radix select is exact too
        _native.disable(exc)
        return None


def _gpu_bracketed(stream: SlicesStream, position: int) -> tuple[list[float | None], Tensor] | None:
    """The same steps by the GPU kernels (:mod:`magmax.merging.backends.gpu.ties`) when every tensor's
    inputs are in GPU memory; None where they do not apply (or failed: then they are off for the process)."""
    if not select.gpu_possible():
        return None
    try:
        model = gpu_ties.resident([slices for _, slices in stream()])
        return None if model is None else gpu_ties.bracketed(model, position)
    except Exception as exc:  # the Triton kernels are an optimisation: the other paths are exact too
        _gpu.disable(exc)
        return None


def order_statistics(values: np.ndarray, indices: list[int]) -> np.ndarray:
    """The entries at the 0-based ``indices`` of ``values`` sorted ascending: what ``np.partition(values,
    indices)`` holds there. One single-index partition per distinct index, each over what lies right of
    the previous one: numpy's partition at several indices at once is several times slower (8.8 ms against
    0.9 ms for two ranks of 2^19 float32 here; 0.15 against 0.04 ms for four of 2^14)."""
    out = np.empty(len(indices), dtype=values.dtype)
    rest, offset = values, 0
    for index in sorted(set(indices)):
        rest = np.partition(rest, index - offset)
        value = rest[index - offset]
        out[[r for r, i in enumerate(indices) if i == index]] = value
        rest, offset = rest[index - offset + 1:], index + 1
    return out


class Brackets:
    """Per task and rank, the bracket of sampled magnitudes around the rank, and what the counting pass
    finds in it: the steps the global thresholds and the per-tensor bounds share.

    ``Brackets(sample, taken, total, positions)`` brackets each 1-based ascending rank of ``positions``
    among the ``total`` magnitudes of each task from its ``taken`` sampled τ values (rows of ``sample``);
    :meth:`count` runs the counting pass over (a group of) the inputs; :meth:`rank` then gives the exact
    value, or None where the bracket missed it or overflowed its room."""

    def __init__(self, sample: np.ndarray, taken: int, total: int, positions: list[int]):
        count = sample.shape[0]
        ranks = [bracket_ranks(taken, total, p) for p in positions]
        wanted = sorted({i for pair in ranks for i in pair if 0 <= i < taken})
        self.low = np.empty((count, len(ranks)), dtype=np.float32)
        self.high = np.empty((count, len(ranks)), dtype=np.float32)

        def bracket(tasks: slice) -> None:  # np.partition releases the GIL: tasks in parallel
            for t in range(tasks.start, tasks.stop):
                chosen = dict(zip(wanted, order_statistics(np.abs(sample[t, :taken]), wanted)))
                for r, (lo_index, hi_index) in enumerate(ranks):
                    self.low[t, r] = chosen[lo_index] if lo_index >= 0 else 0.0
                    self.high[t, r] = chosen[hi_index] if hi_index < taken else np.inf

        _native.per_task_blocks(count, bracket)
        self.capacity = max(gather_capacity(lo, hi, taken, total) for lo, hi in ranks)
        self.below = np.zeros((count, len(ranks)), dtype=np.int64)
        self.filled = np.zeros((count, len(ranks)), dtype=np.int64)
        self.gathered: np.ndarray | None = None  # allocated by the first count: the caller may free its sample first

    def count(self, base: Tensor | None, inputs: list[Tensor], tasks: slice = slice(None),
              report_finite: bool = True) -> None:
        """The counting pass over ``inputs``, the tasks ``tasks`` of the brackets (see
        :func:`magmax.merging.backends.cpu.native.count_and_gather`)."""
        if self.gathered is None:
            self.gathered = np.empty((*self.low.shape, self.capacity), dtype=np.float32)
        _native.count_and_gather(base, inputs, self.low[tasks], self.high[tasks], self.below[tasks],
                                 self.gathered[tasks], self.filled[tasks], report_finite=report_finite)

    def rank(self, t: int, r: int, position: int) -> np.float32 | None:
        """The magnitude of 1-based ascending rank ``position`` (bracket r) of task t: the (position −
        below)-th smallest gathered value. None where the bracket did not hold that rank or overflowed its
        room (more values inside it than the room holds)."""
        assert self.gathered is not None, "count first"
        filled, inside = int(self.filled[t, r]), position - int(self.below[t, r])
        if 1 <= inside <= filled <= self.capacity:
            return np.partition(self.gathered[t, r, :filled], inside - 1)[inside - 1]
        return None


def _bracketed(stream: SlicesStream, count: int, total: int, position: int) -> tuple[list[float | None], np.ndarray]:
    """κ_t by sample → bracket → count and gather (None where the bracket did not decide), and the sample.

    Models in memory: every task in one block. Out of core: blocks of ``GROUP`` tasks, each with
    its own passes over the model, so that the samples and gathered magnitudes (a few MiB to 32 MiB
    per task) do not grow with T; every fine-tuned model is still read twice, θ0 twice per block."""
    resident = next((slices.resident for _, slices in stream()), True)
    block = count if resident else GROUP
    stride = sample_stride(total, min(count, block))  # the same sampled positions in every block
    found: list[float | None] = []
    kept: list[np.ndarray] = []
    for first in range(0, count, block):
        found_block, kept_block = _bracketed_tasks(stream, first, min(block, count - first), total, position, stride)
        found += found_block
        kept.append(kept_block)
    return found, kept[0] if len(kept) == 1 else np.concatenate(kept)


def _bracketed_tasks(stream: SlicesStream, first: int, count: int, total: int, position: int,
                     stride: int) -> tuple[list[float | None], np.ndarray]:
    """:func:`_bracketed` for the tasks first..first+count−1."""
    capacity = total // stride + 2
    sample = np.empty((count, capacity), dtype=np.float32)
    taken = 0
    offset = 0  # global position of the current tensor's first entry
    for _, slices in stream():
        numel = None
        phase = (-offset) % stride
        got = 0
        for start, stop, base, xs in _native_groups(slices, first, count):
            numel = xs[0].numel()
            got = _native.sample_entries(base, xs, phase, stride, sample[start:stop], taken)
            del xs, base
        taken += got
        offset += numel or 0
    if offset != total:
        raise RuntimeError(f"the task vectors have {offset} entries, not {total}")

    brackets = Brackets(sample, taken, total, [position])
    # Kept for TIES's guess of the majority sign: every few positions, evenly over the model.
    kept = np.ascontiguousarray(sample[:, : taken : max(1, taken // KEPT_SAMPLE)])
    sample = None  # the full sample is freed before the gathering pass
    for _, slices in stream():
        for start, stop, base, xs in _native_groups(slices, first, count):
            brackets.count(base, xs, slice(start, stop))
            del xs, base

    found: list[float | None] = [None] * count

    def select(tasks: slice) -> None:
        for t in range(tasks.start, tasks.stop):
            value = brackets.rank(t, 0, position)
            found[t] = None if value is None else float(value)

    _native.per_task_blocks(count, select)
    return found, kept


# -- exact order statistics of one tensor's τ_t (Breadcrumbs' bounds) ---------------------------------

TENSOR_SAMPLE = 1 << 14
"""Sampled entries per task vector of one tensor (64 KiB of float32), for :func:`tensor_magnitude_ranks`."""

SMALL_TENSOR = 1 << 15
"""Tensors of at most this many entries are selected from directly (``np.partition`` of every |τ|)."""


def tensor_magnitude_ranks(base: Tensor | None, inputs: list[Tensor],
                           positions: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each input j (τ_j = float32(x_j) − float32(θ0), flat, n entries each) and each 1-based ascending
    rank in ``positions``, the exact magnitude v of that rank among |τ_j| (``torch.kthvalue``'s value), and
    how many |τ_j| lie below v and how many at most v (they differ from position − 1 and position where
    magnitudes equal to v straddle the rank). Returns float32 values and two int64 counts, each of shape
    (inputs, ranks).

    The steps of the global thresholds, per tensor: a sample brackets each rank, one counting pass per
    input (:func:`magmax.merging.backends.cpu.native.count_and_gather`, every rank in the same read) counts the
    magnitudes below each bracket and gathers those inside, ``np.partition`` picks the exact value, and the
    two counts are the count below the bracket plus the gathered values below (at most) v: no second pass.
    A rank its bracket missed is selected, and counted, from every |τ_j|: exact either way, the sample only
    decides the speed. Native kernels only (float32 / bfloat16 inputs on the CPU).
    """
    count, ranks = len(inputs), len(positions)
    n = inputs[0].numel()
    out = np.empty((count, ranks), dtype=np.float32)
    below = np.empty((count, ranks), dtype=np.int64)
    at_most = np.empty((count, ranks), dtype=np.int64)
    if not ranks:
        return out, below, at_most

    def magnitudes(j: int) -> np.ndarray:
        tau = inputs[j].float() if base is None else inputs[j].float() - base.float()
        return tau.abs().numpy()

    def from_all(j: int, r: int, everything: np.ndarray) -> None:
        out[j, r] = np.partition(everything, positions[r] - 1)[positions[r] - 1]
        below[j, r] = np.count_nonzero(everything < out[j, r])
        at_most[j, r] = np.count_nonzero(everything <= out[j, r])

    if n <= SMALL_TENSOR:
        for j in range(count):
            everything = magnitudes(j)
            out[j] = order_statistics(everything, [p - 1 for p in positions])
            below[j] = [np.count_nonzero(everything < v) for v in out[j]]
            at_most[j] = [np.count_nonzero(everything <= v) for v in out[j]]
        return out, below, at_most
    stride = max(1, n // TENSOR_SAMPLE)
    sample = np.empty((count, n // stride + 2), dtype=np.float32)
    taken = _native.sample_entries(base, inputs, 0, stride, sample, 0)
    brackets = Brackets(sample, taken, n, positions)
    # Not reporting finiteness: the banded fold that follows counts it.
    brackets.count(base, inputs, report_finite=False)

    def select(tasks: slice) -> None:
        for j in range(tasks.start, tasks.stop):
            for r, position in enumerate(positions):
                value = brackets.rank(j, r, position)
                if value is None:  # the bracket missed (or overflowed): select from every magnitude
                    from_all(j, r, magnitudes(j))
                    continue
                # Every |τ_j| <= value is below the bracket or gathered in it (value lies inside it).
                inside = brackets.gathered[j, r, :int(brackets.filled[j, r])]
                out[j, r] = value
                below[j, r] = int(brackets.below[j, r]) + np.count_nonzero(inside < value)
                at_most[j, r] = int(brackets.below[j, r]) + np.count_nonzero(inside <= value)

    _native.per_task_blocks(count, select)
    return out, below, at_most
