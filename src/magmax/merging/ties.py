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
  magmax is handed only the trained tensors (the vision encoder), so ``zero_entries`` says how many
  zero entries the reference's ranking held besides them (CLIP ViT-B/16: the text tower and
  ``logit_scale``, 63.4M of the model's 149.6M): they are counted, never materialised. The continual
  runner fills it from the backbone when a merge says ``population: whole_model``.
* ``threshold="per_tensor"``: d and κ_t per tensor (every tensor keeps its own top-K).

Streaming: the trim depends only on (τ_t, κ_t) and the elect/merge steps only on per-entry running sums
and counts of the positive and of the negative trimmed entries (Σ⁺, Σ⁻, n⁺, n⁻), so TIES is a fold with
four tensors of state per tensor. The majority sign m couples all tensors: ``reduce_states`` computes it
from every tensor's final state, exactly in integers (the reference sums the signs in float32).

Speed: the rule below (radix select, then the consensus fold) is plain torch. Backends accelerate it
through hooks (``fold.accelerated("ties", ...)``): the global thresholds of all tasks from one
sample → bracket → count-and-gather pass (numba on CPU, Triton on GPUs; exact, with the radix select as
fallback), and τ* from one fused pass that also sums the elected-sign balance: about two reads of the
models in all. The majority sign is not known before that
pass; it is guessed from the thresholds' sample, and the tensors whose result depended on it (an
elected sign of exactly 0 with surviving entries) are merged again when the guess was wrong
(``defers_global_reduce``): exact either way.

Exactness against the reference: masks, elected signs and counts are identical; the sums are taken in
task order while ``torch.sum(dim=0)`` of the stacked T×d matrix uses its own (vectorised) order, so the
values agree to float32 rounding, and an elected sign can differ only where Σ_t τ̂_t cancels to within
rounding error.

Yadav, Tam, Choshen, Raffel, Bansal. "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023. arXiv:2306.01708.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from magmax.merging import _weights, fold
from magmax.merging._sparsify import (
    ConsensusState,
    consensus_init,
    consensus_result,
    consensus_update,
    elected_sign_balance,
    global_topk_threshold,
    keep_fraction,
    majority_sign,
    population_position,
    topk_threshold,
    trim,
    zero_sign_ambiguity,
)
from magmax.merging.base import (
    MergeMethod,
    MethodOptions,
    SlicesStream,
    TaskSlices,
    TensorStream,
    register,
)
from magmax.taskvector import combine


class TiesOptions(_weights.WeightedOptions):
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
    zero_entries: int = Field(
        0,
        ge=0,
        description="global threshold: entries of every τ that are zero and not passed (a frozen tower), "
        "counted in the ranking as the MagMax reference counts CLIP's text tower",
    )

    @model_validator(mode="after")
    def _zeros_need_global(self) -> "TiesOptions":
        if self.zero_entries and self.threshold != "global":
            raise ValueError("zero_entries counts into the global ranking; it needs threshold=global")
        return self


