"""Eager torch forms of reference fold kernels that run faster on CPU, with the same bits.

``torch.where`` is not vectorised on CPU; for finite floats a select can be done on the IEEE-754 bit
patterns instead, with a handful of vectorised integer ops. With m = bits & 0x7FFFFFFF (the magnitude
order of finite floats is the integer order of m):

    keep = (m_cur − m_best) >> 31          (all ones where |cur| < |best|, else 0; no overflow)
    best = cur ^ ((best ^ cur) & keep)     (best where keep, else cur)

These run where numba and Triton do not (``MAGMAX_NATIVE=0``, float16/float64 inputs) and under
``torch.compile``. tests/merging/test_backend_equivalence.py compares them with the reference kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from magmax.merging.backends.fold import Step, Workspace, base_f32, tau_into, tau_of

_MAGNITUDE_BITS = 0x7FFFFFFF


def magmax_bits(best: Tensor, base: Tensor | None, inputs: Sequence[Tensor], step: Step, ws: Workspace) -> None:
    """MagMax's fold (best = τ_t where |τ_t| >= |best|) on the bit patterns."""
    base32 = base_f32(base, ws)
    best_bits = best.view(torch.int32)
    if step.first:
        tau_into(best, inputs[0], base32)
        inputs = inputs[1:]
    best_mag = torch.bitwise_and(best_bits, _MAGNITUDE_BITS, out=ws.buffer(torch.int32))
    cur_mag = ws.buffer(torch.int32)
    keep = ws.buffer(torch.int32)
    scratch = ws.buffer(torch.float32)
    for x in inputs:
        cur = tau_of(scratch, x, base32).view(torch.int32)
        torch.bitwise_and(cur, _MAGNITUDE_BITS, out=cur_mag)
        torch.sub(cur_mag, best_mag, out=keep).bitwise_right_shift_(31)
        best_bits.bitwise_xor_(cur).bitwise_and_(keep).bitwise_xor_(cur)
        torch.maximum(best_mag, cur_mag, out=best_mag)

