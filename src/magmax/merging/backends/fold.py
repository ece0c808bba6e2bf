"""Fused folds: an elementwise fold over one tensor's T task vectors in about one pass over memory.

A fold done task by task over whole tensors pays, per task, a pass to form τ_t = θ_t − θ0, a pass per
elementwise op and a pass to write the running state back: 5–10× the bandwidth floor (read every input
once, write the result once). Here a method writes its fold as a *group kernel*
``kernel(state, base, inputs, step, ws)``: it updates the running state **in place** by up to
:data:`GROUP` inputs, forming each τ_t itself from the raw tensors (``TaskSlices.operands``), with
``out=`` / in-place torch ops on scratch buffers taken from ``ws``. A method tags its kernel with its
name (:func:`reference`); what the backends registered under that name (:mod:`.registry`) runs instead
where :mod:`.select` says so: a numba group on CPU (float32/bfloat16 inputs), the Triton op for many
tensors at once on a GPU (:func:`fold_many`). Otherwise this module runs the kernel (or its registered
eager form, same bits)

* eagerly over cache-sized chunks, spread over ``torch.get_num_threads()`` threads: the state chunk and
  the scratch stay in cache, so each input is read from memory once and the state is written once per
  group; or
* under ``torch.compile`` over the whole flattened tensor, where inductor turns the group into one loop
  that reads each input once and writes the state once (scratch buffers are fused away).

Both run the same IEEE-754 operations on every element in the same order, so they agree bit for bit
(inductor compiles without -funsafe-math-optimizations, so nothing is reassociated); the tests check it.

Compiling costs seconds (about 3 s with a warm inductor cache, 10–20 s cold, per group shape): when
to compile is the policy of :mod:`magmax.merging.backends.select`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from magmax.merging.backends import registry, select
from magmax.merging.backends.finite import report as report_finite
from magmax.merging.backends.cpu import native as _native
from magmax.merging.backends.gpu import triton as _gpu
from magmax.taskvector import add_scaled

GROUP = 8
"""Inputs folded per kernel call: the state is read and written once per group, and at most this many
raw tensors of one key are held at a time (O(1) in T)."""

CHUNK = 32768
"""Elements per eager chunk. ATen runs an op on at most 32768 elements (its grain size) on the calling
thread, so no op pays an OpenMP hand-off, and a few chunk-sized buffers stay in L2."""

_F32 = torch.float32
# float32 holds these exactly, so ``x − θ0`` promoted to float32 equals float32(x) − float32(θ0).
_EXACT_IN_F32 = (torch.float32, torch.bfloat16, torch.float16)


# -- what a kernel sees ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """Where a group sits in the fold: ``first`` (the state is uninitialised and ``inputs[0]`` is τ_0),
    ``last`` (the fold ends with this group), per-input integer ``params`` (int64, one row per input,
    built by the method; a tensor so that compiled kernels do not specialise on their values), and the
    flat ``offset`` of this chunk's first element (always 0 when compiled)."""

    first: bool
    last: bool
    params: Tensor | None
    offset: int


class Workspace:
    """Scratch buffers of one chunk's length: reused from a pool eagerly, fresh when compiled (there
    inductor fuses them away). A kernel takes each buffer it needs once per call, by dtype."""

    def __init__(self, like: Tensor, pool: list[Tensor] | None = None, capacity: int = CHUNK):
        self.numel = like.shape[0]
        self.device = like.device
        self._pool = pool
        self._capacity = capacity  # elements of the largest chunk the pool serves
        self._taken = 0

    def buffer(self, dtype: torch.dtype) -> Tensor:
        if self._pool is None:
            return torch.empty(self.numel, dtype=dtype, device=self.device)
        if self._taken == len(self._pool):
            self._pool.append(torch.empty(self._capacity * 8, dtype=torch.uint8, device=self.device))
        raw = self._pool[self._taken]
        self._taken += 1
        return raw.view(dtype)[: self.numel]


