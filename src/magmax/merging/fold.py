"""Elementwise folds: the reference kernels' toolkit, and the base class of the methods that are one fold.

A method whose merge is a left-to-right fold over the task vectors writes it once, in plain torch, as a
*group kernel* ``kernel(state, base, inputs, step, ws)`` that updates the running state in place by a
group of inputs (forming each τ_t = float32(θ_t) − float32(θ0) itself with :func:`tau_of`), and tags it
with :func:`reference` (the method's name). That kernel is the definition, the fallback, and the oracle
the accelerated forms are tested against; the backends (:mod:`magmax.merging.backends`) register numba,
Triton or faster torch forms of it under the method's name, and :mod:`magmax.merging.backends.select`
picks one per call by device, dtype and size. A new method needs none of them to be correct.

Methods with a whole-tensor fast path (TIES, Consensus, Breadcrumbs) look it up with :func:`accelerated`
and keep their reference code as the fallback where it returns None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from magmax.merging import backends
from magmax.merging.backends.fold import (
    GROUP,
    GroupKernel,
    ParamsFn,
    Step,
    Workspace,
    base_f32,
    fold_many,
    fold_operands,
    fold_slices,
    groups,
    mean_of_sum,
    operands_of,
    reference,
    tau_into,
    tau_of,
    update_state,
)
from magmax.merging.base import MergeMethod, TaskSlices

__all__ = [
    "GROUP", "GroupKernel", "KernelFold", "ParamsFn", "Step", "Workspace", "accelerated", "base_f32", "fold_many",
    "fold_operands", "fold_slices", "groups", "mean_of_sum", "operands_of", "reference", "tau_into", "tau_of",
    "update_state",
]


def accelerated(method: str, hook: str) -> Callable[..., Any] | None:
    """The fast path a backend registered as ``method``'s ``hook``, or None (then run the reference code)."""
    return backends.registry.hook(method, hook)


class KernelFold(MergeMethod):
    """A merge that is a left-to-right fold of one group kernel (:data:`kernel`) over the task vectors,
    with the kernel's running value as its only state (MagMax, task arithmetic, random mix). The same fold
    serves every path, so they agree bit for bit: streaming (``init``/``update``), per tensor
    (``merge_tensor``), θ0 + λ·τ* written by the fold's last pass (``merge_into_base``), and runs of
    tensors at once on a GPU (``merge_tensors``)."""

    kernel: ClassVar[GroupKernel]
    """Wrap it in ``staticmethod`` in the subclass: the kernel is a plain function, not a method."""

    foldable = True
    merges_many = True
    folds_natively = True

    def _params(self, key: str) -> ParamsFn | None:
        """The kernel's per-task parameters for this tensor (random's seeds), or None if it takes none."""
        return None

    def init(self, key: str, first: Tensor) -> Tensor:
        return first.to(torch.float32, copy=True)

    def update(self, state: Tensor, tau: Tensor, t: int, key: str) -> Tensor:
        return update_state(self.kernel, state, tau, t, self._params(key))

    def result(self, state: Tensor, key: str) -> Tensor:
        return state

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        return fold_slices(self.kernel, slices, self._params(key))

    def merge_into_base(self, key: str, slices: TaskSlices, scale: float) -> Tensor | None:
        if slices.base is None:
            return None
        return fold_slices(self.kernel, slices, self._params(key), scale=scale)

    def merge_tensors(self, keys: Sequence[str], slices: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        params = [self._params(key) for key in keys]
        many = fold_many(self.kernel, slices, None if all(p is None for p in params) else params)
        return many if many is not None else super().merge_tensors(keys, slices)
