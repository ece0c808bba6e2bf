"""Results of a run as files and tables: results.json, results.csv, results.md, a terminal table, a plot.

Every place that names a model (the table printed at the end, results.csv/.md/.json, the plot, the
evaluation lines while running) uses :func:`magmax.labels.model_label`, so they all say the same thing.
results.json keeps full precision; results.csv and results.md round accuracies to 2 decimals.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

# The names are magmax.labels' (a floor below this module and plots.py); imported here for the callers of report.
from magmax.labels import METHOD_NAMES, REGULARIZER_NAMES, label_of, model_label, protocol_name, protocol_names  # noqa: F401
from magmax.rundir import write_json

DECIMALS = 2
SINGLE_SEED_NOTE = "One seed: no interval (`seeds: [5, 6, 7]` or `--seeds 5,6,7` gives the mean and a 95% interval over seeds)."


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.{DECIMALS}f}"


def _rounded(value: Any) -> Any:
    return f"{value:.{DECIMALS}f}" if isinstance(value, float) else value


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, m in results["models"].items():
        met = m["metrics"]
        out.append(
            {
                "model": name,
                "label": label_of(name, m, results),
                "stream": m.get("stream"),
                "method": m.get("method"),
                "scale": m.get("scale"),
                "final_accuracy": met["final_accuracy"],
                "average_incremental_accuracy": met["average_incremental_accuracy"],
                "forgetting": met["forgetting"],
                "backward_transfer": met["backward_transfer"],
                **{f"final_task{j + 1}": a for j, a in enumerate(m["rows"][-1])},
            }
        )
    return out


def write_csv(path: Path, table: list[dict[str, Any]], cell: Any) -> None:
    """``table`` (one dict per row) as CSV at ``path``, each value through ``cell(key, value)``; written
    beside and renamed, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0].keys()) if table else ["model"])
        writer.writeheader()
        for r in table:
            writer.writerow({k: cell(k, v) for k, v in r.items()})
    os.replace(tmp, path)


def write_results(folder: str | Path, results: dict[str, Any]) -> None:
    folder = Path(folder)
    write_csv(folder / "results.csv", rows(results), lambda k, v: v if k == "scale" else _rounded(v))
    (folder / "results.md").write_text(markdown_table(results) + "\n\n" + SINGLE_SEED_NOTE + "\n")
    write_json(folder / "results.json", results)
    try:
        plot_accuracy(results, folder / "accuracy.png")
    except ImportError:
        pass


def results_table(results: dict[str, Any], title: str | None = None) -> Table:
    """The results as a rich table: numbers never wrap, the model label folds when the width is short."""
    headline = results.get("headline", "task-agnostic accuracy on the whole test set")
    table = Table(title=title or f"{results['name']}: accuracy (%), {headline}")
    # Two-line headers keep the number columns narrow (≈ 46 columns with the borders), so labels of up
    # to ~30 characters fit 80 columns; numbers never wrap, a longer label folds within its column.
    table.add_column("model", justify="left", overflow="fold")
    for col in ("λ", "final\nacc.", "avg. incr.\nacc.", "forgetting", "BWT"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows(results):
        table.add_row(
            escape(r["label"]),
            "–" if r["scale"] is None else f"{r['scale']:g}",
            _fmt(r["final_accuracy"]),
            _fmt(r["average_incremental_accuracy"]),
            _fmt(r["forgetting"]),
            _fmt(r["backward_transfer"]),
        )
    return table


RESULTS_TABLE_MIN_WIDTH = 70
"""Narrower than this, the table would squeeze the labels to nothing: :func:`results_lines` instead."""


def results_lines(results: dict[str, Any]) -> list[str]:
    """The results as one line per model, for consoles too narrow for the table."""
    headline = results.get("headline", "task-agnostic accuracy on the whole test set")
    lines = [f"{results['name']}: accuracy (%), {headline}"]
    for r in rows(results):
        scale = "" if r["scale"] is None else f" (λ {r['scale']:g})"
        lines.append(
            f"{r['label']}{scale}: final {_fmt(r['final_accuracy'])}, avg. incr. {_fmt(r['average_incremental_accuracy'])}, "
            f"forgetting {_fmt(r['forgetting'])}, BWT {_fmt(r['backward_transfer'])}"
        )
    return lines


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| model | λ | final acc. | avg. incr. acc. | forgetting | BWT |", "|---|---|---|---|---|---|"]
    for r in rows(results):
        scale = "–" if r["scale"] is None else f"{r['scale']:g}"
        lines.append(
            f"| {r['label']} | {scale} | {_fmt(r['final_accuracy'])} | "
            f"{_fmt(r['average_incremental_accuracy'])} | {_fmt(r['forgetting'])} | {_fmt(r['backward_transfer'])} |"
        )
    return "\n".join(lines)


def plot_accuracy(results: dict[str, Any], path: str | Path) -> None:
    """Accuracy on the tasks seen so far after each task, one line per model (:mod:`magmax.plots` conventions)."""
    from magmax.plots import accuracy_curves, draw_accuracy

    ylabel = "task-aware accuracy on seen tasks (%)" if results.get("headline", "").startswith("task-aware") else None
    draw_accuracy(accuracy_curves(results), len(results["test_sizes"]), results["name"], path, ylabel)
