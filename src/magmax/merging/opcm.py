"""OPCM (Orthogonal Projection-based Continual Merging): each new task vector is merged orthogonally
to the dominant directions of the running merge, and the result is rescaled to the mean task norm.

Stream τ_1, τ_2, … . The running sum S starts at S_1 = τ_1. For task t ≥ 2 and a matrix tensor,
with the thin SVD S_{t−1} = U·diag(σ)·Vᵀ (r = min(m, n) triplets):

    k   = the first 0-based i with (σ_1 + … + σ_{i+1}) / Σ_j σ_j > α        (α = 0.5)
    P   = Uᵀ·τ_t·V;   Z = P on the block [:k, :k] and on the diagonal, 0 elsewhere
    τ̃_t = τ_t − U·Z·Vᵀ          (τ_t without its overlap with S's first k directions and without
                                  its component along every pair (u_i, v_i))
    S_t = S_{t−1} + τ̃_t
For non-matrix tensors τ̃_t = τ_t. After t tasks, over the whole model (all merged tensors at once):

    λ_t = ‖S_t‖ / ((1/t)·Σ_{i≤t} ‖τ_i‖),      τ* = S_t / λ_t,        θ = θ0 + λ·τ*,  λ = 1

so the merged task vector always has the mean norm of the task vectors seen. OPCM's own λ_t is
inside τ*; the magmax ``scale`` λ multiplies on top and defaults to 1.

This is FusionBench's ``OPCMForCLIP`` (the authors' code) written in closed form: it keeps
τ̃ = S/λ and updates θ0 + (λ_{t−1}·τ̃_{t−1} + τ̃_t)/λ_t, which is the same S_t / λ_t, and it
projects with the SVD of τ̃_{t−1} = S_{t−1}/λ_{t−1}, whose singular vectors and energy ratios are
those of S_{t−1}. Hence the result after every prefix of the stream equals the reference's merged
model after that prefix, up to float rounding. Details kept from the reference: k is the argmax
index of the threshold test (the block excludes the direction that crosses α), the diagonal is
removed for every i, and norms are over all floating-point tensors. Where this differs:
* The reference projects with full bases (U: m×m, V: n×n); U·Z·Vᵀ only involves the first r
  columns, so the thin SVD gives the same τ̃_t at O(m·n·r) cost.
* Which tensors count as matrices: the reference projects ``nn.Linear`` weights only. A state dict
  has no module types, so here a matrix is any 2-D tensor whose name matches none of ``exclude``,
  which defaults to ``("*embed*",)`` so that embedding tables (position, token, word embeddings)
  stay non-matrix as in the reference. Conv kernels (4-D), biases and norms are non-matrix.
* The reference never updates parameters held directly by a non-leaf module (e.g. CLIP's
  ``class_embedding``) after the first model, an artefact of its walk over leaf modules; here
  every tensor is merged by the rule above.
* If S_{t−1} is zero for a tensor (σ sums to 0), the reference's threshold is NaN and its
  projection depends on the arbitrary singular vectors of a zero matrix; here τ̃_t = τ_t.

A fold (``foldable``): the state per tensor is S (one tensor, whatever t) and the per-task squared
norms of that tensor (t floats); the global norms come from ``reduce_states``. The batch merge needs
every tensor's S before any result (the norms are global). When the models are in memory already
(``TaskSlices.resident``), the statistics pass keeps each S until that tensor's ``merge_tensor``
scales it: T−1 SVDs per matrix, and one model's worth of memory held, which the merged model itself
then takes over. Out of core, where that would make memory grow with the model, the fold runs again
for the result: 2(T−1) SVDs per matrix.

Tang, Zhang, Li, Shen, Tao. "Merging Models on the Fly Without Retraining: A Sequential Approach
to Scalable Continual Model Merging", arXiv:2501.09522 (2025).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from magmax.merging._subspace import SubspaceOptions, is_matrix, thin_svd
from magmax.merging.base import MergeMethod, register

OpcmState = tuple[Tensor, tuple[float, ...]]


class OPCMOptions(SubspaceOptions):
    exclude: tuple[str, ...] = ("*embed*",)
    """Glob patterns of 2-D tensor names merged without projection (default: embedding tables)."""

    alpha: float = Field(default=0.5, ge=0.0, lt=1.0)
    """Energy threshold α: the block of S's leading directions whose cumulative σ stays ≤ α is protected."""


