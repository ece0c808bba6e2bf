"""GPU folds over many tensors at once (Triton): the launch-bound part of a GPU merge, removed.

On a GPU the torch group kernels run a handful of ops per input and tensor, and a ViT-B/16 has 152
tensors: at T = 10 that is thousands of launches, each far shorter than its launch cost (92 ms where the
bandwidth floor is 1.3 ms on an H100). :func:`fold` runs one launch per group of inputs for *all* the
tensors it is given (:mod:`magmax.merging.backends.gpu.kernels`), reading each input once and writing each
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

log = logging.getLogger(__name__)

BLOCK = 1024
"""Entries per program: 8 float32 per thread of 4 warps, two 16-byte loads per input."""

CHUNK_NUMEL = 1 << 24
"""Entries per launch (tensors are grouped until they reach it): while the GPU merges one chunk, the host
prepares the next (looking up every input's address costs about as long as the GPU's work)."""

def ends_chunk(pending_numel: int, dtype: torch.dtype, chunk_dtype: torch.dtype) -> bool:
    """Whether the chunk of tensors read so far (``pending_numel`` entries of ``chunk_dtype``) ends before a
    tensor of ``dtype``: at ``CHUNK_NUMEL`` entries, and where the dtype changes (one dtype per launch)."""
    return pending_numel >= CHUNK_NUMEL or dtype != chunk_dtype


_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_AVAILABLE = importlib.util.find_spec("triton") is not None
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
    return _AVAILABLE and not _disabled_after_error and _flag("MAGMAX_TRITON", "1")


def possible() -> bool:
    """:func:`enabled`, and a CUDA device present (or interpreting): a cheap test before any input is loaded."""
    return enabled() and (interpreting() or torch.cuda.is_available())


def kernel_device(device: torch.device) -> bool:
    """Whether the kernels run on tensors of this device: CUDA, or the CPU when interpreting."""
    return device.type == ("cpu" if interpreting() else "cuda")


def serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`fold` would take inputs of this dtype on this device (nothing loaded to find out)."""
    return possible() and dtype in _INPUT_DTYPES and kernel_device(device)


def accepts(tensors: Sequence[Tensor]) -> bool:
    """Whether :func:`fold` can take these inputs: one dtype it reads, all on one CUDA device (CPU when
    interpreting)."""
    if not tensors or not enabled():
        return False
    first = tensors[0]
    if first.dtype not in _INPUT_DTYPES or not kernel_device(first.device):
        return False
    return all(t.dtype == first.dtype and t.device == first.device for t in tensors)


