"""The numba kernels behind :mod:`magmax.merging.backends.cpu.native` (imported on first use: numba takes ~0.5 s to import).

Plain loops, compiled without fast-math (so nothing is reassociated or contracted into an FMA but the
one written as such, ``_fma``) and cached on disk (``cache=True``). ``# pragma: no cover``: coverage cannot see inside compiled code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload


def _bitcast(source: Any, target: Any) -> Any:
    """An intrinsic reading a ``source`` value's bits as a ``target`` of the same width (an LLVM bitcast)."""

    @intrinsic
    def cast(typingctx, value):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(source), codegen

    return cast


_bits_to_f32 = _bitcast(types.uint32, types.float32)
"""The float32 with a uint32's bit pattern."""

_f32_bits = _bitcast(types.float32, types.uint32)
"""The bit pattern of a float32 as a uint32."""


@intrinsic
def _pointer(typingctx, address, like):  # pragma: no cover - compiled
    """The int64 ``address`` as a pointer to entries of ``like``'s dtype (an LLVM inttoptr)."""
    pointer = types.CPointer(like.dtype)
    sig = pointer(types.int64, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return sig, codegen


@intrinsic
def _fma(typingctx, a, b, c):  # pragma: no cover - compiled
    """a·b + c rounded once (LLVM's llvm.fma.f32: one vfmadd on a CPU with FMA)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fma = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fma, args)

    return sig, codegen


KEEP_TAU = 0
"""``finish`` of a fold: write τ* itself."""
ADD_FUSED = 1
"""``finish``: write θ = θ0 + λ·τ* rounded once (an FMA), as torch.add(θ0, τ*, alpha=λ) does on CPUs
whose ATen kernels use FMA (AVX2, AVX-512)."""
ADD_SEPARATE = 2
"""``finish``: write θ = θ0 + round(λ·τ*), as that torch.add does on CPUs without (ATen's default kernels)."""


@njit(inline="always", cache=True)
def _finish(value, b, finish, scale):  # pragma: no cover - compiled
    if finish == ADD_FUSED:
        return _fma(value, scale, b)
    if finish == ADD_SEPARATE:
        return b + value * scale
    return value


@njit(cache=True)
def add_scaled_fused(out, base, tau, scale):  # pragma: no cover - compiled
    """out = θ0 + λ·τ rounded once (what ADD_FUSED writes), for ``_native.add_rounding``'s question."""
    for i in range(out.shape[0]):
        out[i] = _fma(tau[i], scale, base[i])


@njit(inline="always", cache=True)
def _input(addresses, j, like, n):  # pragma: no cover - compiled
    """Input j of a kernel that takes its inputs as addresses: any number of inputs, one compiled version
    (a tuple of arrays compiles once per length). The caller keeps the arrays alive."""
    return carray(_pointer(addresses[j], like), n)


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

#
# The MagMax and Σ folds also return for how many of their n entries the sum of the τ values v they
# formed was finite (a NaN or ±Inf term makes it NaN or ±Inf; for Σ τ_t it is the state itself).
# Fewer than n means an input entry was NaN/Inf, or θ_t − θ0 or the sum overflowed (the engine's own
# check then tells which). Otherwise the engine skips that check, a pass over the inputs as long as
# the merge. The count is an integer reduction (LLVM vectorises those, not float ones without
# fast-math). The random fold counts only when asked (``count_finite``).

#
# A fold's last group may write the merged model instead of τ*: ``finish`` (KEEP_TAU, ADD_FUSED or
# ADD_SEPARATE, with λ = ``scale``) applied to each entry as it is stored, where θ0 is at hand already,
# instead of one more pass over τ* and θ0 afterwards. Such switches are constants of a closure, one
# compiled kernel per value (``_specialised``), never a test inside the loop: one there kept LLVM from
# vectorising the folds (MagMax 20% slower).


def _specialised(factory: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel = get(*switches)``: ``factory(*switches)`` built on first use and kept. numba caches each
    on disk apart (the closure's constants are part of its cache key)."""
    built: dict[tuple[Any, ...], Any] = {}

    def get(*switches: Any) -> Any:
        if switches not in built:
            built[switches] = factory(*switches)
        return built[switches]

    return get


@_specialised
def magmax_fold(finish: int):
    @njit(parallel=True, cache=True, nogil=True)
    def fold(state, base, has_base, first, x0, xs, scale):  # pragma: no cover - compiled
        finite = 0
        for i in prange(state.shape[0]):
            b = f32(base[i]) if has_base else np.float32(0.0)
            best = f32(x0[i]) - b if first else state[i]
            mag = abs(best)
            probe = best if first else np.float32(0.0)
            for x in xs:
                v = f32(x[i]) - b
                probe += v
                a = abs(v)
                take = a >= mag  # ties go to the later task, as the reference fold
                best = v if take else best
                mag = a if take else mag
            state[i] = _finish(best, b, finish, scale)
            finite += np.int32(abs(probe) < np.inf)
        return finite

    return fold

# -- Σ τ_t (task arithmetic, averaging) ---------------------------------------------------------


@_specialised
def sum_fold(divide: bool, finish: int):
    # ``divide``: the group ends the mean, state = Σ / divisor (one correctly rounded float32 division,
    # as ``mean_of_sum``), in the same pass instead of one more over the result.
    @njit(parallel=True, cache=True, nogil=True)
    def fold(state, base, has_base, first, x0, xs, divisor, scale):  # pragma: no cover - compiled
        finite = 0
        for i in prange(state.shape[0]):
            b = f32(base[i]) if has_base else np.float32(0.0)
            total = f32(x0[i]) - b if first else state[i]
            for x in xs:
                total = total + (f32(x[i]) - b)
            state[i] = _finish(total / divisor if divide else total, b, finish, scale)
            finite += np.int32(abs(total) < np.inf)  # a NaN/Inf term makes the sum NaN/Inf
        return finite

    return fold

# -- random mix ---------------------------------------------------------------------------------


_SPREAD = np.uint32(0x61C88647)
_MIX = np.uint32(0x45D9F3B)
_SHIFT = np.uint32(16)


@njit(inline="always", cache=True)
def _hash32(spread, key):  # pragma: no cover - compiled
    """The draw of :mod:`magmax.merging.random` (and DARE's): two multiply–xorshift rounds of the
    0x45D9F3B hash of spread + key. uint32 arithmetic wraps mod 2^32, exactly the torch kernel's int64
    steps followed by "& 0xFFFFFFFF"."""
    h = np.uint32(spread + key)
    h = np.uint32(h ^ (h >> _SHIFT))
    h = np.uint32(h * _MIX)
    h = np.uint32(h ^ (h >> _SHIFT))
    return np.uint32(h * _MIX)


@_specialised
def random_fold(count_finite: bool, finish: int):
    # ``count_finite``: the finite count of the folds above. It costs 1.4x here (the hash loop is
    # compute-bound), so only the engine's merges, which would otherwise read every input once more to
    # check it, ask for it.
    @njit(parallel=True, cache=True, nogil=True)
    def fold(state, base, has_base, first, x0, xs, keys, thresholds, offset, scale):  # pragma: no cover
        finite = 0
        for i in prange(state.shape[0]):
            b = f32(base[i]) if has_base else np.float32(0.0)
            choice = f32(x0[i]) - b if first else state[i]  # t = 0 is always taken
            probe = choice if first else np.float32(0.0)
            spread = np.uint32(np.uint32(offset + i) * _SPREAD)
            for j in range(len(xs)):  # not `for x in xs` with a counter: that kept LLVM from vectorising
                x = xs[j]
                h = _hash32(spread, keys[j])
                v = f32(x[i]) - b
                if count_finite:
                    probe += v
                choice = v if h <= thresholds[j] else choice
            state[i] = _finish(choice, b, finish, scale)
            if count_finite:
                finite += np.int32(abs(probe) < np.inf)
        return finite

    return fold


# -- DARE (drop and rescale, then Σ) -------------------------------------------------------------


@_specialised
def dare_fold(count_finite: bool, finish: int):
    # Σ_t where(h_t(i) >= thr_t, τ_t / (1 − p), 0) in task order. A first group starts the sum from −0.0,
    # the identity of float addition (−0 + x is x for every x, −0 and +0 included), which gives exactly
    # the torch kernel's "state = the first dropped τ" without a loop of its own for input 0.
    @njit(parallel=True, cache=True, nogil=True)
    def fold(state, base, has_base, first, xs, keys, thresholds, offset, divisor, scale):  # pragma: no cover
        finite = 0
        for i in prange(state.shape[0]):
            b = f32(base[i]) if has_base else np.float32(0.0)
            total = np.float32(-0.0) if first else state[i]
            probe = np.float32(0.0)
            spread = np.uint32(np.uint32(offset + i) * _SPREAD)
            for j in range(len(xs)):  # not `for x in xs` with a counter: that kept LLVM from vectorising
                x = xs[j]
                v = f32(x[i]) - b
                if count_finite:
                    probe += v
                h = _hash32(spread, keys[j])
                total = total + (v / divisor if h >= thresholds[j] else np.float32(0.0))
            state[i] = _finish(total, b, finish, scale)
            if count_finite:
                finite += np.int32(abs(probe) < np.inf)
        return finite

    return fold


@njit(cache=True, nogil=True)
def sample_entries(base, has_base, addresses, like, n, phase, stride, out, filled):  # pragma: no cover
    # x_j − θ0 at positions phase, phase + stride, … of this tensor, appended to out[j, filled:].
    for j in range(addresses.shape[0]):
        x = _input(addresses, j, like, n)
        f = filled
        for i in range(phase, n, stride):
            b = f32(base[i]) if has_base else np.float32(0.0)
            out[j, f] = f32(x[i]) - b
            f += 1
    return (n - phase + stride - 1) // stride if n > phase else 0

COUNT_BLOCK = 2048
"""Entries per block of :func:`count_gather` (θ0's block and one input's magnitudes: 16 KiB, in L1)."""

COMPRESS_WIDTH = 16
"""Entries per compress-store (one AVX-512 vector of float32)."""


def _vector_codegen(context, builder, array_type, array, start):
    """The 16 float32 at array[start:] as one LLVM vector (an unaligned load)."""
    data = context.make_array(array_type)(context, builder, array).data
    vector = ir.VectorType(ir.FloatType(), COMPRESS_WIDTH)
    return builder.load(builder.bitcast(builder.gep(data, [start]), vector.as_pointer()), align=4)


def _splat_codegen(builder, value):
    vector = ir.VectorType(ir.FloatType(), COMPRESS_WIDTH)
    undef = ir.Constant(vector, ir.Undefined)
    lanes = ir.Constant(ir.VectorType(ir.IntType(32), COMPRESS_WIDTH), [0] * COMPRESS_WIDTH)
    return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0)), undef, lanes)


def _popcount_codegen(builder, mask):
    """The number of set lanes of a 16-lane mask, as an int64 (kmov + popcnt on AVX-512)."""
    popcount = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(COMPRESS_WIDTH)])
    bits = builder.bitcast(mask, ir.IntType(COMPRESS_WIDTH))
    return builder.zext(builder.call(popcount, [bits]), ir.IntType(64))


