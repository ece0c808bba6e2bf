"""TIES (global threshold) on CPU by numba: τ* in one fused pass that also sums the elected-sign balance.

:func:`magmax.merging.backends.cpu.native.ties_group` trims, elects and averages every entry with the
running state (Σ⁺, Σ⁻, n⁺, n⁻) in registers, writes θ0 + λ·τ* where asked, and counts the entries whose
value depends on the majority sign (TIES's deferred majority): the same masks, signs, counts and float32
sums in task order as the reference fold of :mod:`magmax.merging.ties`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from magmax.merging.backends.cpu import native
from magmax.merging.backends.fold import GROUP, groups
from magmax.merging.backends.registry import register_hook


@register_hook("ties", "adds_base")
def adds_base() -> bool:
    """Whether the fused pass can write θ0 + λ·τ* itself, rounded as torch.add rounds it here."""
    return native.enabled() and native.can_add_base(True)


@register_hook("ties", "fold")
def fused_fold(slices: Sequence[Tensor], kappas: Sequence[float | None], majority_positive: bool,
               scale: float | None, scratch: Callable[[int], tuple[np.ndarray, ...]]) -> tuple[Tensor, int, int] | None:
    """(τ*, or θ0 + scale·τ*; the elected-sign balance; the ambiguous entries) of one tensor, with κ_t =
    ``kappas[t]`` (None: keep all); None if the kernels cannot run. ``scratch(numel)``: the four state
    rows to use between groups (reused over the tensors of a merge)."""
    if not native.enabled():
        return None
    try:
        return _fold(slices, kappas, majority_positive, scale, scratch)
    except Exception as exc:  # the native kernels are an optimisation: the torch fold gives the same result
        native.disable(exc)
        return None


def _fold(slices: Sequence[Tensor], kappas: Sequence[float | None], majority_positive: bool,
          scale: float | None, scratch: Callable[[int], tuple[np.ndarray, ...]]) -> tuple[Tensor, int, int] | None:
    operands = getattr(slices, "operands", None)
    count = len(slices)
    if operands is None or count == 0:
        return None
    kappa_values = [-1.0 if kappa is None else kappa for kappa in kappas]
    state = out = None
    balance = ambiguous = 0
    shape = None
    # Inputs already in memory: all tasks in one group (no fold state written between groups).
    size = count if getattr(slices, "resident", False) else GROUP
    for start, stop, base, xs, shape in groups(operands, count, size):
        if not native.accepts_inputs(base, xs, size):
            return None
        numel = xs[0].numel()
        if out is None:
            out = torch.empty(numel, dtype=torch.float32)
        if state is None and count > size:
            state = scratch(numel)
        balance, ambiguous = native.ties_group(state, out, base, xs, kappa_values[start:stop], start == 0,
                                               stop == count, majority_positive, scale)
        del xs, base
    assert out is not None and shape is not None
    return out.view(shape), balance, ambiguous
