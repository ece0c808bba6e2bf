"""Triton multi-tensor folds: every tensor of a bucket and every input of a group in one launch.

Imported only by :mod:`magmax.merging.backends.gpu.triton`, when triton is installed. One program merges BLOCK
consecutive entries of one tensor ("segment"); a per-block table says which segment and where in it.
The inputs come as a table of addresses (``table[S + t·S + s]``: input t of segment s), so any number of
tensors and tasks go in one launch with nothing concatenated or stacked, and each entry of each input is
read once, the state written once (the bandwidth floor, apart from the small tables).

Per entry, for the inputs j of the group in order (τ_j = float32(x_j) − float32(θ0), as the engine forms it):

* MagMax (``OP = 0``): best = τ_j where |τ_j| ≥ |best| (ties go to the later task); |best| kept, not
  recomputed.
* Σ (``OP = 1``): total = total + τ_j, left to right in float32; ``DIVIDE``: total / divisor, correctly
  rounded (``div_rn``; Triton's ``/`` is not), for averaging.
* random (``OP = 2``): choice = τ_j where h(i; k_j) ≤ thr_j (the uint32 hash of
  :mod:`magmax.merging.random`, i the entry's index in its tensor).

These are the IEEE-754 float32 operations of the torch and numba kernels in the same order (no FMA can
form: there is no multiply-add), so the results agree bit for bit; the tests check it under Triton's
interpreter. MagMax and Σ also count the entries whose sum of τ's is finite (NaN/Inf in an input makes
it non-finite), one atomic add per program, so that the engine can skip its NaN/Inf pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

OP_MAGMAX = 0
OP_SUM = 1
OP_RANDOM = 2


@triton.jit
def _block(block_segment, block_start, segment_numel, BLOCK: tl.constexpr):
    """This program's (program id, segment, entry indices within the segment, which are in it)."""
    pid = tl.program_id(0)
    s = tl.load(block_segment + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK).to(tl.int64)
    return pid, s, offs, offs < tl.load(segment_numel + s)


