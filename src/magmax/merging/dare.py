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

Draws: a counter-based hash of (seed, tensor name, task, parameter index), the one of
:mod:`magmax.merging.random`: an entry of τ_t is kept iff h(i; k_t) >= thr, with k_t = ``seed_for(seed,
tensor name, t)`` and thr = min(⌈p·2^32⌉, 2^32 − 1), so each entry survives with probability 1 − p (up to
2^-32; p = 0 keeps every entry, so p = 0 is exactly task arithmetic). The merge is exact for a seed, does
not depend on tensor order or on how the engine splits a tensor, is the same in the batch and the
streaming fold, and the same on CPU and CUDA. Survivors are divided by float32(1 − p), as FusionBench
divides, rather than multiplied by its inverse.

How it computes: the sum is a fold (:func:`dare_kernel`, plain torch; on CPU a backend runs the same fold
in one pass over the inputs and also writes θ0 + λ·τ* in it); the TIES
combination folds the same dropped vectors into the sign-consensus state of :mod:`magmax.merging._sparsify`.

Yu, Yu, Yu, Huang, Li. "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024. arXiv:2311.03099.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from magmax.merging import _weights, fold
from magmax.merging._sparsify import (
    ConsensusState,
    consensus_init,
    consensus_result,
    consensus_update,
    majority_sign,
)
from magmax.merging.base import MergeMethod, MethodOptions, TaskSlices, register, seed_for
from magmax.merging.random import hash_draws, spread_indices
from magmax.merging.ties import Ties


class DareOptions(_weights.WeightedOptions):
    p: float = Field(0.5, ge=0, lt=1, description="probability of dropping each task-vector entry")
    seed: int = Field(0, description="seed of the drops (per tensor and task)")
    combine: Literal["sum", "ties"] = Field(
        "sum", description="sum (DARE + task arithmetic) or ties (sign election + disjoint mean, DARE-TIES)"
    )


def keep_threshold(p: float) -> int:
    """thr: an entry is kept iff its 32-bit draw h >= thr (probability 1 − p up to 2^-32)."""
    return min(math.ceil(p * 2.0**32), 2**32 - 1)


def rescale_bits(p: float) -> int:
    """float32(1 − p) as its int32 bit pattern (a params row holds integers)."""
    return int(np.array([1.0 - p], dtype=np.float32).view(np.int32)[0])


@fold.reference("dare")
def dare_kernel(total: Tensor, base: Tensor | None, inputs: Sequence[Tensor], step: fold.Step, ws: fold.Workspace) -> None:
    """Fold ``inputs`` into ``total`` in place: total += where(h_t(i) >= thr, τ_t / float32(1 − p), 0).

    ``step.params`` holds one row (k_t, thr, bits of float32(1 − p)) per input.
    """
    assert step.params is not None
    base32 = fold.base_f32(base, ws)
    spread = spread_indices(step.offset, ws)
    h = ws.buffer(torch.int64)
    tmp = ws.buffer(torch.int64)
    scratch = ws.buffer(torch.float32)
    dropped = ws.buffer(torch.float32)
    dropping = ws.buffer(torch.bool)
    rescale = step.params[0, 2:3].to(torch.int32).view(torch.float32)
    for j, x in enumerate(inputs):
        cur = fold.tau_of(scratch, x, base32)
        hash_draws(spread, step.params[j, 0], h, tmp)
        torch.div(cur, rescale, out=dropped).masked_fill_(torch.lt(h, step.params[j, 1], out=dropping), 0.0)
        if step.first and j == 0:
            total.copy_(dropped)
        else:
            total.add_(dropped)


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
        # The sum's numba fold forms every τ_t and counts the finite ones (as the other sums do).
        self.folds_natively = self.options.combine == "sum"
        self._majority: int | None = None
        _weights.use_plain_kernels(self)

    @property
    def scale(self) -> float:
        if self.options.scale is not None:
            return float(self.options.scale)
        return Ties.default_scale if self.options.combine == "ties" else self.default_scale

    def _params(self, key: str) -> fold.ParamsFn:
        seed, threshold, rescale = self.options.seed, keep_threshold(self.options.p), rescale_bits(self.options.p)

        def params(first_t: int, count: int, total: int) -> Tensor:
            rows = [[seed_for(seed, key, t), threshold, rescale] for t in range(first_t, first_t + count)]
            return torch.tensor(rows, dtype=torch.int64)

        return params

    def _dropped(self, tau: Tensor, t: int, key: str) -> Tensor:
        """τ_t dropped and rescaled (a fresh tensor), the same entries as the fold's."""
        return fold.fold_operands(dare_kernel, lambda _: (tau, None), 1, lambda first, *_: self._params(key)(t, 1, 0))

    def reduce_states(self, states: Iterable[tuple[str, Any]]) -> None:
        self._majority = majority_sign(states)

    def init(self, key: str, first: Tensor) -> Tensor | ConsensusState:
        dropped = self._dropped(first, 0, key)
        return consensus_init(dropped) if self.options.combine == "ties" else dropped

    def update(self, state: Any, tau: Tensor, t: int, key: str) -> Tensor | ConsensusState:
        if self.options.combine == "ties":
            return consensus_update(state, self._dropped(tau, t, key))
        return fold.update_state(dare_kernel, state, tau, t, self._params(key))

    def result(self, state: Any, key: str) -> Tensor:
        if self.options.combine == "sum":
            return state
        if self._majority is None:
            raise RuntimeError("dare: reduce_states() must run before result() with combine='ties'")
        return consensus_result(state, self._majority)

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        if _weights.weighted(self):
            weights = _weights.weights_for(self, len(slices))
            dropped = lambda tau, t: self._dropped(tau, t, key)  # noqa: E731
            if self.options.combine == "sum":
                return _weights.weighted_sum(slices, weights, dropped)
            return _weights.weighted_disjoint_mean(slices, weights, dropped)
        if self.options.combine == "sum":
            return fold.fold_slices(dare_kernel, slices, self._params(key))
        return super().merge_tensor(key, slices)

    def merge_into_base(self, key: str, slices: TaskSlices, scale: float) -> Tensor | None:
        if self.options.combine == "sum" and slices.base is not None and not _weights.weighted(self):
            return fold.fold_slices(dare_kernel, slices, self._params(key), scale=scale)
        return None
