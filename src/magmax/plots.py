"""The figures of a run: accuracy after each task, accuracy matrices, forgetting, λ sweeps, task-vector analyses.

One set of conventions for every figure: a model keeps its colour, marker and line style across
figures (:func:`model_styles`: any two models differ in colour AND marker), task axes have integer
ticks 1..T, and zero-shot (θ0) and joint are drawn on the same basis as the curves: the accuracy over
the tasks seen so far, computed from their single row with the test sizes. The run's own
``accuracy.png`` and ``magmax report`` draw with the same functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from magmax.labels import label_of

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
LINESTYLES = ["-", "--", "-.", ":"]
REFERENCE_STYLES = {"zero-shot": ("#555555", "x", ":"), "joint": ("#000000", "+", "--")}


@dataclass(frozen=True)
class Style:
    colour: str
    marker: str
    linestyle: str

    def kwargs(self) -> dict[str, Any]:
        return {"color": self.colour, "marker": self.marker, "linestyle": self.linestyle}


def model_styles(names: Sequence[str]) -> dict[str, Style]:
    """A style per model name: zero-shot and joint grey/black with their own markers; the others in order,
    colour i mod 10 and marker (i + i // 10) mod 10, so any two of up to 100 differ in one and mostly both."""
    styles: dict[str, Style] = {}
    i = 0
    for name in names:
        if name in REFERENCE_STYLES:
            styles[name] = Style(*REFERENCE_STYLES[name])
            continue
        styles[name] = Style(COLOURS[i % 10], MARKERS[(i + i // 10) % 10], LINESTYLES[(i // 10) % 4] if i >= 10 else "-")
        i += 1
    return styles


def is_task_aware(results: dict[str, Any]) -> bool:
    return str(results.get("headline", "")).startswith("task-aware")


def matrix_of(model: dict[str, Any], results: dict[str, Any]) -> np.ndarray:
    """The accuracy matrix the model's metrics are computed from (task-aware rows in task-aware settings)."""
    key = "task_aware" if is_task_aware(results) and "task_aware" in model else "rows"
    return np.asarray(model[key], dtype=float)


def seen_curve(model: dict[str, Any], results: dict[str, Any]) -> list[float]:
    """Accuracy over the tasks seen so far after each task t = 1..T, sample-weighted with the test sizes.

    A model evaluated once (zero-shot, joint) has one row: the same row gives every step's value."""
    acc = matrix_of(model, results)
    sizes = np.asarray(results["test_sizes"], dtype=float)
    n = len(sizes)
    rows = acc if acc.shape[0] == n else np.repeat(acc[-1:], n, axis=0)
    return [float((rows[i, : i + 1] * sizes[: i + 1]).sum() / sizes[: i + 1].sum()) for i in range(n)]


@dataclass
class Curve:
    name: str
    label: str
    values: list[float]
    band: list[float] | None = None  # ± this around values (e.g. the std over seeds)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    plt = _pyplot()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _task_axis(ax, n_tasks: int, margin: float = 0.3) -> None:
    """Integer task ticks 1..n on the x axis."""
    ax.set_xticks(list(range(1, n_tasks + 1)))
    ax.set_xlim(1 - margin, n_tasks + margin)


def _outside_legend(ax) -> None:
    """The legend right of the plot, where it hides no line."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _cell_text_colour(image, value: float) -> str:
    """White on dark cells, black on light ones (by the colour map's luminance at ``value``)."""
    r, g, b, _ = image.cmap(image.norm(value))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def draw_accuracy(curves: Sequence[Curve], n_tasks: int, title: str, path: str | Path, ylabel: str | None = None) -> None:
    """Accuracy on the seen tasks after each task, one line per model (a shaded band where given)."""
    plt = _pyplot()
    styles = model_styles([c.name for c in curves])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = np.arange(1, n_tasks + 1)
    for c in curves:
        style = styles[c.name]
        ax.plot(x, c.values, label=c.label, markersize=5, linewidth=1.6, **style.kwargs())
        if c.band is not None:
            lo = np.asarray(c.values) - np.asarray(c.band)
            hi = np.asarray(c.values) + np.asarray(c.band)
            ax.fill_between(x, lo, hi, color=style.colour, alpha=0.15, linewidth=0)
    _task_axis(ax, n_tasks)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel(ylabel or "accuracy on seen tasks (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _outside_legend(ax)
    _save(fig, path)


def accuracy_curves(results: dict[str, Any]) -> list[Curve]:
    return [Curve(name, label_of(name, m, results), seen_curve(m, results)) for name, m in results["models"].items()]


def draw_heatmaps(matrices: Sequence[tuple[str, np.ndarray]], path: str | Path, title: str = "") -> None:
    """Each model's accuracy matrix A[t, j] (row: after task t, column: test set of task j), one colour scale."""
    plt = _pyplot()
    n = len(matrices)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    size = matrices[0][1].shape[1] if matrices else 1
    cell = 3.2 if size <= 10 else 4.2
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 0.8, cell * rows + 0.3), squeeze=False)
    image = None
    for ax, (label, acc) in zip(axes.flat, matrices):
        image = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis", aspect="equal")
        ax.set_title(label, fontsize=8)
        t, k = acc.shape
        ax.set_xticks(range(k), [str(j + 1) for j in range(k)], fontsize=6)
        ax.set_yticks(range(t), [str(i + 1) for i in range(t)], fontsize=6)
        ax.set_xlabel("test set of task", fontsize=7)
        ax.set_ylabel("after task", fontsize=7)
        if k <= 10:
            for i in range(t):
                for j in range(k):
                    ax.text(j, i, f"{acc[i, j]:.0f}", ha="center", va="center", fontsize=5.5,
                            color=_cell_text_colour(image, acc[i, j]))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="accuracy (%)")
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def draw_forgetting(series: Sequence[tuple[str, str, list[float]]], path: str | Path, title: str = "") -> None:
    """Forgetting of each task j < T (best earlier accuracy minus the final one), grouped bars per model."""
    plt = _pyplot()
    styles = model_styles([name for name, _, _ in series])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    n = len(series)
    width = 0.8 / max(n, 1)
    hatches = ["", "//", "..", "xx", "\\\\", "oo", "--", "++", "**", "||"]
    for i, (name, label, values) in enumerate(series):
        x = np.arange(1, len(values) + 1) + (i - (n - 1) / 2) * width
        ax.bar(x, values, width=width, color=styles[name].colour, hatch=hatches[i % len(hatches)],
               edgecolor="white", linewidth=0.3, label=label)
    k = max((len(v) for _, _, v in series), default=1)
    _task_axis(ax, k, margin=0.5)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("task")
    ax.set_ylabel("forgetting (accuracy points)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    _outside_legend(ax)
    _save(fig, path)


def draw_lambda_sweep(series: Sequence[tuple[str, str, list[float], list[float], float | None]], path: str | Path, title: str = "") -> None:
    """Final accuracy of a merge against its scaling coefficient λ; the run's own λ circled."""
    plt = _pyplot()
    styles = model_styles([name for name, *_ in series])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label, lambdas, accs, default in series:
        ax.plot(lambdas, accs, label=label, markersize=5, **styles[name].kwargs())
        if default is not None and default in lambdas:
            y = accs[lambdas.index(default)]
            ax.plot([default], [y], marker="o", markersize=12, fillstyle="none", color=styles[name].colour, linestyle="")
    ax.set_xlabel("λ (scaling coefficient)")
    ax.set_ylabel("final accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    _outside_legend(ax)
    _save(fig, path)


def draw_selection(share: list[float], layer_share: dict[str, list[float]], path: str | Path, title: str = "") -> None:
    """MagMax's selection: the share of parameters taken from each task, overall (bars) and per layer (heatmap)."""
    plt = _pyplot()
    n = len(share)
    layers = list(layer_share)
    height = max(3.5, 0.18 * len(layers) + 1.2)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, height), gridspec_kw={"width_ratios": [1, 1.4]})
    ax1.bar(np.arange(1, n + 1), [100 * s for s in share], color=COLOURS[0])
    _task_axis(ax1, n)
    ax1.set_xlabel("task")
    ax1.set_ylabel("parameters selected (%)")
    ax1.set_title("all parameters (ties left out)", fontsize=9)
    ax1.grid(alpha=0.3, axis="y")
    grid = np.asarray([layer_share[name] for name in layers], dtype=float) * 100
    image = ax2.imshow(grid, aspect="auto", cmap="magma", vmin=0)
    ax2.set_xticks(range(n), [str(t + 1) for t in range(n)], fontsize=7)
    ax2.set_yticks(range(len(layers)), layers, fontsize=5 if len(layers) > 30 else 7)
    ax2.set_xlabel("task")
    ax2.set_title("per layer", fontsize=9)
    fig.colorbar(image, ax=ax2, label="selected (%)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def draw_task_matrix(matrix: list[list[float]], path: str | Path, title: str, label: str, vmin: float, vmax: float, cmap: str) -> None:
    """A task × task matrix (cosine similarity, sign conflicts), values written in the cells up to 12 tasks."""
    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    n = m.shape[0]
    fig, ax = plt.subplots(figsize=(4.8, 4))
    image = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(n), [str(t + 1) for t in range(n)], fontsize=7)
    ax.set_yticks(range(n), [str(t + 1) for t in range(n)], fontsize=7)
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color=_cell_text_colour(image, m[i, j]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    _save(fig, path)


def draw_norms(norms: list[float], path: str | Path, title: str = "") -> None:
    plt = _pyplot()
    n = len(norms)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(np.arange(1, n + 1), norms, marker="o", color=COLOURS[0])
    _task_axis(ax, n)
    ax.set_xlabel("task")
    ax.set_ylabel("‖τ_t‖₂")
    ax.set_ylim(bottom=0)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
