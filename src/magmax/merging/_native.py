"""CPU group kernels compiled by numba: one pass over memory, every thread, no compile at merge time.

The torch group kernels of :mod:`magmax.merging._fused` run eagerly as a handful of ATen ops per input
on cache-sized chunks (4–20× the bandwidth floor on CPU), or under ``torch.compile`` (at the floor, but
1–30 s of compiling per group shape). The kernels here are the same folds written as plain loops for
numba: each chunk of ``CHUNK`` elements keeps its running state in two small local arrays, every input
of the group is read once, the state is written once. They compile once per machine (``cache=True``,
about 2 s per kernel; numba keeps the machine code on disk) and are used on CPU whenever numba imports
and ``MAGMAX_NATIVE`` is not ``0``.

Exactness: the loops perform the same IEEE-754 float32 operations, in the same order, as the torch
kernels (numba compiles without fast-math, so nothing is reassociated or contracted into an FMA), and
the random hash is the same int64 arithmetic; the tests check bit equality against the torch kernels.

Only float32 inputs take this path (the engine forms τ in float32; bf16/fp16 checkpoints fall back to
the torch kernels). A group has at most ``_fused.GROUP`` inputs, passed as a tuple padded to that length
with an empty array, so that each kernel compiles once rather than once per group size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

try:  # numba is a dependency, but an unsupported Python or a broken LLVM must not break merging
    import numba
    from numba import njit, prange

    _IMPORTED = True
except Exception:  # pragma: no cover - depends on the installation
    _IMPORTED = False

CHUNK = 4096
"""Elements per chunk: the chunk's state, |state| and θ0 (48 KiB) stay in L1/L2 while the inputs stream."""

_F32 = torch.float32
_disabled_after_error = False


def enabled() -> bool:
    """numba imported, not turned off by ``MAGMAX_NATIVE=0``, and no kernel has failed in this process."""
    flag = os.environ.get("MAGMAX_NATIVE", "1").strip().lower()
    return _IMPORTED and not _disabled_after_error and flag not in ("0", "false", "no", "off")


def accepts(state: Tensor, base: Tensor | None, inputs: Sequence[Tensor], group: int) -> bool:
    """Whether a group can run natively: CPU, float32 everywhere, at most ``group`` inputs."""
    if state.device.type != "cpu" or state.dtype != _F32 or not 0 < len(inputs) <= group:
        return False
    if base is not None and (base.dtype != _F32 or base.device.type != "cpu"):
        return False
    return all(x.dtype == _F32 and x.device.type == "cpu" for x in inputs)


