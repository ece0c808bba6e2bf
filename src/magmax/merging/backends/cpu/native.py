"""CPU group kernels compiled by numba: one pass over memory, every thread, no compile at merge time.

The torch group kernels of :mod:`magmax.merging.backends.fold` run eagerly as a handful of ATen ops per input
on cache-sized chunks (4–20× the bandwidth floor on CPU), or under ``torch.compile`` (at the floor, but
1–30 s of compiling per group shape). The kernels here (:mod:`magmax.merging.backends.cpu.kernels`) are the
same folds written as plain loops for numba: element by element, the running state stays in registers,
every input of the group is read once and the state written once. numba compiles each kernel once per
machine and group size (about 1–2 s; ``cache=True`` keeps the machine code on disk). They run on CPU
whenever numba imports and ``MAGMAX_NATIVE`` is not ``0``; numba itself is imported on first use.

Exactness: the loops perform the same IEEE-754 float32 operations, in the same order, as the torch
kernels (numba compiles without fast-math, so nothing is reassociated or contracted into an FMA), and
the random hash is the same int64 arithmetic; θ0 + λ·τ*, where a fold writes it, is rounded as
``torch.add`` rounds it on this machine (:func:`add_rounding`); the tests check bit equality.

float32 and bfloat16 inputs take this path (a bfloat16 entry is read as its exact float32: its bits
followed by 16 zeros, as ``Tensor.float()`` does); float16 and float64 checkpoints fall back to the torch
kernels. The folds take a group of at most ``fold.GROUP`` inputs as a tuple (one compiled version
per group size); TIES's, Consensus's and Breadcrumbs' counting kernels take any number of inputs as
an array of their addresses (one compiled version), so that inputs already in memory go in one call.

Threads: the folds are numba ``prange`` loops (numba's threading layer: OpenMP where it loads, the same
libgomp as torch's). The counting passes and numpy's partitions run as serial nogil calls on a pool of
our own (:func:`per_task_blocks`), and so does any fold a merge alternates with them tensor by tensor
(Breadcrumbs' banded sum, :func:`per_entry_blocks`): an OpenMP worker spins for milliseconds after each
parallel loop, and beside it the pool's next pass would have one core fewer.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from magmax.merging.backends.finite import report as _report
from magmax.merging.backends.cpu import numba_policy

log = logging.getLogger(__name__)

_F32 = torch.float32
_EMPTY = np.empty(0, dtype=np.float32)
_AVAILABLE = importlib.util.find_spec("numba") is not None
_disabled_after_error = False
_module: ModuleType | None = None

NativeGroup = Callable[..., bool]
"""``group(state, θ0, inputs, first, last, params, group size, divisor=None, scale=None)`` → whether it
finished the fold as asked: divided the state by ``divisor``, then wrote θ0 + scale·state (as
:func:`magmax.taskvector.add_scaled` rounds it). All of it or none: on False the caller does both."""


def enabled() -> bool:
    """numba installed, not turned off by ``MAGMAX_NATIVE=0``, no kernel has failed in this process, and
    :mod:`magmax.merging.backends.cpu.numba_policy` chooses it (compiled already, or a merge big enough to compile for)."""
    flag = os.environ.get("MAGMAX_NATIVE", "1").strip().lower()
    if not (_AVAILABLE and not _disabled_after_error and flag not in ("0", "false", "no", "off")):
        return False
    # First-run cost: numba only where its kernels are compiled or worth compiling.
    return numba_policy.use_numba()


_NATIVE_INPUTS = (torch.float32, torch.bfloat16)


def accepts_inputs(base: Tensor | None, inputs: Sequence[Tensor], group: int) -> bool:
    """CPU inputs (and θ0), all float32 or all bfloat16 (read exactly as float32 in the loops), at most
    ``group`` of them."""
    if not 0 < len(inputs) <= group:
        return False
    dtype = inputs[0].dtype
    if dtype not in _NATIVE_INPUTS or (base is not None and (base.dtype != dtype or base.device.type != "cpu")):
        return False
    return all(x.dtype == dtype and x.device.type == "cpu" for x in inputs)


def accepts(state: Tensor, base: Tensor | None, inputs: Sequence[Tensor], group: int) -> bool:
    """Whether a fold group can run natively: a float32 CPU state and :func:`accepts_inputs`."""
    return state.device.type == "cpu" and state.dtype == _F32 and accepts_inputs(base, inputs, group)


def disable(exc: Exception) -> None:
    """A native kernel failed (no LLVM, a broken cache, no memory): use the torch kernels from now on."""
    global _disabled_after_error
    _disabled_after_error = True
    log.warning("magmax: a numba merge kernel failed (%s: %s); using the torch kernels from now on",
                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


def _kernels() -> ModuleType:
    global _module
    if _module is None:
        from magmax.merging.backends.cpu import kernels

        _module = kernels
    return _module


_launch = threading.Lock()


class _threads:  # noqa: N801 - a context manager that reads like one
    """One kernel launch at a time, on torch's intra-op thread count.

    numba's fallback threading layer (workqueue, where neither OpenMP nor TBB is usable) aborts the
    process on concurrent launches from several Python threads: launches are serialised (each uses
    every thread anyway). numba's OpenMP layer resets the process-wide OpenMP thread count when it
    starts, which torch shares: torch's is put back after."""

    def __enter__(self) -> None:
        import numba

        _launch.acquire()
        try:
            self.torch_threads = torch.get_num_threads()
            numba.set_num_threads(max(1, min(self.torch_threads, numba.config.NUMBA_NUM_THREADS)))
        except BaseException:
            _launch.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
        finally:
            _launch.release()


