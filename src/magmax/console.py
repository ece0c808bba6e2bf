"""Consoles for the CLI: a sensible width in pipes and logs, and user text printed as text, never as markup."""

from __future__ import annotations

import os
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


def print_line(console: Console, text: str, style: str = "", indent: int = 8) -> None:
    """A progress line as text; a line longer than the console continues on indented lines, at spaces."""
    lead = len(text) - len(text.lstrip(" "))
    pieces = textwrap.wrap(
        text, width=console.width, subsequent_indent=" " * (lead + indent),
        break_long_words=False, break_on_hyphens=False, drop_whitespace=True,
    ) or [text]
    pieces[0] = " " * lead + pieces[0].lstrip(" ")
    for piece in pieces:
        console.print(Text(piece, style=style), highlight=False, soft_wrap=True)
