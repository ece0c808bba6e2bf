"""Per-model weights w_1..w_T for the task-vector methods, with mergekit's semantics.

    task_arithmetic:  τ* = Σ_t w_t·τ_t                                   (mergekit ``task_arithmetic``)
    dare (sum):       τ* = Σ_t w_t·drop(τ_t)                             (mergekit ``dare_linear``, no normalize)
    breadcrumbs:      τ* = Σ_t w_t·band(τ_t)                             (mergekit ``breadcrumbs``, no normalize)
    consensus:        τ* = the consensus merge of the weighted vectors w_t·τ_t (τ_MTL = Σ_t w_t·τ_t, TALL
                      mask of task t: |w_t·τ_t| > λ_m·|τ_MTL − w_t·τ_t|)
    ties / dare (ties): the trimmed (or dropped) τ̂_t weighted, δ_t = w_t·τ̂_t; elected sign s = +1 where
                      Σ_t δ_t >= 0, else −1; τ* = Σ_t δ_t·[sign δ_t = s] / Σ_t w_t·[sign δ_t = s] (a divisor
                      of 0 read as 1): mergekit's ``ties`` / ``dare_ties`` with ``normalize: true``.

The sparsification (TIES's top-k, DARE's drops, the breadcrumbs band) acts on the unweighted τ_t, as in
mergekit (and it is the same on w_t·τ_t for any w_t ≠ 0). Without weights every method is unchanged; with
them the methods use these plain torch kernels (the numba and GPU fast paths do not take weights), walking
the T slices once, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from magmax.errors import MergeInputError
from magmax.merging.base import MergeMethod, MethodOptions


class WeightedOptions(MethodOptions):
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        None, description="per-model weights w_1..w_T, in the order of the models (default: all 1, unweighted)"
    )


def weighted(method: MergeMethod) -> bool:
    return getattr(method.options, "weights", None) is not None


def use_plain_kernels(method: MergeMethod) -> None:
    """With weights: no native/GPU folds, no streaming fold (``magmax.Merger`` keeps the task vectors and
    calls ``merge_tensor``), no model-wide majority sign (the weighted election resolves ties to +)."""
    if not weighted(method):
        return
    method.folds_natively = False
    method.merges_many = False
    method.foldable = False  # type: ignore[misc]
    method.uses_global_reduce = False
    method.defers_global_reduce = False


def weights_for(method: MergeMethod, count: int) -> list[float]:
    weights = list(method.options.weights)  # type: ignore[attr-defined]
    if len(weights) != count:
        raise MergeInputError(
            f"{method.name}: {len(weights)} weights given for {count} fine-tuned models; give one per model"
        )
    return weights


def weighted_sum(slices: Sequence[Tensor], weights: Sequence[float],
                 transform: Callable[[Tensor, int], Tensor] | None = None) -> Tensor:
    """Σ_t w_t·f(τ_t) in float32, left to right (f = ``transform``, default the identity)."""
    total: Tensor | None = None
    for t, w in enumerate(weights):
        tau = slices[t].to(torch.float32)
        if transform is not None:
            tau = transform(tau, t)
        term = tau * w
        total = term if total is None else total.add_(term)
    assert total is not None
    return total


class WeightedSlices(Sequence[Tensor]):
    """w_t·τ_t, each a fresh float32 tensor computed when indexed."""

    def __init__(self, slices: Sequence[Tensor], weights: Sequence[float]):
        self._slices = slices
        self._weights = weights

    def __len__(self) -> int:
        return len(self._weights)

    def __getitem__(self, t: int) -> Tensor:  # type: ignore[override]
        if not 0 <= t < len(self._weights):
            raise IndexError(t)
        return self._slices[t].to(torch.float32) * self._weights[t]


def weighted_disjoint_mean(slices: Sequence[Tensor], weights: Sequence[float],
                           sparsify: Callable[[Tensor, int], Tensor]) -> Tensor:
    """mergekit's TIES combination with ``normalize``: δ_t = w_t·sparsify(τ_t); s = +1 where Σ δ_t >= 0 else
    −1; Σ δ_t·[sign δ_t = s] / Σ w_t·[sign δ_t = s] (divisor 0 → 1). One pass: the running sums of the
    positive and of the negative δ_t and of their weights."""
    pos = neg = pos_w = neg_w = None
    for t, w in enumerate(weights):
        delta = sparsify(slices[t].to(torch.float32), t) * w
        positive, negative = delta > 0, delta < 0
        if pos is None:
            pos, neg = torch.where(positive, delta, 0.0), torch.where(negative, delta, 0.0)
            pos_w = torch.where(positive, w, 0.0)
            neg_w = torch.where(negative, w, 0.0)
        else:
            pos.add_(torch.where(positive, delta, 0.0))
            neg.add_(torch.where(negative, delta, 0.0))
            pos_w.add_(torch.where(positive, w, 0.0))
            neg_w.add_(torch.where(negative, w, 0.0))
    assert pos is not None and neg is not None and pos_w is not None and neg_w is not None
    elect_positive = (pos + neg) >= 0
    numerator = torch.where(elect_positive, pos, neg)
    divisor = torch.where(elect_positive, pos_w, neg_w)
    divisor = torch.where(divisor == 0, 1.0, divisor)
    return numerator / divisor
