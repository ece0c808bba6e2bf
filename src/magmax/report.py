"""Results of a run as files and tables: results.json, results.csv, a terminal table, a plot."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from magmax.rundir import write_json

DISPLAY = {"finetune": "fine-tune (θ_t)"}


def display_name(name: str) -> str:
    if ":" not in name:
        return name
    stream, what = name.split(":", 1)
    return f"{stream} · {DISPLAY.get(what, what)}"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, m in results["models"].items():
        met = m["metrics"]
        out.append(
            {
                "model": name,
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


def write_results(folder: str | Path, results: dict[str, Any]) -> None:
    folder = Path(folder)
    table = rows(results)
    tmp = folder / "results.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0].keys()) if table else ["model"])
        writer.writeheader()
        for r in table:
            writer.writerow(r)
    os.replace(tmp, folder / "results.csv")
    (folder / "results.md").write_text(markdown_table(results) + "\n")
    write_json(folder / "results.json", results)
    try:
        plot_accuracy(results, folder / "accuracy.png")
    except ImportError:
        pass


def results_table(results: dict[str, Any], title: str | None = None) -> Table:
    headline = results.get("headline", "task-agnostic accuracy on the whole test set")
    table = Table(title=title or f"{results['name']}: accuracy (%), {headline}")
    for col in ("model", "λ", "final acc.", "avg. incr. acc.", "forgetting", "BWT"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows(results):
        table.add_row(
            display_name(r["model"]),
            "–" if r["scale"] is None else f"{r['scale']:g}",
            _fmt(r["final_accuracy"]),
            _fmt(r["average_incremental_accuracy"]),
            _fmt(r["forgetting"]),
            _fmt(r["backward_transfer"]),
        )
    return table


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| model | λ | final acc. | avg. incr. acc. | forgetting | BWT |", "|---|---|---|---|---|---|"]
    for r in rows(results):
        scale = "–" if r["scale"] is None else f"{r['scale']:g}"
        lines.append(
            f"| {display_name(r['model'])} | {scale} | {_fmt(r['final_accuracy'])} | "
            f"{_fmt(r['average_incremental_accuracy'])} | {_fmt(r['forgetting'])} | {_fmt(r['backward_transfer'])} |"
        )
    return "\n".join(lines)


def plot_accuracy(results: dict[str, Any], path: str | Path) -> None:
    """Accuracy on the tasks seen so far after each task, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sizes = np.asarray(results["test_sizes"], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in results["models"].items():
        acc = np.asarray(m["rows"], dtype=float)
        if acc.shape[0] == 1 and len(sizes) > 1:
            ax.axhline(m["metrics"]["final_accuracy"], linestyle=":", color="grey" if name == "zero-shot" else "black", label=display_name(name))
            continue
        seen = [(acc[i, : i + 1] * sizes[: i + 1]).sum() / sizes[: i + 1].sum() for i in range(acc.shape[0])]
        ax.plot(range(1, len(seen) + 1), seen, marker="o", label=display_name(name))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy on seen tasks (%)")
    ax.set_title(results["name"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