class GroupKernel(Protocol):
    def __call__(self, state: Tensor, base: Tensor | None, inputs: Sequence[Tensor], step: Step, ws: Workspace) -> None: ...


def reference(method: str) -> Callable[[GroupKernel], GroupKernel]:
    """Decorator: this torch group kernel is the reference fold of ``method``; the backends register their
    accelerated forms of it under that name (:func:`magmax.merging.backends.registry.register_fold`)."""

    def tag(kernel: GroupKernel) -> GroupKernel:
        kernel.method = method  # type: ignore[attr-defined]
        return kernel

    return tag


def accelerated(kernel: GroupKernel) -> registry.FoldKernels:
    """What the backends registered for ``kernel``'s method."""
    return registry.fold_kernels(getattr(kernel, "method", None))


ParamsFn = Callable[[int, int, int], Tensor]
"""``params(first_t, count, total)``: the int64 rows for inputs first_t..first_t+count−1 of a fold of
``total`` inputs (``total`` is 0 when the fold's length is not known yet, as in a streaming update)."""


# -- τ formed inside a kernel ------------------------------------------------------------------------


def base_f32(base: Tensor | None, ws: Workspace) -> Tensor | None:
    """θ0 as float32 (converted once per chunk and reused for every input of the group)."""
    if base is None or base.dtype == _F32:
        return base
    return ws.buffer(_F32).copy_(base)


def tau_into(out: Tensor, x: Tensor, base32: Tensor | None) -> Tensor:
    """Write τ = float32(x) − float32(θ0) into ``out`` (τ = float32(x) without a base), as the engine forms it."""
    if base32 is None:
        return out.copy_(x)
    if x.dtype in _EXACT_IN_F32:
        return torch.sub(x, base32, out=out)
    return out.copy_(x).sub_(base32)


def tau_of(scratch: Tensor, x: Tensor, base32: Tensor | None) -> Tensor:
    """τ for reading only: ``x`` itself when it already is a float32 task vector, else formed in ``scratch``."""
    if base32 is None and x.dtype == _F32:
        return x
    return tau_into(scratch, x, base32)


# -- running a fold ----------------------------------------------------------------------------------


def fold_slices(
    kernel: GroupKernel,
    slices: Sequence[Tensor],
    params: ParamsFn | None = None,
    divide: bool = False,
    scale: float | None = None,
) -> Tensor:
    """The fold of a tensor's T slices (``TaskSlices`` hand over unformed τ; a plain list is taken as τ);
    ``divide``: divided by T (:func:`mean_of_sum`); ``scale``: the merged model θ0 + scale·τ* instead of
    τ* (:func:`magmax.taskvector.add_scaled`; only for slices formed from θ0). Both in the fold's last
    pass where its kernel can, else after it."""
    return fold_operands(kernel, operands_of(slices), len(slices), params, divide, scale)


def mean_of_sum(total: Tensor, count: int) -> Tensor:
    """total / T in place, dividing by a 0-d tensor on the device, not a Python number: CUDA divides by
    a scalar as a multiplication by its reciprocal (and Triton's division is not correctly rounded),
    while the mean must be the same on every device. Outside any (possibly compiled) kernel for that;
    the numba sum fold and the Triton one divide in their last pass, correctly rounded too."""
    return total.div_(torch.tensor(float(count), device=total.device))


