"""The shared body of the methods whose merge is one group kernel folded over the task vectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from magmax.merging import _fused
from magmax.merging.base import MergeMethod, TaskSlices


class KernelFold(MergeMethod):
    """A merge that is a left-to-right fold of one group kernel (:data:`kernel`, a
    :class:`magmax.merging._fused.GroupKernel`) over the task vectors, with the kernel's running value as
    its only state (MagMax, task arithmetic, random mix). The same fold serves every path, so they agree
    bit for bit: streaming (``init``/``update``), per tensor (``merge_tensor``), θ0 + λ·τ* written by the
    fold's last pass (``merge_into_base``), and runs of tensors at once on a GPU (``merge_tensors``)."""

    kernel: ClassVar[_fused.GroupKernel]
    """Wrap it in ``staticmethod`` in the subclass: the kernel is a plain function, not a method."""

    foldable = True
    merges_many = True
    folds_natively = True

    def _params(self, key: str) -> _fused.ParamsFn | None:
        """The kernel's per-task parameters for this tensor (random's seeds), or None if it takes none."""
        return None

    def init(self, key: str, first: Tensor) -> Tensor:
        return first.to(torch.float32, copy=True)

    def update(self, state: Tensor, tau: Tensor, t: int, key: str) -> Tensor:
        return _fused.update_state(self.kernel, state, tau, t, self._params(key))

    def result(self, state: Tensor, key: str) -> Tensor:
        return state

    def merge_tensor(self, key: str, slices: Sequence[Tensor]) -> Tensor:
        return _fused.fold_slices(self.kernel, slices, self._params(key))

    def merge_into_base(self, key: str, slices: TaskSlices, scale: float) -> Tensor | None:
        if slices.base is None:
            return None
        return _fused.fold_slices(self.kernel, slices, self._params(key), scale=scale)

    def merge_tensors(self, keys: Sequence[str], slices: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        params = [self._params(key) for key in keys]
        many = _fused.fold_many(self.kernel, slices, None if all(p is None for p in params) else params)
        return many if many is not None else super().merge_tensors(keys, slices)
