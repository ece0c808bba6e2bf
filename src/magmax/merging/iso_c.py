"""Iso-C (Isotropic merging in the Common subspace): the task-arithmetic sum with a flat spectrum.

For a matrix:

    M = Σ_t τ_t = U·diag(σ)·Vᵀ        (thin SVD, r = min(m, n) singular values)
    τ* = σ̄·U·Vᵀ,   σ̄ = (1/r)·Σ_i σ_i,        θ = θ0 + λ·τ*,  λ = 1

Every direction of the sum's subspace gets the same weight, so the few dominant directions of task
arithmetic no longer drown the others. Non-matrix tensors (biases, norms, 1-D and 4-D tensors,
names matching ``exclude``) are averaged, as the reference does: τ* = (1/T)·Σ_t τ_t. Matrices are
all 2-D tensors, embeddings included (see :mod:`magmax.merging._subspace`).

λ: the paper tunes α on validation data over (0, 3] (the reference code sweeps 0.15 … 3.0);
the default 1.0 is FusionBench's (its documentation's examples use 1.5 for CLIP ViTs, 8 tasks).

One pass over the T slices (a running sum) and one SVD: memory O(1) in T. Written as a fold
(``foldable``: the sum is the state), so :class:`magmax.Merger` keeps only the running sum.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer. "No Task Left Behind: Isotropic
Model Merging with Common and Task-Specific Subspaces", ICML 2025. arXiv:2502.04959.
"""

from __future__ import annotations

from torch import Tensor

from magmax.merging._subspace import SubspaceOptions, is_matrix, thin_svd
from magmax.merging.base import MergeMethod, register


def isotropic(matrix: Tensor) -> Tensor:
    """σ̄·U·Vᵀ for matrix = U·diag(σ)·Vᵀ: same singular vectors, every singular value their mean."""
    u, s, vh = thin_svd(matrix)
    return (u * s.mean()) @ vh


@register
class IsoC(MergeMethod):
    name = "iso_c"
    summary = "Iso-C: sum of the task vectors with every singular value set to their mean (mean off matrices)"
    reference = "Marczak et al., No Task Left Behind: Isotropic Model Merging, ICML 2025, arXiv:2502.04959"
    Options = SubspaceOptions
    default_scale = 1.0
    foldable = True

    def init(self, key: str, first: Tensor) -> tuple[Tensor, int]:
        return first.clone(), 1

    def update(self, state: tuple[Tensor, int], tau: Tensor, t: int, key: str) -> tuple[Tensor, int]:
        total, count = state
        total.add_(tau)
        return total, count + 1

    def result(self, state: tuple[Tensor, int], key: str) -> Tensor:
        total, count = state
        if is_matrix(key, total, self.options.exclude):
            return isotropic(total)
        return total / count
