"""TIES-Merging: trim each task vector to its top-k magnitudes, elect a sign per entry, average the agreeing.

    trim:    τ̂_t = τ_t ⊙ [ |τ_t| >= κ_t ],   κ_t = kthvalue(|τ_t|, d − int(d·K))   (ties at κ_t kept)
    elect:   s = sign(Σ_t τ̂_t);   where s = 0:  s = m,  m = sign(Σ_entries s)   (majority over the model)
    merge:   τ* = Σ_t τ̂_t[agree] / max(#agree, 1),   agree = τ̂_t > 0 if s > 0 else τ̂_t < 0
    model:   θ = θ0 + λ·τ*,   λ = 0.55 (the MagMax paper's value for TIES)

K = ``k`` (default 0.2, "top-20%"); k > 1 is read as a percentage and K >= 1 keeps everything, as the
reference's ``topk_values_mask`` does. Its rank d − int(d·K) keeps int(d·K) + 1 entries, plus every entry
tied with κ_t; int(d·K) = 0 keeps the largest magnitude (and its ties). d is the number of entries the
threshold is taken over:

* ``threshold="global"`` (default): the WHOLE flattened task vector (every floating-point tensor of the
  model concatenated). This is what the TIES reference and the MagMax reference code do, and so what the
  MagMax paper's TIES numbers measure (protocol.md §1, quirk "TIES"): there the text tower never changes,
  its zero entries fill the bottom of the ranking, and about 35% of the vision weights survive instead of
  20%. Reproducing the paper needs this mode. κ_t is found by an exact two-pass radix select over the
  task vector's tensors (``observe_task``), never by concatenating them, so it runs out of core.
* ``threshold="per_tensor"``: d and κ_t per tensor (every tensor keeps its own top-K).

Streaming: the trim depends only on (τ_t, κ_t) and the elect/merge steps only on per-entry running sums
and counts of the positive and of the negative trimmed entries (Σ⁺, Σ⁻, n⁺, n⁻), so TIES is a fold with
four tensors of state per tensor. The majority sign m couples all tensors: ``reduce_states`` computes it
from every tensor's final state, exactly in integers (the reference sums the signs in float32).

Exactness against the reference: masks, elected signs and counts are identical; the sums are taken in
task order while ``torch.sum(dim=0)`` of the stacked T×d matrix uses its own (vectorised) order, so the
values agree to float32 rounding, and an elected sign can differ only where Σ_t τ̂_t cancels to within
rounding error.

Yadav, Tam, Choshen, Raffel, Bansal. "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023. arXiv:2306.01708.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import Field
from torch import Tensor

from magmax.merging._sparsify import (
    ConsensusState,
    consensus_init,
    consensus_result,
    consensus_update,
    global_topk_threshold,
    majority_sign,
    topk_threshold,
    trim,
)
from magmax.merging.base import MergeMethod, MethodOptions, TensorStream, register


class TiesOptions(MethodOptions):
    k: float = Field(
        0.2,
        gt=0,
        le=100,
        description="fraction of each task vector kept by magnitude; values > 1 are percentages (20 = 20%)",
    )
    threshold: Literal["global", "per_tensor"] = Field(
        "global",
        description="top-k over the whole flattened task vector (reference, paper) or per tensor",
    )


@register
class Ties(MergeMethod):
    name = "ties"
    summary = "trim to top-k magnitudes, elect the sign of the sum, mean of the entries that agree"
    reference = "Yadav et al., TIES-Merging, NeurIPS 2023, arXiv:2306.01708"
    Options = TiesOptions
    default_scale = 0.55
    foldable = True
    uses_task_stats = True
    uses_global_reduce = True

    def __init__(self, options: MethodOptions | None = None):
        super().__init__(options)
        # Only the global threshold needs a statistics pass over each whole task vector; per-tensor
        # thresholds are found inside the fold, so the engine must not read every task vector twice more.
        self.uses_task_stats = self.options.threshold == "global"
        self._thresholds: dict[int, float | None] = {}
        self._majority: int | None = None

    # -- statistics ------------------------------------------------------------------------------------
    def observe_task(self, t: int, tensors: TensorStream) -> None:
        self._thresholds[t] = global_topk_threshold(lambda: (tau for _, tau in tensors()), self.options.k)

    def reduce_states(self, states: Iterable[tuple[str, ConsensusState]]) -> None:
        self._majority = majority_sign(states)

    # -- fold ------------------------------------------------------------------------------------------
    def _trimmed(self, tau: Tensor, t: int) -> Tensor:
        if self.options.threshold == "per_tensor":
            return trim(tau, topk_threshold(tau, self.options.k))
        if t not in self._thresholds:
            raise RuntimeError(f"ties: observe_task({t}) must run before task {t} is folded (global threshold)")
        return trim(tau, self._thresholds[t])

    def init(self, key: str, first: Tensor) -> ConsensusState:
        return consensus_init(self._trimmed(first, 0))

    def update(self, state: ConsensusState, tau: Tensor, t: int, key: str) -> ConsensusState:
        return consensus_update(state, self._trimmed(tau, t))

    def result(self, state: ConsensusState, key: str) -> Tensor:
        if self._majority is None:
            raise RuntimeError("ties: reduce_states() must run before result() (it sets the majority sign)")
        return consensus_result(state, self._majority)