def fold_many(
    kernel: GroupKernel,
    slices: Sequence[Sequence[Tensor]],
    params: Sequence[ParamsFn] | None = None,
    divide: bool = False,
) -> list[Tensor] | None:
    """The folds of several tensors (``slices[s]``: tensor s's T slices) on a GPU, one launch per group of
    inputs and chunk of tensors (:mod:`magmax.merging.backends.gpu.triton`); ``divide``: each result divided by T (the
    mean). Results may share storage. None when that path cannot take them (no triton, not on a GPU,
    other dtypes): the caller folds tensor by tensor. Inputs already in memory go in one group; else
    groups of :data:`GROUP`. Reports to ``backends.finite.finite_watch`` whether every τ sum was finite."""
    op = accelerated(kernel).gpu
    if op is None or not slices or not select.gpu_possible():
        return None
    count = len(slices[0])
    if count < 1 or any(len(s) != count for s in slices):
        return None
    try:
        return _fold_many(op, [_ranges_of(s) for s in slices], count, params, divide,
                          count if all(getattr(s, "resident", False) for s in slices) else GROUP)
    except _gpu.NotAccepted:  # inputs for the torch kernels (mixed devices, strided): not a failure
        return None
    except Exception as exc:  # the Triton kernels are an optimisation: the torch kernels give the same
        _gpu.disable(exc)
        return None


@dataclass
class _Chunk:
    """Consecutive tensors begin..end−1 merged by one launch per group, into one state buffer."""

    begin: int
    end: int
    segments: _gpu.Layout
    state: Tensor


def _fold_many(
    op: str,
    operands: list[Callable[[int, int], tuple[list[Tensor], Tensor | None]]],
    count: int,
    params: Sequence[ParamsFn] | None,
    divide: bool,
    size: int,
) -> list[Tensor] | None:
    groups = [(start, min(start + size, count)) for start in range(0, count, size)]
    chunks: dict[int, _Chunk] = {}  # by end; decided while the first group is read, kept for the others
    shapes: list[torch.Size] = []
    finite: Tensor | None = None
    has_base: bool | None = None
    for g, (start, stop) in enumerate(groups):
        rows: list[list[Tensor]] = [[] for _ in range(start, stop)]
        bases: list[Tensor] = []

        def launch(end: int) -> None:
            """The pending tensors (..end−1) as one chunk: laid out in the first group, merged in each."""
            nonlocal rows, bases
            if g == 0:
                segments = _gpu.layout([x.numel() for x in rows[0]], rows[0][0].device)
                state = torch.empty(segments.total, dtype=_F32, device=segments.device)
                chunks[end] = _Chunk(end - len(rows[0]), end, segments, state)
            chunk = chunks[end]
            assert finite is not None
            rows_params = None
            if params is not None:
                rows_params = torch.stack([fn(start, stop - start, count) for fn in params[chunk.begin : chunk.end]],
                                          dim=1).numpy()
            _gpu.fold(op, chunk.segments, chunk.state, bases if has_base else None, rows, start == 0,
                      finite[g : g + 1], count if divide and stop == count else None, rows_params)
            rows = [[] for _ in range(start, stop)]
            bases = []

        pending = 0  # entries of the tensors read since the last launch
        for s, operand_range in enumerate(operands):
            inputs, base = operand_range(start, stop)
            x = inputs[0]
            if has_base is None:
                has_base = base is not None
                if not _gpu.accepts([x] + ([base] if base is not None else [])):
                    return None
                finite = torch.zeros(len(groups), dtype=torch.int64, device=x.device)
            if (base is not None) != has_base:
                return None
            if rows[0] and (s in chunks if g > 0 else _gpu.ends_chunk(pending, x.dtype, rows[0][0].dtype)):
                launch(s)
                pending = 0
            if base is not None:
                bases.append(base)
            for row, x_t in zip(rows, inputs):
                row.append(x_t)
            if g == 0:
                shapes.append(x.shape)
            pending += x.numel()
            del inputs, base, x, x_t
        launch(len(operands))
    if finite is not None and _gpu.counts_finite(op):
        total = sum(c.segments.total for c in chunks.values())
        for (start, stop), found in zip(groups, finite.tolist()):  # the one wait for the GPU
            report_finite(found, total, stop - start, bool(has_base))
    views = [view for c in chunks.values() for view in c.segments.views(c.state)]
    return [view.view(shape) for view, shape in zip(views, shapes)]