if _IMPORTED:
    _EMPTY = np.empty(0, dtype=np.float32)
    _NO_PARAMS = np.zeros((1, 2), dtype=np.int64)

    def _array(t: Tensor) -> np.ndarray:
        return t.detach().contiguous().numpy()

    def _padded(inputs: Sequence[Tensor], group: int) -> tuple[np.ndarray, ...]:
        arrays = [_array(x) for x in inputs]
        return tuple(arrays) + (_EMPTY,) * (group - len(arrays))

    class _threads:  # noqa: N801 - used as a context manager, reads like one
        """numba's threads = torch's intra-op threads for one call. numba's OpenMP layer resets the
        process-wide OpenMP thread count when it starts, which torch shares: put torch's back after."""

        def __enter__(self) -> None:
            self.torch_threads = torch.get_num_threads()
            numba.set_num_threads(max(1, min(self.torch_threads, numba.config.NUMBA_NUM_THREADS)))

        def __exit__(self, *exc: object) -> None:
            if torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)

    # -- shared pieces (inlined into every kernel) --------------------------------------------------

    @njit(inline="always", cache=True)
    def _load_base(base, has_base, lo, m, out):  # pragma: no cover - compiled
        if has_base:
            for k in range(m):
                out[k] = base[lo + k]
        else:
            for k in range(m):
                out[k] = np.float32(0.0)

    @njit(inline="always", cache=True)
    def _tau(x, lo, m, b0, out):  # pragma: no cover - compiled
        # x − θ0 in float32; without a base θ0 is +0.0 and x − 0.0 == x bit for bit (−0.0 included).
        for k in range(m):
            out[k] = x[lo + k] - b0[k]

    # -- MagMax -------------------------------------------------------------------------------------
    # Element-outer loops over a tuple of inputs: numba compiles one version per group size (the
    # tuple's length is part of its type), unrolls the task loop and keeps the running state in
    # registers: each input is read once, the state written once, no scratch arrays.

    @njit(parallel=True, cache=True, nogil=True)
    def _magmax(state, base, has_base, first, x0, xs):  # pragma: no cover - compiled
        for i in prange(state.shape[0]):
            b = base[i] if has_base else np.float32(0.0)
            best = x0[i] - b if first else state[i]
            mag = abs(best)
            for x in xs:
                v = x[i] - b
                a = abs(v)
                take = a >= mag  # ties go to the later task, as the reference fold
                best = v if take else best
                mag = a if take else mag
            state[i] = best

    # -- Σ τ_t (task arithmetic, averaging) ---------------------------------------------------------

    @njit(parallel=True, cache=True, nogil=True)
    def _sum(state, base, has_base, first, x0, xs):  # pragma: no cover - compiled
        for i in prange(state.shape[0]):
            b = base[i] if has_base else np.float32(0.0)
            total = x0[i] - b if first else state[i]
            for x in xs:
                total = total + (x[i] - b)
            state[i] = total

    # -- random mix ---------------------------------------------------------------------------------

    @njit(parallel=True, cache=True, nogil=True)
    def _random(state, base, has_base, first, x0, xs, keys, thresholds, offset):  # pragma: no cover - compiled
        # uint32 arithmetic wraps mod 2^32, exactly the torch kernel's int64 steps followed by "& 0xFFFFFFFF".
        spread_mul = np.uint32(0x61C88647)
        mix = np.uint32(0x45D9F3B)
        shift = np.uint32(16)
        for i in prange(state.shape[0]):
            b = base[i] if has_base else np.float32(0.0)
            choice = x0[i] - b if first else state[i]  # t = 0 is always taken
            spread = np.uint32(np.uint32(offset + i) * spread_mul)
            j = 0
            for x in xs:
                h = np.uint32(spread + keys[j])
                h = np.uint32(h ^ (h >> shift))
                h = np.uint32(h * mix)
                h = np.uint32(h ^ (h >> shift))
                h = np.uint32(h * mix)
                v = x[i] - b
                choice = v if h <= thresholds[j] else choice
                j += 1
            state[i] = choice

    # -- entry points with the group-kernel calling convention ------------------------------------

    def _common(state: Tensor, base: Tensor | None, inputs: Sequence[Tensor], first: bool):
        """numpy views; (x0, rest): with ``first`` the fold starts from τ_0 = inputs[0], else from ``state``."""
        has_base = base is not None
        arrays = tuple(_array(x) for x in inputs)
        x0, rest = (arrays[0], arrays[1:]) if first else (_EMPTY, arrays)
        return _array(state), (_array(base) if has_base else _EMPTY), has_base, x0, rest

    def _tau_only(state: Tensor, base: Tensor | None, x: Tensor) -> None:
        # A group that is just τ_0 (numba cannot type an empty tuple of inputs): the same float32 op in torch.
        if base is None:
            state.copy_(x)
        else:
            torch.sub(x, base, out=state)

    def magmax_group(state, base, inputs, first, last, params, group) -> None:
        if first and len(inputs) == 1:
            return _tau_only(state, base, inputs[0])
        s, b, has_base, x0, xs = _common(state, base, inputs, first)
        with _threads():
            _magmax(s, b, has_base, first, x0, xs)

    def sum_group(state, base, inputs, first, last, params, group) -> None:
        if first and len(inputs) == 1:
            return _tau_only(state, base, inputs[0])
        s, b, has_base, x0, xs = _common(state, base, inputs, first)
        with _threads():
            _sum(s, b, has_base, first, x0, xs)

    def random_group(state, base, inputs, first, last, params, group) -> None:
        if first and len(inputs) == 1:
            return _tau_only(state, base, inputs[0])
        s, b, has_base, x0, xs = _common(state, base, inputs, first)
        rows = params.numpy()[1:] if first else params.numpy()
        with _threads():
            keys = rows[:, 0].astype(np.uint32)
            thresholds = rows[:, 1].astype(np.uint32)  # ⌈2^32/(t+1)⌉ − 1 < 2^32
            _random(s, b, has_base, first, x0, xs, keys, thresholds, 0)

else:  # pragma: no cover - without numba every group runs the torch kernels
    magmax_group = sum_group = random_group = None  # type: ignore[assignment]


NativeGroup = Callable[[Tensor, "Tensor | None", Sequence[Tensor], bool, bool, "Tensor | None", int], None]


