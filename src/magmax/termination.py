"""SIGTERM handled like Ctrl-C while partial output exists, so a terminated merge leaves nothing behind.

By default SIGTERM (``kill``, a batch scheduler's time limit, ``docker stop``) ends the process at once,
so no ``with`` block or ``finally`` runs and a merge's hidden work folder stays on disk. Inside
:func:`sigterm_unwinds`, SIGTERM raises :class:`Terminated` in the main thread instead: the stack
unwinds through every clean-up on the way, and when the block is left the signal is delivered again
with its default action, so the process still ends as killed by SIGTERM (exit status 143 in a shell).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class Terminated(BaseException):
    """SIGTERM arrived; a BaseException so that ``except Exception`` handlers let it through."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # Once: a second SIGTERM must not interrupt the clean-up the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM unwinds the stack (clean-ups run), then ends the process as SIGTERM does.

    Does nothing outside the main thread (only it may set handlers) or when the program has its own
    SIGTERM handler (it decides what SIGTERM means)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise  # only if the signal is blocked: the exception ends the program instead
    finally:
        signal.signal(signal.SIGTERM, previous)