def _array(t: Tensor) -> np.ndarray:
    """A numpy view; bfloat16 (which numpy lacks) as its uint16 bit patterns."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _common(state: Tensor, base: Tensor | None, inputs: Sequence[Tensor], first: bool) -> tuple[Any, ...]:
    """numpy views; (x0, rest): with ``first`` the fold starts from τ_0 = inputs[0], else from ``state``."""
    has_base = base is not None
    arrays = tuple(_array(x) for x in inputs)
    x0, rest = (arrays[0], arrays[1:]) if first else (_EMPTY, arrays)
    return _array(state), (_array(base) if has_base else _EMPTY), has_base, x0, rest


def _tau_only(state: Tensor, base: Tensor | None, x: Tensor) -> None:
    # A group that is just τ_0 (numba cannot type an empty tuple of inputs): the same float32 op in torch.
    if base is None:
        state.copy_(x)
    else:  # float32(x) − float32(θ0): θ0 promoted first, so bfloat16 inputs are subtracted in float32
        torch.sub(x, base.to(_F32), out=state)


# -- group kernels (the calling convention of magmax.merging.backends.fold.run_group) ----------------------


_ADD_ROUNDING: int | None = None


def add_rounding() -> int | None:
    """How ``torch.add(θ0, τ, alpha=λ)`` rounds in this process's CPU kernels: ``ADD_FUSED`` (once, an
    FMA: ATen's AVX2 and AVX-512 kernels) or ``ADD_SEPARATE`` (λ·τ rounded, then the sum: its default
    kernels). Found once by asking torch, on lengths that exercise vectorised bodies, scalar tails and
    a split over threads; None if it did neither throughout (then the folds never add θ0 themselves)."""
    global _ADD_ROUNDING
    if _ADD_ROUNDING is None:
        k = _kernels()
        gen = torch.Generator().manual_seed(0)
        scale = np.float32(0.55)
        matches = {k.ADD_FUSED: True, k.ADD_SEPARATE: True}
        for n in (*range(1, 40), 1000, 70_001):
            base, tau = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
            got = base.add(tau, alpha=float(scale)).numpy().view(np.int32)
            fused = np.empty(n, np.float32)
            k.add_scaled_fused(fused, base.numpy(), tau.numpy(), scale)
            separate = (base + tau * float(scale)).numpy()
            matches[k.ADD_FUSED] &= bool((got == fused.view(np.int32)).all())
            matches[k.ADD_SEPARATE] &= bool((got == separate.view(np.int32)).all())
        found = [rounding for rounding, ok in matches.items() if ok]
        _ADD_ROUNDING = found[0] if len(found) == 1 else -1
    return None if _ADD_ROUNDING < 0 else _ADD_ROUNDING


def _finish_of(has_base: bool, scale: float | None) -> tuple[int, np.float32] | None:
    """(finish, λ) for a fold kernel: KEEP_TAU without ``scale``; None where it cannot add θ0 as torch does."""
    k = _kernels()
    if scale is None:
        return k.KEEP_TAU, np.float32(0.0)
    rounding = add_rounding()
    if not has_base or rounding is None:
        return None
    return rounding, np.float32(scale)


def _finish_mode(has_base: bool, scale: float | None, possible: bool = True) -> tuple[bool, int, np.float32]:
    """(whether the kernel finishes as asked, its finish mode, λ): the finish :func:`_finish_of` gives
    where it is ``possible`` for the kernel, else KEEP_TAU (the caller then adds θ0 itself)."""
    finish = _finish_of(has_base, scale) if possible else None
    mode, scale32 = finish or _finish_of(has_base, None)
    return finish is not None, mode, scale32


def _fold_group(fold: str, divides: bool = False) -> NativeGroup:
    """The group kernel that runs ``kernels.<fold>(state, θ0, has θ0, first, x0, rest, [divisor,]
    finish, λ)``; a fold that ``divides`` can end a mean."""

    def group(state, base, inputs, first, last, params, group, divisor=None, scale=None) -> bool:
        asked = divisor is not None or scale is not None
        if first and len(inputs) == 1:
            _tau_only(state, base, inputs[0])
            return not asked
        s, b, has_base, x0, xs = _common(state, base, inputs, first)
        finish = _finish_of(has_base, scale)
        done = finish is not None and (divisor is None or divides)
        if not done:  # all of the finish or none of it: the caller does it
            finish, divisor = _finish_of(has_base, None), None
        mode, scale32 = finish
        kernels = getattr(_kernels(), fold)  # one compiled kernel per switch setting
        with _threads():
            if divides:
                kernel = kernels(divisor is not None, mode)
                finite = kernel(s, b, has_base, first, x0, xs, np.float32(divisor or 1), scale32)
            else:
                finite = kernels(mode)(s, b, has_base, first, x0, xs, scale32)
        _report(int(finite), s.shape[0], len(inputs), has_base)
        return done

    return group


magmax_group = _fold_group("magmax_fold")
sum_group = _fold_group("sum_fold", divides=True)


def random_group(state, base, inputs, first, last, params, group, divisor=None, scale=None) -> bool:
    if first and len(inputs) == 1:
        _tau_only(state, base, inputs[0])
        return divisor is None and scale is None
    s, b, has_base, x0, xs = _common(state, base, inputs, first)
    done, mode, scale32 = _finish_mode(has_base, scale, divisor is None)  # a random pick is never divided
    rows = params.numpy()[1:] if first else params.numpy()
    keys = rows[:, 0].astype(np.uint32)
    thresholds = rows[:, 1].astype(np.uint32)  # ⌈2^32/(t+1)⌉ − 1 < 2^32
    k = _kernels()
    with _threads():
        # The finite count only where τ is formed from checkpoints (the engine's merges): else no one reads it.
        finite = k.random_fold(has_base, mode)(s, b, has_base, first, x0, xs, keys, thresholds, 0, scale32)
    if has_base:
        _report(int(finite), s.shape[0], len(inputs), has_base)
    return done


def dare_group(state, base, inputs, first, last, params, group, divisor=None, scale=None) -> bool:
    """DARE's drop-and-rescale sum; ``params`` rows (k_t, thr_t, bits of float32(1 − p))."""
    rows = params.numpy()
    s, b, has_base, _, xs = _common(state, base, inputs, False)  # every input in xs: the sum starts at −0.0
    done, mode, scale32 = _finish_mode(has_base, scale, divisor is None)  # a DARE sum is never divided
    rescale = np.array([rows[0, 2]], dtype=np.int64).astype(np.uint32).view(np.float32)[0]
    with _threads():
        finite = _kernels().dare_fold(has_base, mode)(
            s, b, has_base, first, xs, rows[:, 0].astype(np.uint32), rows[:, 1].astype(np.uint32), 0, rescale, scale32)
    if has_base:
        _report(int(finite), s.shape[0], len(inputs), has_base)
    return done


