"""Mini-batch index streams: seeded, epoch-based, reproducible from (seed, task) alone."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch


def steps_per_task(num_samples: int, batch_size: int, epochs: float | None, steps: int | None) -> int:
    """The reference trains ``epochs × len(loader)`` steps with a loader that keeps the last partial batch."""
    if steps is not None:
        return steps
    assert epochs is not None
    return max(1, math.ceil(epochs * math.ceil(num_samples / batch_size)))


def batch_indices(num_samples: int, batch_size: int, total_steps: int, generator: torch.Generator) -> Iterator[np.ndarray]:
    """``total_steps`` batches: a fresh permutation each epoch, the last batch of an epoch may be short."""
    produced = 0
    while produced < total_steps:
        perm = torch.randperm(num_samples, generator=generator).numpy()
        for start in range(0, num_samples, batch_size):
            yield perm[start : start + batch_size]
            produced += 1
            if produced == total_steps:
                return


def take(items: Sequence, idx: np.ndarray) -> Sequence:
    """Items at ``idx``, of the same kind: an array slice, an ``ImageFiles`` list, or a list of texts."""
    if isinstance(items, np.ndarray):
        return items[idx]
    picked = [items[int(i)] for i in idx]
    return type(items)(picked) if type(items) is not list else picked


def concat_items(parts: Sequence[Sequence]) -> Sequence:
    """Concatenate item collections of one kind (arrays, ``ImageFiles`` path lists, text lists)."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    joined = [x for p in parts for x in p]
    return type(parts[0])(joined) if type(parts[0]) is not list else joined


T = TypeVar("T")


def prefetch(jobs: Iterable[T], prepare: Callable[[T], Any], workers: int) -> Iterator[tuple[T, Any]]:
    """(job, prepare(job)) in order, with up to 2·workers jobs prepared ahead in threads.

    Decoding and resizing release the GIL, so threads keep an accelerator fed without the pickling
    and start-up cost of worker processes. ``workers = 0`` prepares in the calling thread.
    """
    if workers <= 0:
        for job in jobs:
            yield job, prepare(job)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="magmax-data") as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append((job, pool.submit(prepare, job)))
            if len(pending) > 2 * workers:
                done_job, future = pending.popleft()
                yield done_job, future.result()
        while pending:
            done_job, future = pending.popleft()
            yield done_job, future.result()