@intrinsic
def _below16(typingctx, src, start, bound):  # pragma: no cover - compiled
    """#{src[start + k] < bound : k < 16} (a compare and a popcount: a reduction per vector, which the
    loop vectoriser would do on eight int64 lanes per four float32 ones)."""
    if src.layout != "C":  # the vector load assumes consecutive entries
        return None
    sig = types.int64(src, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        src_array, start, bound = args
        values = _vector_codegen(context, builder, signature.args[0], src_array, start)
        return _popcount_codegen(builder, builder.fcmp_ordered("<", values, _splat_codegen(builder, bound)))

    return sig, codegen


@intrinsic
def _gather16(typingctx, dst, at, src, start, low, high):  # pragma: no cover - compiled
    """Store the entries of src[start:start + 16] that lie in [low, high] one after another at dst[at:]
    (LLVM's llvm.masked.compressstore: one vcompressps on AVX-512, a scalar sequence elsewhere). Returns
    how many, plus 256 × how many lie below low. Offsets, not slices: a slice made per call costs more
    than the store."""
    if dst.layout != "C" or src.layout != "C":  # the vector load and store assume consecutive entries
        return None
    sig = types.int64(dst, types.intp, src, types.intp, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        dst_array, at, src_array, start, lo, hi = args
        f32 = ir.FloatType()
        vector = ir.VectorType(f32, COMPRESS_WIDTH)
        mask_type = ir.VectorType(ir.IntType(1), COMPRESS_WIDTH)
        values = _vector_codegen(context, builder, signature.args[2], src_array, start)
        lo_v = _splat_codegen(builder, lo)
        below = builder.fcmp_ordered("<", values, lo_v)
        inside = builder.and_(builder.fcmp_ordered(">=", values, lo_v),
                              builder.fcmp_ordered("<=", values, _splat_codegen(builder, hi)))
        dst_data = context.make_array(signature.args[0])(context, builder, dst_array).data
        store = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [vector, f32.as_pointer(), mask_type]),
            "llvm.masked.compressstore.v16f32")
        builder.call(store, [values, builder.gep(dst_data, [at]), inside])
        below_count = builder.shl(_popcount_codegen(builder, below), ir.Constant(ir.IntType(64), 8))
        return builder.add(_popcount_codegen(builder, inside), below_count)

    return sig, codegen