def _ranges_of(slices: Sequence[Tensor]) -> Callable[[int, int], tuple[list[Tensor], Tensor | None]]:
    """(inputs start..stop−1, θ0 or None) of a tensor's slices (``TaskSlices`` or a plain list of τ)."""
    operand_range = getattr(slices, "operand_range", None)
    if operand_range is not None:
        return operand_range
    return lambda start, stop: (list(slices[start:stop]), None)  # type: ignore[index]


def operands_of(slices: Sequence[Tensor]) -> Callable[[int], tuple[Tensor, Tensor | None]]:
    operands = getattr(slices, "operands", None)
    if operands is not None:
        return operands
    return lambda t: (slices[t], None)


def groups(
    operands: Callable[[int], tuple[Tensor, Tensor | None]], count: int, size: int = GROUP
) -> Iterator[tuple[int, int, Tensor | None, list[Tensor], torch.Size]]:
    """(start, stop, θ0 or None, flat inputs start..stop−1, the inputs' shape) for the groups of at most
    ``size`` inputs (default :data:`GROUP`).

    A consumer must drop a group's tensors before asking for the next: then at most ``size`` raw tensors
    of one key are alive at a time, whatever ``count``.
    """
    for start in range(0, count, size):
        stop = min(start + size, count)
        pairs = [operands(t) for t in range(start, stop)]
        base = pairs[0][1]
        shape = pairs[0][0].shape
        xs = [x.reshape(-1) for x, _ in pairs]
        del pairs
        yield start, stop, None if base is None else base.reshape(-1), xs, shape
        del xs, base


def fold_operands(
    kernel: GroupKernel,
    operands: Callable[[int], tuple[Tensor, Tensor | None]],
    count: int,
    params: ParamsFn | None = None,
    divide: bool = False,
    scale: float | None = None,
) -> Tensor:
    """The fold of ``count`` inputs (``operands(t)`` = (x_t, θ0 or None)) as a new float32 tensor of x's
    shape; ``divide``: divided by ``count``; ``scale``: θ0 + scale·(that) (needs θ0)."""
    if count < 1:
        raise ValueError("a fold needs at least one input")
    state: Tensor | None = None
    for start, stop, base, xs, shape in groups(operands, count):
        if state is None:
            state = torch.empty(xs[0].numel(), dtype=_F32, device=xs[0].device)
        if scale is not None and base is None:
            raise ValueError("θ0 + λ·τ* needs slices formed from θ0 (TaskSlices over checkpoints)")
        rows = params(start, stop - start, count) if params is not None else None
        last = stop == count
        run_group(kernel, state, base, xs, start == 0, last, rows, count if divide and last else None,
                  scale if last else None)
        del xs, base
    assert state is not None
    return state.view(shape)


def update_state(
    kernel: GroupKernel, state: Tensor, tau: Tensor, t: int, params: ParamsFn | None = None
) -> Tensor:
    """One streaming step: fold task vector ``tau`` (the t-th, t ≥ 1) into ``state`` in place."""
    rows = params(t, 1, 0) if params is not None else None
    run_group(kernel, state.view(-1), None, [tau.reshape(-1)], False, False, rows)
    return state


