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

How it computes: every mask needs the final sum, so this is not a fold. :func:`consensus_merge` is the
rule in plain torch: two passes over the T slices, loading one τ_t at a time. On CPU a backend computes
the same in one read of each input (``fold.accelerated("consensus", "merge")``), with the same float32
operations in the same order.

Wang, Dimitriadis, Ortiz-Jiménez, Fleuret, Frossard. "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024. arXiv:2405.07813.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from magmax.merging import _weights, fold
from magmax.merging._subspace import sum_slices
from magmax.merging.base import MergeMethod, MethodOptions, TaskSlices, register
from magmax.merging.task_arithmetic import sum_kernel


class ConsensusOptions(_weights.WeightedOptions):
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

    # The native kernel counts finite sums of every τ_t it forms; where it does not run, the engine checks.
    folds_natively = True

    def __init__(self, options: MethodOptions | None = None):
        super().__init__(options)
        _weights.use_plain_kernels(self)

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        if _weights.weighted(self):
            weighted = _weights.WeightedSlices(slices, _weights.weights_for(self, len(slices)))
            return consensus_merge(weighted, self.options.tall_mask_lambda, self.options.k)
        merged = self._accelerated(slices, None)
        return merged if merged is not None else consensus_merge(slices, self.options.tall_mask_lambda, self.options.k)

    def merge_into_base(self, key: str, slices: TaskSlices, scale: float) -> Tensor | None:
        if _weights.weighted(self) or slices.base is None:
            return None
        return self._accelerated(slices, scale)

    def _accelerated(self, slices: Sequence[Tensor], scale: float | None) -> Tensor | None:
        """τ* (or θ0 + scale·τ*) by a backend's single-pass kernel; None where none takes the inputs."""
        fast = fold.accelerated(self.name, "merge")
        if fast is None:
            return None
        return fast(slices, scale, self.options.tall_mask_lambda, self.options.k,
                    lambda operands, count: fold.fold_operands(sum_kernel, operands, count))
