"""Whether this process's merges use the numba CPU kernels or the torch kernels (bit-identical results).

numba compiles a kernel on its first call unless its machine code is cached on disk
(:mod:`magmax.merging.backends.cpu.kernel_cache`). Compiling the kernels of one method costs seconds (TIES about
10 s on an idle 2-vCPU machine; docs/benchmarks.md, "First merge on a fresh install"), more than a small merge
takes with the torch kernels. So with ``MAGMAX_NATIVE`` unset (or ``auto``), numba runs when

* its kernels are on disk (``magmax warmup`` put them there), or
* the merges of this process read at least :data:`COMPILE_REPAYS_AT` entries (each input tensor's
  entries, θ0 included, counted per merge; :func:`expect` adds them as a merge starts), enough that
  the numba kernels' speed repays the compile (``MAGMAX_NATIVE_AFTER`` overrides the figure);

and once chosen it stays chosen (the compile is paid). ``MAGMAX_NATIVE=1`` always uses numba (compiling
if need be), ``MAGMAX_NATIVE=0`` never.
"""

from __future__ import annotations

import os

from magmax.merging.backends.cpu import kernel_cache

COMPILE_REPAYS_AT = 600_000_000
"""Entries read (θ0 and each θ_t, summed over the merges of a process) from which compiling the numba
kernels on the spot repays itself. Calibrated on TIES, the method with the costliest compile, on the idle
2-vCPU CPU VM (2026-12-05), three MiniLM fine-tunes (91M entries read): 12.7–13.0 s compiling, 3.1 s
on compiled kernels, 4.6–4.7 s on the torch kernels, so about 10 s of compile against 1.6–1.7e-8 s saved
per entry read: 10 s / 1.7e-8 s ≈ 6e8. Below it a first merge costs what the torch kernels cost.
docs/benchmarks.md, "First merge on a fresh install", has the figures."""

_ON = ("1", "true", "yes", "on")
_planned = 0
_chosen = False
_decision: bool | None = None
_declined = False


def _threshold() -> int:
    raw = os.environ.get("MAGMAX_NATIVE_AFTER", "").strip()
    try:
        return int(float(raw)) if raw else COMPILE_REPAYS_AT
    except ValueError:
        return COMPILE_REPAYS_AT


def expect(entries: int) -> None:
    """A merge that reads ``entries`` tensor entries (θ0 and every θ_t) is about to run."""
    global _planned, _decision
    _planned += max(0, int(entries))
    _decision = None


def use_numba() -> bool:
    """numba for the merges of this process? (``MAGMAX_NATIVE=0`` is the caller's to check.)"""
    global _chosen, _decision, _declined
    if os.environ.get("MAGMAX_NATIVE", "auto").strip().lower() in _ON or _chosen:
        return True
    if _decision is None:
        _decision = kernel_cache.kernels_cached() or _planned >= _threshold()
        _chosen = _decision
        _declined = _declined or not _decision
    return _decision


def declined() -> bool:
    """Whether this process ran (or was about to run) a merge on the torch kernels only because the
    numba kernels were not compiled (for the hint to run ``magmax warmup``)."""
    return _declined and not _chosen


def reset() -> None:
    """Forget this process's decision and planned work (tests; after a warm-up)."""
    global _planned, _chosen, _decision, _declined
    _planned, _chosen, _decision, _declined = 0, False, None, False
