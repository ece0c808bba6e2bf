"""Weight averaging: the mean task vector.

    τ* = (1/T)·Σ_t τ_t,        θ = θ0 + λ·τ*,  λ = 1   (= the mean of the fine-tuned weights)

The MagMax paper's "Avg" baseline (the reference writes it as task arithmetic with λ = 1/T).
Computed as the float32 sum of task arithmetic, left to right, then one division by T (not a
multiplication by 1/T), the same in the batch and the streaming fold; in the batch kernel the division
is fused into the last group (:mod:`magmax.merging._fused`).
Wortsman et al., "Model soups", ICML 2022.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from magmax.merging import _fused
from magmax.merging.base import MergeMethod, register
from magmax.merging.task_arithmetic import sum_kernel


def mean_kernel(
    total: Tensor, base: Tensor | None, inputs: Sequence[Tensor], step: _fused.Step, ws: _fused.Workspace
) -> None:
    """:func:`sum_kernel`, then total / T after the last group (T = ``step.params[0, 0]``)."""
    sum_kernel(total, base, inputs, step, ws)
    if step.last:
        assert step.params is not None
        total.div_(step.params[0, 0])


def _count_params(first_t: int, count: int, total: int) -> Tensor:
    # A tensor, not a Python int: a compiled kernel then serves every T without recompiling.
    return torch.tensor([[total]], dtype=torch.int64)


@register
class Average(MergeMethod):
    name = "average"
    summary = "mean of the task vectors (= mean of the fine-tuned weights at λ = 1)"
    reference = "Wortsman et al., Model soups, ICML 2022; MagMax paper's Avg baseline"
    default_scale = 1.0
    foldable = True

    def init(self, key: str, first: Tensor) -> tuple[Tensor, int]:
        return first.to(torch.float32, copy=True), 1

    def update(self, state: tuple[Tensor, int], tau: Tensor, t: int, key: str) -> tuple[Tensor, int]:
        total, count = state
        return _fused.update_state(sum_kernel, total, tau, t), count + 1

    def result(self, state: tuple[Tensor, int], key: str) -> Tensor:
        total, count = state
        return total / count

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        return _fused.fold_slices(mean_kernel, slices, _count_params)
