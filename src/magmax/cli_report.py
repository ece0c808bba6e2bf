"""`magmax report RUN_DIR [RUN_DIR ...] [--out DIR]`: one self-contained HTML page and its PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from magmax.console import make_console, print_line
from magmax.errors import ConfigError


def report_command(
    run_dirs: list[Path] = typer.Argument(..., help="run directories of `magmax run` (single or multi-seed)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="folder for report.html and the PNGs (default: RUN_DIR/report with one RUN_DIR)"),
) -> None:
    """Write an HTML report (figures embedded, opens offline) and its PNGs for one or more runs."""
    from magmax.report_page import build_report

    if out is None:
        if len(run_dirs) > 1:
            raise ConfigError(f"{len(run_dirs)} run directories: pass --out DIR for the report's folder")
        out = run_dirs[0] / "report"
    page = build_report(run_dirs, out)
    print_line(make_console(), f"report: {page}")
