"""The numba kernels behind :mod:`magmax.merging._native` (imported on first use: numba takes ~0.5 s to import).

Plain loops, compiled without fast-math (so nothing is reassociated or fused into an FMA) and cached on
disk (``cache=True``). ``# pragma: no cover``: coverage cannot see inside compiled code.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload


@intrinsic
def _bits_to_f32(typingctx, bits):  # pragma: no cover - compiled
    """Reinterpret a uint32 as the float32 with that bit pattern (an LLVM bitcast)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


def f32(value):  # pragma: no cover - replaced by the overload inside compiled code
    """An input entry as float32: float32 entries as they are, bfloat16 ones (read as uint16) exactly."""
    raise NotImplementedError


@overload(f32, inline="always")
def _f32_overload(value):  # pragma: no cover - compiled
    if isinstance(value, types.Float):
        return lambda value: value
    if value == types.uint16:  # bfloat16 bits: its float32 is the same bits followed by 16 zeros
        return lambda value: _bits_to_f32(np.uint32(value) << np.uint32(16))
    return None

@njit(inline="always", cache=True)
def _load_base(base, has_base, lo, m, out):  # pragma: no cover - compiled
    if has_base:
        for k in range(m):
            out[k] = f32(base[lo + k])
    else:
        for k in range(m):
            out[k] = np.float32(0.0)

# -- MagMax -------------------------------------------------------------------------------------
# Element-outer loops over a tuple of inputs: numba compiles one version per group size (the
# tuple's length is part of its type), unrolls the task loop and keeps the running state in
# registers: each input is read once, the state written once, no scratch arrays.

@njit(parallel=True, cache=True, nogil=True)
def magmax_fold(state, base, has_base, first, x0, xs):  # pragma: no cover - compiled
    for i in prange(state.shape[0]):
        b = f32(base[i]) if has_base else np.float32(0.0)
        best = f32(x0[i]) - b if first else state[i]
        mag = abs(best)
        for x in xs:
            v = f32(x[i]) - b
            a = abs(v)
            take = a >= mag  # ties go to the later task, as the reference fold
            best = v if take else best
            mag = a if take else mag
        state[i] = best

# -- Σ τ_t (task arithmetic, averaging) ---------------------------------------------------------

@njit(parallel=True, cache=True, nogil=True)
def sum_fold(state, base, has_base, first, x0, xs):  # pragma: no cover - compiled
    for i in prange(state.shape[0]):
        b = f32(base[i]) if has_base else np.float32(0.0)
        total = f32(x0[i]) - b if first else state[i]
        for x in xs:
            total = total + (f32(x[i]) - b)
        state[i] = total

# -- random mix ---------------------------------------------------------------------------------

@njit(parallel=True, cache=True, nogil=True)
def random_fold(state, base, has_base, first, x0, xs, keys, thresholds, offset):  # pragma: no cover - compiled
    # uint32 arithmetic wraps mod 2^32, exactly the torch kernel's int64 steps followed by "& 0xFFFFFFFF".
    spread_mul = np.uint32(0x61C88647)
    mix = np.uint32(0x45D9F3B)
    shift = np.uint32(16)
    for i in prange(state.shape[0]):
        b = f32(base[i]) if has_base else np.float32(0.0)
        choice = f32(x0[i]) - b if first else state[i]  # t = 0 is always taken
        spread = np.uint32(np.uint32(offset + i) * spread_mul)
        j = 0
        for x in xs:
            h = np.uint32(spread + keys[j])
            h = np.uint32(h ^ (h >> shift))
            h = np.uint32(h * mix)
            h = np.uint32(h ^ (h >> shift))
            h = np.uint32(h * mix)
            v = f32(x[i]) - b
            choice = v if h <= thresholds[j] else choice
            j += 1
        state[i] = choice


@njit(cache=True, nogil=True)
def sample_magnitudes(base, has_base, xs, count, phase, stride, out, filled):  # pragma: no cover
    # |x − θ0| at positions phase, phase + stride, … of this tensor, appended to out[j, filled:].
    n = xs[0].shape[0]
    for j in range(count):
        x = xs[j]
        f = filled
        for i in range(phase, n, stride):
            b = f32(base[i]) if has_base else np.float32(0.0)
            out[j, f] = abs(f32(x[i]) - b)
            f += 1
    return (n - phase + stride - 1) // stride if n > phase else 0

GATHER_CHUNK = 256
"""Entries per step of the count-and-gather pass: small, so that most steps hold no bracketed value
and skip the copy-out loop (at a 0.2% bracket, about 60% of the steps)."""

@njit(cache=True)
def _count_gather_task(x, b0, lo, m, low, high, gathered, j, f, mags):  # pragma: no cover - compiled
    # A vectorised pass counts (no branches); when the step holds in-bracket values, a branch-free
    # compaction (write every value, advance only on a hit) copies them out.
    below = 0
    inside = 0
    for k in range(m):
        a = abs(f32(x[lo + k]) - b0[k])
        below += a < low
        inside += (a >= low) & (a <= high)
    if inside:
        q = 0
        for k in range(m):
            a = abs(f32(x[lo + k]) - b0[k])
            mags[q] = a
            q += (a >= low) & (a <= high)
        cap = gathered.shape[1]
        for k in range(q):
            if f < cap:
                gathered[j, f] = mags[k]
            f += 1
    return below, f

