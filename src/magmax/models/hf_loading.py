"""Quiet, offline-aware loading of transformers models (shared by the CLIP and MiniLM backbones)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for local files only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports (e.g. a checkpoint's unused pooler) while
    loading; the previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (errors shown to users are one line)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