def squared_norm(tensor: Tensor) -> float:
    """‖x‖² accumulated in float64, so that global norms do not depend on the float32 rounding of big sums."""
    return float(tensor.to(torch.float64).square().sum())


def split_rank(singular_values: Tensor, alpha: float) -> int:
    """The reference's k: argmax of (cumsum(σ)/Σσ > α), i.e. the first index whose cumulative energy exceeds α."""
    above = (singular_values.cumsum(dim=0) / singular_values.sum()) > alpha
    return int(above.to(torch.float32).argmax())


def project_out(merged: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """τ − U·Z·Vᵀ: τ without the parts the reference zeroes in the SVD basis of ``merged``."""
    u, s, vh = thin_svd(merged)
    if not bool(s.sum() > 0):
        return tau.clone()
    k = split_rank(s, alpha)
    projected = u.T @ tau @ vh.T
    removed = torch.diag_embed(projected.diagonal())
    removed[:k, :k] = projected[:k, :k]
    return tau - u @ removed @ vh


@register
class OPCM(MergeMethod):
    name = "opcm"
    summary = "continual merge: each task projected off the merge's dominant directions, rescaled to the mean task norm"
    reference = "Tang et al., Merging Models on the Fly Without Retraining (OPCM), arXiv:2501.09522"
    Options = OPCMOptions
    default_scale = 1.0
    foldable = True
    uses_global_reduce = True

    def __init__(self, options: OPCMOptions | None = None):
        super().__init__(options)
        self._mean_task_norm: float | None = None
        self._merged_norm: float | None = None
        self._folded: dict[str, OpcmState] = {}
        """Fold states of the statistics pass, kept for ``merge_tensor`` (models in memory only)."""

    def global_contribution(self, key: str, slices: Sequence[Tensor]) -> OpcmState:
        state = self.fold(key, slices)
        if getattr(slices, "resident", False):
            self._folded[key] = state
        return state

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        state = self._folded.pop(key, None)
        return self.result(state if state is not None else self.fold(key, slices), key)

    def init(self, key: str, first: Tensor) -> OpcmState:
        return first.to(torch.float32).clone(), (squared_norm(first),)

    def update(self, state: OpcmState, tau: Tensor, t: int, key: str) -> OpcmState:
        merged, task_norms = state
        if is_matrix(key, merged, self.options.exclude):
            merged.add_(project_out(merged, tau, self.options.alpha))
        else:
            merged.add_(tau)
        return merged, (*task_norms, squared_norm(tau))

    def reduce_states(self, states: Iterable[tuple[str, Any]]) -> None:
        """Global norms: ‖τ_i‖ and ‖S‖ over every merged tensor (sums of per-tensor squares, key order)."""
        task_sq: list[float] = []
        merged_sq = 0.0
        for _, (merged, task_norms) in states:
            if not task_sq:
                task_sq = [0.0] * len(task_norms)
            for i, value in enumerate(task_norms):
                task_sq[i] += value
            merged_sq += squared_norm(merged)
        self._mean_task_norm = sum(math.sqrt(v) for v in task_sq) / len(task_sq) if task_sq else 0.0
        self._merged_norm = math.sqrt(merged_sq)

    def result(self, state: OpcmState, key: str) -> Tensor:
        if self._merged_norm is None or self._mean_task_norm is None:
            raise RuntimeError("opcm needs reduce_states() over all tensors first: use magmax.merge or Merger")
        merged, _ = state
        if self._merged_norm == 0.0:
            return merged
        # For one task the two norms are the same sums in the same order: the factor is exactly 1.
        return merged * (self._mean_task_norm / self._merged_norm)
