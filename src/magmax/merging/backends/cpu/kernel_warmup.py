"""Compile the numba CPU merge kernels ahead of time into numba's on-disk cache (``magmax warmup``).

It merges small synthetic models with every method that has numba kernels, float32 and bfloat16, at
numbers of fine-tuned models that together call every kernel at every group size (one compiled version
per number of inputs in a group, up to ``GROUP``), with the numba kernels forced on. numba writes the
machine code to its cache; the names of the files are recorded (:mod:`magmax.merging.backends.cpu.kernel_cache`), so
that later processes know the kernels are compiled and use them from a merge's first tensor on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from magmax.merging.backends.cpu import kernel_cache, numba_policy

METHODS: tuple[tuple[str, dict[str, object]], ...] = (
    ("magmax", {}),
    ("average", {}),
    ("task_arithmetic", {}),
    ("random", {}),
    ("dare", {"seed": 0}),
    ("ties", {}),
    ("consensus", {}),
    ("breadcrumbs", {}),
)
"""The methods whose merges call numba kernels, with the options a warm-up merge needs."""

TASKS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9, 16)
"""Numbers of fine-tuned models merged: first groups of 1..GROUP-1 inputs after τ_1, later full groups."""

DTYPES = (torch.float32, torch.bfloat16)
NUMEL = 70_001
"""Entries of the largest synthetic tensor: above ``_native.SERIAL_NUMEL``, so the threaded paths run."""


@dataclass
class WarmupReport:
    folder: Path | None
    files: int
    seconds: float
    merges: int


def _models(tasks: int, dtype: torch.dtype, seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(NUMEL, generator=gen).to(dtype), "b": torch.randn(7, 3, generator=gen).to(dtype)}
    fts = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
           for _ in range(tasks)]
    return base, fts


def warm_up(
    tasks: Sequence[int] = TASKS,
    dtypes: Sequence[torch.dtype] = DTYPES,
    methods: Sequence[tuple[str, dict[str, object]]] = METHODS,
    progress: Callable[[str], None] | None = None,
) -> WarmupReport:
    """Compile every kernel (see the module docstring) and record the cache files; returns where they are."""
    from magmax.api import merge
    from magmax.merging.backends.cpu import native as _native

    if not _native._AVAILABLE:
        return WarmupReport(None, 0, 0.0, 0)
    start = time.perf_counter()
    previous = os.environ.get("MAGMAX_NATIVE")
    os.environ["MAGMAX_NATIVE"] = "1"
    merges = 0
    try:
        for name, options in methods:
            if progress is not None:
                progress(name)
            for dtype in dtypes:
                for t in tasks:
                    base, fts = _models(t, dtype, seed=t)
                    merge(name, base, fts, **options)
                    merges += 1
    finally:
        if previous is None:
            os.environ.pop("MAGMAX_NATIVE", None)
        else:
            os.environ["MAGMAX_NATIVE"] = previous
    folder = _numba_cache_folder()
    names = kernel_cache.cache_files(folder) if folder is not None else []
    if folder is not None and names:
        kernel_cache.write_manifest(folder, names)
    numba_policy.reset()
    return WarmupReport(folder, len(names), time.perf_counter() - start, merges)


def _numba_cache_folder() -> Path | None:
    """Where numba put the kernels' machine code (asked of numba itself, not guessed)."""
    from magmax.merging.backends.cpu import kernels as _native_kernels

    cache = getattr(_native_kernels.add_scaled_fused, "_cache", None)
    path = getattr(cache, "cache_path", None)
    return Path(path) if path else kernel_cache.cache_dir()
