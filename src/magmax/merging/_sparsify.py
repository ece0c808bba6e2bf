"""Shared kernels of the sparsifying merges (TIES, DARE-TIES).

* **Top-k magnitude threshold** (TIES' "trim"), with the TIES reference's rounding: for d entries and a
  kept fraction K, the threshold is the magnitude of ascending rank ``d − int(d·K)`` (1-based), and every
  entry with ``|x| >= threshold`` is kept, ties included. ``K > 1`` is read as a percentage (20 → 0.2)
  and ``K >= 1`` keeps everything, as in the reference's ``topk_values_mask``.
* **Exact k-th magnitude out of core** (:func:`kth_smallest_magnitude`): a two-pass radix select over the
  float32 bit patterns of |x|. For non-negative floats the bit pattern, read as an integer, orders like the
  value, so a histogram of the high 16 bits (pass 1) finds the bucket holding rank r and a histogram of
  the low 16 bits inside that bucket (pass 2) finds the value itself. Memory: two 65,536-bin histograms
  plus one tensor (and 4M-entry temporaries) at a time, whatever the number and size of the tensors.
* **Sign consensus as a fold** (TIES' "elect" and "disjoint merge"): the running state per entry is
  (Σ of the positive entries, Σ of the negative entries, their counts). Then
  elected sign s = sign(Σ⁺ + Σ⁻), zero elected signs become the global majority sign m, and
  τ* = Σ⁺/max(n⁺, 1) where the sign is positive, Σ⁻/max(n⁻, 1) otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

MagnitudeStream = Callable[[], Iterable[Tensor]]
"""A zero-argument callable returning a fresh iterable of tensors each call (read twice by the radix select)."""

ConsensusState = tuple[Tensor, Tensor, Tensor, Tensor]
"""(Σ⁺, Σ⁻, n⁺, n⁻) per entry. A plain tuple so that :class:`magmax.Merger` can clone it."""

_RADIX = 1 << 16
_CHUNK = 1 << 22


# -- top-k threshold ---------------------------------------------------------------------------------


def keep_fraction(k: float) -> float:
    """The TIES reference's reading of ``k``: a value above 1 is a percentage (20 → 0.2)."""
    return k / 100 if k > 1 else k


def kth_position(numel: int, k: float) -> int | None:
    """1-based ascending rank of the threshold magnitude among ``numel`` entries, or None to keep them all.

        K = k/100 if k > 1 else k;   keep all if K >= 1;   else rank = numel − int(numel·K)

    ``int(numel·K)`` may be 0 (tiny K or tensor); the rank is then ``numel``: only the largest magnitude
    (and its ties) survives, exactly as ``kthvalue`` in the reference does.
    """
    fraction = keep_fraction(k)
    if fraction >= 1 or numel == 0:
        return None
    return numel - int(numel * fraction)


def population_position(numel: int, k: float, zeros: int = 0) -> int | None:
    """:func:`kth_position` over ``numel`` entries plus ``zeros`` entries known to be 0 and not passed
    (a frozen tower's τ), as a rank among the ``numel`` passed entries; None keeps them all.

    The ``zeros`` extra entries are the smallest magnitudes of the population, so the rank-r entry of the
    whole is the (r − zeros)-th of the passed ones; r <= zeros puts the threshold at 0, which keeps all.
    """
    position = kth_position(numel + zeros, k)
    if position is None or position <= zeros:
        return None
    return position - zeros


def topk_threshold(tau: Tensor, k: float) -> float | None:
    """The reference's per-row threshold applied to one whole tensor: kthvalue of |τ| at :func:`kth_position`."""
    position = kth_position(tau.numel(), k)
    if position is None:
        return None
    return float(torch.kthvalue(tau.detach().reshape(-1).abs(), position).values)


def trim(tau: Tensor, threshold: float | None) -> Tensor:
    """Zero the entries with |τ| < threshold (ties at the threshold are kept); None keeps everything."""
    if threshold is None:
        return tau
    return torch.where(tau.abs() >= threshold, tau, 0.0)


# -- exact k-th magnitude over many tensors -----------------------------------------------------------


def _magnitude_bits(tau: Tensor) -> Iterator[Tensor]:
    """|τ| as int32 bit patterns (sign bit cleared, so −0 is 0), whose integer order is the float order.

    Yielded in chunks so that the temporaries stay small whatever the size of the tensor.
    """
    for chunk in tau.detach().reshape(-1).split(_CHUNK):
        yield chunk.to(torch.float32).abs().view(torch.int32)


def _count_into(hist: np.ndarray, bins: Tensor) -> None:
    """hist[b] += #{i: bins[i] = b}.

    The 65,536-bin histograms are kept in NumPy: torch parallelises fills and reductions of that size,
    and on a busy machine the thread hand-offs cost more than the counting for the many small tensors
    (biases, norms) of a model: those are counted by NumPy, large ones (and CUDA ones, on the device)
    by torch.bincount.
    """
    if bins.is_cuda or bins.numel() >= _RADIX:
        hist += torch.bincount(bins, minlength=_RADIX).cpu().numpy()
    else:
        hist += np.bincount(bins.numpy(), minlength=_RADIX)


