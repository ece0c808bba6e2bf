"""Model Breadcrumbs: per tensor, mask the largest (outliers) and the smallest magnitudes, then sum.

For each tensor (layer-wise) of each task vector, with n entries, n_bot = int(bottom·n), n_top = int(top·n),
and the entries in a stable ascending order by |τ_t| (among equal magnitudes the lower flat index counts as
the smaller):

    τ̃_t = τ_t ⊙ [ n_bot <= rank(i) < n − n_top ]      (rank: 0-based position in that order)
    τ* = Σ_t τ̃_t,        θ = θ0 + λ·τ*,  λ = 0.3

so exactly n_bot smallest and n_top largest magnitudes are masked and n − n_bot − n_top entries kept per
tensor, however many magnitudes are equal (the authors' rule; bfloat16 task vectors are full of ties). The
kernel computes it without sorting: lo = kthvalue(|τ_t|, n_bot + 1) and hi = kthvalue(|τ_t|, n − n_top)
bound the band; entries strictly inside are kept; of the entries equal to lo, the first
n_bot − #{|τ_t| < lo} by index are masked, and of those equal to hi, the last n_top − #{|τ_t| > hi}.

``ties="keep"``: the bounds inclusive, τ̃_t = τ_t ⊙ [lo <= |τ_t| <= hi], so every entry tied with a bound
is kept and more than n − n_bot − n_top may survive (32% instead of 14.3% at the defaults on a bfloat16
checkpoint's task vectors); the same as ``exact`` where no tie straddles a bound.

``bottom`` is the paper's β (fraction of the smallest magnitudes masked, default 0.85) and ``top`` is 1 − the
paper's γ percentile (fraction of the largest magnitudes masked, default 0.007, i.e. γ = 0.993); these are
the paper's recommended values as used by its public re-implementations. In mergekit's terms
density = 1 − bottom − top and gamma = top. The paper tunes λ on validation data; the default 0.3 is the
task-arithmetic default for 8 CLIP tasks. A mask with no count to remove (n_bot = n_top = 0, e.g. tiny
tensors) keeps the tensor whole. The authors' code masks per row of the last dimension with top-k index
selection; this module follows the paper's per-layer description, with ties broken by index so that the
result is deterministic and independent of the sort algorithm.

The mask depends only on (tensor, task), so the merge is a fold with one tensor of state (the sum).

How it computes: :func:`breadcrumbs_mask` and a sum in task order are the rule in plain torch (``kthvalue``
and ``where`` per task). On CPU a backend (``fold.accelerated("breadcrumbs", ...)``) finds the same exact
bounds without sorting and sums the banded τ_t in one pass per group, writing θ0 + λ·τ*; the same float32
additions in the same order.

Davari, Belilovsky. "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024.
arXiv:2312.06795.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from magmax.merging import _weights, fold
from magmax.merging.base import MergeMethod, MethodOptions, TaskSlices, register


class BreadcrumbsOptions(_weights.WeightedOptions):
    bottom: float = Field(0.85, ge=0, lt=1, description="fraction of smallest magnitudes masked per tensor (β)")
    top: float = Field(0.007, ge=0, lt=1, description="fraction of largest magnitudes masked per tensor (1 − γ)")
    ties: Literal["exact", "keep"] = Field(
        "exact", description="exact: mask exactly int(bottom·n) and int(top·n) entries, ties by index; "
                             "keep: keep every entry tied with a band edge (bounds inclusive)")

    @model_validator(mode="after")
    def _band_not_empty(self) -> "BreadcrumbsOptions":
        if self.bottom + self.top >= 1:
            raise ValueError(f"bottom + top = {self.bottom + self.top:g} masks everything; make it < 1")
        return self


def breadcrumbs_mask(tau: Tensor, bottom: float, top: float, ties: str = "exact") -> Tensor | None:
    """The kept entries of one tensor (see the module docstring), or None when nothing is masked."""
    n = tau.numel()
    n_bottom, n_top = int(bottom * n), int(top * n)
    if n_bottom == 0 and n_top == 0:
        return None
    magnitude = tau.abs().reshape(-1)
    keep = torch.ones(n, dtype=torch.bool, device=tau.device)
    if n_bottom:
        lo = torch.kthvalue(magnitude, n_bottom + 1).values
        keep &= magnitude >= lo
        if ties == "exact":  # the smallest ranks among the entries equal to lo are the first by index
            surplus = n_bottom - int((magnitude < lo).sum())
            keep[torch.nonzero(magnitude == lo).view(-1)[:surplus]] = False
    if n_top:
        hi = torch.kthvalue(magnitude, n - n_top).values
        keep &= magnitude <= hi
        if ties == "exact":  # the largest ranks among the entries equal to hi are the last by index
            surplus = n_top - int((magnitude > hi).sum())
            tied = torch.nonzero(magnitude == hi).view(-1)
            keep[tied[tied.numel() - surplus:]] = False
    return keep.view(tau.shape)


@register
class Breadcrumbs(MergeMethod):
    name = "breadcrumbs"
    summary = "per tensor, mask the top outliers and the small magnitudes of each τ, then sum"
    reference = "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, arXiv:2312.06795"
    Options = BreadcrumbsOptions
    default_scale = 0.3
    foldable = True

    # The native fold forms every τ_t and counts the finite sums; where it does not run, the engine checks.
    folds_natively = True

    def _sparsified(self, tau: Tensor) -> Tensor:
        keep = breadcrumbs_mask(tau, self.options.bottom, self.options.top, self.options.ties)
        # The fold adds into its state in place, so the first slice must never be returned as is.
        return tau.clone() if keep is None else torch.where(keep, tau, 0.0)

    def init(self, key: str, first: Tensor) -> Tensor:
        state = torch.empty(first.shape, dtype=torch.float32, device=first.device)
        if self._native_group(state.view(-1), None, [first.reshape(-1)], True, None) is None:
            return self._sparsified(first)
        return state

    def update(self, state: Tensor, tau: Tensor, t: int, key: str) -> Tensor:
        if self._native_group(state.view(-1), None, [tau.reshape(-1)], False, None) is None:
            state.add_(self._sparsified(tau))
        return state

    def result(self, state: Tensor, key: str) -> Tensor:
        return state

    def __init__(self, options: MethodOptions | None = None):
        super().__init__(options)
        _weights.use_plain_kernels(self)

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        if _weights.weighted(self):
            weights = _weights.weights_for(self, len(slices))
            return _weights.weighted_sum(slices, weights, lambda tau, t: self._sparsified(tau))
        merged = self._native_fold(slices, None)
        return merged if merged is not None else super().merge_tensor(key, slices)

    def merge_into_base(self, key: str, slices: TaskSlices, scale: float) -> Tensor | None:
        return self._native_fold(slices, scale) if slices.base is not None and not _weights.weighted(self) else None

    def _native_group(self, state: Tensor, base: Tensor | None, inputs: list[Tensor], first: bool,
                      scale: float | None) -> bool | None:
        """One group of the fold by a backend: whether it added θ0, or None where none takes it."""
        fast = fold.accelerated(self.name, "group")
        return None if fast is None else fast(self.options, state, base, inputs, first, scale)

    def _native_fold(self, slices: Sequence[Tensor], scale: float | None) -> Tensor | None:
        """τ* (or θ0 + scale·τ*) by a backend; None where none takes the inputs."""
        fast = fold.accelerated(self.name, "fold")
        return None if fast is None else fast(self.options, slices, scale)