@njit(inline="always", cache=True)
def _count_gather_block(mags, m, lo, hi, dst, filled, below, j, r):  # pragma: no cover - compiled
    # For the block's magnitudes (m a multiple of COMPRESS_WIDTH): below[j, r] += #{< lo}, and those in
    # [lo, hi] appended to dst at filled[j, r]; without room for a whole step, filled is set past the
    # capacity (the caller then selects from every magnitude) and only the count goes on.
    cap = dst.shape[0]
    f = filled[j, r]
    c = 0
    if f + m <= cap:
        for q in range(0, m, COMPRESS_WIDTH):
            v = _gather16(dst, f, mags, q, lo, hi)
            f += v & 255
            c += v >> 8
    else:
        for q in range(0, m, COMPRESS_WIDTH):
            if f + COMPRESS_WIDTH <= cap:
                v = _gather16(dst, f, mags, q, lo, hi)
                f += v & 255
                c += v >> 8
            else:
                f = cap + 1
                c += _below16(mags, q, lo)
    below[j, r] += c
    filled[j, r] = f


@_specialised
def count_gather(count_finite: bool):
    """The count-and-gather pass of the exact order statistics, with or without counting the finite |τ|:
    the engine's merges ask for the count, which spares them a separate NaN/Inf pass over the inputs."""

    @njit(cache=True, nogil=True)
    def kernel(base, has_base, addresses, like, n, low, high, below, gathered, filled):  # pragma: no cover
        # For each input j and bracket r: below[j, r] += #{|τ_j| < low[j, r]}, and the |τ_j| in
        # [low[j, r], high[j, r]] go to gathered[j, r] (filled[j, r] counts them). Block by block of
        # θ0 (in L1), every input of the call over the block: one vectorised loop forms the magnitudes,
        # then per 16 entries and bracket one compare, popcount and compress-store counts and copies
        # out. Inputs are indexed through views of the block: an index s + k in a loop of variable length
        # compiles to a gather (numba's wrap-around test for negative indices), 1.5x slower. Serial and
        # nogil: threads take disjoint inputs. Returns the number of finite |τ| (NaN and ±Inf fail
        # a < Inf) when counting, else 0.
        count, brackets = low.shape
        full = n - n % COMPRESS_WIDTH
        counted = filled.copy()  # private copies: threads share the callers' cache lines
        counts = np.zeros_like(below)
        b0 = np.empty(COUNT_BLOCK, np.float32)
        mags = np.empty(COUNT_BLOCK, np.float32)
        finite = 0
        for s in range(0, full, COUNT_BLOCK):
            m = min(COUNT_BLOCK, full - s)
            if has_base:
                block = base[s:s + m]
                for k in range(m):
                    b0[k] = f32(block[k])
            else:
                b0[:] = 0.0
            for j in range(count):
                x = _input(addresses, j, like, n)[s:s + m]
                # With count_finite, the largest bit pattern of the block's |τ| (an integer max: a
                # reduction LLVM may vectorise, unlike a float one) is below +Inf's only if every |τ| is
                # finite; only a block that fails counts lane by lane.
                top = np.uint32(0)
                for k in range(m):
                    a = abs(f32(x[k]) - b0[k])
                    mags[k] = a
                    if count_finite:
                        top = max(top, _f32_bits(a))
                if count_finite:
                    if top < np.uint32(0x7F800000):
                        finite += m
                    else:
                        for q in range(0, m, COMPRESS_WIDTH):
                            finite += _below16(mags, q, np.float32(np.inf))
                for r in range(brackets):
                    _count_gather_block(mags, m, low[j, r], high[j, r], gathered[j, r], counted, counts, j, r)
        for j in range(count):  # the last n mod 16 entries
            x = _input(addresses, j, like, n)
            for i in range(full, n):
                a = abs(f32(x[i]) - (f32(base[i]) if has_base else np.float32(0.0)))
                finite += a < np.inf
                for r in range(brackets):
                    counts[j, r] += a < low[j, r]
                    if (a >= low[j, r]) & (a <= high[j, r]):
                        f = counted[j, r]
                        if f < gathered.shape[2]:
                            gathered[j, r, f] = a
                        counted[j, r] = f + 1
        below += counts
        filled[:] = counted
        return finite if count_finite else 0

    return kernel

