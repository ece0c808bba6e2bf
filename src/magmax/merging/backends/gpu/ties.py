"""TIES with the global threshold on a GPU: three passes over every tensor at once (Triton).

The CPU algorithm of :mod:`magmax.merging.backends.cpu.threshold` and ``cpu.native.ties_group``, with the
kernels of :mod:`magmax.merging.backends.gpu.kernels` over all tensors and all T inputs in one launch per chunk of
tensors (the models are in GPU memory already):

1. ``ties_sample``: τ_t at every ``stride``-th position of the flattened model (the CPU's positions);
   the bracket [lo_t, hi_t] around each task's k-th magnitude from two order statistics of the sample.
2. ``ties_count``: below_t = #{|τ_t| < lo_t} and the magnitudes inside the bracket; κ_t is then the
   (r − below_t)-th smallest of them (``kthvalue``), exactly the k-th magnitude of the whole task
   vector. A task whose bracket missed (or overflowed) gets None: the caller's exact fallback decides.
3. ``ties_merge``: τ* from Σ⁺, Σ⁻, n⁺, n⁻ of the trimmed τ's in registers, with the elected-sign
   balance and, per tensor, the entries where the majority sign decides (TIES's deferred majority).

Bit-exact with the CPU kernels (same float32 operations per entry; the mean correctly rounded); the
thresholds are exact order statistics either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from magmax.merging.backends.brackets import KEPT_SAMPLE, bracket_ranks, gather_capacity, sample_stride
from magmax.merging.backends.gpu import triton as _gpu
from magmax.merging.backends.registry import register_hook


@dataclass
class _Chunk:
    segments: _gpu.Layout
    offset: int  # entries of the model before this chunk
    table: Tensor  # θ0's and the T inputs' addresses (``_gpu.address_table``)
    dtype: torch.dtype


class ResidentModel:
    """The T task inputs of every tensor, in memory on one device, tabled by chunks for the kernels."""

    def __init__(self, slices: Sequence[Sequence[Tensor]]):
        """Chunks of consecutive tensors of one dtype (``_gpu.ends_chunk``, as the folds chunk them)."""
        self.count = len(slices[0])
        self.shapes: list[torch.Size] = []
        self.chunks: list[_Chunk] = []
        self._alive: list[object] = []
        self.total = 0
        rows: list[list[Tensor]] = [[] for _ in range(self.count)]
        bases: list[Tensor] = []
        numel = 0
        for s, tensor_slices in enumerate(slices):
            inputs, base = tensor_slices.operand_range(0, self.count)  # type: ignore[attr-defined]
            if s == 0:
                self.has_base = base is not None
                self.device = inputs[0].device
            if (base is not None) != self.has_base:
                raise _gpu.NotAccepted("some tensors come with θ0 and some without")
            if rows[0] and _gpu.ends_chunk(numel, inputs[0].dtype, rows[0][0].dtype):
                self._close(rows, bases)
                rows, bases, numel = [[] for _ in range(self.count)], [], 0
            if base is not None:
                bases.append(base)
            for row, x in zip(rows, inputs):
                row.append(x)
            self._alive.append((inputs, base))  # the tables hold addresses: the tensors must outlive them
            self.shapes.append(inputs[0].shape)
            numel += inputs[0].numel()
        if rows[0]:
            self._close(rows, bases)

    def _close(self, rows: list[list[Tensor]], bases: list[Tensor]) -> None:
        segments = _gpu.layout([x.numel() for x in rows[0]], self.device)
        table = _gpu.address_table(segments, bases if self.has_base else None, rows)
        self.chunks.append(_Chunk(segments, self.total, table, rows[0][0].dtype))
        self.total += segments.total

    def launch(self, kernel: object, chunk: _Chunk, *args: object) -> None:
        kernel[(chunk.segments.blocks,)](  # type: ignore[index]
            chunk.segments.block_segment, chunk.segments.block_start, chunk.segments.segment_numel,
            chunk.segments.segment_offset, *args,
            HAS_BASE=self.has_base, DTYPE=_gpu._triton_dtype(chunk.dtype), BLOCK=_gpu.BLOCK, num_warps=4,
        )


def resident(slices: Sequence[Sequence[Tensor]]) -> ResidentModel | None:
    """The model tabled for the GPU kernels, or None where they do not apply: inputs not all in memory
    (``TaskSlices.resident``), not on a GPU (or interpreting), other dtypes, no triton."""
    if not slices or not _gpu.possible() or not all(getattr(s, "resident", False) for s in slices):
        return None
    if any(not hasattr(s, "operand_range") for s in slices) or len({len(s) for s in slices}) != 1 or len(slices[0]) == 0:
        return None
    inputs, base = slices[0].operand_range(0, 1)  # type: ignore[attr-defined]
    if not _gpu.accepts(inputs + ([base] if base is not None else [])):  # the device kind; tables check the rest
        return None
    try:
        return ResidentModel(slices)
    except _gpu.NotAccepted:  # mixed devices, dtypes the kernels do not read, strided tensors
        return None


def bracketed(model: ResidentModel, position: int) -> tuple[list[float | None], Tensor]:
    """(κ_t = the ``position``-th smallest |τ_t| for every task, None where the bracket did not decide; a
    subsample of the sample, count × S, for TIES's guess of the majority sign)."""
    kern = _gpu._kernels()
    count, total, device = model.count, model.total, model.device
    stride = sample_stride(total, count)
    cap = total // stride + 2
    sample = torch.zeros((count, cap), dtype=torch.float32, device=device)
    for chunk in model.chunks:
        model.launch(kern.ties_sample, chunk, chunk.table, sample, len(chunk.segments.numels), count, chunk.offset,
                     stride, cap)
    taken = -(-total // stride)
    sample = sample[:, :taken]
    lo_index, hi_index = bracket_ranks(taken, total, position)
    magnitudes = sample.abs()
    low = (magnitudes.kthvalue(lo_index + 1, dim=1).values if lo_index >= 0
           else torch.zeros(count, dtype=torch.float32, device=device))
    high = (magnitudes.kthvalue(hi_index + 1, dim=1).values if hi_index < taken
            else torch.full((count,), float("inf"), dtype=torch.float32, device=device))
    del magnitudes
    kept = sample[:, :: max(1, taken // KEPT_SAMPLE)]
    gather_cap = gather_capacity(lo_index, hi_index, taken, total)
    gathered = torch.empty((count, gather_cap), dtype=torch.float32, device=device)
    filled = torch.zeros(count, dtype=torch.int64, device=device)
    below = torch.zeros(count, dtype=torch.int64, device=device)
    for chunk in model.chunks:
        partial = torch.empty((chunk.segments.blocks, count), dtype=torch.int64, device=device)
        model.launch(kern.ties_count, chunk, chunk.table, low, high, partial, gathered, filled,
                     len(chunk.segments.numels), count, gather_cap)
        below += partial.sum(dim=0)
    found: list[float | None] = [None] * count
    inside = [int(position - b) for b in below.tolist()]
    for t, (n, r) in enumerate(zip(filled.tolist(), inside)):
        if 1 <= r <= n <= gather_cap:
            found[t] = gathered[t, :n].kthvalue(r).values  # type: ignore[assignment]
    values = [None if v is None else float(v) for v in found]  # one wait for the device per task found
    return values, kept


def merge(model: ResidentModel, kappas: Sequence[float | None], zero_positive: bool) -> tuple[list[Tensor], int, list[int]]:
    """(τ* of every tensor, views of per-chunk buffers; the elected-sign balance; per tensor, the number
    of entries whose value depends on the majority sign)."""
    kern = _gpu._kernels()
    device = model.device
    kap = torch.tensor([-1.0 if v is None else v for v in kappas], dtype=torch.float32, device=device)
    results: list[Tensor] = []
    balance = torch.zeros((), dtype=torch.int64, device=device)
    ambiguous: list[Tensor] = []
    for chunk in model.chunks:
        state = torch.empty(chunk.segments.total, dtype=torch.float32, device=device)
        counts = torch.empty((chunk.segments.blocks, 2), dtype=torch.int64, device=device)
        model.launch(kern.ties_merge, chunk, state, chunk.table, kap, counts, len(chunk.segments.numels),
                     model.count, int(zero_positive))
        results.extend(chunk.segments.views(state))
        balance += counts[:, 0].sum()
        per_segment = torch.zeros(len(chunk.segments.numels), dtype=torch.int64, device=device)
        ambiguous.append(per_segment.index_add_(0, chunk.segments.block_segment.long(), counts[:, 1]))
    shaped = [r.view(shape) for r, shape in zip(results, model.shapes)]
    return shaped, int(balance), torch.cat(ambiguous).tolist()


@register_hook("ties", "merge_many")
def merge_many(slices: Sequence[Sequence[Tensor]], kappas: Sequence[float | None],
               zero_positive: bool) -> tuple[list[Tensor], int, list[int]] | None:
    """:func:`merge` of tensors whose inputs are all in GPU memory; None where the kernels do not apply
    (or failed: then they are off for the process, and the torch fold gives the same)."""
    if not slices or not _gpu.possible():
        return None
    try:
        model = resident(slices)
        return None if model is None else merge(model, kappas, zero_positive)
    except Exception as exc:  # the Triton kernels are an optimisation: the torch fold gives the same
        _gpu.disable(exc)
        return None
