"""The one place that decides which backend runs a merge kernel: by device, dtype and size.

Paths, fastest first:

* ``"numba"``: the CPU kernels of :mod:`magmax.merging.backends.cpu` (float32/bfloat16 inputs on the CPU,
  numba installed, ``MAGMAX_NATIVE`` not ``0``, no kernel failed in this process, and the kernels either
  compiled already or the merge big enough to repay compiling them: :mod:`...cpu.numba_policy`);
* ``"triton"``: the GPU kernels of :mod:`magmax.merging.backends.gpu` (CUDA tensors of float32, bfloat16
  or float16, triton installed, ``MAGMAX_TRITON`` not ``0``), many tensors per launch;
* ``"compiled"``: the method's torch kernel under ``torch.compile`` (see the compile policy below);
* ``"torch"``: the method's torch kernel, eagerly (always possible).

Compile policy (:func:`set_compile_mode`, or the ``MAGMAX_COMPILE`` environment variable): ``"never"``,
``"always"``, or ``"auto"`` (default): run eagerly until this process has spent
``MAGMAX_COMPILE_AFTER_S`` seconds (default 30) in eager group kernels, then compile, so that a small
merge never pays a compile and a large one pays at most about twice the better choice.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from magmax.errors import ConfigError
from magmax.merging.backends.cpu import native, numba_policy
from magmax.merging.backends.gpu import triton

Path = Literal["numba", "compiled", "torch"]
CompileMode = Literal["auto", "always", "never"]
_MODES: tuple[str, ...] = ("auto", "always", "never")

MIN_COMPILE_NUMEL = 4096
"""Smaller tensors always run eagerly (a compiled call has a fixed cost of tens of microseconds)."""


def group_path(has_numba: bool, state: Tensor, base: Tensor | None, inputs: Sequence[Tensor], group: int) -> Path:
    """How one group of a fold runs: by its numba twin (``has_numba``) where the inputs suit it, else
    compiled where the policy says so, else eagerly."""
    if has_numba and native.enabled() and native.accepts(state, base, inputs, group):
        return "numba"
    if use_compiled(state.shape[0], state.device):
        return "compiled"
    return "torch"


def numba_takes(base: Tensor | None, inputs: Sequence[Tensor], group: int) -> bool:
    """Whether the CPU kernels take these inputs (for the methods whose fast path is a whole pass)."""
    return native.enabled() and native.accepts_inputs(base, inputs, group)


def expect_merge(entries: int) -> None:
    """Tell the choice of CPU kernels how big the coming merge is (entries read over all its models):
    compiling the numba kernels is worth it only for merges large enough to repay the compile."""
    numba_policy.expect(entries)


def numba_declined() -> bool:
    """Whether a CPU merge ran on the torch kernels only because the numba ones are not compiled."""
    return numba_policy.declined()


def gpu_possible() -> bool:
    """Whether the Triton kernels might run (checked before any input is loaded)."""
    return triton.possible()


# -- compile policy ----------------------------------------------------------------------------------

_mode: str = os.environ.get("MAGMAX_COMPILE", "auto").strip().lower() or "auto"
_compile_after_s = float(os.environ.get("MAGMAX_COMPILE_AFTER_S", "30"))
_eager_seconds = 0.0
_compile_failed = False
_compiled_cache: dict[tuple[object, ...], Callable[..., Tensor]] = {}


def set_compile_mode(mode: CompileMode) -> None:
    """Choose when group kernels are compiled: ``"auto"`` (after enough eager time), ``"always"``, ``"never"``."""
    global _mode
    if mode not in _MODES:
        raise ConfigError(f"compile mode '{mode}' is unknown; choose one of: {', '.join(_MODES)}")
    _mode = mode


def compile_mode() -> str:
    return _mode


def spent_eager(seconds: float) -> None:
    """Eager group kernels ran for ``seconds`` (the ``auto`` policy's meter)."""
    global _eager_seconds
    _eager_seconds += seconds


def use_compiled(numel: int, device: torch.device) -> bool:
    if _mode not in _MODES:
        raise ConfigError(f"MAGMAX_COMPILE='{_mode}' is unknown; set it to one of: {', '.join(_MODES)}")
    if _mode == "never" or _compile_failed or numel < MIN_COMPILE_NUMEL:
        return False
    if _mode == "auto" and _eager_seconds < _compile_after_s:
        return False
    return _compiler_available(device)


def _compiler_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))
    if device.type == "cuda":
        try:
            import triton as _triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def disable_compile(exc: Exception) -> None:
    global _compile_failed
    _compile_failed = True
    native.log.warning("magmax: torch.compile of a merge kernel failed (%s: %s); merging eagerly from now on",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


# -- what the engine asks before it loads anything ---------------------------------------------------


def numba_enabled() -> bool:
    """The numba kernels may run on CPU inputs (installed, not off, none failed)."""
    return native.enabled()


def gpu_kernel_device(device: torch.device) -> bool:
    """Whether the Triton kernels run on tensors of this device."""
    return triton.kernel_device(device)


def gpu_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton folds would take inputs of this dtype on this device."""
    return triton.serves(device, dtype)