def band_sum_group(state, base, inputs, first, low, high, scale=None) -> bool:
    """Breadcrumbs' fold of one group: ``state`` (+)= Σ_j where(low[j] <= |τ_j| <= high[j], τ_j, 0), then
    θ0 + scale·state when ``scale`` is given and :func:`can_add_base`; returns whether it added θ0."""
    s, b, has_base, _, xs = _common(state, base, inputs, False)  # every input in xs: the sum starts at −0.0
    done, mode, scale32 = _finish_mode(has_base, scale)
    kernel = _kernels().band_sum_fold(mode)
    low32, high32 = np.asarray(low, np.float32), np.asarray(high, np.float32)
    # On the pool that runs the bounds' passes, not in numba's OpenMP loop: the merge alternates the two
    # tensor by tensor, and an OpenMP worker spins for milliseconds after each parallel loop, holding a
    # core the next pass needs (ViT-B/16, T = 10, two threads: 1.4–1.6 s → 1.0–1.1 s for τ*, 1.7 s → 1.2–1.4 s
    # for magmax.merge).

    def fold(entries: slice) -> int:
        part = tuple(x[entries] for x in xs)
        return kernel(s[entries], b[entries] if has_base else b, has_base, first, part, low32, high32, scale32)

    finite = sum(per_entry_blocks(s.shape[0], fold))
    _report(int(finite), s.shape[0], len(inputs), has_base)
    return done and scale is not None


