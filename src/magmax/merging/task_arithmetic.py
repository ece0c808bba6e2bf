"""Task arithmetic: the sum of task vectors, scaled.

    τ* = Σ_t τ_t,        θ = θ0 + λ·τ*

λ is tuned on validation data in the paper (the MagMax reference only sweeps it); the default 0.3 is
the value Ilharco et al. and FusionBench use for 8 CLIP tasks. Pass ``scale`` to choose another.
Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. arXiv:2212.04089.
"""

from __future__ import annotations

from torch import Tensor

from magmax.merging.base import MergeMethod, register


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "sum of the task vectors times λ (λ is usually tuned)"
    reference = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089"
    default_scale = 0.3
    foldable = True

    def init(self, key: str, first: Tensor) -> Tensor:
        return first.clone()

    def update(self, state: Tensor, tau: Tensor, t: int, key: str) -> Tensor:
        return state.add_(tau)

    def result(self, state: Tensor, key: str) -> Tensor:
        return state
