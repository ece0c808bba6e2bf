"""A value per thread that a ``with`` block installs and the code it calls reads (restored on exit)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class ThreadSlot(Generic[T]):
    """Used where a setting must reach code deep in a call chain without a parameter at every level
    (a read-buffer pool for the checkpoint readers, a NaN/Inf watch for the folds), and only in the
    thread that asked for it: other threads see ``None``."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> T | None:
        return getattr(self._local, "value", None)

    @contextmanager
    def holding(self, value: T) -> Iterator[T]:
        """``value`` for this thread within the block; the previous one again after it (blocks nest)."""
        previous = self.get()
        self._local.value = value
        try:
            yield value
        finally:
            self._local.value = previous
