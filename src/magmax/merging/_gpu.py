"""GPU folds over many tensors at once (Triton): the launch-bound part of a GPU merge, removed.

On a GPU the torch group kernels run a handful of ops per input and tensor, and a ViT-B/16 has 152
tensors: at T = 10 that is thousands of launches, each far shorter than its launch cost (92 ms where the
bandwidth floor is 1.3 ms on an H100). :func:`fold` runs one launch per group of inputs for *all* the
tensors it is given (:mod:`magmax.merging._gpu_kernels`), reading each input once and writing each
state once, with the same float32 operations as the CPU kernels (the tests compare bits).

Used when triton imports, the tensors are on a CUDA device, their dtype is float32, bfloat16 or float16,
and ``MAGMAX_TRITON`` is not ``0``. ``MAGMAX_TRITON_INTERPRET=1`` runs the kernels in Triton's
interpreter on CPU tensors instead (slow: for the tests on machines without a GPU). A failing kernel
turns the path off for the process, and the torch kernels take over (like the numba kernels).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from magmax.merging import _native

log = logging.getLogger(__name__)

BLOCK = 1024
"""Entries per program: 8 float32 per thread of 4 warps, two 16-byte loads per input."""

OPS = ("magmax", "sum", "random")
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_disabled_after_error = False
_module: ModuleType | None = None


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def interpreting() -> bool:
    """Kernels run in Triton's interpreter, on CPU tensors (``MAGMAX_TRITON_INTERPRET=1``; triton must
    not have been imported before ``TRITON_INTERPRET=1`` was set, which the tests' conftest does)."""
    return _flag("MAGMAX_TRITON_INTERPRET", "0")


def enabled() -> bool:
    """triton installed, not turned off by ``MAGMAX_TRITON=0``, and no kernel has failed in this process."""
    if _disabled_after_error or not _flag("MAGMAX_TRITON", "1"):
        return False
    return importlib.util.find_spec("triton") is not None


def possible() -> bool:
    """:func:`enabled`, and a CUDA device present (or interpreting): a cheap test before any input is loaded."""
    return enabled() and (interpreting() or torch.cuda.is_available())


def serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`fold` would take inputs of this dtype on this device (nothing loaded to find out)."""
    return possible() and dtype in _INPUT_DTYPES and device.type == ("cpu" if interpreting() else "cuda")


def accepts(tensors: Sequence[Tensor]) -> bool:
    """Whether :func:`fold` can take these inputs: one dtype it reads, all on one CUDA device (CPU when
    interpreting)."""
    if not tensors or not enabled():
        return False
    first = tensors[0]
    device_type = "cpu" if interpreting() else "cuda"
    if first.dtype not in _INPUT_DTYPES or first.device.type != device_type:
        return False
    return all(t.dtype == first.dtype and t.device == first.device for t in tensors)


def disable(exc: Exception) -> None:
    """A Triton kernel failed (no compiler, an unsupported GPU): use the torch kernels from now on."""
    global _disabled_after_error
    _disabled_after_error = True
    log.warning("magmax: a Triton merge kernel failed (%s: %s); using the torch kernels from now on",
                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


def _kernels() -> ModuleType:
    """The kernel module. Triton reads TRITON_INTERPRET when it decorates a kernel and again while it
    launches one, so interpreting is set for the whole process, before the first import."""
    global _module
    if _module is None:
        if interpreting():
            os.environ["TRITON_INTERPRET"] = "1"
        from magmax.merging import _gpu_kernels

        _module = _gpu_kernels
    return _module


def _triton_dtype(dtype: torch.dtype) -> object:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _block_tables(numels: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """(segment, first entry) of every program: ⌈n_s / BLOCK⌉ programs per segment s, in order."""
    counts = np.array([-(-n // BLOCK) for n in numels], dtype=np.int64)
    segment = np.repeat(np.arange(len(numels), dtype=np.int32), counts)
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    start = (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(firsts, counts)) * BLOCK
    return torch.from_numpy(segment).to(device), torch.from_numpy(start).to(device)


def _addresses(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device)


def fold(
    op: str,
    states: Sequence[Tensor],
    bases: Sequence[Tensor] | None,
    inputs: Sequence[Sequence[Tensor]],
    first: bool,
    divisor: int | None = None,
    params: Tensor | None = None,
) -> None:
    """One group of ``op``'s fold for every segment s at once, in one launch.

    ``states[s]``: flat float32 state of segment s (written; read too unless ``first``); ``bases[s]``: its
    θ0 (None: the inputs are task vectors); ``inputs[j][s]``: input j of the group for segment s, flat;
    ``divisor``: divide the states by it at the end (averaging's last group); ``params``: random's int64
    (k_j, thr_j) rows, shape [G, S, 2]. MagMax and Σ report to :func:`magmax.merging._native.finite_watch`
    whether every entry's τ sum was finite."""
    k = _kernels()
    op_code = {"magmax": k.OP_MAGMAX, "sum": k.OP_SUM, "random": k.OP_RANDOM}[op]
    device = states[0].device
    numels = [s.shape[0] for s in states]
    segments, group = len(states), len(inputs)
    if group == 0 or any(len(row) != segments for row in inputs):
        raise ValueError("a GPU fold needs one input per segment in every row of the group")
    for row in inputs:
        for x, n in zip(row, numels):
            if not x.is_contiguous() or x.numel() != n:
                raise ValueError("GPU fold inputs must be contiguous and as long as their state")
    block_segment, block_start = _block_tables(numels, device)
    if block_segment.shape[0] == 0:  # only empty tensors
        return
    out_addr = _addresses(states, device)
    base_addr = _addresses(bases, device) if bases is not None else torch.zeros(segments, dtype=torch.int64, device=device)
    x_addr = _addresses([x for row in inputs for x in row], device)
    rows = (params.reshape(-1).to(device=device, dtype=torch.int64) if params is not None
            else torch.zeros(2, dtype=torch.int64, device=device))
    finite = torch.zeros(1, dtype=torch.int64, device=device)
    k.fold_segments[(block_segment.shape[0],)](
        block_segment, block_start, torch.tensor(numels, dtype=torch.int64).to(device), out_addr, base_addr, x_addr,
        rows, finite, segments, group, float(divisor or 1),
        FIRST=first, DIVIDE=divisor is not None, OP=op_code, HAS_BASE=bases is not None,
        DTYPE=_triton_dtype(inputs[0][0].dtype), BLOCK=BLOCK, num_warps=4,
    )
    if op != "random":
        _native._report(int(finite.item()), sum(numels), group, bases is not None)
