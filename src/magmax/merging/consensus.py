"""Consensus Task Arithmetic: the task-arithmetic sum restricted to weights that at least k tasks use.

    τ_MTL = Σ_t τ_t                                               (the multi-task vector)
    m_t[p] = 1  if |τ_t[p]| > λ_m·|τ_MTL[p] − τ_t[p]|  else 0     (TALL mask of task t, λ_m = 0.6)
    c[p]   = 1  if Σ_t m_t[p] ≥ k  else 0                         (consensus mask, k = 2)
    τ*     = c ⊙ τ_MTL,        θ = θ0 + λ·τ*,  λ = 0.3

A TALL mask keeps, for task t, the weights where the multi-task model θ0 + τ_MTL is closer to the
fine-tuned θ_t than θ0 is, up to λ_m (|θ0 − θ_t| = |τ_t| and |θ_MTL − θ_t| = |τ_MTL − τ_t|); the
comparison is strict, as in the reference. Weights no task keeps ("catastrophic") or only one keeps
("selfish") are dropped with k = 2; k = 1 drops only the catastrophic ones, k = 0 is plain task
arithmetic, k > T gives τ* = 0.

λ_m: the paper selects it per task on validation data from {0.2, …, 0.6}; with no validation data
here it is one value for all tasks, FusionBench's default 0.6 (``tall_mask_lambda``). λ: tuned on
validation data in the paper, like task arithmetic; the default 0.3 is task arithmetic's.
The consensus-TIES variant (TIES instead of the sum as τ_MTL) is not offered.

Two passes over the T slices of a tensor (the sum, then the masks), each loading one τ_t at a time:
memory is O(1) in T. Not a fold: every mask needs the final sum.

Wang, Dimitriadis, Ortiz-Jiménez, Fleuret, Frossard. "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024. arXiv:2405.07813.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from magmax.merging._subspace import sum_slices
from magmax.merging.base import MergeMethod, MethodOptions, register


class ConsensusOptions(MethodOptions):
    tall_mask_lambda: float = Field(default=0.6, ge=0.0)
    """λ_m of the TALL masks: task t keeps p when |τ_t[p]| > λ_m·|τ_MTL[p] − τ_t[p]|."""

    k: int = Field(default=2, ge=0)
    """Keep a weight when at least k tasks' TALL masks keep it (2: drop catastrophic and selfish weights)."""


def consensus_merge(slices: Sequence[Tensor], tall_mask_lambda: float, k: int) -> Tensor:
    """c ⊙ Σ_t τ_t with c = [#{t : |τ_t| > λ_m·|Σ − τ_t|} ≥ k] (see the module docstring)."""
    total = sum_slices(slices)
    votes = torch.zeros(total.shape, dtype=torch.int32, device=total.device)
    for t in range(len(slices)):
        tau = slices[t]
        votes += tau.abs() > (total - tau).abs().mul_(tall_mask_lambda)
    # A product, not a where: the reference multiplies the sum by the mask.
    return total.mul_(votes >= k)


@register
class Consensus(MergeMethod):
    name = "consensus"
    summary = "task-arithmetic sum on the weights that at least k tasks' TALL masks keep"
    reference = "Wang et al., Localizing Task Information for Model Merging (TALL masks), ICML 2024, arXiv:2405.07813"
    Options = ConsensusOptions
    default_scale = 0.3

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        return consensus_merge(slices, self.options.tall_mask_lambda, self.options.k)
