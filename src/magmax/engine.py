"""The merge engine: runs a method over checkpoints tensor by tensor, in bounded memory.

Data flow, one direction:  readers (base, FT_1..FT_T)  →  τ slices per tensor  →  method kernel  →
θ0 + λ·τ*  →  writer.  Only one tensor's worth of inputs is alive at a time and the fold methods walk
the T slices one by one, so memory is O(1) in T and O(largest tensor) in model size. The in-memory
``magmax.merge`` is this same engine over dict readers, so out-of-core and in-memory agree bit for bit.
"""

from __future__ import annotations

import functools

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from magmax.errors import MergeInputError
from magmax.merging.backends import finite, select
from magmax.merging.base import MergeMethod, TaskSlices, run_statistics
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

    def replace(self, key: str, tensor: Tensor) -> None:
        """Write an already written key again (same shape and dtype)."""
        ...


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

    def replace(self, key: str, tensor: Tensor) -> None:
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


BUCKET_NUMEL = 1 << 26
"""Entries per bucket when tensors are merged as one flat tensor on a GPU (256 MiB of float32 per input)."""


@dataclass(frozen=True)
class Unit:
    """What the engine handles in one step: ``keys`` merged together (``merged``), or one key copied."""

    name: str
    keys: tuple[str, ...]
    merged: bool


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
        bucketed: bool | None = None,
        output_device: torch.device | str = "cpu",
    ):
        """``bucketed``: merge runs of tensors as one flat tensor (default: on CUDA, for key-independent
        methods); ``output_device``: where the merged tensors are handed out (each its own storage)."""
        validate_readers(base, finetuned)
        self.method = method
        self.base = base
        self.finetuned = list(finetuned)
        self.device = torch.device(device)
        self.out_dtype = out_dtype
        self.output_device = torch.device(output_device)
        self.check_values = check_values
        self.keys = base.keys()
        self.float_keys = [k for k in self.keys if is_mergeable(base.meta(k).dtype)]
        self._float_key_set = set(self.float_keys)
        self._checked: set[tuple[int, str]] = set()
        self._bucketed = bucketed
        self._in_memory = all(isinstance(reader, DictReader) for reader in (base, *finetuned))
        self._on_device: bool | None = None
        self.plan = self._plan()
        self.units = {unit.name: unit for unit in self.plan if unit.merged}
        select.expect_merge(sum(base.meta(k).numel for k in self.float_keys) * (len(self.finetuned) + 1))

    # -- what is merged together ----------------------------------------------------------------------
    def _plan(self) -> list[Unit]:
        """The base's keys in order, as units: a non-float key (copied), one float tensor, or — on a GPU,
        for a method that treats entries independently of their tensor — a bucket of consecutive float
        tensors of one dtype merged as one flat tensor (one kernel launch per step instead of one per
        tensor: a ViT-B/16 has 152 tensors, and per-tensor launches cost more than the GPU's work)."""
        bucketed = self.device.type == "cuda" if self._bucketed is None else self._bucketed
        bucketed = bucketed and (self.method.key_independent or self.method.merges_many)
        plan: list[Unit] = []
        run: list[str] = []
        run_numel = 0

        def flush() -> None:
            nonlocal run, run_numel
            if run:
                plan.append(Unit(run[0] if len(run) == 1 else f"{run[0]} … {run[-1]}", tuple(run), True))
            run, run_numel = [], 0

        for key in self.keys:
            meta = self.base.meta(key)
            if key not in self._float_key_set:
                flush()
                plan.append(Unit(key, (key,), False))
            elif not bucketed:
                plan.append(Unit(key, (key,), True))
            else:
                if run and (meta.dtype != self.base.meta(run[0]).dtype or run_numel + meta.numel > BUCKET_NUMEL):
                    flush()
                run.append(key)
                run_numel += meta.numel
        flush()
        return plan

    # -- loading -------------------------------------------------------------------------------------
    def _load(self, reader: TensorReader, index: int, key: str, check: bool = True) -> Tensor:
        tensor = reader.get(key).to(self.device)
        if check and self.check_values and (index, key) not in self._checked:
            check_finite(key, tensor, reader.name)
            self._checked.add((index, key))
        return tensor

    def _load_unit(self, reader: TensorReader, index: int, unit: Unit, check: bool = True) -> Tensor:
        """One key's tensor, or a bucket's tensors flattened into one on the device (NaN/Inf checked
        unless ``check`` is off)."""
        if len(unit.keys) == 1:
            return self._load(reader, index, unit.keys[0], check)
        first = reader.get(unit.keys[0])
        if first.device == self.device:  # already there: one concatenation (a few launches)
            flat = torch.cat([first.reshape(-1)] + [reader.get(k).reshape(-1) for k in unit.keys[1:]])
        else:  # each tensor copied into its place (the host-to-device copy it needs anyway)
            total = sum(self.base.meta(k).numel for k in unit.keys)
            flat = torch.empty(total, dtype=first.dtype, device=self.device)
            offset = 0
            for key in unit.keys:
                value = first if key == unit.keys[0] else reader.get(key)
                flat[offset : offset + value.numel()].copy_(value.reshape(-1))
                offset += value.numel()
        del first
        if check and self.check_values and (index, unit.name) not in self._checked:
            try:
                check_finite(unit.name, flat, reader.name)
            except MergeInputError:  # name the tensor, as the per-tensor check does
                for key in unit.keys:
                    check_finite(key, reader.get(key), reader.name)
                raise
            self._checked.add((index, unit.name))
        return flat

    def slices(self, name: str, base_tensor: Tensor | None = None, check: bool = True) -> TaskSlices:
        """τ_1..τ_T of one unit (a tensor's key, or a bucket's name), each computed when indexed (θ0 loaded
        once, when first needed)."""
        unit = self.units[name]
        base = (lambda: base_tensor) if base_tensor is not None else functools.cache(
            lambda: self._load_unit(self.base, -1, unit, check))

        def finetuned(t: int) -> Tensor:
            return self._load_unit(self.finetuned[t], t, unit, check)

        def load(t: int) -> Tensor:
            return task_vector_tensor(base(), finetuned(t))

        return TaskSlices(name, len(self.finetuned), load, base=base, finetuned=finetuned,
                          resident=self._resident(unit))

    def _key_slices(self, key: str, base_tensor: Tensor, check: bool) -> TaskSlices:
        """τ_1..τ_T of one key of a unit handed over tensor by tensor (:meth:`_merge_segments`)."""

        def finetuned(t: int) -> Tensor:
            return self._load(self.finetuned[t], t, key, check)

        def load(t: int) -> Tensor:
            return task_vector_tensor(base_tensor, finetuned(t))

        return TaskSlices(key, len(self.finetuned), load, base=base_tensor, finetuned=finetuned,
                          resident=self._inputs_on_device())

    def _by_segments(self, unit: Unit) -> bool:
        """Whether the unit goes to ``merge_tensors`` as separate tensors: a run of tensors (a bucket), or
        any tensor on a GPU, for a method that merges many at once; on a GPU with the models in its
        memory, also for a key-independent method (TIES's global threshold: its GPU kernels take every
        tensor of a model in memory at once, where concatenating them would copy every input)."""
        m = self.method
        if m.merges_many:
            return len(unit.keys) > 1 or self.device.type == "cuda"
        return m.key_independent and select.gpu_kernel_device(self.device) and self._inputs_on_device()

    def _stat_units(self, check: bool = True) -> tuple[list[str], Callable[[str], TaskSlices]]:
        """The names the statistics passes see, and their slices (NaN/Inf checked as loaded unless
        ``check`` is off): each key of a unit handed over tensor by tensor, else the unit (a key or a bucket)."""
        names: list[str] = []
        by_key: set[str] = set()
        for unit in self.units.values():
            if self._by_segments(unit):
                names.extend(unit.keys)
                by_key.update(unit.keys)
            else:
                names.append(unit.name)

        def slices(name: str) -> TaskSlices:
            if name in by_key:
                return self._key_slices(name, self._load(self.base, -1, name, check), check=check)
            return self.slices(name, check=check)

        return names, slices

    def _unit_of(self, name: str) -> Unit:
        """The unit to merge again for a provisional result: a unit, or one key of a unit handed over
        tensor by tensor (its own single-key unit)."""
        return self.units[name] if name in self.units else Unit(name, (name,), True)

    def _checked_in_passing(self, unit: Unit) -> bool:
        """Whether the method's folds will check this unit's inputs for NaN/Inf as they merge it: one-pass
        methods whose folds count finite entries, float32/bfloat16 on CPU (the numba folds; one key, T >= 2),
        or the dtypes of the GPU folds for a unit handed over tensor by tensor (no second read for others)."""
        m = self.method
        if not (self.check_values and m.folds_natively and not m.uses_task_stats):
            return False
        dtype = self.base.meta(unit.keys[0]).dtype
        if self._by_segments(unit):
            return select.gpu_serves(self.device, dtype)
        if not select.numba_enabled() or self.device.type != "cpu" or len(unit.keys) != 1 or len(self.finetuned) < 2:
            return False
        return dtype in (torch.float32, torch.bfloat16)

    def _inputs_on_device(self) -> bool:
        """In-memory state dicts whose tensors are on the merge's device already: loading copies nothing."""
        if self._on_device is None:
            base = self.base
            self._on_device = self._in_memory and isinstance(base, DictReader) and (
                not self.float_keys or base.state[self.float_keys[0]].device == self.device  # not counted as a read
            )
        return self._on_device

    def _resident(self, unit: Unit) -> bool:
        """One tensor of in-memory state dicts on the merge's device (a bucket is concatenated when loaded):
        loading copies nothing, a kernel may hold all T."""
        return len(unit.keys) == 1 and self._inputs_on_device()

    # -- running -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Statistics passes that couple tensors (per-task thresholds, global signs), if the method has any.

        Where they check NaN/Inf in passing (``statistics_check_finite``, float32/bfloat16 on CPU), the
        inputs are not checked as loaded; if the kernels could not vouch for every entry, the explicit
        check runs after them, before anything is merged."""
        total = sum(self.base.meta(key).numel for key in self.float_keys)
        in_passing = self._statistics_checked_in_passing()
        names, slices = self._stat_units(check=not in_passing)
        with finite.finite_watch() as watch:
            run_statistics(self.method, names, slices, len(self.finetuned), total)
        if not in_passing:
            return
        if watch.proves_finite(len(self.finetuned) * len(names)):
            self._checked.update((index, name) for index in range(-1, len(self.finetuned)) for name in names)
            return
        for name in names:
            self._check_inputs(self._unit_of(name))

    def _check_inputs(self, unit: Unit) -> None:
        """θ0 and every θ_t of a unit loaded with the NaN/Inf check (which names the tensor): where the
        kernels meant to check in passing could not vouch for every entry."""
        self._load_unit(self.base, -1, unit)
        for t, reader in enumerate(self.finetuned):
            self._load_unit(reader, t, unit)

    def _statistics_checked_in_passing(self) -> bool:
        m = self.method
        if not (self.check_values and m.uses_task_stats and m.statistics_check_finite and self.float_keys):
            return False
        if not select.numba_enabled() or self.device.type != "cpu":
            return False
        return all(self.base.meta(key).dtype in (torch.float32, torch.bfloat16) for key in self.float_keys)

    def iter_merged(self) -> Iterator[tuple[str, Tensor]]:
        """(key, merged tensor) in base key order; non-float tensors come from the base unchanged.

        With a deferred global reduce, tensors whose first result was provisional come again at the end
        (same key, final value): a consumer keeps the last one."""
        self.prepare()
        for unit in self.plan:
            if not unit.merged:
                yield unit.name, self.base.get(unit.name).to(self.output_device, copy=True)
                continue
            yield from self._merge_unit(unit)
        if self.method.uses_global_reduce and self.method.defers_global_reduce:
            for name in self.method.provisional_units():
                yield from self._merge_unit(self._unit_of(name))

    def _merge_segments(self, unit: Unit) -> Iterator[tuple[str, Tensor]]:
        """The unit's tensors handed to ``merge_tensors`` as they are (nothing concatenated): on a GPU, one
        launch per group of inputs for all of them."""
        m = self.method
        in_passing = self._checked_in_passing(unit)
        with finite.finite_watch() as watch:
            bases = [self._load(self.base, -1, key, check=not in_passing) for key in unit.keys]
            slices = [self._key_slices(key, base, check=not in_passing) for key, base in zip(unit.keys, bases)]
            taus = m.merge_tensors(list(unit.keys), slices)
        del slices
        if in_passing and not watch.proves_finite(len(self.finetuned)):
            for key in unit.keys:  # before anything is yielded
                self._check_inputs(self._unit_of(key))
        for key, base_tensor, tau in zip(unit.keys, bases, taus):
            merged = combine(base_tensor, tau, m.scale, self.out_dtype, reuse_tau=True)
            yield key, merged.to(self.output_device)
        del bases, taus

    def _merge_unit(self, unit: Unit) -> Iterator[tuple[str, Tensor]]:
        if self._by_segments(unit):
            yield from self._merge_segments(unit)
            return
        if self._checked_in_passing(unit):
            # The native folds tell whether every τ entry was finite as they read the inputs, which saves
            # the NaN/Inf pass (as long as the merge); the explicit check runs (reading the inputs again)
            # when they could not vouch for all of them, before anything is yielded.
            with finite.finite_watch() as watch:
                base_tensor = self._load_unit(self.base, -1, unit, check=False)
                merged = self._merged(unit.name, self.slices(unit.name, base_tensor, check=False), base_tensor)
            if not watch.proves_finite(len(self.finetuned)):
                self._check_inputs(unit)
        else:
            base_tensor = self._load_unit(self.base, -1, unit)
            merged = self._merged(unit.name, self.slices(unit.name, base_tensor), base_tensor)
        del base_tensor
        if len(unit.keys) == 1:
            yield unit.name, merged.to(self.output_device)
            return
        offset = 0
        for key in unit.keys:
            meta = self.base.meta(key)
            # Each key copied out on its own (not views of one buffer: merged tensors must not share
            # storage, which safetensors refuses).
            part = merged[offset : offset + meta.numel].view(meta.shape)
            yield key, part.to(self.output_device, copy=True)
            offset += meta.numel

    def _merged(self, name: str, slices: TaskSlices, base_tensor: Tensor) -> Tensor:
        """θ0 + λ·τ* of one unit in the output dtype: added by the method's kernel where it can, else here."""
        m = self.method
        merged = m.merge_into_base(name, slices, m.scale)
        if merged is not None:
            return merged.to(self.out_dtype or base_tensor.dtype)
        return combine(base_tensor, m.merge_tensor(name, slices), m.scale, self.out_dtype, reuse_tau=True)

    def run(self, writer: TensorWriter, progress: Callable[[str, int], None] | None = None) -> MergeStats:
        stats = MergeStats()
        seen: set[str] = set()
        for key, tensor in self.iter_merged():
            if key in seen:  # a provisional result replaced (deferred global reduce): counted once
                writer.replace(key, tensor)
                continue
            seen.add(key)
            writer.write(key, tensor)
            stats.tensors += 1
            stats.parameters += tensor.numel()
            if key in self._float_key_set:
                stats.merged_parameters += tensor.numel()
            if progress is not None:
                progress(key, tensor.numel())
        return stats
