"""Helpers that more than one command shares, a floor below the command modules (``cli.py`` imports the
command modules; the command modules and the sweep's jobs import this one)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from magmax.console import print_line


class LineHooks:
    """Progress as lines (task headings, evaluations, periodic training lines, each with an ETA for the
    run), in terminals and logs alike; on a terminal also a live bar for the task being trained."""

    def __init__(self, console: Console, progress: Progress | None):
        self.console = console
        self.progress = progress
        self.bar: int | None = None

    def on_phase(self, text: str) -> None:
        print_line(self.console, text, style="bold")

    def on_line(self, text: str) -> None:
        print_line(self.console, text)

    def on_task_start(self, stream: str, task, index: int) -> None:
        if self.progress is None:
            return
        if self.bar is not None:
            self.progress.remove_task(self.bar)
        self.bar = self.progress.add_task(escape(f"{stream} task {index + 1}"), total=None, loss=float("nan"), lr=0.0)

    def on_step(self, info) -> None:
        if self.progress is not None and self.bar is not None:
            self.progress.update(self.bar, total=info.total, completed=info.step + 1, loss=info.loss, lr=info.lr)

    def hooks(self):
        from magmax.continual import ProgressHooks

        return ProgressHooks(on_phase=self.on_phase, on_task_start=self.on_task_start, on_step=self.on_step, on_line=self.on_line)
