"""Model Breadcrumbs: per tensor, mask the largest (outliers) and the smallest magnitudes, then sum.

For each tensor (layer-wise) of each task vector, with n entries, n_bot = int(bottom·n), n_top = int(top·n):

    lo = kthvalue(|τ_t|, n_bot + 1),   hi = kthvalue(|τ_t|, n − n_top)     (ascending, 1-based)
    τ̃_t = τ_t ⊙ [ lo <= |τ_t| <= hi ]                (bounds inclusive: ties at a bound are kept)
    τ* = Σ_t τ̃_t,        θ = θ0 + λ·τ*,  λ = 0.3

``bottom`` is the paper's β (fraction of the smallest magnitudes masked, default 0.85) and ``top`` is 1 − the
paper's γ percentile (fraction of the largest magnitudes masked, default 0.007, i.e. γ = 0.993); these are
the paper's recommended values as used by its public re-implementations. In mergekit's terms
density = 1 − bottom − top and gamma = top. The paper tunes λ on validation data; the default 0.3 is the
task-arithmetic default for 8 CLIP tasks. A mask with no count to remove (n_bot = n_top = 0, e.g. tiny
tensors) keeps the tensor whole. The authors' code masks per row of the last dimension with top-k index
selection; this module follows the paper's per-layer description with thresholds, which makes ties
deterministic and the result independent of the sort algorithm.

The mask depends only on (tensor, task), so the merge is a fold with one tensor of state (the sum).

Davari, Belilovsky. "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024.
arXiv:2312.06795.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from magmax.merging.base import MergeMethod, MethodOptions, register


class BreadcrumbsOptions(MethodOptions):
    bottom: float = Field(0.85, ge=0, lt=1, description="fraction of smallest magnitudes masked per tensor (β)")
    top: float = Field(0.007, ge=0, lt=1, description="fraction of largest magnitudes masked per tensor (1 − γ)")

    @model_validator(mode="after")
    def _band_not_empty(self) -> "BreadcrumbsOptions":
        if self.bottom + self.top >= 1:
            raise ValueError(f"bottom + top = {self.bottom + self.top:g} masks everything; make it < 1")
        return self


def breadcrumbs_mask(tau: Tensor, bottom: float, top: float) -> Tensor | None:
    """[lo <= |τ| <= hi] for one tensor (see the module docstring), or None when nothing is masked."""
    n = tau.numel()
    n_bottom, n_top = int(bottom * n), int(top * n)
    if n_bottom == 0 and n_top == 0:
        return None
    magnitude = tau.abs()
    flat = magnitude.reshape(-1)
    keep: Tensor | None = None
    if n_bottom:
        keep = magnitude >= torch.kthvalue(flat, n_bottom + 1).values
    if n_top:
        below_outliers = magnitude <= torch.kthvalue(flat, n - n_top).values
        keep = below_outliers if keep is None else keep & below_outliers
    return keep


@register
class Breadcrumbs(MergeMethod):
    name = "breadcrumbs"
    summary = "per tensor, mask the top outliers and the small magnitudes of each τ, then sum"
    reference = "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, arXiv:2312.06795"
    Options = BreadcrumbsOptions
    default_scale = 0.3
    foldable = True

    def _sparsified(self, tau: Tensor) -> Tensor:
        keep = breadcrumbs_mask(tau, self.options.bottom, self.options.top)
        # The fold adds into its state in place, so the first slice must never be returned as is.
        return tau.clone() if keep is None else torch.where(keep, tau, 0.0)

    def init(self, key: str, first: Tensor) -> Tensor:
        return self._sparsified(first)

    def update(self, state: Tensor, tau: Tensor, t: int, key: str) -> Tensor:
        return state.add_(self._sparsified(tau))

    def result(self, state: Tensor, key: str) -> Tensor:
        return state
