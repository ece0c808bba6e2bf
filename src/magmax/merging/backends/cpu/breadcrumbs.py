"""Breadcrumbs on CPU by numba: exact band bounds per task, then one banded-sum pass per group.

Per group of up to ``GROUP`` inputs of a tensor: the exact bounds of every task by
:func:`magmax.merging.backends.cpu.threshold.tensor_magnitude_ranks` (a sample brackets each rank, one
counting pass gathers the magnitudes inside the brackets, ``np.partition`` picks the exact values:
``kthvalue``'s), then one fold pass that sums the banded τ_t in task order and writes θ0 + λ·τ*. With
``ties="exact"`` the counting pass also says how many magnitudes lie below lo and up to hi; where a tie
straddles a bound of some input, the inclusive band would keep the tied entries that the rule masks (the
first ones by index at lo, the last ones at hi), so those entries of that input are set to θ0's value
(τ = 0) in a copy of the input before the banded sum: a masked entry adds +0.0 to the sum, as in the
reference kernel, and a zero τ inside the band adds the same +0.0. Both make the same float32 additions in
the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from magmax.merging.backends.cpu import native
from magmax.merging.backends.cpu.threshold import tensor_magnitude_ranks
from magmax.merging.backends.fold import GROUP, groups, operands_of
from magmax.merging.backends.registry import register_hook
from magmax.taskvector import add_scaled


def without_surplus_ties(base: Tensor | None, x: Tensor, low: float, high: float, surplus_low: int,
                         surplus_high: int) -> Tensor:
    """A copy of input ``x`` whose entries the exact rule masks although the inclusive band [low, high]
    holds them are set to θ0's value (to 0 where there is no base), so that their τ is 0: of the
    magnitudes equal to ``low``, the first ``surplus_low`` by index; of those equal to ``high``, the last
    ``surplus_high``."""
    tau = x.to(torch.float32) - base.to(torch.float32) if base is not None else x.to(torch.float32)
    magnitude = tau.abs()
    masked = []
    if surplus_low > 0:
        masked.append(torch.nonzero(magnitude == low).view(-1)[:surplus_low])
    if surplus_high > 0:
        tied = torch.nonzero(magnitude == high).view(-1)
        masked.append(tied[tied.numel() - surplus_high:])
    out = x.clone()
    index = torch.cat(masked)
    out[index] = base[index] if base is not None else 0
    return out


def band_bounds(bottom: float, top: float, base: Tensor | None,
                inputs: list[Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(low_t, high_t) of every input's band (float32; −inf / +inf where that side masks nothing), and
    per input how many entries tied with low_t and with high_t the inclusive band [low_t, high_t] holds
    beyond the rule's count (0 and 0 where no tie straddles a bound)."""
    n = inputs[0].numel()
    n_bottom, n_top = int(bottom * n), int(top * n)
    positions = ([n_bottom + 1] if n_bottom else []) + ([n - n_top] if n_top else [])
    values, below, at_most = tensor_magnitude_ranks(base, inputs, positions)
    none = np.zeros(len(inputs), dtype=np.int64)
    surplus_low = n_bottom - below[:, 0].astype(np.int64) if n_bottom else none
    surplus_high = at_most[:, -1].astype(np.int64) - (n - n_top) if n_top else none
    low = values[:, 0] if n_bottom else np.full(len(inputs), -np.inf, np.float32)
    high = values[:, -1] if n_top else np.full(len(inputs), np.inf, np.float32)
    return low, high, surplus_low, surplus_high


@register_hook("breadcrumbs", "group")
def band_group(options: object, state: Tensor, base: Tensor | None, inputs: list[Tensor], first: bool,
               scale: float | None) -> bool | None:
    """One group of the fold: whether it added θ0 (with ``scale``), or None where the kernels do not take
    the inputs (the state is then untouched). ``options``: the method's (``bottom``, ``top``, ``ties``)."""
    if not (native.enabled() and native.accepts(state, base, inputs, GROUP)):
        return None
    try:
        low, high, surplus_low, surplus_high = band_bounds(options.bottom, options.top, base, inputs)  # type: ignore[attr-defined]
        if options.ties == "exact":  # type: ignore[attr-defined]
            inputs = [x if surplus_low[j] <= 0 and surplus_high[j] <= 0
                      else without_surplus_ties(base, x, float(low[j]), float(high[j]), int(surplus_low[j]), int(surplus_high[j]))
                      for j, x in enumerate(inputs)]
        return native.band_sum_group(state, base, inputs, first, low, high, scale)
    except Exception as exc:  # the native kernels are an optimisation: the torch kernel is exact too
        native.disable(exc)
        return None


@register_hook("breadcrumbs", "fold")
def band_fold(options: object, slices: Sequence[Tensor], scale: float | None) -> Tensor | None:
    """τ* (or θ0 + scale·τ*) group by group; None where the native kernels do not take the inputs."""
    count = len(slices)
    state: Tensor | None = None
    added = False
    base = None
    for start, stop, base, xs, shape in groups(operands_of(slices), count):
        if state is None:
            state = torch.empty(xs[0].numel(), dtype=torch.float32, device=xs[0].device)
        done = band_group(options, state, base, xs, start == 0, scale if stop == count else None)
        del xs  # before the next group is read: at most GROUP raw tensors at a time
        if done is None:
            return None
        added = done
    assert state is not None
    if scale is not None and not added:
        add_scaled(base, state, scale, out=state)
    return state.view(shape)
