"""MagMax: per parameter, the task-vector entry of largest magnitude.

    τ*[p] = τ_k[p],  k = argmax_t |τ_t[p]|,        θ = θ0 + λ·τ*,  λ = 0.5

Ties go to the LATER task: the reference folds left to right with ``where(|cur| >= |best|, cur, best)``;
this fold is that exact expression, so the result is bit-exact with the reference. The running state is
(best, |best|): keeping |best| saves recomputing an abs of the state at every step.

Marczak, Twardowski, Trzciński, Cygert. "MagMax: Leveraging Model Merging for Seamless Continual
Learning", ECCV 2024. arXiv:2407.06322.
"""

from __future__ import annotations

import torch
from torch import Tensor

from magmax.merging.base import MergeMethod, register


@register
class MagMax(MergeMethod):
    name = "magmax"
    summary = "per parameter, the task-vector entry of largest magnitude (ties: later task)"
    reference = "Marczak et al., MagMax, ECCV 2024, arXiv:2407.06322"
    default_scale = 0.5
    foldable = True

    def init(self, key: str, first: Tensor) -> tuple[Tensor, Tensor]:
        return first.clone(), first.abs()

    def update(self, state: tuple[Tensor, Tensor], tau: Tensor, t: int, key: str) -> tuple[Tensor, Tensor]:
        best, best_abs = state
        cur_abs = tau.abs()
        take = cur_abs >= best_abs
        torch.where(take, tau, best, out=best)
        torch.where(take, cur_abs, best_abs, out=best_abs)
        return best, best_abs

    def result(self, state: tuple[Tensor, Tensor], key: str) -> Tensor:
        return state[0]
