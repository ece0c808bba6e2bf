"""The contract every merging method follows, and the registry that makes a new method one file.

A method merges, for ONE tensor at a time, the T task-vector slices τ_1..τ_T of that tensor into one
merged slice τ*. The model is then θ = θ0 + λ·τ* (λ = ``scale``). Three hooks cover the family:

* ``merge_tensor(key, slices)``: the batch kernel. ``slices`` is a lazy sequence: ``slices[t]`` loads
  (or computes) τ_t for this tensor on demand, so a kernel that walks it once keeps O(1) task vectors in
  memory, and out-of-core engines can re-read it for a second pass. Default: the fold below.
* ``init / update / result``: the fold, for methods whose merge is a running state over the stream
  (MagMax, averaging, task arithmetic, random, TIES, OPCM). ``foldable = True`` promises that the batch
  result equals the fold applied left to right, bit for bit, and lets :class:`magmax.Merger` keep only
  the running state.
* ``observe_task(t, tensors)`` and ``reduce_states(states)``: statistics that couple tensors, e.g. TIES'
  top-k threshold over a whole flattened task vector (per task) and its global majority sign (over all
  merged tensors). ``tensors()`` returns a fresh iterator over (key, τ_t[key]) each call, so a method may
  read a task vector several times without holding it.

Methods are instantiated once per merge with validated options; they may keep per-merge statistics on
``self`` (set by ``observe_task`` / ``reduce_states``), and no per-tensor state but what the tensor's own
``merge_tensor`` consumes (OPCM hands its statistics pass's fold states on that way, models in memory).
"""

from __future__ import annotations

import importlib
import pkgutil
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from magmax.errors import ConfigError

_FLOAT32_MAX = torch.finfo(torch.float32).max  # λ is applied in float32

TensorStream = Callable[[], Iterator[tuple[str, Tensor]]]


