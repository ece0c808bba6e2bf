"""Weight averaging: the mean task vector.

    τ* = (1/T)·Σ_t τ_t,        θ = θ0 + λ·τ*,  λ = 1   (= the mean of the fine-tuned weights)

The MagMax paper's "Avg" baseline (the reference writes it as task arithmetic with λ = 1/T).
Wortsman et al., "Model soups", ICML 2022.
"""

from __future__ import annotations

from torch import Tensor

from magmax.merging.base import MergeMethod, register


@register
class Average(MergeMethod):
    name = "average"
    summary = "mean of the task vectors (= mean of the fine-tuned weights at λ = 1)"
    reference = "Wortsman et al., Model soups, ICML 2022; MagMax paper's Avg baseline"
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
        return total / count