# TIES runs as two kernels over blocks of entries: per block, the running state (Σ⁺, Σ⁻, n⁺, n⁻;
# counts as float32, exact below 2^24 tasks) sits in L1-sized scratch arrays (one set per thread),
# and the tasks of the group are vectorised loops over the block, four tasks per loop (a quarter of
# the scratch traffic; element-outer loops with all tasks unrolled inside stayed scalar). The
# inputs come as addresses, so a group may hold every task (inputs already in memory) without a
# compile per count. Between groups the state lives in arrays, ignored by a first group.

TIES_BLOCK = 2048
"""Entries per block of the TIES kernels (five float32 scratch arrays: 40 KiB, about L1)."""

@njit(inline="always", cache=True)
def _ties_add(v, kappa, ps, ns, pc, nc):  # pragma: no cover - compiled
    # Σ⁺ += clamp(τ̂, min=0), Σ⁻ += clamp(τ̂, max=0), n± += (τ̂ ≷ 0); branch-free: adding +0.0 leaves a
    # sum's value unchanged.
    trimmed = v if abs(v) >= kappa else np.float32(0.0)  # trim: ties at κ_t kept
    return (ps + max(trimmed, np.float32(0.0)), ns + min(trimmed, np.float32(0.0)),
            pc + np.float32(trimmed > 0), nc + np.float32(trimmed < 0))