def disable(exc: Exception) -> None:
    """A Triton kernel failed (no compiler, an unsupported GPU): use the torch kernels from now on."""
    global _disabled_after_error
    _disabled_after_error = True
    log.warning("magmax: a Triton merge kernel failed (%s: %s); using the torch kernels from now on",
                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


def _triton_dtype(dtype: torch.dtype) -> object:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _kernels() -> ModuleType:
    """The kernel module. Triton reads TRITON_INTERPRET when it decorates a kernel and again while it
    launches one, so interpreting is set for the whole process, before the first import."""
    global _module
    if _module is None:
        if interpreting():
            os.environ["TRITON_INTERPRET"] = "1"
        from magmax.merging.backends.gpu import kernels

        _module = kernels
    return _module


class Layout:
    """Where each segment (tensor) lies in one flat float32 state buffer, and which segment and entries
    each program takes (⌈n_s / BLOCK⌉ programs per segment s, in order): built once per set of shapes
    and device, and kept on the device."""

    def __init__(self, numels: tuple[int, ...], device: torch.device):
        self.numels = numels
        self.device = device
        sizes = np.array(numels, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.total = int(sizes.sum())
        counts = -(-sizes // BLOCK)
        self.blocks = int(counts.sum())
        segment = np.repeat(np.arange(len(numels), dtype=np.int32), counts)
        firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        start = (np.arange(self.blocks, dtype=np.int64) - np.repeat(firsts, counts)) * BLOCK
        self.block_segment = torch.from_numpy(segment).to(device)
        self.block_start = torch.from_numpy(start).to(device)
        self.segment_numel = torch.from_numpy(sizes).to(device)
        self.segment_offset = torch.from_numpy(self.offsets).to(device)

    def views(self, state: Tensor) -> list[Tensor]:
        """Each segment's part of a flat state buffer."""
        return [state[o : o + n] for o, n in zip(self.offsets.tolist(), self.numels)]


_layouts: dict[tuple[tuple[int, ...], torch.device], Layout] = {}


def layout(numels: Sequence[int], device: torch.device) -> Layout:
    key = (tuple(numels), device)
    if key not in _layouts:
        if len(_layouts) > 64:  # a few shapes per process in practice; never unbounded
            _layouts.clear()
        _layouts[key] = Layout(key[0], device)
    return _layouts[key]


class NotAccepted(ValueError):
    """Inputs the kernels do not take (mixed dtypes or devices, not contiguous): the caller's other path
    takes them; not a failure of the kernels."""


def _pointers(tensors: Sequence[Tensor], numels: Sequence[int], dtype: torch.dtype, device: torch.device) -> list[int]:
    """Data addresses, checking what the kernel relies on: dtype, device, contiguity, length."""
    index = device.index if device.type == "cuda" else -1
    pointers = []
    for x, n in zip(tensors, numels):
        if x.dtype is not dtype or x.get_device() != index or not x.is_contiguous() or x.numel() != n:
            raise NotAccepted("GPU kernel inputs must share one dtype and device, be contiguous and as long as "
                             "their segment")
        pointers.append(x.data_ptr())
    return pointers


def address_table(
    segments: Layout,
    bases: Sequence[Tensor] | None,
    inputs: Sequence[Sequence[Tensor]],
    params: np.ndarray | None = None,
) -> Tensor:
    """The kernels' int64 table on the device: θ0's address per segment (0 without θ0), then input j of
    segment s at S + j·S + s, then ``params`` ([G, S, 2]) if given. Built in pinned memory and copied
    once, so that the copy does not wait for the kernels queued before it (a pageable copy would)."""
    count, group = len(segments.numels), len(inputs)
    if group == 0 or any(len(row) != count for row in inputs):
        raise NotAccepted("a GPU kernel needs one input per segment in every row of the group")
    dtype = inputs[0][0].dtype
    if dtype not in _INPUT_DTYPES:
        raise NotAccepted(f"the GPU kernels read float32, bfloat16 and float16, not {dtype}")
    size = count + group * count + (2 * group * count if params is not None else 0)
    host = torch.empty(size, dtype=torch.int64, pin_memory=segments.device.type == "cuda")
    table = host.numpy()
    table[:count] = _pointers(bases, segments.numels, dtype, segments.device) if bases is not None else 0
    table[count : count + group * count] = [
        p for row in inputs for p in _pointers(row, segments.numels, dtype, segments.device)
    ]
    if params is not None:
        table[count + group * count :] = params.reshape(-1)
    return host.to(segments.device, non_blocking=True)


def fold(
    op: str,
    segments: Layout,
    state: Tensor,
    bases: Sequence[Tensor] | None,
    inputs: Sequence[Sequence[Tensor]],
    first: bool,
    finite: Tensor,
    divisor: int | None = None,
    params: np.ndarray | None = None,
) -> None:
    """One group of ``op``'s fold for every segment s at once, in one launch (asynchronous on a GPU).

    ``state``: the flat float32 buffer of all segments' states (``segments.views``; written, and read too
    unless ``first``); ``bases[s]``: θ0 of segment s (None: the inputs are task vectors); ``inputs[j][s]``:
    input j of the group for segment s (contiguous, any shape); ``finite``: an int64[1] on the device to
    which MagMax and Σ add the number of entries whose τ sum is finite; ``divisor``: divide the states by
    it at the end (averaging's last group); ``params``: random's int64 (k_j, thr_j), shape [G, S, 2]."""
    k = _kernels()
    op_code = {"magmax": k.OP_MAGMAX, "sum": k.OP_SUM, "random": k.OP_RANDOM}[op]
    count, group = len(segments.numels), len(inputs)
    if segments.blocks == 0:  # only empty tensors
        return
    dtype = inputs[0][0].dtype
    table = address_table(segments, bases, inputs, params)
    k.fold_segments[(segments.blocks,)](
        segments.block_segment, segments.block_start, segments.segment_numel, segments.segment_offset, state,
        table, finite, count, group, float(divisor or 1),
        FIRST=first, DIVIDE=divisor is not None, OP=op_code, HAS_BASE=bases is not None,
        DTYPE=_triton_dtype(dtype), BLOCK=BLOCK, num_warps=4,
    )


def counts_finite(op: str) -> bool:
    """Whether ``op``'s kernel counts the entries whose τ sum is finite."""
    return op != "random"