@triton.jit
def _theta0(table, s, offs, mask, HAS_BASE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """θ0 of segment s at ``offs`` as float32 (0 without θ0: the inputs are task vectors)."""
    if HAS_BASE:
        b = tl.load(tl.load(table + s).to(tl.pointer_type(DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK], dtype=tl.float32)
    return b


@triton.jit
def _tau(table, S, j, s, offs, mask, b, DTYPE: tl.constexpr):
    """τ_j = float32(x_j) − float32(θ0) of segment s at ``offs`` (input j at table[S + j·S + s])."""
    x = tl.load(tl.load(table + S + j * S + s).to(tl.pointer_type(DTYPE)) + offs, mask=mask, other=0.0)
    return x.to(tl.float32) - b


@triton.jit
def fold_segments(
    block_segment,  # int32[blocks]: the segment of each program
    block_start,  # int64[blocks]: its first entry within the segment
    segment_numel,  # int64[S]
    segment_offset,  # int64[S]: where the segment's state starts in ``state``
    state_ptr,  # float32[Σ n_s]: every segment's state / result
    table,  # int64: θ0's address per segment [S], input j of segment s at S + j·S + s, then random's
    #         (k_j, thr_j) of segment s at S + G·S + (j·S + s)·2
    finite,  # int64[1]: entries whose τ sum is finite, summed over programs
    S,
    G,
    divisor,
    FIRST: tl.constexpr,
    DIVIDE: tl.constexpr,
    OP: tl.constexpr,
    HAS_BASE: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid, s, offs, mask = _block(block_segment, block_start, segment_numel, BLOCK)
    out = state_ptr + tl.load(segment_offset + s)
    params = table + S + G * S
    b = _theta0(table, s, offs, mask, HAS_BASE, DTYPE, BLOCK)
    if FIRST:
        state = _tau(table, S, 0, s, offs, mask, b, DTYPE)
        probe = state
        j0 = 1
    else:
        state = tl.load(out + offs, mask=mask, other=0.0)
        probe = tl.zeros([BLOCK], dtype=tl.float32)
        j0 = 0
    mag = tl.abs(state)
    spread = offs.to(tl.uint32) * 0x61C88647
    for j in range(j0, G):
        v = _tau(table, S, j, s, offs, mask, b, DTYPE)
        if OP == 0:
            probe = probe + v
            a = tl.abs(v)
            take = a >= mag
            state = tl.where(take, v, state)
            mag = tl.where(take, a, mag)
        elif OP == 1:
            state = state + v
        else:
            key = tl.load(params + (j * S + s) * 2).to(tl.uint32)
            threshold = tl.load(params + (j * S + s) * 2 + 1).to(tl.uint32)
            h = spread + key
            h = h ^ (h >> 16)
            h = h * 0x45D9F3B
            h = h ^ (h >> 16)
            h = h * 0x45D9F3B
            state = tl.where(h <= threshold, v, state)
    if OP == 1:
        probe = state
    if OP != 2:
        ok = (tl.abs(probe) < float("inf")) & mask
        tl.atomic_add(finite, tl.sum(ok.to(tl.int64), axis=0))
    if DIVIDE:
        state = tl.math.div_rn(state, tl.zeros([BLOCK], dtype=tl.float32) + divisor)
    tl.store(out + offs, state, mask=mask)


# -- TIES (global thresholds): sample, count and gather, merge -------------------------------------
# The same three steps as the CPU kernels of magmax.merging.backends.cpu.threshold and .native: a strided sample
# brackets each task's k-th magnitude, one pass counts below the bracket and gathers what lies inside
# (the k-th is then selected exactly from the gathered values), one pass merges. All T inputs of every
# segment in one launch per chunk (the inputs are in memory already).


@triton.jit
def ties_sample(
    block_segment, block_start, segment_numel, segment_offset, table,
    sample,  # float32[T, cap]: τ_j at the model positions g ≡ 0 (mod stride), at g / stride
    S, G, chunk_offset, stride, cap,
    HAS_BASE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, s, offs, mask = _block(block_segment, block_start, segment_numel, BLOCK)
    g = chunk_offset + tl.load(segment_offset + s) + offs  # position in the whole flattened model
    at = g // stride
    pick = mask & (g % stride == 0) & (at < cap)
    b = _theta0(table, s, offs, pick, HAS_BASE, DTYPE, BLOCK)
    for j in range(0, G):
        tl.store(sample + j * cap + at, _tau(table, S, j, s, offs, pick, b, DTYPE), mask=pick)


@triton.jit
def ties_count(
    block_segment, block_start, segment_numel, segment_offset, table,
    low, high,  # float32[T]: each task's bracket
    below,  # int64[blocks, G]: #{|τ_j| < lo_j} of each program
    gathered,  # float32[T, cap]: the |τ_j| inside [lo_j, hi_j], in no particular order
    filled,  # int64[T]: how many were found (may exceed cap: then some were not stored)
    S, G, cap,
    HAS_BASE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, s, offs, mask = _block(block_segment, block_start, segment_numel, BLOCK)
    b = _theta0(table, s, offs, mask, HAS_BASE, DTYPE, BLOCK)
    for j in range(0, G):
        a = tl.abs(_tau(table, S, j, s, offs, mask, b, DTYPE))
        lo = tl.load(low + j)
        hi = tl.load(high + j)
        tl.store(below + pid * G + j, tl.sum((mask & (a < lo)).to(tl.int64), axis=0))
        hit = mask & (a >= lo) & (a <= hi)
        hits = tl.sum(hit.to(tl.int64), axis=0)
        if hits > 0:
            first = tl.atomic_add(filled + j, hits)
            at = first + tl.cumsum(hit.to(tl.int64), axis=0) - 1
            tl.store(gathered + j * cap + at, a, mask=hit & (at < cap))


@triton.jit
def ties_merge(
    block_segment, block_start, segment_numel, segment_offset, state_ptr, table,
    kappas,  # float32[T]: κ_j (−1: keep everything)
    counts,  # int64[blocks, 2]: each program's elected-sign balance and ambiguous entries
    S, G, zero_positive,
    HAS_BASE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # τ* = Σ⁺/max(n⁺, 1) where the elected sign sign(Σ⁺ + Σ⁻) is positive (or 0 and ``zero_positive``),
    # else Σ⁻/max(n⁻, 1), over the τ_j with |τ_j| >= κ_j (ties at κ kept); the division correctly rounded.
    pid, s, offs, mask = _block(block_segment, block_start, segment_numel, BLOCK)
    b = _theta0(table, s, offs, mask, HAS_BASE, DTYPE, BLOCK)
    ps = tl.zeros([BLOCK], dtype=tl.float32)
    ns = tl.zeros([BLOCK], dtype=tl.float32)
    pc = tl.zeros([BLOCK], dtype=tl.float32)
    nc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, G):
        v = _tau(table, S, j, s, offs, mask, b, DTYPE)
        kappa = tl.load(kappas + j)
        trimmed = tl.where(tl.abs(v) >= kappa, v, 0.0)
        ps = ps + tl.maximum(trimmed, 0.0)
        ns = ns + tl.minimum(trimmed, 0.0)
        pc = pc + (trimmed > 0).to(tl.float32)
        nc = nc + (trimmed < 0).to(tl.float32)
    total = ps + ns
    positive = (total > 0) | ((total == 0) & (zero_positive != 0))
    numerator = tl.where(positive, ps, ns)
    count = tl.maximum(tl.where(positive, pc, nc), 1.0)
    tl.store(state_ptr + tl.load(segment_offset + s) + offs, tl.math.div_rn(numerator, count), mask=mask)
    balance = tl.sum((mask & (total > 0)).to(tl.int64) - (mask & (total < 0)).to(tl.int64), axis=0)
    ambiguous = tl.sum((mask & (total == 0) & (pc + nc > 0)).to(tl.int64), axis=0)
    tl.store(counts + pid * 2, balance)
    tl.store(counts + pid * 2 + 1, ambiguous)
