"""Iso-CTS (Isotropic merging in Common and Task-Specific subspaces).

For a matrix (m×n, r = min(m, n)), with M = Σ_t τ_t = U·diag(σ)·Vᵀ:

    c  = r − T·s,   s = round((r − ⌊f·r⌋)/T)           (common dims; s task-specific dims per task;
                                                         f = common_space_fraction = 0.8)
    common:   U_c = U[:, :c],  σ_c = σ[:c],  V_c = V[:, :c]
    task t:   τ_t − U_c·U_cᵀ·τ_t = P_t·diag(ρ_t)·Q_tᵀ   (the part of τ_t outside the common subspace)
    Ū = [P_1[:, :s] … P_T[:, :s]  U_c]     V̄ = [Q_1[:, :s] … Q_T[:, :s]  V_c]     (m×r, n×r)
    Ū⊥, V̄⊥ = orthonormal factors of Ū, V̄  (A = X·S·Yᵀ  ↦  X·Yᵀ)
    σ̄ = mean of the r values (ρ_1[:s] … ρ_T[:s], σ_c)
    τ* = σ̄·Ū⊥·V̄⊥ᵀ,        θ = θ0 + λ·τ*,  λ = 1

The least significant directions of the sum are replaced by each task's own strongest directions
outside the common subspace, then the spectrum is flattened as in Iso-C. The common size is rounded
so that r − c divides evenly among the tasks (Python's ``round``, as the reference); if that
rounding would ask for more than r dimensions (only when f is small and T large), s = ⌊r/T⌋.
s = 0 (e.g. f = 1) makes Iso-CTS equal to Iso-C on that matrix.

Non-matrix tensors (biases, norms, 1-D and 4-D tensors, names matching ``exclude``) are averaged,
as the reference does: τ* = (1/T)·Σ_t τ_t. Matrices are all 2-D tensors (see
:mod:`magmax.merging._subspace`). λ: tuned over (0, 3] on validation data in the paper; the default
1.0 is FusionBench's.

Two passes over the T slices (the sum, then one projection and SVD per task), each loading one τ_t
at a time: memory O(1) in T. Not a fold: the common subspace needs the final sum.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer. "No Task Left Behind: Isotropic
Model Merging with Common and Task-Specific Subspaces", ICML 2025. arXiv:2502.04959.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from magmax.merging._subspace import SubspaceOptions, is_matrix, mean_slices, polar_factor, sum_slices, thin_svd
from magmax.merging.base import MergeMethod, register


class IsoCTSOptions(SubspaceOptions):
    common_space_fraction: float = Field(default=0.8, gt=0.0, le=1.0)
    """Fraction f of the r = min(m, n) dimensions of a matrix given to the common subspace (before rounding)."""


def subspace_split(rank: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dims c, task-specific dims per task s) with c + T·s = rank, as the reference rounds them."""
    per_task = round((rank - int(rank * common_space_fraction)) / tasks)
    if per_task * tasks > rank:
        per_task = rank // tasks
    return rank - per_task * tasks, per_task


def iso_cts_merge_matrix(slices: Sequence[Tensor], common_space_fraction: float, first: Tensor | None = None) -> Tensor:
    """σ̄·Ū⊥·V̄⊥ᵀ (see the module docstring); ``first`` = τ_1 if already loaded."""
    count = len(slices)
    total = sum_slices(slices, first)
    rows, cols = total.shape
    common, per_task = subspace_split(min(rows, cols), count, common_space_fraction)
    u, s, vh = thin_svd(total)
    del total
    u_common = u[:, :common]
    width = per_task * count
    u_all = torch.empty(rows, width + common, dtype=torch.float32, device=u.device)
    s_all = torch.empty(width + common, dtype=torch.float32, device=u.device)
    vh_all = torch.empty(width + common, cols, dtype=torch.float32, device=u.device)
    if per_task > 0:
        for t in range(count):
            tau = slices[t]
            u_t, s_t, vh_t = thin_svd(tau - u_common @ (u_common.T @ tau))
            block = slice(t * per_task, (t + 1) * per_task)
            u_all[:, block] = u_t[:, :per_task]
            s_all[block] = s_t[:per_task]
            vh_all[block, :] = vh_t[:per_task, :]
    u_all[:, width:] = u_common
    s_all[width:] = s[:common]
    vh_all[width:, :] = vh[:common, :]
    return (polar_factor(u_all) * s_all.mean()) @ polar_factor(vh_all)


@register
class IsoCTS(MergeMethod):
    name = "iso_cts"
    summary = "Iso-CTS: common subspace of the sum plus each task's own directions, flat spectrum (mean off matrices)"
    reference = "Marczak et al., No Task Left Behind: Isotropic Model Merging, ICML 2025, arXiv:2502.04959"
    Options = IsoCTSOptions
    default_scale = 1.0

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        first = slices[0]
        if is_matrix(key, first, self.options.exclude):
            return iso_cts_merge_matrix(slices, self.options.common_space_fraction, first)
        return mean_slices(slices, first)
