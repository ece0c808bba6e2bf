"""Consensus (TALL masks) on CPU by numba: the sum and the votes in one read of each input.

With a tensor's inputs in memory (or at most ``GROUP`` of them), one kernel walks blocks of entries,
summing the block's τ_t in task order and then voting against that sum while the block's inputs are still
in cache, and writes θ0 + λ·τ* in the same pass. Out of core with more inputs, a sum pass and a vote pass
over groups of ``GROUP`` inputs (memory O(1) in T). The same float32 operations, in the same order, as
:func:`magmax.merging.consensus.consensus_merge`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from magmax.merging.backends import select
from magmax.merging.backends.cpu import native
from magmax.merging.backends.fold import GROUP, groups, operands_of
from magmax.merging.backends.registry import register_hook
from magmax.taskvector import add_scaled

SumFold = Callable[[Callable[[int], tuple[Tensor, Tensor | None]], int], Tensor]


@register_hook("consensus", "merge")
def merge(slices: Sequence[Tensor], scale: float | None, lam: float, least: int, sum_fold: SumFold) -> Tensor | None:
    """τ* (or θ0 + scale·τ*) by the numba kernels; None where they do not take the inputs (or are off).
    ``sum_fold(operands, count)``: the method's task-arithmetic fold, for the out-of-core sum."""
    if not native.enabled():
        return None
    try:
        return _merge(slices, scale, lam, least, sum_fold)
    except Exception as exc:  # the native kernels are an optimisation: the torch kernel is exact too
        native.disable(exc)
        return None


def _merge(slices: Sequence[Tensor], scale: float | None, lam: float, least: int, sum_fold: SumFold) -> Tensor | None:
    count = len(slices)
    operands = operands_of(slices)
    size = count if getattr(slices, "resident", False) else GROUP
    if count <= size:  # every input in one call: one read of each
        _, _, base, xs, shape = next(groups(operands, count, size))
        if not select.numba_takes(base, xs, size):
            return None
        out = torch.empty(xs[0].numel(), dtype=torch.float32)
        if not native.consensus_group(out, base, xs, lam, least, scale) and scale is not None:
            add_scaled(base, out, scale, out=out)
        return out.view(shape)
    # Out of core with more inputs than a group: the sum, then the votes, group by group.
    total = sum_fold(operands, count)
    shape = total.shape
    total = total.view(-1)
    votes = torch.zeros(total.shape[0], dtype=torch.int32)
    base = None
    for _, _, base, xs, _ in groups(operands, count):
        if not select.numba_takes(base, xs, GROUP):
            return None  # (other dtypes: rare out of core) the torch kernel starts over
        native.tall_votes(total, votes, base, xs, lam)
        del xs  # before the next group is read: at most GROUP raw tensors at a time
    merged = total.mul_(votes >= least)
    if scale is not None:
        add_scaled(base, merged, scale, out=merged)
    return merged.view(shape)