# -- Consensus ----------------------------------------------------------------------------------------


def _parts(n: int) -> int:
    """Threads for a kernel over ``n`` entries: one per SERIAL_NUMEL entries at most."""
    return max(1, min(torch.get_num_threads(), n // max(SERIAL_NUMEL, 1)))


def consensus_group(out, base, inputs, tall_mask_lambda, least, scale=None) -> bool:
    """Consensus over every input of a tensor in one call: ``out`` = Σ τ_t · [TALL votes >= ``least``],
    or θ0 + scale·that when ``scale`` is given and :func:`can_add_base`; returns whether it added θ0.
    Reports to :func:`finite_watch` whether every sum was finite."""
    b, has_base, arrays, addresses, n = _by_address(base, inputs)
    done, mode, scale32 = _finish_mode(has_base, scale)
    with _threads():
        finite = _kernels().consensus_merge(mode)(_array(out), b, has_base, addresses, arrays[0], n,
                                                  np.float32(tall_mask_lambda), least, _parts(n), scale32)
    _report(int(finite), n, len(arrays), has_base)
    return done and scale is not None


def tall_votes(total, votes, base, inputs, tall_mask_lambda) -> None:
    """``votes`` (int32) += the TALL votes of ``inputs`` against the finished sum ``total``."""
    b, has_base, arrays, addresses, n = _by_address(base, inputs)
    with _threads():
        _kernels().tall_votes(_array(total), votes.numpy(), b, has_base, addresses, arrays[0], n,
                              np.float32(tall_mask_lambda), _parts(n))


# -- TIES ------------------------------------------------------------------------------------------


def _by_address(base: Tensor | None, inputs: Sequence[Tensor]) -> tuple[Any, ...]:
    """(θ0 as numpy or an empty array of the inputs' dtype, has θ0, numpy views of ``inputs`` — keep them
    alive while a kernel runs —, their data addresses, their length) for the kernels taking addresses."""
    arrays = [_array(x) for x in inputs]
    addresses = np.array([a.ctypes.data for a in arrays], dtype=np.int64)
    b = _array(base) if base is not None else arrays[0][:0]
    return b, base is not None, arrays, addresses, arrays[0].shape[0]


def sample_entries(base, inputs, phase, stride, out, filled) -> int:
    """Append τ_j at every ``stride``-th position (from ``phase``) of one tensor to ``out[j, filled:]``."""
    b, has_base, arrays, addresses, n = _by_address(base, inputs)
    kernel = _kernels().sample_entries
    taken = per_task_blocks(len(arrays), lambda blk: kernel(b, has_base, addresses[blk], arrays[0], n, phase, stride,
                                                            out[blk], filled), numel=n)
    return int(taken[0])


def count_and_gather(base, inputs, low, high, below, gathered, filled, report_finite: bool = True) -> None:
    """For every input j and bracket r: below[j, r] += #{|τ_j| < low[j, r]}; the |τ_j| in [low[j, r],
    high[j, r]] go to gathered[j, r] (filled[j, r] counts them, and is left above the capacity where they
    did not fit): ``low``, ``high``, ``below``, ``filled`` are (inputs, brackets), ``gathered`` (inputs,
    brackets, room). Where τ is formed from θ0 and ``report_finite``, whether every |τ_j| was finite goes
    to :func:`finite_watch`, as the folds report it. Inputs split over threads."""
    b, has_base, arrays, addresses, n = _by_address(base, inputs)
    counting = has_base and report_finite
    kernel = _kernels().count_gather(counting)
    finite = per_task_blocks(len(arrays), lambda blk: kernel(b, has_base, addresses[blk], arrays[0], n, low[blk],
                                                             high[blk], below[blk], gathered[blk], filled[blk]),
                             numel=n)
    if counting:
        _report(sum(int(f) for f in finite), n * len(arrays), len(arrays), has_base)


SERIAL_NUMEL = 1 << 16
"""Tensors of fewer entries are not split over threads: handing work to a pool costs more there."""


def per_task_blocks(count: int, run: Callable[[slice], Any], numel: int | None = None) -> list[Any]:
    """``run`` over contiguous blocks of the tasks 0..count−1, one block per torch thread, each on a thread
    of its own (for serial nogil kernels and GIL-free numpy calls: each block reads θ0 once and owns its
    rows of the outputs). One thread, or tensors of fewer than ``SERIAL_NUMEL`` entries: one call, here."""
    parts = 1 if numel is not None and numel < SERIAL_NUMEL else max(1, min(torch.get_num_threads(), count))
    return _on_threads(_blocks(count, parts), run)


def per_entry_blocks(numel: int, run: Callable[[slice], Any]) -> list[Any]:
    """``run`` over contiguous ranges of the entries 0..numel−1 (starting on 64-entry boundaries), one
    range per torch thread and at least ``SERIAL_NUMEL`` entries each, each on a thread of its own (for
    serial nogil kernels). Fewer entries or one thread: one call, here."""
    parts = max(1, min(torch.get_num_threads(), numel // max(SERIAL_NUMEL, 1)))
    return _on_threads(_blocks(numel, parts, align=64), run)


def _blocks(total: int, parts: int, align: int = 1) -> list[slice]:
    """``parts`` contiguous ranges covering 0..total−1, their inner edges rounded up to ``align``."""
    edges = [min(total, -(-(total * p // parts) // align) * align) for p in range(parts)] + [total]
    return [slice(edges[p], edges[p + 1]) for p in range(parts)]


def _on_threads(blocks: list[slice], run: Callable[[slice], Any]) -> list[Any]:
    """``run(block)`` for each block, each on a pool thread (one block: here); the results in order."""
    if len(blocks) == 1:
        return [run(blocks[0])]
    futures = [_pool(len(blocks)).submit(run, blk) for blk in blocks]
    return [future.result() for future in futures]


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="magmax-native")
        return _pools[workers]


def can_add_base(has_base: bool) -> bool:
    """Whether a fold given θ0 can write θ0 + λ·τ* itself, rounded as torch.add rounds it here."""
    return _finish_of(has_base, 1.0) is not None


def ties_group(state, out, base, inputs, kappas, first, last, majority_positive, scale=None) -> tuple[int, int]:
    """One group of the TIES fold (any number of inputs): not last → update ``state`` (four float32
    arrays); last → τ* in ``out`` (zero elected signs take the positive side when ``majority_positive``),
    or θ0 + scale·τ* when ``scale`` is given (only where :func:`can_add_base`), and (balance, ambiguous):
    the elected-sign balance and the number of entries whose value depends on the majority sign."""
    b, has_base, arrays, addresses, n = _by_address(base, inputs)
    finish = _finish_of(has_base, scale)
    if finish is None:
        raise ValueError("ties_group cannot add θ0 here (no θ0, or torch.add rounds neither way)")
    ps, ns, pc, nc = (_EMPTY,) * 4 if state is None else state
    kap = np.asarray(kappas, dtype=np.float32)
    k = _kernels()
    with _threads():
        parts = _parts(n)
        if not last:
            k.ties_partial(ps, ns, pc, nc, b, has_base, addresses, arrays[0], n, kap, first, parts)
            return 0, 0
        mode, scale32 = finish
        balance, ambiguous = k.ties_merge(mode)(ps, ns, pc, nc, _array(out), b, has_base, addresses, arrays[0], n,
                                                kap, first, majority_positive, parts, scale32)
    return int(balance), int(ambiguous)
