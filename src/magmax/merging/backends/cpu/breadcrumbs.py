"""Breadcrumbs on CPU by numba: exact band bounds per task, then one banded-sum pass per group.

Per group of up to ``GROUP`` inputs of a tensor: the exact bounds of every task by
:func:`magmax.merging.backends.cpu.threshold.tensor_magnitude_ranks` (a sample brackets each rank, one
counting pass gathers the magnitudes inside the brackets, ``np.partition`` picks the exact values:
``kthvalue``'s), then one fold pass that sums the banded τ_t in task order and writes θ0 + λ·τ*. With
``ties="exact"`` the counting pass also says how many magnitudes lie below lo and up to hi; where a tie
straddles a bound of some input, the inclusive band would keep too much and the tensor is merged by the
reference kernel instead. Both make the same float32 additions in the same order.
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


def bounds(bottom: float, top: float, base: Tensor | None,
           inputs: list[Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low_t, high_t) of every input's band (float32; −inf / +inf where that side masks nothing), and
    per input whether the inclusive band [low_t, high_t] holds exactly the n − n_bot − n_top entries
    the rule keeps (no tie straddles a bound)."""
    n = inputs[0].numel()
    n_bottom, n_top = int(bottom * n), int(top * n)
    positions = ([n_bottom + 1] if n_bottom else []) + ([n - n_top] if n_top else [])
    values, below, at_most = tensor_magnitude_ranks(base, inputs, positions)
    exact = np.ones(len(inputs), dtype=bool)
    if n_bottom:
        exact &= below[:, 0] == n_bottom
    if n_top:
        exact &= at_most[:, -1] == n - n_top
    low = values[:, 0] if n_bottom else np.full(len(inputs), -np.inf, np.float32)
    high = values[:, -1] if n_top else np.full(len(inputs), np.inf, np.float32)
    return low, high, exact


@register_hook("breadcrumbs", "group")
def band_group(options: object, state: Tensor, base: Tensor | None, inputs: list[Tensor], first: bool,
               scale: float | None) -> bool | None:
    """One group of the fold: whether it added θ0 (with ``scale``), or None where the kernels do not take
    the inputs, or a tie straddles a band edge under ``ties="exact"`` (the state is then untouched).
    ``options``: the method's (``bottom``, ``top``, ``ties``)."""
    if not (native.enabled() and native.accepts(state, base, inputs, GROUP)):
        return None
    try:
        low, high, exact = bounds(options.bottom, options.top, base, inputs)  # type: ignore[attr-defined]
        if options.ties == "exact" and not exact.all():  # type: ignore[attr-defined]
            return None
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