def high_histogram(tensors: MagnitudeStream) -> np.ndarray:
    """Pass 1: counts of the high 16 bits of |x| over every entry of every tensor (int64, 65,536 bins)."""
    hist = np.zeros(_RADIX, dtype=np.int64)
    for tau in tensors():
        for bits in _magnitude_bits(tau):
            _count_into(hist, bits >> 16)
    return hist


def _bucket_of(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th smallest entry (1-based) and the rank inside that bin."""
    cumulative = np.cumsum(hist)
    bucket = int(np.searchsorted(cumulative, rank, side="left"))
    below = int(cumulative[bucket - 1]) if bucket > 0 else 0
    return bucket, rank - below


def select_from_histogram(tensors: MagnitudeStream, hist: np.ndarray, position: int) -> float:
    """Pass 2: the exact ``position``-th smallest |x| (1-based) given pass 1's histogram."""
    total = int(hist.sum())
    if not 1 <= position <= total:
        raise ValueError(f"rank {position} is outside 1..{total}")
    bucket, rank = _bucket_of(hist, position)
    low = np.zeros(_RADIX, dtype=np.int64)
    for tau in tensors():
        for bits in _magnitude_bits(tau):
            _count_into(low, bits[(bits >> 16) == bucket] & (_RADIX - 1))
    if int(low.sum()) != int(hist[bucket]):
        raise RuntimeError("the tensors changed between the two passes of the k-th magnitude selection")
    low_bits, _ = _bucket_of(low, rank)
    return float(np.array([(bucket << 16) | low_bits], dtype=np.uint32).view(np.float32)[0])


def kth_smallest_magnitude(tensors: MagnitudeStream, position: int) -> float:
    """The exact ``position``-th smallest |x| (1-based) over all tensors, as torch.kthvalue of the concatenation."""
    return select_from_histogram(tensors, high_histogram(tensors), position)


def global_topk_threshold(tensors: MagnitudeStream, k: float, zeros: int = 0) -> float | None:
    """:func:`topk_threshold` of the concatenation of ``tensors`` (and ``zeros`` zero entries not passed,
    see :func:`population_position`), without concatenating them."""
    if keep_fraction(k) >= 1:
        return None
    hist = high_histogram(tensors)
    position = population_position(int(hist.sum()), k, zeros)
    if position is None:
        return None
    return select_from_histogram(tensors, hist, position)


# -- sign consensus (elect + disjoint mean) as a fold -------------------------------------------------


def consensus_init(x: Tensor) -> ConsensusState:
    """State after the first sparsified task vector (fresh tensors: never aliases ``x``)."""
    return (
        x.clamp(min=0),
        x.clamp(max=0),
        (x > 0).to(torch.int32),
        (x < 0).to(torch.int32),
    )


def consensus_update(state: ConsensusState, x: Tensor) -> ConsensusState:
    """Add one sparsified task vector to the running sums and counts (in place)."""
    pos_sum, neg_sum, pos_count, neg_count = state
    pos_sum.add_(x.clamp(min=0))
    neg_sum.add_(x.clamp(max=0))
    pos_count.add_(x > 0)
    neg_count.add_(x < 0)
    return state


def elected_sign_balance(state: ConsensusState) -> int:
    """#(elected sign > 0) − #(elected sign < 0) over one tensor; summed over tensors it gives the majority."""
    total = state[0] + state[1]
    return int((total > 0).sum()) - int((total < 0).sum())


def majority_sign(states: Iterable[tuple[str, ConsensusState]]) -> int:
    """sign(Σ over every entry of the model of its elected sign), in exact integer arithmetic, from every
    tensor's final fold state."""
    balance = sum(elected_sign_balance(state) for _, state in states)
    return (balance > 0) - (balance < 0)


def zero_sign_ambiguity(state: ConsensusState) -> int:
    """How many entries of one tensor's τ* depend on the majority sign: elected sign 0 and the two
    candidate means (of the positive, of the negative entries) not bit-equal."""
    pos_sum, neg_sum, pos_count, neg_count = state
    pos_mean = pos_sum / pos_count.clamp(min=1)
    neg_mean = neg_sum / neg_count.clamp(min=1)
    differs = pos_mean.view(torch.int32) != neg_mean.view(torch.int32)
    return int(((pos_sum + neg_sum == 0) & differs).sum())


def consensus_result(state: ConsensusState, majority: int) -> Tensor:
    """Disjoint mean of the entries that agree with the elected sign.

    As in the reference ``where(sign > 0, x > 0, x < 0)``: an entry whose elected sign is 0 takes the
    majority sign, and where that is not positive (−1, or 0 when the model is perfectly balanced) the
    negative entries are averaged.
    """
    pos_sum, neg_sum, pos_count, neg_count = state
    total = pos_sum + neg_sum
    positive = (total > 0) | ((total == 0) & (majority > 0))
    pos_mean = pos_sum / pos_count.clamp(min=1)
    neg_mean = neg_sum / neg_count.clamp(min=1)
    return torch.where(positive, pos_mean, neg_mean)
