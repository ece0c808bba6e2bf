"""The `magmax` command. Subcommands live in their own modules and register themselves on ``app``."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from magmax.errors import MagmaxError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continual learning by model merging.")
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Continual learning by model merging: `magmax merge`, `magmax run`, `magmax demo`, `magmax list-methods`."""


@app.command("list-methods")
def list_methods() -> None:
    """Print every merging method with its options, default λ and reference."""
    from magmax.merging import registry

    table = Table(title="merging methods", show_lines=True)
    for col in ("method", "what it does", "default λ", "options", "streaming", "reference"):
        table.add_column(col)
    for name, cls in registry().items():
        opts = []
        for field, info in cls.Options.model_fields.items():
            if field == "scale":
                continue
            opts.append(f"{field}={info.default!r}")
        table.add_row(
            name,
            cls.summary,
            f"{cls(cls.Options()).scale:g}",
            ", ".join(opts) or "-",
            "fold" if cls.foldable else "per tensor",
            cls.reference,
        )
    Console(width=200).print(table)


def _register_subcommands() -> None:
    # Imported for their side effect: each module adds its command(s) to ``app``.
    import magmax.cli_merge  # noqa: F401
    import magmax.cli_run  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2 (usage errors too, via click)."""
    _register_subcommands()
    try:
        app(args=argv, prog_name="magmax")
    except MagmaxError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0

