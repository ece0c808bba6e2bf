"""Consoles for the CLI: a sensible width in pipes and logs, and user text printed as text, never as markup."""

from __future__ import annotations

import os
import re
import textwrap

from rich.console import Console
from rich.text import Text

PIPE_WIDTH = 100
"""Width when the output is not a terminal and $COLUMNS is unset: rich's 80 folds tables mid-row."""


def make_console(stderr: bool = False) -> Console:
    """A console on stdout/stderr; off a terminal its width is $COLUMNS or PIPE_WIDTH.

    Made at the time of printing (not at import), so it sees the streams in use then.
    """
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    try:
        width = int(os.environ.get("COLUMNS", "")) or PIPE_WIDTH
    except ValueError:
        width = PIPE_WIDTH
    return Console(stderr=stderr, width=max(width, 40))


def print_error(console: Console, message: str) -> None:
    """``error: MESSAGE`` on one line; brackets in MESSAGE (``magmax[demo]``) are text, not markup."""
    console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


NBSP = "\u00a0"
SEPARATORS = re.compile(r"( \| |; )")


def wrap_line(text: str, width: int, indent: int = 8) -> list[str]:
    """``text`` in lines of at most ``width``, continued with a hanging indent.

    Lines break between the `` | `` / ``; `` separated parts of a progress line first: a part that fits
    on a continuation line (``elapsed 3m07s, ETA run 14m05s``) is kept whole; a longer one (many tasks'
    accuracies) breaks at its spaces.
    """
    lead = len(text) - len(text.lstrip(" "))
    room = width - lead - indent
    parts = SEPARATORS.split(text.strip(" "))
    glued = "".join(p.replace(" ", NBSP) if not SEPARATORS.fullmatch(p) and len(p) <= room else p for p in parts)
    pieces = textwrap.wrap(
        glued, width=width, initial_indent=" " * lead, subsequent_indent=" " * (lead + indent),
        break_long_words=False, break_on_hyphens=False,
    ) or [text]
    return [p.replace(NBSP, " ") for p in pieces]


def print_line(console: Console, text: str, style: str = "", indent: int = 8) -> None:
    """A progress line as text (never markup), wrapped to the console's width by :func:`wrap_line`."""
    for piece in wrap_line(text, console.width, indent):
        console.print(Text(piece, style=style), highlight=False, soft_wrap=True)
