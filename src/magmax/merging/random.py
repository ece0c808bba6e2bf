"""Random mix (RandMix): per parameter, the entry of a task chosen uniformly at random.

    τ*[p] = τ_{k_p}[p],  k_p ~ Uniform{1..T} independently per parameter,   θ = θ0 + λ·τ*,  λ = 1

Streamed as reservoir sampling: after task t (1-based) each entry is replaced by τ_t with probability
1/t, which leaves every task equally likely after any prefix. The draws come from a generator seeded by
(seed, tensor name, task), so the result is exact for a given seed and independent of tensor order
(draws are made on the tensor's device: CPU and CUDA give different, equally valid, mixes).
Marczak et al., MagMax, ECCV 2024 (the "Random" baseline).
"""

from __future__ import annotations

import torch
from torch import Tensor

from magmax.merging.base import MergeMethod, MethodOptions, generator_for, register


class RandomOptions(MethodOptions):
    seed: int = 0
    """Seed of the per-parameter task choice."""


@register
class RandomMix(MergeMethod):
    name = "random"
    summary = "per parameter, the entry of a uniformly random task"
    reference = "Marczak et al., MagMax, ECCV 2024 (Random baseline)"
    Options = RandomOptions
    default_scale = 1.0
    foldable = True

    def init(self, key: str, first: Tensor) -> Tensor:
        return first.clone()

    def update(self, state: Tensor, tau: Tensor, t: int, key: str) -> Tensor:
        gen = generator_for(self.options.seed, key, t, tau.device)
        draw = torch.rand(tau.shape, generator=gen, device=tau.device)
        # Task t (0-based) replaces the kept entry with probability 1/(t+1).
        torch.where(draw * (t + 1) < 1.0, tau, state, out=state)
        return state

    def result(self, state: Tensor, key: str) -> Tensor:
        return state