def run_group(
    kernel: GroupKernel,
    state: Tensor,
    base: Tensor | None,
    inputs: Sequence[Tensor],
    first: bool,
    last: bool,
    params: Tensor | None,
    divisor: int | None = None,
    scale: float | None = None,
) -> None:
    """Apply ``kernel`` to flat, equally long tensors: by its numba twin on CPU when it has one and the
    inputs suit it (:mod:`magmax.merging.backends.cpu.native`), compiled when :func:`select.group_path` says so, else
    chunked. Then, unless the numba kernel did it in the same pass, divide the state by ``divisor``
    (:func:`mean_of_sum`) and make it θ0 + scale·state (:func:`add_scaled`, θ0 = ``base``)."""
    if params is not None:
        params = params.to(state.device)
    finished = False
    fast = accelerated(kernel)
    kernel = fast.eager or kernel  # the same bits, faster on CPU
    path = select.group_path(fast.cpu is not None, state, base, inputs, GROUP)
    ran = False
    if path == "numba":
        assert fast.cpu is not None
        try:
            finished = fast.cpu(state, base, inputs, first, last, params, GROUP, divisor, scale)
            ran = True
        except Exception as exc:  # a native kernel is an optimisation: fall back to the torch kernel
            _native.disable(exc)
            path = select.group_path(False, state, base, inputs, GROUP)
    numel = state.shape[0]
    if path == "compiled":
        try:
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                _compiled(kernel, first, last, len(inputs))(state, base, params, *inputs)
            ran = True
        except Exception as exc:  # compiling is an optimisation: any failure falls back to eager, for good
            select.disable_compile(exc)
    if not ran:  # eagerly: one chunk on a GPU; on CPU cache-sized chunks over threads of our own
        began = time.perf_counter()
        if state.device.type != "cpu":  # a GPU runs each op over the whole tensor
            _run_chunks(kernel, state, base, inputs, first, last, params, 0, numel, max(numel, 1))
        else:
            chunk = CHUNK
            chunks = -(-numel // chunk)
            workers = min(torch.get_num_threads(), chunks)
            if workers <= 1:
                _run_chunks(kernel, state, base, inputs, first, last, params, 0, numel, chunk)
            else:
                # ATen runs ops of <= 32768 elements on the calling thread, so chunks are spread over
                # threads of our own (ops release the GIL); one join per group, not an OpenMP barrier per op.
                per_worker = -(-chunks // workers) * chunk
                jobs = [
                    _executor(workers).submit(
                        _run_chunks, kernel, state, base, inputs, first, last, params, lo,
                        min(lo + per_worker, numel), chunk,
                    )
                    for lo in range(0, numel, per_worker)
                ]
                for job in jobs:
                    job.result()
        select.spent_eager(time.perf_counter() - began)
    if not finished:
        if divisor is not None:
            mean_of_sum(state, divisor)
        if scale is not None:
            assert base is not None
            add_scaled(base, state, scale, out=state)


def _run_chunks(
    kernel: GroupKernel,
    state: Tensor,
    base: Tensor | None,
    inputs: Sequence[Tensor],
    first: bool,
    last: bool,
    params: Tensor | None,
    start: int,
    stop: int,
    chunk: int,
) -> None:
    pool: list[Tensor] = []
    for lo in range(start, stop, chunk):
        hi = min(lo + chunk, stop)
        part = state[lo:hi]
        kernel(
            part,
            None if base is None else base[lo:hi],
            [x[lo:hi] for x in inputs],
            Step(first, last, params, lo),
            Workspace(part, pool, chunk),
        )


_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_workers
    if _pool is None or _pool_workers != workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="magmax-kernel")
        _pool_workers = workers
    return _pool


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but not its threads: work submitted there would wait forever.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


# Every group shape (kernel × first/last × arity × dtypes) is one dynamo cache entry of the same entry
# function; dynamo's default limit of 8 would silently fall back to eager past it.
_RECOMPILE_LIMIT = 256


def _compiled(kernel: GroupKernel, first: bool, last: bool, arity: int) -> Callable[..., Tensor]:
    key = (kernel, first, last, arity)
    if key not in select._compiled_cache:

        def entry(state: Tensor, base: Tensor | None, params: Tensor | None, *inputs: Tensor) -> Tensor:
            kernel(state, base, inputs, Step(first, last, params, 0), Workspace(state))
            return state

        select._compiled_cache[key] = torch.compile(entry, dynamic=True, fullgraph=True)
    return select._compiled_cache[key]
