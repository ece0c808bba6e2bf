"""The `magmax` command: the root ``app`` and its subcommands.

Each subcommand is a plain function in its own module (cli_merge, cli_report, cli_run, cli_sweep, cli_warmup); this
module imports them and registers them on ``app``. The dependency runs one way: no command module imports
this one (what commands share lives a floor below, in cli_common).
"""

from __future__ import annotations

import os

import typer
from rich.table import Table
from rich.text import Text

from magmax import cli_merge, cli_report, cli_run, cli_sweep, cli_warmup
from magmax.console import make_console, print_error, print_line
from magmax.errors import MagmaxError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continual learning by model merging.")

LIST_METHODS_TABLE_WIDTH = 150
"""Below this many columns the methods table would fold every cell: list them one block per method instead."""


@app.callback()
def _root() -> None:
    """Continual learning by model merging: `magmax merge`, `magmax run`, `magmax sweep`, `magmax demo`, `magmax report`, `magmax warmup`, `magmax list-methods`."""


@app.command("list-methods")
def list_methods() -> None:
    """Print every merging method with its options, default λ and reference."""
    from magmax.merging import registry

    methods = []
    for name, cls in registry().items():
        opts = [f"{field}={info.default!r}" for field, info in cls.Options.model_fields.items() if field != "scale"]
        scale = f"{cls(cls.Options()).scale:g}"
        streaming = "fold" if cls.foldable else "per tensor"
        methods.append((name, cls.summary, scale, ", ".join(opts) or "-", streaming, cls.reference))
    console = make_console()
    if console.width < LIST_METHODS_TABLE_WIDTH:
        for name, summary, scale, opts, streaming, reference in methods:
            console.print(Text.assemble((name, "bold"), f"  (default λ {scale}, streaming: {streaming})"), highlight=False)
            for line in (summary, f"options: {opts}", f"reference: {reference}"):
                print_line(console, "    " + line, indent=2)
        return
    table = Table(title="merging methods", show_lines=True)
    for col in ("method", "what it does", "default λ", "options", "streaming", "reference"):
        no_wrap = col in ("method", "default λ", "streaming")
        table.add_column(col, no_wrap=no_wrap, overflow="fold")
    for row in methods:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)


app.command("merge")(cli_merge.merge_command)
app.command("report")(cli_report.report_command)
app.command("run")(cli_run.run_command)
app.command("demo")(cli_run.demo_command)
app.command("sweep")(cli_sweep.sweep_command)
app.command("warmup")(cli_warmup.warmup_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2 (usage errors too, via click)."""
    try:
        app(args=argv, prog_name="magmax")
    except MagmaxError as exc:
        if os.environ.get("RANK", "0") == "0":  # a data-parallel run: every rank raises it, rank 0 says it
            print_error(make_console(stderr=True), str(exc))
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0

