"""The Python API: ``merge`` (state dicts in, merged state dict out) and the incremental ``Merger``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from magmax.engine import DictReader, DictWriter, MergeRun
from magmax.errors import MergeInputError
from magmax.merging.base import MergeMethod, TaskSlices, create_method, merge_all
from magmax.taskvector import apply_task_vector, check_compatible, check_finite, is_mergeable, task_vector_tensor

StateDict = Mapping[str, Tensor]


def _method(method: str | MergeMethod, options: dict[str, Any]) -> MergeMethod:
    if isinstance(method, MergeMethod):
        if options:
            raise TypeError("pass options either to create_method or to merge, not both")
        return method
    return create_method(method, **options)


def merge(
    method: str | MergeMethod,
    base: StateDict,
    finetuned: list[StateDict] | tuple[StateDict, ...],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    output_device: torch.device | str | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """θ0 + λ·merge(τ_1..τ_T) for fine-tuned state dicts ``finetuned`` of the base ``base``.

    ``options`` are the method's (e.g. ``scale=0.5``, ``seed=0``, ``k=0.2``); ``device`` is where the
    merge runs, ``output_device`` where the merged tensors are returned (default: where the base's
    tensors are, so models on a GPU give a model on that GPU); ``dtype`` is the output dtype (default:
    each base tensor's dtype). Integer/bool tensors are copied from the base.
    """
    m = _method(method, options)
    if output_device is None:
        output_device = next(iter(base.values())).device if base else torch.device("cpu")
    readers = [DictReader(sd, f"fine-tuned model {i + 1}") for i, sd in enumerate(finetuned)]
    run = MergeRun(m, DictReader(base, "base"), readers, device=device, out_dtype=dtype, output_device=output_device)
    writer = DictWriter()
    run.run(writer)
    return writer.state


class Merger:
    """Merge a stream of fine-tuned models one at a time; the merged model is available after any prefix.

    Foldable methods (``method.foldable``) keep only their running state per tensor, O(1) task vectors
    whatever the stream length; the others keep the task vectors they need (said in their docstring).
    """

    def __init__(self, method: str | MergeMethod, base: StateDict, *, check_values: bool = True, **options: Any):
        self.method = _method(method, options)
        self.base = {k: v for k, v in base.items()}
        self.check_values = check_values
        self.count = 0
        self._states: dict[str, Any] = {}
        self._taus: list[dict[str, Tensor]] = []

    @property
    def scale(self) -> float:
        return self.method.scale

    def add(self, finetuned: StateDict) -> None:
        """Fold in the next fine-tuned model (its task vector is τ = θ_ft − θ0)."""
        check_compatible(self.base, finetuned, "base", f"fine-tuned model {self.count + 1}")
        if self.check_values:
            for key, value in finetuned.items():
                check_finite(key, value, f"fine-tuned model {self.count + 1}")
        # Compatibility was just checked (with this model's name in the message): form τ directly.
        tau = {k: task_vector_tensor(v, finetuned[k]) for k, v in self.base.items() if is_mergeable(v.dtype)}
        self.add_task_vector(tau)

    def add_task_vector(self, tau: StateDict) -> None:
        """Fold in a task vector directly (float32, keys = the base's floating-point tensors)."""
        m = self.method
        t = self.count
        if m.foldable:
            if m.uses_task_stats:
                m.observe_task(t, lambda: iter(tau.items()))
            for key, value in tau.items():
                if t == 0:
                    self._states[key] = m.init(key, value)
                else:
                    self._states[key] = m.update(self._states[key], value, t, key)
        else:
            self._taus.append({k: v.detach().clone() for k, v in tau.items()})
        self.count += 1

    def task_vector(self) -> dict[str, Tensor]:
        """The merged task vector τ* of the models added so far (λ not applied)."""
        if self.count == 0:
            raise MergeInputError("no fine-tuned model added yet; call Merger.add() first")
        m = self.method
        if m.foldable:
            if m.uses_global_reduce:
                m.reduce_states(self._states.items())
            # result() must not consume the running state: later add() calls continue from it.
            return {k: m.result(_clone_state(s), k) for k, s in self._states.items()}
        keys = [k for k, v in self.base.items() if is_mergeable(v.dtype)]

        def slices(key: str) -> TaskSlices:
            return TaskSlices.from_list(key, [tau[key] for tau in self._taus])

        return merge_all(m, keys, slices, len(self._taus), sum(self.base[k].numel() for k in keys))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream later (see :mod:`magmax.state_io` to save it)."""
        method_stats = {k: v for k, v in vars(self.method).items() if k != "options"}
        return {"count": self.count, "states": self._states, "taus": self._taus, "method": method_stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self._states = dict(state["states"])
        self._taus = list(state["taus"])
        for key, value in state["method"].items():
            setattr(self.method, key, value)

    def merged(self, scale: float | None = None, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """θ0 + λ·τ* (λ = the method's scale unless given)."""
        return apply_task_vector(self.base, self.task_vector(), self.scale if scale is None else scale, dtype)


def _clone_state(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.clone()
    if isinstance(state, tuple):
        return tuple(_clone_state(s) for s in state)
    if isinstance(state, list):
        return [_clone_state(s) for s in state]
    if isinstance(state, dict):
        return {k: _clone_state(v) for k, v in state.items()}
    return state