@njit(inline="always", cache=True)
def _ties_block(lo, m, base, has_base, addresses, like, n, kappas, first, pos_s, neg_s, npos_s, nneg_s,
                b0, ps, ns, pc, nc):  # pragma: no cover - compiled
    # The state of entries lo..lo+m−1 after the group's tasks, in task order, into ps, ns, pc, nc.
    at = np.uint64(lo)  # unsigned indices: no wrap-around test, so LLVM vectorises
    for k in range(m):
        b0[k] = f32(base[at + np.uint64(k)]) if has_base else np.float32(0.0)
    if first:
        for k in range(m):
            ps[k] = 0.0
            ns[k] = 0.0
            pc[k] = 0.0
            nc[k] = 0.0
    else:
        for k in range(m):
            i = at + np.uint64(k)
            ps[k] = pos_s[i]
            ns[k] = neg_s[i]
            pc[k] = npos_s[i]
            nc[k] = nneg_s[i]
    count = addresses.shape[0]
    j = 0
    while j + 3 < count:
        xa = _input(addresses, j, like, n)
        xb = _input(addresses, j + 1, like, n)
        xc = _input(addresses, j + 2, like, n)
        xd = _input(addresses, j + 3, like, n)
        ka = kappas[j]
        kb = kappas[j + 1]
        kc = kappas[j + 2]
        kd = kappas[j + 3]
        for k in range(m):
            i = at + np.uint64(k)
            b = b0[k]
            p, q, c, d = _ties_add(f32(xa[i]) - b, ka, ps[k], ns[k], pc[k], nc[k])
            p, q, c, d = _ties_add(f32(xb[i]) - b, kb, p, q, c, d)
            p, q, c, d = _ties_add(f32(xc[i]) - b, kc, p, q, c, d)
            p, q, c, d = _ties_add(f32(xd[i]) - b, kd, p, q, c, d)
            ps[k] = p
            ns[k] = q
            pc[k] = c
            nc[k] = d
        j += 4
    while j + 1 < count:
        xa = _input(addresses, j, like, n)
        xb = _input(addresses, j + 1, like, n)
        ka = kappas[j]
        kb = kappas[j + 1]
        for k in range(m):
            i = at + np.uint64(k)
            p, q, c, d = _ties_add(f32(xa[i]) - b0[k], ka, ps[k], ns[k], pc[k], nc[k])
            p, q, c, d = _ties_add(f32(xb[i]) - b0[k], kb, p, q, c, d)
            ps[k] = p
            ns[k] = q
            pc[k] = c
            nc[k] = d
        j += 2
    if j < count:
        x = _input(addresses, j, like, n)
        kappa = kappas[j]
        for k in range(m):
            p, q, c, d = _ties_add(f32(x[at + np.uint64(k)]) - b0[k], kappa, ps[k], ns[k], pc[k], nc[k])
            ps[k] = p
            ns[k] = q
            pc[k] = c
            nc[k] = d

