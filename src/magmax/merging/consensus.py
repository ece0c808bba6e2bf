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

How it computes: every mask needs the final sum, so this is not a fold. On CPU (numba, float32 and
bfloat16 checkpoints), when a tensor's inputs are in memory or at most ``_fused.GROUP`` of them, one
kernel walks blocks of entries, summing the block's τ_t in task order and then voting against that
sum while the block's inputs are still in cache: each input is read from memory once, and θ0 + λ·τ*
is written in the same pass. Out of core with more inputs, a sum pass and a vote pass over groups of
``GROUP`` inputs (memory O(1) in T). Elsewhere (other dtypes, a GPU), the torch kernel: two passes over
the T slices, loading one τ_t at a time. All three make the same float32 operations in the same order.

Wang, Dimitriadis, Ortiz-Jiménez, Fleuret, Frossard. "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024. arXiv:2405.07813.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from magmax.merging import _fused, _native, _weights
from magmax.merging._subspace import sum_slices
from magmax.merging.base import MergeMethod, MethodOptions, TaskSlices, register
from magmax.merging.task_arithmetic import sum_kernel
from magmax.taskvector import add_scaled


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
        merged = self._native(slices, None) if _native.enabled() else None
        return merged if merged is not None else consensus_merge(slices, self.options.tall_mask_lambda, self.options.k)

    def merge_into_base(self, key: str, slices: TaskSlices, scale: float) -> Tensor | None:
        if _weights.weighted(self):
            return None
        return self._native(slices, scale) if _native.enabled() and slices.base is not None else None

    def _native(self, slices: Sequence[Tensor], scale: float | None) -> Tensor | None:
        """τ* (or θ0 + scale·τ*) by the numba kernels; None where they do not take the inputs."""
        try:
            return self._native_merge(slices, scale)
        except Exception as exc:  # the native kernels are an optimisation: the torch kernel is exact too
            _native.disable(exc)
            return None

    def _native_merge(self, slices: Sequence[Tensor], scale: float | None) -> Tensor | None:
        lam, least = self.options.tall_mask_lambda, self.options.k
        count = len(slices)
        operands = _fused._operands_of(slices)
        size = count if getattr(slices, "resident", False) else _fused.GROUP
        if count <= size:  # every input in one call: one read of each
            _, _, base, xs, shape = next(_fused.groups(operands, count, size))
            if not _native.accepts_inputs(base, xs, size):
                return None
            out = torch.empty(xs[0].numel(), dtype=torch.float32)
            if not _native.consensus_group(out, base, xs, lam, least, scale) and scale is not None:
                add_scaled(base, out, scale, out=out)
            return out.view(shape)
        # Out of core with more inputs than a group: the sum, then the votes, group by group.
        total = _fused.fold_operands(sum_kernel, operands, count)
        shape = total.shape
        total = total.view(-1)
        votes = torch.zeros(total.shape[0], dtype=torch.int32)
        base = None
        for _, _, base, xs, _ in _fused.groups(operands, count):
            if not _native.accepts_inputs(base, xs, _fused.GROUP):
                return None  # (other dtypes: rare out of core) the torch kernel starts over
            _native.tall_votes(total, votes, base, xs, lam)
            del xs  # before the next group is read: at most GROUP raw tensors at a time
        merged = total.mul_(votes >= least)
        if scale is not None:
            add_scaled(base, merged, scale, out=merged)
        return merged.view(shape)