@njit(cache=True, nogil=True)
def count_gather_serial(base, has_base, xs, count, low, high, below, gathered, filled):  # pragma: no cover
    n = xs[0].shape[0]
    step = GATHER_CHUNK
    b0 = np.empty(step, np.float32)
    mags = np.empty(step + 1, np.float32)
    for c in range((n + step - 1) // step):
        lo = c * step
        m = min(step, n - lo)
        _load_base(base, has_base, lo, m, b0)
        for j in range(count):
            nb, f = _count_gather_task(xs[j], b0, lo, m, low[j], high[j], gathered, j, filled[j], mags)
            below[j] += nb
            filled[j] = f

@njit(parallel=True, cache=True, nogil=True)
def count_gather_by_task(base, has_base, xs, count, low, high, below, gathered, filled):  # pragma: no cover
    # One task per thread (θ0 is then read once per task): no shared counters, no races.
    n = xs[0].shape[0]
    step = GATHER_CHUNK
    for j in prange(count):
        b0 = np.empty(step, np.float32)
        mags = np.empty(step + 1, np.float32)
        for c in range((n + step - 1) // step):
            lo = c * step
            m = min(step, n - lo)
            _load_base(base, has_base, lo, m, b0)
            nb, f = _count_gather_task(xs[j], b0, lo, m, low[j], high[j], gathered, j, filled[j], mags)
            below[j] += nb
            filled[j] = f

# TIES runs as three element-outer kernels (one per role of a group, so no per-element branch on
# it). State (Σ⁺, Σ⁻, n⁺, n⁻; counts as float32, exact below 2^24 tasks) lives in arrays between
# groups and is ignored by a first group.

@njit(inline="always", cache=True)
def _ties_accumulate(i, b, xs, kappas, first, pos_s, neg_s, npos_s, nneg_s):  # pragma: no cover
    if first:
        ps = np.float32(0.0)
        ns = np.float32(0.0)
        pc = np.float32(0.0)
        nc = np.float32(0.0)
    else:
        ps = pos_s[i]
        ns = neg_s[i]
        pc = npos_s[i]
        nc = nneg_s[i]
    j = 0
    for x in xs:
        # Branch-free: adding +0.0 leaves a sum's value unchanged, so this is
        # Σ⁺ += clamp(τ̂, min=0), Σ⁻ += clamp(τ̂, max=0), n± += (τ̂ ≷ 0) as in the torch fold.
        v = f32(x[i]) - b
        trimmed = v if abs(v) >= kappas[j] else np.float32(0.0)  # trim: ties at κ_t kept
        ps = ps + max(trimmed, np.float32(0.0))
        ns = ns + min(trimmed, np.float32(0.0))
        pc += np.float32(trimmed > 0)
        nc += np.float32(trimmed < 0)
        j += 1
    return ps, ns, pc, nc

@njit(parallel=True, cache=True, nogil=True)
def ties_partial(pos_s, neg_s, npos_s, nneg_s, base, has_base, xs, kappas, first):  # pragma: no cover
    for i in prange(xs[0].shape[0]):
        b = f32(base[i]) if has_base else np.float32(0.0)
        ps, ns, pc, nc = _ties_accumulate(i, b, xs, kappas, first, pos_s, neg_s, npos_s, nneg_s)
        pos_s[i] = ps
        neg_s[i] = ns
        npos_s[i] = pc
        nneg_s[i] = nc

@njit(parallel=True, cache=True, nogil=True)
def ties_balance(pos_s, neg_s, npos_s, nneg_s, base, has_base, xs, kappas, first):  # pragma: no cover
    # #(elected sign > 0) − #(elected sign < 0), s = sign(Σ⁺ + Σ⁻)
    balance = 0
    for i in prange(xs[0].shape[0]):
        b = f32(base[i]) if has_base else np.float32(0.0)
        ps, ns, pc, nc = _ties_accumulate(i, b, xs, kappas, first, pos_s, neg_s, npos_s, nneg_s)
        total = ps + ns
        balance += (total > 0) - (total < 0)
    return balance

@njit(parallel=True, cache=True, nogil=True)
def ties_merge(pos_s, neg_s, npos_s, nneg_s, out, den, base, has_base, xs, kappas, first, zero_positive):  # pragma: no cover
    # τ* = Σ⁺/max(n⁺, 1) where the elected sign is positive (or 0 and the majority positive), else
    # Σ⁻/max(n⁻, 1). The division runs as a second loop: fused into the first, LLVM leaves it scalar.
    n = xs[0].shape[0]
    for i in prange(n):
        b = f32(base[i]) if has_base else np.float32(0.0)
        ps, ns, pc, nc = _ties_accumulate(i, b, xs, kappas, first, pos_s, neg_s, npos_s, nneg_s)
        total = ps + ns
        positive = (total > 0) | ((total == 0) & zero_positive)
        out[i] = ps if positive else ns
        den[i] = pc if positive else nc
    for i in prange(n):
        out[i] = out[i] / max(den[i], np.float32(1.0))
