"""Weight averaging: the mean task vector.

    τ* = (1/T)·Σ_t τ_t,        θ = θ0 + λ·τ*,  λ = 1   (= the mean of the fine-tuned weights)

The MagMax paper's "Avg" baseline (the reference writes it as task arithmetic with λ = 1/T).
Computed as the float32 sum of task arithmetic, left to right, then one division by T (not a
multiplication by 1/T), the same in the batch and the streaming fold and on every device.
Wortsman et al., "Model soups", ICML 2022.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from magmax.merging import fold
from magmax.merging.base import MergeMethod, TaskSlices, register
from magmax.merging.task_arithmetic import sum_kernel


@register
class Average(MergeMethod):
    name = "average"
    summary = "mean of the task vectors (= mean of the fine-tuned weights at λ = 1)"
    reference = "Wortsman et al., Model soups, ICML 2022; MagMax paper's Avg baseline"
    default_scale = 1.0
    foldable = True
    folds_natively = True
    key_independent = True
    merges_many = True

    def init(self, key: str, first: Tensor) -> tuple[Tensor, int]:
        return first.to(torch.float32, copy=True), 1

    def update(self, state: tuple[Tensor, int], tau: Tensor, t: int, key: str) -> tuple[Tensor, int]:
        total, count = state
        return fold.update_state(sum_kernel, total, tau, t), count + 1

    def result(self, state: tuple[Tensor, int], key: str) -> Tensor:
        total, count = state
        return fold.mean_of_sum(total.clone(), count)

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        return fold.fold_slices(sum_kernel, slices, divide=True)

    def merge_into_base(self, key: str, slices: TaskSlices, scale: float) -> Tensor | None:
        return fold.fold_slices(sum_kernel, slices, divide=True, scale=scale) if slices.base is not None else None

    def merge_tensors(self, keys: Sequence[str], slices: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        # The GPU kernel divides by T itself, correctly rounded, as mean_of_sum does.
        many = fold.fold_many(sum_kernel, slices, divide=True)
        return many if many is not None else super().merge_tensors(keys, slices)
