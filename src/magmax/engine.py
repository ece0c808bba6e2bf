"""The merge engine: runs a method over checkpoints tensor by tensor, in bounded memory.

Data flow, one direction:  readers (base, FT_1..FT_T)  →  τ slices per tensor  →  method kernel  →
θ0 + λ·τ*  →  writer.  Only one tensor's worth of inputs is alive at a time and the fold methods walk
the T slices one by one, so memory is O(1) in T and O(largest tensor) in model size. The in-memory
``magmax.merge`` is this same engine over dict readers, so out-of-core and in-memory agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from magmax.errors import MergeInputError
from magmax.merging.base import MergeMethod, TaskSlices
from magmax.taskvector import check_finite, check_tensor_pair, combine, is_mergeable, task_vector_tensor


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class TensorReader(Protocol):
    """Random access to the tensors of one checkpoint, loaded one at a time."""

    name: str

    def keys(self) -> list[str]: ...

    def meta(self, key: str) -> TensorMeta: ...

    def get(self, key: str) -> Tensor: ...


class TensorWriter(Protocol):
    def write(self, key: str, tensor: Tensor) -> None: ...


class DictReader:
    """A state dict in memory as a :class:`TensorReader`."""

    def __init__(self, state: Mapping[str, Tensor], name: str = "state dict"):
        self.state = state
        self.name = name

    def keys(self) -> list[str]:
        return list(self.state.keys())

    def meta(self, key: str) -> TensorMeta:
        t = self.state[key]
        return TensorMeta(tuple(t.shape), t.dtype)

    def get(self, key: str) -> Tensor:
        return self.state[key]


class DictWriter:
    def __init__(self) -> None:
        self.state: dict[str, Tensor] = {}

    def write(self, key: str, tensor: Tensor) -> None:
        self.state[key] = tensor


def validate_readers(base: TensorReader, finetuned: Sequence[TensorReader]) -> None:
    """Keys, shapes and dtypes of every fine-tuned checkpoint must match the base (metadata only)."""
    if len(finetuned) < 1:
        raise MergeInputError("no fine-tuned model given; pass at least one fine-tuned checkpoint to merge")
    base_keys = base.keys()
    base_set = set(base_keys)
    for reader in finetuned:
        keys = set(reader.keys())
        missing = [k for k in base_keys if k not in keys]
        if missing:
            raise MergeInputError(
                f"{reader.name}: tensor '{missing[0]}' of the base ({base.name}) is missing "
                f"({len(missing)} missing in all); merge only checkpoints of the same architecture"
            )
        extra = sorted(keys - base_set)
        if extra:
            raise MergeInputError(
                f"{reader.name}: tensor '{extra[0]}' is not in the base ({base.name}) ({len(extra)} extra "
                "in all); merge only checkpoints of the same architecture"
            )
        for key in base_keys:
            bm, fm = base.meta(key), reader.meta(key)
            check_tensor_pair(key, bm.shape, bm.dtype, fm.shape, fm.dtype, f"the base ({base.name})", reader.name)


@dataclass
class MergeStats:
    tensors: int = 0
    parameters: int = 0
    merged_parameters: int = 0


class MergeRun:
    """One merge of ``finetuned`` onto ``base`` with ``method``; call :meth:`run` with a writer."""

    def __init__(
        self,
        method: MergeMethod,
        base: TensorReader,
        finetuned: Sequence[TensorReader],
        device: torch.device | str = "cpu",
        out_dtype: torch.dtype | None = None,
        check_values: bool = True,
    ):
        validate_readers(base, finetuned)
        self.method = method
        self.base = base
        self.finetuned = list(finetuned)
        self.device = torch.device(device)
        self.out_dtype = out_dtype
        self.check_values = check_values
        self.keys = base.keys()
        self.float_keys = [k for k in self.keys if is_mergeable(base.meta(k).dtype)]
        self._float_key_set = set(self.float_keys)
        self._checked: set[tuple[int, str]] = set()

    # -- loading -------------------------------------------------------------------------------------
    def _load(self, reader: TensorReader, index: int, key: str) -> Tensor:
        tensor = reader.get(key).to(self.device)
        if self.check_values and (index, key) not in self._checked:
            check_finite(key, tensor, reader.name)
            self._checked.add((index, key))
        return tensor

    def slices(self, key: str, base_tensor: Tensor | None = None) -> TaskSlices:
        """τ_1..τ_T of one tensor, each computed when indexed (θ0[key] loaded once)."""
        base_tensor = self._load(self.base, -1, key) if base_tensor is None else base_tensor

        def finetuned(t: int) -> Tensor:
            return self._load(self.finetuned[t], t, key)

        def load(t: int) -> Tensor:
            return task_vector_tensor(base_tensor, finetuned(t))

        return TaskSlices(key, len(self.finetuned), load, base=base_tensor, finetuned=finetuned)

    # -- running -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Statistics passes that couple tensors (per-task thresholds, global signs), if the method has any."""
        m = self.method
        if m.uses_task_stats:
            total = sum(self.base.meta(key).numel for key in self.float_keys)
            m.observe_tasks(lambda: ((key, self.slices(key)) for key in self.float_keys), len(self.finetuned), total)
        if m.uses_global_reduce:
            m.reduce_states((key, m.global_contribution(key, self.slices(key))) for key in self.float_keys)

    def iter_merged(self) -> Iterator[tuple[str, Tensor]]:
        """(key, merged tensor) in base key order; non-float tensors come from the base unchanged."""
        self.prepare()
        scale = self.method.scale
        for key in self.keys:
            base_tensor = self._load(self.base, -1, key)
            if key in self._float_key_set:
                tau = self.method.merge_tensor(key, self.slices(key, base_tensor))
                yield key, combine(base_tensor, tau, scale, self.out_dtype).cpu()
            else:
                yield key, base_tensor.cpu().clone()

    def run(self, writer: TensorWriter, progress: Callable[[str, int], None] | None = None) -> MergeStats:
        stats = MergeStats()
        for key, tensor in self.iter_merged():
            writer.write(key, tensor)
            stats.tensors += 1
            stats.parameters += tensor.numel()
            if key in self._float_key_set:
                stats.merged_parameters += tensor.numel()
            if progress is not None:
                progress(key, tensor.numel())
        return stats