@njit(inline="always", cache=True)
def _ties_scratch():  # pragma: no cover - compiled
    """θ0 and the state (Σ⁺, Σ⁻, n⁺, n⁻) of one block: one set per thread."""
    return (np.empty(TIES_BLOCK, np.float32), np.empty(TIES_BLOCK, np.float32), np.empty(TIES_BLOCK, np.float32),
            np.empty(TIES_BLOCK, np.float32), np.empty(TIES_BLOCK, np.float32))

@njit(parallel=True, cache=True, nogil=True)
def ties_partial(pos_s, neg_s, npos_s, nneg_s, base, has_base, addresses, like, n, kappas, first, parts):  # pragma: no cover
    blocks = (n + TIES_BLOCK - 1) // TIES_BLOCK
    for part in prange(parts):  # one set of scratch arrays per thread, a contiguous run of blocks each
        b0, ps, ns, pc, nc = _ties_scratch()
        for blk in range(part * blocks // parts, (part + 1) * blocks // parts):
            lo = blk * TIES_BLOCK
            m = min(TIES_BLOCK, n - lo)
            _ties_block(lo, m, base, has_base, addresses, like, n, kappas, first, pos_s, neg_s, npos_s, nneg_s,
                        b0, ps, ns, pc, nc)
            at = np.uint64(lo)
            for k in range(m):
                i = at + np.uint64(k)
                pos_s[i] = ps[k]
                neg_s[i] = ns[k]
                npos_s[i] = pc[k]
                nneg_s[i] = nc[k]

@_specialised
def ties_merge(finish: int):
    @njit(parallel=True, cache=True, nogil=True)
    def merge(pos_s, neg_s, npos_s, nneg_s, out, base, has_base, addresses, like, n, kappas, first,
              zero_positive, parts, scale):  # pragma: no cover
        # τ* = Σ⁺/max(n⁺, 1) where the elected sign s = sign(Σ⁺ + Σ⁻) is positive (or 0 and the majority
        # positive: ``zero_positive``), else Σ⁻/max(n⁻, 1), written as ``finish`` says (τ* or θ0 + λ·τ*).
        # Returns the elected-sign balance #(s > 0) − #(s < 0) and the number of ambiguous entries (s = 0
        # with agreeing entries: there the majority decides).
        blocks = (n + TIES_BLOCK - 1) // TIES_BLOCK
        balance = 0
        ambiguous = 0
        for part in prange(parts):  # one set of scratch arrays per thread, a contiguous run of blocks each
            b0, ps, ns, pc, nc = _ties_scratch()
            part_balance = 0
            part_ambiguous = 0
            for blk in range(part * blocks // parts, (part + 1) * blocks // parts):
                lo = blk * TIES_BLOCK
                m = min(TIES_BLOCK, n - lo)
                _ties_block(lo, m, base, has_base, addresses, like, n, kappas, first, pos_s, neg_s, npos_s, nneg_s,
                            b0, ps, ns, pc, nc)
                block_balance = np.int32(0)
                block_ambiguous = np.int32(0)
                at = np.uint64(lo)
                for k in range(m):
                    total = ps[k] + ns[k]
                    positive = (total > 0) | ((total == 0) & zero_positive)
                    numerator = ps[k] if positive else ns[k]
                    count = pc[k] if positive else nc[k]
                    out[at + np.uint64(k)] = _finish(numerator / max(count, np.float32(1.0)), b0[k], finish, scale)
                    block_balance += np.int32(total > 0) - np.int32(total < 0)
                    block_ambiguous += np.int32((total == 0) & (pc[k] + nc[k] > 0))
                part_balance += block_balance
                part_ambiguous += block_ambiguous
            balance += part_balance
            ambiguous += part_ambiguous
        return balance, ambiguous

    return merge


# -- Consensus (TALL masks) ------------------------------------------------------------------------
# Per block of entries: Σ_t τ_t in task order, then each task's TALL vote against that sum, re-reading
# the block's inputs from cache: each input is read from memory once. Inputs as addresses (any count).

CONSENSUS_BLOCK = 2048
"""Entries per block of the consensus kernel (θ0, Σ and the votes: 24 KiB, in L1)."""


@njit(inline="always", cache=True)
def _tall_votes_block(at, m, addresses, like, n, b0, total, votes, lam):  # pragma: no cover - compiled
    # votes[k] += [|τ_j| > λ_m·|Σ − τ_j|] for every input j of the call.
    for j in range(addresses.shape[0]):
        x = _input(addresses, j, like, n)
        for k in range(m):
            v = f32(x[at + np.uint64(k)]) - b0[k]
            votes[k] += np.int32(abs(v) > abs(total[k] - v) * lam)


@_specialised
def consensus_merge(finish: int):
    @njit(parallel=True, cache=True, nogil=True)
    def merge(out, base, has_base, addresses, like, n, lam, least, parts, scale):  # pragma: no cover
        # out = Σ_t τ_t · [#{t : |τ_t| > λ_m·|Σ − τ_t|} >= least], written as ``finish`` says. Returns how
        # many entries' sums were finite (a NaN/Inf τ entry makes its sum NaN/Inf).
        blocks = (n + CONSENSUS_BLOCK - 1) // CONSENSUS_BLOCK
        count = addresses.shape[0]
        finite = 0
        for part in prange(parts):
            b0 = np.empty(CONSENSUS_BLOCK, np.float32)
            total = np.empty(CONSENSUS_BLOCK, np.float32)
            votes = np.empty(CONSENSUS_BLOCK, np.int32)
            part_finite = 0
            for blk in range(part * blocks // parts, (part + 1) * blocks // parts):
                lo = blk * CONSENSUS_BLOCK
                m = min(CONSENSUS_BLOCK, n - lo)
                at = np.uint64(lo)  # unsigned indices: no wrap-around test, so LLVM vectorises
                for k in range(m):
                    b0[k] = f32(base[at + np.uint64(k)]) if has_base else np.float32(0.0)
                x = _input(addresses, 0, like, n)
                for k in range(m):
                    total[k] = f32(x[at + np.uint64(k)]) - b0[k]
                    votes[k] = 0
                for j in range(1, count):
                    x = _input(addresses, j, like, n)
                    for k in range(m):
                        total[k] = total[k] + (f32(x[at + np.uint64(k)]) - b0[k])
                _tall_votes_block(at, m, addresses, like, n, b0, total, votes, lam)
                block_finite = np.int32(0)
                for k in range(m):
                    s = total[k]
                    block_finite += np.int32(abs(s) < np.inf)
                    out[at + np.uint64(k)] = _finish(s * np.float32(votes[k] >= least), b0[k], finish, scale)
                part_finite += block_finite
            finite += part_finite
        return finite

    return merge


@njit(parallel=True, cache=True, nogil=True)
def tall_votes(total, votes, base, has_base, addresses, like, n, lam, parts):  # pragma: no cover
    # votes += the TALL votes of this call's inputs against the finished sum ``total`` (a group of a
    # tensor whose inputs do not fit in one call).
    blocks = (n + CONSENSUS_BLOCK - 1) // CONSENSUS_BLOCK
    for part in prange(parts):
        b0 = np.empty(CONSENSUS_BLOCK, np.float32)
        s = np.empty(CONSENSUS_BLOCK, np.float32)
        v = np.empty(CONSENSUS_BLOCK, np.int32)
        for blk in range(part * blocks // parts, (part + 1) * blocks // parts):
            lo = blk * CONSENSUS_BLOCK
            m = min(CONSENSUS_BLOCK, n - lo)
            at = np.uint64(lo)
            for k in range(m):
                i = at + np.uint64(k)
                b0[k] = f32(base[i]) if has_base else np.float32(0.0)
                s[k] = total[i]
                v[k] = votes[i]
            _tall_votes_block(at, m, addresses, like, n, b0, s, v, lam)
            for k in range(m):
                votes[at + np.uint64(k)] = v[k]


# -- Σ of banded τ (Model Breadcrumbs) --------------------------------------------------------------


@_specialised
def band_sum_fold(finish: int):
    # Σ_t where(low_t <= |τ_t| <= high_t, τ_t, 0) in task order; a first group starts from −0.0, the
    # identity of float addition, which gives exactly "state = the first masked τ". Serial and nogil: the
    # caller runs ranges of entries on threads of its own (see _native.band_sum_group).
    @njit(cache=True, nogil=True)
    def fold(state, base, has_base, first, xs, low, high, scale):  # pragma: no cover - compiled
        finite = 0
        for i in range(state.shape[0]):
            b = f32(base[i]) if has_base else np.float32(0.0)
            total = np.float32(-0.0) if first else state[i]
            probe = np.float32(0.0)
            for j in range(len(xs)):  # not `for x in xs` with a counter: that kept LLVM from vectorising
                x = xs[j]
                v = f32(x[i]) - b
                probe += v
                a = abs(v)
                total = total + (v if (a >= low[j]) & (a <= high[j]) else np.float32(0.0))
            state[i] = _finish(total, b, finish, scale)
            finite += np.int32(abs(probe) < np.inf)
        return finite

    return fold


