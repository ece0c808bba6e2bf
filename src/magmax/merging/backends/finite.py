"""NaN/Inf verdicts that the fast folds compute in passing, collected per thread.

The numba and Triton folds form every τ_t = θ_t − θ0 anyway, and count the finite entries as they go; the
engine wraps a merge in :func:`finite_watch` and skips its own NaN/Inf pass over in-memory inputs when
the watch proves every entry finite.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from magmax.thread_slot import ThreadSlot


class FiniteWatch:
    """What the folds of one thread saw inside :func:`finite_watch`: how many inputs they formed τ from,
    whether θ0 was among them, and whether every τ entry was finite."""

    def __init__(self) -> None:
        self.inputs = 0
        self.base = False
        self.finite = True

    def proves_finite(self, count: int) -> bool:
        """θ0 and ``count`` inputs went through the folds (each once), every entry finite."""
        return self.finite and self.base and self.inputs == count


_watch: ThreadSlot[FiniteWatch] = ThreadSlot()


def finite_watch() -> AbstractContextManager[FiniteWatch]:
    """Collect, in this thread, the NaN/Inf verdicts of the native folds (they compute one in passing)."""
    return _watch.holding(FiniteWatch())


def report(finite: int, numel: int, inputs: int, has_base: bool) -> None:
    """A fold formed ``inputs`` τ's and found ``finite`` of its ``numel`` entries all finite."""
    watch = _watch.get()
    if watch is not None:
        watch.inputs += inputs
        watch.base = watch.base or has_base
        watch.finite = watch.finite and finite == numel
