"""TSV-M (Task Singular Vectors: Merge): each task keeps its top 1/T of singular directions, decorrelated.

For a matrix (m×n, r = min(m, n)) with per-task SVDs τ_t = U_t·diag(σ_t)·V_tᵀ and k = ⌊r/T⌋:

    U = [U_1[:, :k] … U_T[:, :k]]    (m × Tk)      Σ = diag(σ_1[:k] … σ_T[:k])
    V = [V_1[:, :k] … V_T[:, :k]]    (n × Tk)
    U⊥ = P_U·Q_Uᵀ  where U = P_U·S_U·Q_Uᵀ          (orthonormal factor: "whitening" of U)
    V⊥ = P_V·Q_Vᵀ  where V = P_V·S_V·Q_Vᵀ
    τ* = U⊥·Σ·V⊥ᵀ,        θ = θ0 + λ·τ*,  λ = 1

Each task's low-rank approximation keeps its singular values; the orthogonalisation removes the
overlap (interference) between the tasks' singular vectors. Non-matrix tensors (biases, norms,
1-D and 4-D tensors, names matching ``exclude``) are averaged: τ* = (1/T)·Σ_t τ_t. Matrices are all
2-D tensors, embedding tables included, as in the reference (which excludes only CLIP's unused
``text_projection``; pass ``exclude`` for that).

Reference details kept: k = ⌊r/T⌋ (the reference writes ``int(r * (1/T))``, which agrees except for
float round-off at T = 49), so a matrix with r < T gets k = 0 and τ* = 0, as in the reference.
The orthonormal factors are taken of the Tk filled columns only; the reference pads U and V with
zero columns up to r, which changes nothing in exact arithmetic (zero columns meet zero singular
values). λ = 1 is FusionBench's default (the paper also sweeps it on validation data).

One pass over the T slices (one SVD each; U, Σ, V are filled in place): memory is O(1) in T
(an m×r, an r×n and an r-vector). Not a fold: k depends on T.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà. "Task Singular Vectors: Reducing
Task Interference in Model Merging", CVPR 2025. arXiv:2412.00081.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from magmax.merging._subspace import SubspaceOptions, is_matrix, mean_slices, polar_factor, thin_svd
from magmax.merging.base import MergeMethod, register


def tsv_merge_matrix(slices: Sequence[Tensor], first: Tensor) -> Tensor:
    """U⊥·Σ·V⊥ᵀ from the top ⌊r/T⌋ singular triplets of every τ_t (``first`` = τ_1, already loaded)."""
    count = len(slices)
    rows, cols = first.shape
    per_task = min(rows, cols) // count
    if per_task == 0:
        return torch.zeros(rows, cols, dtype=torch.float32, device=first.device)
    width = per_task * count
    u_cat = torch.empty(rows, width, dtype=torch.float32, device=first.device)
    s_cat = torch.empty(width, dtype=torch.float32, device=first.device)
    vh_cat = torch.empty(width, cols, dtype=torch.float32, device=first.device)
    for t in range(count):
        u, s, vh = thin_svd(first if t == 0 else slices[t])
        block = slice(t * per_task, (t + 1) * per_task)
        u_cat[:, block] = u[:, :per_task]
        s_cat[block] = s[:per_task]
        vh_cat[block, :] = vh[:per_task, :]
    return (polar_factor(u_cat) * s_cat) @ polar_factor(vh_cat)


@register
class TaskSingularVectors(MergeMethod):
    name = "tsv"
    summary = "TSV-M: top 1/T singular directions of each task, orthogonalised across tasks (mean off matrices)"
    reference = "Gargiulo et al., Task Singular Vectors, CVPR 2025, arXiv:2412.00081"
    Options = SubspaceOptions
    default_scale = 1.0

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        first = slices[0]
        if is_matrix(key, first, self.options.exclude):
            return tsv_merge_matrix(slices, first)
        return mean_slices(slices, first)
