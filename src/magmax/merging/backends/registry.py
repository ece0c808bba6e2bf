"""Where the backends register what they accelerate, by method name (no kernels, no imports of them).

Two kinds of entry:

* **fold kernels** (:func:`register_fold`): for a method whose merge is an elementwise fold (its reference
  kernel, plain torch, lives in the method's file and is tagged with the method's name), a numba group
  (CPU), a Triton op (GPU, many tensors at once) and/or a faster torch kernel with the same bits.
* **hooks** (:func:`register_hook`): a method-specific fast path (TIES's thresholds and fused fold,
  Consensus's and Breadcrumbs' single-pass folds), looked up by (method, hook) through
  :func:`magmax.merging.fold.accelerated`; a method falls back to its reference code where it is None.

Every accelerated implementation must give exactly the reference's bits
(tests/merging/test_backend_equivalence.py checks each one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class FoldKernels:
    """The accelerated forms of one method's fold kernel (None: that backend has none)."""

    cpu: Callable[..., bool] | None = None
    """numba group (:mod:`magmax.merging.backends.cpu.native`)."""
    gpu: str | None = None
    """The op of :func:`magmax.merging.backends.gpu.triton.fold` (one launch for many tensors)."""
    eager: Callable[..., None] | None = None
    """A torch group kernel that is faster than the reference on CPU (bit tricks instead of ``where``)."""


_FOLDS: dict[str, FoldKernels] = {}
_HOOKS: dict[tuple[str, str], Callable[..., Any]] = {}


def register_fold(method: str, *, cpu: Callable[..., bool] | None = None, gpu: str | None = None,
                  eager: Callable[..., None] | None = None) -> None:
    """Register accelerated forms of ``method``'s fold kernel (merged with what is registered already)."""
    kernels = _FOLDS.setdefault(method, FoldKernels())
    kernels.cpu = cpu or kernels.cpu
    kernels.gpu = gpu or kernels.gpu
    kernels.eager = eager or kernels.eager


def fold_kernels(method: str | None) -> FoldKernels:
    """What is registered for ``method``'s fold (an empty :class:`FoldKernels` when nothing is)."""
    return _FOLDS.get(method or "", FoldKernels())


def register_hook(method: str, hook: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn`` is ``method``'s accelerated ``hook``."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        if (method, hook) in _HOOKS and _HOOKS[method, hook] is not fn:
            raise ValueError(f"hook '{hook}' of merge method '{method}' registered twice")
        _HOOKS[method, hook] = fn
        return fn

    return add


def hook(method: str, name: str) -> Callable[..., Any] | None:
    return _HOOKS.get((method, name))


def registered() -> dict[str, list[str]]:
    """Method → what accelerates it (for docs and tests)."""
    out: dict[str, list[str]] = {}
    for method, kernels in _FOLDS.items():
        out.setdefault(method, []).extend(
            f"fold:{name}" for name in ("cpu", "gpu", "eager") if getattr(kernels, name) is not None)
    for method, name in _HOOKS:
        out.setdefault(method, []).append(name)
    return {m: sorted(v) for m, v in sorted(out.items())}