def disable(exc: Exception) -> None:
    """A native kernel failed (e.g. a broken numba cache): fall back to the torch kernels for good."""
    global _disabled_after_error
    _disabled_after_error = True
    log.warning("magmax: a numba merge kernel failed (%s: %s); using the torch kernels from now on",
                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


# -- TIES: exact global top-k thresholds (sample → bracket → count and gather) and the fused merge -----

if _IMPORTED:

    @njit(cache=True, nogil=True)
    def _sample_magnitudes(base, has_base, xs, count, phase, stride, out, filled):  # pragma: no cover
        # |x − θ0| at positions phase, phase + stride, … of this tensor, appended to out[j, filled:].
        n = xs[0].shape[0]
        for j in range(count):
            x = xs[j]
            f = filled
            for i in range(phase, n, stride):
                b = base[i] if has_base else np.float32(0.0)
                out[j, f] = abs(x[i] - b)
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
            a = abs(x[lo + k] - b0[k])
            below += a < low
            inside += (a >= low) & (a <= high)
        if inside:
            q = 0
            for k in range(m):
                a = abs(x[lo + k] - b0[k])
                mags[q] = a
                q += (a >= low) & (a <= high)
            cap = gathered.shape[1]
            for k in range(q):
                if f < cap:
                    gathered[j, f] = mags[k]
                f += 1
        return below, f

    @njit(cache=True, nogil=True)
    def _count_gather_serial(base, has_base, xs, count, low, high, below, gathered, filled):  # pragma: no cover
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
    def _count_gather_by_task(base, has_base, xs, count, low, high, below, gathered, filled):  # pragma: no cover
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
            v = x[i] - b
            trimmed = v if abs(v) >= kappas[j] else np.float32(0.0)  # trim: ties at κ_t kept
            ps = ps + max(trimmed, np.float32(0.0))
            ns = ns + min(trimmed, np.float32(0.0))
            pc += np.float32(trimmed > 0)
            nc += np.float32(trimmed < 0)
            j += 1
        return ps, ns, pc, nc

    @njit(parallel=True, cache=True, nogil=True)
    def _ties_partial(pos_s, neg_s, npos_s, nneg_s, base, has_base, xs, kappas, first):  # pragma: no cover
        for i in prange(xs[0].shape[0]):
            b = base[i] if has_base else np.float32(0.0)
            ps, ns, pc, nc = _ties_accumulate(i, b, xs, kappas, first, pos_s, neg_s, npos_s, nneg_s)
            pos_s[i] = ps
            neg_s[i] = ns
            npos_s[i] = pc
            nneg_s[i] = nc

    @njit(parallel=True, cache=True, nogil=True)
    def _ties_balance(pos_s, neg_s, npos_s, nneg_s, base, has_base, xs, kappas, first):  # pragma: no cover
        # #(elected sign > 0) − #(elected sign < 0), s = sign(Σ⁺ + Σ⁻)
        balance = 0
        for i in prange(xs[0].shape[0]):
            b = base[i] if has_base else np.float32(0.0)
            ps, ns, pc, nc = _ties_accumulate(i, b, xs, kappas, first, pos_s, neg_s, npos_s, nneg_s)
            total = ps + ns
            balance += (total > 0) - (total < 0)
        return balance

    @njit(parallel=True, cache=True, nogil=True)
    def _ties_merge(pos_s, neg_s, npos_s, nneg_s, out, den, base, has_base, xs, kappas, first, zero_positive):  # pragma: no cover
        # τ* = Σ⁺/max(n⁺, 1) where the elected sign is positive (or 0 and the majority positive), else
        # Σ⁻/max(n⁻, 1). The division runs as a second loop: fused into the first, LLVM leaves it scalar.
        n = xs[0].shape[0]
        for i in prange(n):
            b = base[i] if has_base else np.float32(0.0)
            ps, ns, pc, nc = _ties_accumulate(i, b, xs, kappas, first, pos_s, neg_s, npos_s, nneg_s)
            total = ps + ns
            positive = (total > 0) | ((total == 0) & zero_positive)
            out[i] = ps if positive else ns
            den[i] = pc if positive else nc
        for i in prange(n):
            out[i] = out[i] / max(den[i], np.float32(1.0))

    def sample_magnitudes(base, inputs, phase, stride, out, filled, group) -> int:
        """Append |τ_j| at every ``stride``-th position (from ``phase``) of one tensor to ``out[j, filled:]``."""
        has_base = base is not None
        xs = _padded(inputs, group)
        return int(_sample_magnitudes(_array(base) if has_base else _EMPTY, has_base, xs, len(inputs), phase, stride, out, filled))

    def count_and_gather(base, inputs, low, high, below, gathered, filled, group) -> None:
        """below[j] += #{|τ_j| < low[j]}; the |τ_j| in [low[j], high[j]] go to gathered[j] (filled[j] counts them)."""
        has_base = base is not None
        xs = _padded(inputs, group)
        b = _array(base) if has_base else _EMPTY
        with _threads():
            parallel = numba.get_num_threads() > 1 and len(inputs) > 1
            kernel = _count_gather_by_task if parallel else _count_gather_serial
            kernel(b, has_base, xs, len(inputs), low, high, below, gathered, filled)

    def ties_group(state, out, base, inputs, kappas, first, last, majority, group) -> int:
        """One group of the TIES fold: not last → update ``state`` (four float32 arrays); last with
        majority 0 → the elected-sign balance; last with majority 1 (m > 0) or 2 (m <= 0) → τ* in ``out``."""
        has_base = base is not None
        xs = tuple(_array(x) for x in inputs)
        ps, ns, pc, nc = (_EMPTY,) * 4 if state is None else state
        b = _array(base) if has_base else _EMPTY
        k = np.asarray(kappas, dtype=np.float32)
        with _threads():
            if not last:
                _ties_partial(ps, ns, pc, nc, b, has_base, xs, k, first)
                return 0
            if majority == 0:
                return int(_ties_balance(ps, ns, pc, nc, b, has_base, xs, k, first))
            den = np.empty(xs[0].shape[0], dtype=np.float32)
            _ties_merge(ps, ns, pc, nc, _array(out), den, b, has_base, xs, k, first, majority == 1)
            return 0

else:  # pragma: no cover
    sample_magnitudes = count_and_gather = ties_group = None  # type: ignore[assignment]