def sampled_majority(sample: np.ndarray | Tensor, kappas: Sequence[float | None]) -> int:
    """The majority sign m estimated on sampled positions (``sample``: count × S, τ_t at the same S
    positions for every task; on the CPU or the GPU, where the thresholds' sample was taken): ±1, −1 for a
    balance of 0 (as the reference treats m = 0). A guess only."""
    rows = torch.from_numpy(sample) if isinstance(sample, np.ndarray) else sample
    positive = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
    negative = torch.zeros_like(positive)
    for row, kappa in zip(rows, kappas):
        trimmed = row if kappa is None else torch.where(row.abs() >= kappa, row, 0.0)
        positive += trimmed.clamp(min=0)
        negative += trimmed.clamp(max=0)
    total = positive + negative
    return 1 if int((total > 0).sum()) > int((total < 0).sum()) else -1


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
        # Its count-and-gather pass forms every τ_t from θ0 and counts the finite ones (numba, CPU).
        self.statistics_check_finite = self.uses_task_stats
        # With the global threshold every entry is trimmed and merged alike, whatever its tensor.
        self.key_independent = self.options.threshold == "global"
        self._thresholds: dict[int, float | None] = {}
        self._majority: int | None = None
        self._balance = 0
        self._provisional: list[str] = []
        self._guess = 1  # the majority sign a deferred merge assumes (from the thresholds' sample)
        self._scratch: np.ndarray | None = None
        _weights.use_plain_kernels(self)

    # -- statistics ------------------------------------------------------------------------------------
    def observe_task(self, t: int, tensors: TensorStream) -> None:
        self._thresholds[t] = global_topk_threshold(lambda: (tau for _, tau in tensors()), self.options.k,
                                                    self.options.zero_entries)

    def observe_tasks(self, tensors: SlicesStream, count: int, total_numel: int) -> None:
        """κ_t of every task: exact radix selects (:func:`global_topk_threshold`), after a backend's
        sample-and-bracket pass where one runs (it finds them all in about one read; a task it leaves
        undecided, None, takes the radix select). The bracket's sample also gives the guess of m."""
        k, zeros = self.options.k, self.options.zero_entries
        position = None if keep_fraction(k) >= 1 or total_numel == 0 else population_position(total_numel, k, zeros)
        if position is None:
            self._thresholds.update((t, None) for t in range(count))
            return
        fast = fold.accelerated(self.name, "thresholds")
        bracketed = None if fast is None else fast(tensors, count, total_numel, position)
        found, sample = bracketed if bracketed is not None else ([None] * count, None)
        values = [value if value is not None else
                  global_topk_threshold(lambda t=t: (slices[t] for _, slices in tensors()), k, zeros)
                  for t, value in enumerate(found)]
        self._thresholds.update(enumerate(values))
        self._guess = 1 if sample is None else sampled_majority(sample, values)

    def reduce_states(self, states: Iterable[tuple[str, ConsensusState]]) -> None:
        """m from every tensor's final fold state."""
        self._majority = majority_sign(states)

    # The majority sign m only matters where an elected sign is 0 although some entries survived the
    # trim (Σ⁺ = −Σ⁻ ≠ 0 exactly; common only when τ is coarsely quantised, as bfloat16 weights are). So
    # the engine merges first, on a guess of m (from the thresholds' sample, else m > 0), while the
    # merge pass sums the balance that gives m; the tensors holding such entries are merged again if
    # the guess was wrong. That saves a whole pass over the models (the reference's order: a pass for
    # the balance, then the merge).
    defers_global_reduce = True

    def begin_deferred_reduce(self) -> None:
        self._scratch = None
        self._majority = None
        self._balance = 0
        self._provisional = []

    def provisional_units(self) -> list[str]:
        self._majority = (self._balance > 0) - (self._balance < 0)
        redo = [] if (self._majority > 0) == (self._guess > 0) else self._provisional
        self._provisional = []
        return redo

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

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        """τ* of one tensor; before the majority sign is known (deferred), on a guess of it."""
        if _weights.weighted(self):
            return _weights.weighted_disjoint_mean(slices, _weights.weights_for(self, len(slices)), self._trimmed)
        return self._merged(key, slices, None)

    def merge_into_base(self, key: str, slices: TaskSlices, scale: float) -> Tensor | None:
        """θ0 + scale·τ*: written by the fused CPU pass where it runs, else added after the torch fold."""
        adds_base = fold.accelerated(self.name, "adds_base")
        if _weights.weighted(self) or slices.base is None or adds_base is None or not adds_base():
            return None
        return self._merged(key, slices, scale)

    def _merged(self, key: str, slices: Sequence[Tensor], scale: float | None) -> Tensor:
        """τ* (or, with ``scale``, θ0 + scale·τ*; θ0 = ``slices.base``)."""
        final = self._majority is not None
        majority = self._majority if final else self._guess
        native = self._native_pass(slices, majority > 0, scale)
        if native is not None:
            merged, balance, ambiguous = native
        else:
            state = self.fold(key, slices)
            merged = consensus_result(state, majority)
            if not final:
                balance, ambiguous = elected_sign_balance(state), zero_sign_ambiguity(state)
            if scale is not None:
                merged = combine(slices.base, merged, scale, torch.float32, reuse_tau=True)  # type: ignore[attr-defined]
        if not final:
            self._balance += balance
            if ambiguous:
                self._provisional.append(key)
        return merged

    def merge_tensors(self, keys: Sequence[str], slices: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """All tensors at once on a GPU when their inputs are all in GPU memory (a backend's), else key by key."""
        merged = None if _weights.weighted(self) else self._gpu_merge(keys, slices)
        return merged if merged is not None else super().merge_tensors(keys, slices)

    def _gpu_merge(self, keys: Sequence[str], slices: Sequence[Sequence[Tensor]]) -> list[Tensor] | None:
        """τ* of every tensor at once by a backend (models in GPU memory); None where none takes them."""
        fast = fold.accelerated(self.name, "merge_many")
        if fast is None or self.options.threshold != "global" or not keys:
            return None
        count = len(slices[0])
        if any(t not in self._thresholds for t in range(count)):
            return None
        final = self._majority is not None
        majority = self._majority if final else self._guess
        found = fast(slices, [self._thresholds[t] for t in range(count)], majority > 0)
        if found is None:
            return None
        merged, balance, ambiguous = found
        if not final:
            self._balance += balance
            self._provisional.extend(key for key, n in zip(keys, ambiguous) if n)
        return merged

    def _native_pass(
        self, slices: Sequence[Tensor], majority_positive: bool, scale: float | None = None
    ) -> tuple[Tensor, int, int] | None:
        """A backend's fused fold (global thresholds only): (τ*, or θ0 + scale·τ*; balance, ambiguous);
        None if none can run."""
        fast = fold.accelerated(self.name, "fold")
        count = len(slices)
        if fast is None or self.options.threshold != "global" or count == 0:
            return None
        if any(t not in self._thresholds for t in range(count)):
            return None
        return fast(slices, [self._thresholds[t] for t in range(count)], majority_positive, scale,
                    self._scratch_state)

    def _scratch_state(self, numel: int) -> tuple[np.ndarray, ...]:
        """The fold state between groups (Σ⁺, Σ⁻, n⁺, n⁻), one buffer reused for every tensor of a merge:
        fresh buffers of that size per tensor cost more in page faults than the state's reads and writes."""
        if self._scratch is None or self._scratch.shape[1] < numel:
            self._scratch = np.empty((4, numel), np.float32)
        return tuple(self._scratch[r, :numel] for r in range(4))

    def result(self, state: ConsensusState, key: str) -> Tensor:
        if self._majority is None:
            raise RuntimeError("ties: reduce_states() must run before result() (it sets the majority sign)")
        return consensus_result(state, self._majority)