class MethodOptions(BaseModel):
    """Options shared by every method. Subclasses add their own fields (with defaults and a description)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float | None = Field(None, allow_inf_nan=False, ge=-_FLOAT32_MAX, le=_FLOAT32_MAX)
    """λ in θ = θ0 + λ·τ*; ``None`` means the method's default (see ``default_scale``). NaN, ±inf and
    values float32 cannot hold are refused: every merged weight would be NaN or infinite."""


class TaskSlices(Sequence[Tensor]):
    """The T task-vector slices of one tensor, produced lazily (``slices[t]`` computes τ_t).

    ``operands(t)`` gives τ_t unformed, as (θ_t, θ0) with τ_t = float32(θ_t) − float32(θ0), so a fused
    kernel can form it chunk by chunk instead of materialising it (one memory pass instead of four).
    """

    def __init__(
        self,
        key: str,
        count: int,
        load: Callable[[int], Tensor],
        *,
        base: Tensor | Callable[[], Tensor] | None = None,
        finetuned: Callable[[int], Tensor] | None = None,
        resident: bool = False,
    ):
        self.key = key
        self.resident = resident
        """Every slice's inputs are in memory already: a kernel may take all T at once (else at most
        ``backends.fold.GROUP`` raw tensors at a time, so that out-of-core memory does not grow with T)."""
        self._count = count
        self._load = load
        # θ0 as a tensor, or a loader called when it is first needed: a pass that only asks how the
        # inputs are held (``resident``) must not read it from disk.
        self._base = base if isinstance(base, Tensor) else None
        self._base_loader = None if isinstance(base, Tensor) else base
        self._finetuned = finetuned

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, t: int) -> Tensor:  # type: ignore[override]
        if not 0 <= t < self._count:
            raise IndexError(t)
        return self._load(t)

    @property
    def base(self) -> Tensor | None:
        """θ0 when the slices are formed from checkpoints (``operands`` gives (θ_t, θ0)), else None."""
        return self._loaded_base() if self._finetuned is not None else None

    def _loaded_base(self) -> Tensor | None:
        if self._base is None and self._base_loader is not None:
            self._base = self._base_loader()
            self._base_loader = None
        return self._base

    def operands(self, t: int) -> tuple[Tensor, Tensor | None]:
        """(θ_t, θ0) when the slices come from checkpoints, else (τ_t, None)."""
        if self._finetuned is None or (self._base is None and self._base_loader is None):
            return self[t], None
        if not 0 <= t < self._count:
            raise IndexError(t)
        base = self._loaded_base()  # θ0 first: its NaN/Inf check comes before θ_t's, as when it was eager
        return self._finetuned(t), base

    def operand_range(self, start: int, stop: int) -> tuple[list[Tensor], Tensor | None]:
        """The first items of ``operands(t)`` for t = start..stop−1, and θ0 (or None), in one call."""
        if self._taus is not None:
            return list(self._taus[start:stop]), None
        pairs = [self.operands(t) for t in range(start, stop)]
        return [x for x, _ in pairs], pairs[0][1] if pairs else None

    _taus: Sequence[Tensor] | None = None

    @classmethod
    def from_list(cls, key: str, taus: Sequence[Tensor]) -> TaskSlices:
        slices = cls(key, len(taus), lambda t: taus[t], resident=True)
        slices._taus = taus
        return slices


SlicesStream = Callable[[], Iterator[tuple[str, TaskSlices]]]
"""A zero-argument callable giving (key, that tensor's T slices) for every tensor, afresh on each call."""


class MergeMethod:
    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    default_scale: ClassVar[float] = 1.0
    foldable: ClassVar[bool] = False
    # Plain attributes, not ClassVar: a method's options may switch its statistics passes on or off.
    uses_task_stats: bool = False
    key_independent: bool = False
    """``merge_tensor`` treats every entry alike whatever tensor it belongs to (no key, shape or per-tensor
    statistic enters), so consecutive tensors may be merged as one flat tensor (the engine does on GPUs)."""
    uses_global_reduce: bool = False
    folds_natively: bool = False
    """``merge_tensor`` forms every τ_t in the native folds of :mod:`magmax.merging.backends.cpu` (on CPU, for
    float32/bfloat16 inputs), which report whether every entry was finite (``backends.finite.finite_watch``):
    the engine may then skip its own NaN/Inf pass over in-memory inputs."""

    statistics_check_finite: bool = False
    """Like ``folds_natively``, for the statistics passes (``uses_task_stats``): they form every τ_t of
    every tensor in native kernels that report whether it was finite (TIES's global thresholds), so the
    engine may skip its own NaN/Inf pass."""

    merges_many: bool = False
    """:meth:`merge_tensors` merges several tensors at once (on a GPU: one launch per group of inputs for
    all of them), so the engine hands it runs of tensors on a GPU instead of one tensor at a time."""

    def __init__(self, options: MethodOptions | None = None):
        self.options = options if options is not None else self.Options()

    # -- scale -------------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.default_scale if self.options.scale is None else float(self.options.scale)

    # -- statistics hooks (default: none) ----------------------------------------------------------
    def observe_task(self, t: int, tensors: TensorStream) -> None:
        """Collect per-task statistics from task vector t (only called if ``uses_task_stats``)."""

    def observe_tasks(self, tensors: SlicesStream, count: int, total_numel: int) -> None:
        """Per-task statistics of all ``count`` tasks at once (only called if ``uses_task_stats``).

        ``tensors()`` yields (key, the T slices of that tensor) afresh on each call; ``total_numel`` is the
        number of entries of one whole task vector. A method may read all tasks in one pass per key;
        the default runs :meth:`observe_task` task by task.
        """
        for t in range(count):
            self.observe_task(t, lambda t=t: ((key, slices[t]) for key, slices in tensors()))

    def reduce_states(self, states: Iterable[tuple[str, Any]]) -> None:
        """Collect statistics over every tensor's fold state (only called if ``uses_global_reduce``).

        Each item is (key, :meth:`global_contribution` of that tensor) in a batch merge, and (key, the
        running fold state) in a streaming one.
        """

    def global_contribution(self, key: str, slices: Sequence[Tensor]) -> Any:
        """What :meth:`reduce_states` needs of one tensor in a batch merge (default: its final fold state)."""
        return self.fold(key, slices)

    defers_global_reduce: bool = False
    """With ``uses_global_reduce``: the batch merge may skip the pass over every tensor that
    :meth:`reduce_states` needs. ``merge_tensor`` then collects the global statistic itself, and where
    a tensor's τ* depended on a provisional value of it, :meth:`provisional_units` names that tensor
    for a second ``merge_tensor`` call once every tensor has been merged."""

    def begin_deferred_reduce(self) -> None:
        """A batch merge with a deferred reduce starts (only called if ``defers_global_reduce``)."""

    def provisional_units(self) -> list[str]:
        """After every tensor's ``merge_tensor``: the keys to merge again, now that the global statistic
        is known (only called if ``defers_global_reduce``)."""
        return []

    # -- fold --------------------------------------------------------------------------------------
    def init(self, key: str, first: Tensor) -> Any:
        raise NotImplementedError(f"{self.name} has no fold")

    def update(self, state: Any, tau: Tensor, t: int, key: str) -> Any:
        raise NotImplementedError(f"{self.name} has no fold")

    def result(self, state: Any, key: str) -> Tensor:
        raise NotImplementedError(f"{self.name} has no fold")

    def fold(self, key: str, slices: Sequence[Tensor]) -> Any:
        """Run the fold over all slices; returns the final state (before ``result``)."""
        state = self.init(key, slices[0])
        for t in range(1, len(slices)):
            state = self.update(state, slices[t], t, key)
        return state

    # -- batch kernel ------------------------------------------------------------------------------
    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        """τ* for one tensor from its T slices (float32, same shape): a tensor of its own, which the caller
        owns (the engine writes the merged model into it), never an input, a view of one or a state the
        method reads again."""
        return self.result(self.fold(key, slices), key)

    def merge_into_base(self, key: str, slices: TaskSlices, scale: float) -> Tensor | None:
        """The merged model's tensor θ0 + scale·τ* in float32, with the same bits as
        :func:`magmax.taskvector.add_scaled` of :meth:`merge_tensor`'s τ*, for methods whose kernels add θ0
        as they write τ* (a pass over τ* and θ0 saved); the caller owns it. None (the default): the
        caller adds θ0 to :meth:`merge_tensor`'s result."""
        return None

    def merge_tensors(self, keys: Sequence[str], slices: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """τ* of several tensors (``slices[i]``: the T slices of ``keys[i]``); the same as
        :meth:`merge_tensor` key by key, which is what the default does (each result the caller's own)."""
        return [self.merge_tensor(key, s) for key, s in zip(keys, slices)]


def seed_for(seed: int, key: str, t: int = 0) -> int:
    """A stable per-(seed, tensor, task) seed, so random methods do not depend on tensor order."""
    return zlib.crc32(f"{seed}\x00{key}\x00{t}".encode()) & 0x7FFF_FFFF


# -- batch merges --------------------------------------------------------------------------------


def run_statistics(method: MergeMethod, keys: Sequence[str], slices: Callable[[str], TaskSlices], count: int,
                   total_numel: int) -> None:
    """The passes a batch merge runs before ``merge_tensor``: per-task statistics, then the global reduce
    (or, for a method that defers it, its start). ``slices(key)`` gives a tensor's T slices afresh."""
    if method.uses_task_stats:
        method.observe_tasks(lambda: ((key, slices(key)) for key in keys), count, total_numel)
    if method.uses_global_reduce:
        if method.defers_global_reduce:
            method.begin_deferred_reduce()
        else:
            method.reduce_states((key, method.global_contribution(key, slices(key))) for key in keys)


def merge_all(method: MergeMethod, keys: Sequence[str], slices: Callable[[str], TaskSlices], count: int,
              total_numel: int) -> dict[str, Tensor]:
    """τ* of every key, with the statistics passes and the re-merge of provisional tensors, as the engine
    runs them (which also loads, checks and writes as it goes)."""
    run_statistics(method, keys, slices, count, total_numel)
    merged = dict(zip(keys, method.merge_tensors(keys, [slices(key) for key in keys])))
    if method.uses_global_reduce and method.defers_global_reduce:
        merged.update((key, method.merge_tensor(key, slices(key))) for key in method.provisional_units())
    return merged


# -- registry --------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available by its ``name`` (to Python, YAML and the CLI)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"merge method '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def discover() -> None:
    """Import every method module of this folder (each applies @register): a new method is one file here,
    nothing else to edit. Modules named ``_*``, ``base``, ``fold`` and sub-packages are not methods."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.ispkg and info.name not in ("base", "fold") and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")


def registry() -> dict[str, type[MergeMethod]]:
    discover()
    return dict(sorted(_REGISTRY.items()))


def get_method_class(name: str) -> type[MergeMethod]:
    methods = registry()
    if name not in methods:
        raise ConfigError(f"unknown merge method '{name}'; choose one of: {', '.join(methods)}")
    return methods[name]


def create_method(name: str, **options: Any) -> MergeMethod:
    """Instantiate a method by name with validated options (unknown or ill-typed options are one line)."""
    cls = get_method_class(name)
    try:
        opts = cls.Options(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "options"
        known = ", ".join(cls.Options.model_fields)
        raise ConfigError(
            f"merge method '{name}': option '{where}': {err['msg']}; options of '{name}' are: {known}"
        ) from None
    return cls(opts)
