"""MagMax: per parameter, the task-vector entry of largest magnitude.

    τ*[p] = τ_k[p],  k = argmax_t |τ_t[p]|,        θ = θ0 + λ·τ*,  λ = 0.5

Ties go to the LATER task: the reference folds left to right with ``where(|cur| >= |best|, cur, best)``,
and this kernel computes exactly that fold, so the result is bit-exact with the reference (−0.0 and
+0.0 tie, and the later one is kept).

Inputs are finite (the engine and :class:`magmax.Merger` refuse NaN/Inf). The rule below, plain torch, is
the definition and the fallback; the backends run the same fold in one pass (numba on CPU, Triton on
GPUs, an integer form of the same comparison in eager torch), bit for bit the same.

Marczak, Twardowski, Trzciński, Cygert. "MagMax: Leveraging Model Merging for Seamless Continual
Learning", ECCV 2024. arXiv:2407.06322.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from magmax.merging import fold
from magmax.merging.base import register


@fold.reference("magmax")
def magmax_kernel(best: Tensor, base: Tensor | None, inputs: Sequence[Tensor], step: fold.Step, ws: fold.Workspace) -> None:
    """Fold ``inputs`` into ``best`` in place: best = τ_t where |τ_t| >= |best| (the later task wins ties)."""
    base32 = fold.base_f32(base, ws)
    if step.first:
        fold.tau_into(best, inputs[0], base32)
        inputs = inputs[1:]
    scratch = ws.buffer(torch.float32)
    for x in inputs:
        tau = fold.tau_of(scratch, x, base32)
        best.copy_(torch.where(tau.abs() >= best.abs(), tau, best))


@register
class MagMax(fold.KernelFold):
    name = "magmax"
    summary = "per parameter, the task-vector entry of largest magnitude (ties: later task)"
    reference = "Marczak et al., MagMax, ECCV 2024, arXiv:2407.06322"
    kernel = staticmethod(magmax_kernel)
    default_scale = 0.5
    key_independent = True
