"""Task arithmetic: the sum of task vectors, scaled.

    τ* = Σ_t τ_t,        θ = θ0 + λ·τ*

λ is tuned on validation data in the paper (the MagMax reference only sweeps it); the default 0.3 is
the value Ilharco et al. and FusionBench use for 8 CLIP tasks. Pass ``scale`` to choose another.
The sum is accumulated in float32 left to right, ((τ_1 + τ_2) + τ_3) + …, the same in the batch and the
streaming fold; the batch kernel forms each τ_t inside a fused pass (:mod:`magmax.merging.fold`).
Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. arXiv:2212.04089.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from magmax.merging import _weights, fold
from magmax.merging.base import MethodOptions, TaskSlices, register


@fold.reference("task_arithmetic")
def sum_kernel(total: Tensor, base: Tensor | None, inputs: Sequence[Tensor], step: fold.Step, ws: fold.Workspace) -> None:
    """Fold ``inputs`` into ``total`` in place: total = total + τ_t, left to right (float32)."""
    base32 = fold.base_f32(base, ws)
    if step.first:
        fold.tau_into(total, inputs[0], base32)
        inputs = inputs[1:]
    scratch = ws.buffer(torch.float32)
    for x in inputs:
        total.add_(fold.tau_of(scratch, x, base32))


@register
class TaskArithmetic(fold.KernelFold):
    name = "task_arithmetic"
    summary = "sum of the task vectors times λ (λ is usually tuned)"
    reference = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089"
    kernel = staticmethod(sum_kernel)
    default_scale = 0.3
    key_independent = True
    Options = _weights.WeightedOptions

    def __init__(self, options: MethodOptions | None = None):
        super().__init__(options)
        _weights.use_plain_kernels(self)

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        if _weights.weighted(self):
            return _weights.weighted_sum(slices, _weights.weights_for(self, len(slices)))
        return super().merge_tensor(key, slices)

    def merge_into_base(self, key: str, slices: TaskSlices, scale: float) -> Tensor | None:
        return None if _weights.weighted(self) else super().merge_into_base(key, slices, scale)

    def merge_tensors(self, keys: Sequence[str], slices: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        if _weights.weighted(self):
            return [self.merge_tensor(key, s) for key, s in zip(keys, slices)]
        return super().merge_tensors(keys, slices)
