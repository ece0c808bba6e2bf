"""MagMax: per parameter, the task-vector entry of largest magnitude.

    τ*[p] = τ_k[p],  k = argmax_t |τ_t[p]|,        θ = θ0 + λ·τ*,  λ = 0.5

Ties go to the LATER task: the reference folds left to right with ``where(|cur| >= |best|, cur, best)``,
and this kernel computes exactly that fold, so the result is bit-exact with the reference (−0.0 and
+0.0 tie, and the later one is kept).

How it computes (:func:`magmax_kernel`): on the IEEE-754 bit patterns. For finite floats the magnitude
order is the integer order of the bits with the sign cleared, so with m = bits & 0x7FFFFFFF

    keep = (m_cur − m_best) >> 31          (all ones where |cur| < |best|, else 0; no overflow)
    best = cur ^ ((best ^ cur) & keep)     (best where keep, else cur)
    m_best = max(m_best, m_cur)

which is eight cheap vectorised integer ops per task, where ``torch.where`` on CPU is not vectorised.
Inputs are finite (the engine and :class:`magmax.Merger` refuse NaN/Inf). The fold runs fused over
groups of raw checkpoint tensors (:mod:`magmax.merging._fused`): each input read once per tensor.

Marczak, Twardowski, Trzciński, Cygert. "MagMax: Leveraging Model Merging for Seamless Continual
Learning", ECCV 2024. arXiv:2407.06322.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from magmax.merging import _fused, _native
from magmax.merging._kernel_fold import KernelFold
from magmax.merging.base import register

_MAGNITUDE_BITS = 0x7FFFFFFF


@_fused.native(_native.magmax_group, gpu="magmax")
def magmax_kernel(
    best: Tensor, base: Tensor | None, inputs: Sequence[Tensor], step: _fused.Step, ws: _fused.Workspace
) -> None:
    """Fold ``inputs`` into ``best`` in place: best = τ_t where |τ_t| >= |best| (bit patterns, see module)."""
    base32 = _fused.base_f32(base, ws)
    best_bits = best.view(torch.int32)
    if step.first:
        _fused.tau_into(best, inputs[0], base32)
        inputs = inputs[1:]
    best_mag = torch.bitwise_and(best_bits, _MAGNITUDE_BITS, out=ws.buffer(torch.int32))
    cur_mag = ws.buffer(torch.int32)
    keep = ws.buffer(torch.int32)
    scratch = ws.buffer(torch.float32)
    for x in inputs:
        cur = _fused.tau_of(scratch, x, base32).view(torch.int32)
        torch.bitwise_and(cur, _MAGNITUDE_BITS, out=cur_mag)
        torch.sub(cur_mag, best_mag, out=keep).bitwise_right_shift_(31)
        best_bits.bitwise_xor_(cur).bitwise_and_(keep).bitwise_xor_(cur)
        torch.maximum(best_mag, cur_mag, out=best_mag)


@register
class MagMax(KernelFold):
    name = "magmax"
    summary = "per parameter, the task-vector entry of largest magnitude (ties: later task)"
    reference = "Marczak et al., MagMax, ECCV 2024, arXiv:2407.06322"
    kernel = staticmethod(magmax_kernel)
    default_scale = 0.5
    key_independent = True
