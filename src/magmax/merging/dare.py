"""DARE (Drop And REscale): randomly drop task-vector entries, rescale the rest, then combine.

    drop:     τ̃_t = τ_t ⊙ b_t / (1 − p),   b_t[i] ~ Bernoulli(1 − p) independently   (E[τ̃_t] = τ_t)
    combine:  "sum"  (default):  τ* = Σ_t τ̃_t,                               θ = θ0 + λ·τ*,  λ = 0.3
              "ties" (DARE-TIES): τ* = TIES elect + disjoint mean of the τ̃_t,  θ = θ0 + λ·τ*,  λ = 0.55

Defaults p = 0.5 and λ = 0.3 are FusionBench's for CLIP vision models (config/method/dare/
task_arithmetic.yaml); the paper shows p up to 0.9–0.99 works for LLM fine-tunes, whose deltas are far
smaller. With ``combine="ties"`` the combination is the sign election and disjoint mean of
:mod:`magmax.merging.ties` (zero elected signs take the model's majority sign, as in the TIES reference)
applied to the DARE-sparsified vectors with no magnitude trimming, as mergekit's ``dare_ties`` does
(mergekit resolves a zero elected sign to + per entry instead; FusionBench's DareTiesMerging additionally
trims to the top 20%). Its default λ is TIES' 0.55, because the result is a mean, not a sum.

Draws: one generator per (seed, tensor name, task) (:func:`magmax.merging.base.generator_for`), so the
merge is exact for a seed, does not depend on tensor order, and a tensor's τ̃_t is the same however often
the engine recomputes it. Draws are made on the tensor's device (CPU and CUDA give different, equally
valid, masks). A draw u ~ U[0, 1) keeps the entry iff u >= p, so p = 0 is exactly task arithmetic.

Yu, Yu, Yu, Huang, Li. "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024. arXiv:2311.03099.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field
from torch import Tensor

from magmax.merging._sparsify import (
    ConsensusState,
    consensus_init,
    consensus_result,
    consensus_update,
    majority_sign,
    random_drop,
)
from magmax.merging.base import MergeMethod, MethodOptions, generator_for, register
from magmax.merging.ties import Ties


class DareOptions(MethodOptions):
    p: float = Field(0.5, ge=0, lt=1, description="probability of dropping each task-vector entry")
    seed: int = Field(0, description="seed of the drops (per tensor and task)")
    combine: Literal["sum", "ties"] = Field(
        "sum", description="sum (DARE + task arithmetic) or ties (sign election + disjoint mean, DARE-TIES)"
    )


@register
class Dare(MergeMethod):
    name = "dare"
    summary = "drop each entry with probability p, rescale by 1/(1-p), then sum (or TIES-combine)"
    reference = "Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv:2311.03099"
    Options = DareOptions
    default_scale = 0.3
    foldable = True

    def __init__(self, options: MethodOptions | None = None):
        super().__init__(options)
        # Only the TIES combination needs the model-wide majority sign (one extra fold pass in the engine).
        self.uses_global_reduce = self.options.combine == "ties"
        self._majority: int | None = None

    @property
    def scale(self) -> float:
        if self.options.scale is not None:
            return float(self.options.scale)
        return Ties.default_scale if self.options.combine == "ties" else self.default_scale

    def _dropped(self, tau: Tensor, t: int, key: str) -> Tensor:
        return random_drop(tau, self.options.p, generator_for(self.options.seed, key, t, tau.device))

    def reduce_states(self, states: Iterable[tuple[str, Any]]) -> None:
        self._majority = majority_sign(states)

    def init(self, key: str, first: Tensor) -> Tensor | ConsensusState:
        dropped = self._dropped(first, 0, key)
        return consensus_init(dropped) if self.options.combine == "ties" else dropped

    def update(self, state: Any, tau: Tensor, t: int, key: str) -> Tensor | ConsensusState:
        dropped = self._dropped(tau, t, key)
        if self.options.combine == "ties":
            return consensus_update(state, dropped)
        return state.add_(dropped)

    def result(self, state: Any, key: str) -> Tensor:
        if self.options.combine == "sum":
            return state
        if self._majority is None:
            raise RuntimeError("dare: reduce_states() must run before result() with combine='ties'")
        return consensus_result(state, self._majority)
