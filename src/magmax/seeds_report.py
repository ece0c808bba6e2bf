"""The aggregate of a multi-seed run as files and tables: DIR/aggregate.json, results.md, results.csv and
the table printed at the end. Every number is the mean over seeds ± the half-width of its Student-t
interval (:mod:`magmax.stats`); with one seed, the mean alone and the words "one seed: no interval"."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from magmax.report import DECIMALS, write_csv
from magmax.rundir import write_json
from magmax.stats import METRICS, NO_INTERVAL, half_width

COLUMNS = {"final_accuracy": "final acc.", "average_incremental_accuracy": "avg. incr. acc.",
           "forgetting": "forgetting", "backward_transfer": "BWT"}


def fmt_mean(entry: Mapping[str, Any], key: str = "mean", signed: bool = False) -> str:
    """``12.34 ± 1.05`` (mean ± half-width), ``12.34`` without an interval, ``–`` without a value."""
    value = entry.get(key)
    if value is None:
        return "–"
    text = f"{value:+.{DECIMALS}f}" if signed else f"{value:.{DECIMALS}f}"
    half = half_width(entry)
    return text if half is None else f"{text} ± {half:.{DECIMALS}f}"


def fmt_diff(entry: Mapping[str, Any]) -> str:
    return fmt_mean(entry, "mean_diff", signed=True)


def seeds_line(aggregate: Mapping[str, Any]) -> str:
    """What the numbers are: the seeds, and the interval or its absence."""
    seeds = aggregate["seeds"]
    listed = ", ".join(str(s) for s in seeds)
    if len(seeds) < 2:
        return f"seed {listed}, {NO_INTERVAL}"
    level = f"{aggregate['confidence'] * 100:g}%"
    return f"mean over {len(seeds)} seeds ({listed}) ± half-width of the {level} Student-t interval"


def reference_label(aggregate: Mapping[str, Any]) -> str:
    ref = aggregate["reference"]
    return aggregate["models"][ref]["label"]


def markdown(aggregate: Mapping[str, Any], name: str, headline: str) -> str:
    header = "| model | " + " | ".join(COLUMNS.values()) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    lines = [f"# {name}: accuracy (%), {headline}", "", seeds_line(aggregate) + ".", "", header, rule]
    for m in aggregate["models"].values():
        lines.append(f"| {m['label']} | " + " | ".join(fmt_mean(m["metrics"][k]) for k in METRICS) + " |")
    lines += ["", f"Paired difference against {reference_label(aggregate)} (`{aggregate['reference']}`), "
              "model − reference seed by seed, mean ± half-width:", "", header, rule]
    for m in aggregate["models"].values():
        lines.append(f"| {m['label']} | " + " | ".join(fmt_diff(m["paired"][k]) for k in METRICS) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.{DECIMALS}f}" if isinstance(value, float) else value


def csv_rows(aggregate: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model: each metric's mean, std, interval and n, and its paired difference's mean and interval."""
    out = []
    for name, m in aggregate["models"].items():
        row: dict[str, Any] = {"model": name, "label": m["label"]}
        for k in METRICS:
            s, p = m["metrics"][k], m["paired"][k]
            row.update({f"{k}_mean": s["mean"], f"{k}_std": s["std"], f"{k}_ci_low": s["ci_low"],
                        f"{k}_ci_high": s["ci_high"], f"{k}_n": s["n"], f"{k}_diff": p["mean_diff"],
                        f"{k}_diff_ci_low": p["ci_low"], f"{k}_diff_ci_high": p["ci_high"]})
        out.append(row)
    return out


def write_aggregate(folder: str | Path, aggregate: Mapping[str, Any], name: str, headline: str) -> None:
    """DIR/aggregate.json (full precision), DIR/results.csv (2 decimals) and DIR/results.md."""
    folder = Path(folder)
    write_csv(folder / "results.csv", csv_rows(aggregate), lambda _, v: _cell(v))
    tmp = folder / "results.md.tmp"
    tmp.write_text(markdown(aggregate, name, headline) + "\n")
    os.replace(tmp, folder / "results.md")
    write_json(folder / "aggregate.json", aggregate)


AGGREGATE_TABLE_MIN_WIDTH = 100
"""Narrower than this, :func:`aggregate_lines` instead of the table."""


def aggregate_table(aggregate: Mapping[str, Any], name: str) -> Table:
    """The printed table: each metric as mean ± half-width, and the paired difference of the final accuracy."""
    table = Table(title=f"{name}: accuracy (%), {seeds_line(aggregate)}",
                  caption=f"Δ: final accuracy − {reference_label(aggregate)}'s, seed by seed")
    table.add_column("model", justify="left", overflow="fold")
    for col in ("final\nacc.", "avg. incr.\nacc.", "forgetting", "BWT", "Δ final\nacc."):
        table.add_column(col, justify="right", no_wrap=True)
    for m in aggregate["models"].values():
        table.add_row(escape(m["label"]), *(fmt_mean(m["metrics"][k]) for k in METRICS),
                      fmt_diff(m["paired"]["final_accuracy"]))
    return table


def aggregate_lines(aggregate: Mapping[str, Any], name: str) -> list[str]:
    lines = [f"{name}: accuracy (%), {seeds_line(aggregate)}"]
    for m in aggregate["models"].values():
        met = m["metrics"]
        lines.append(
            f"{m['label']}: final {fmt_mean(met['final_accuracy'])}, avg. incr. {fmt_mean(met['average_incremental_accuracy'])}, "
            f"forgetting {fmt_mean(met['forgetting'])}, BWT {fmt_mean(met['backward_transfer'])}; "
            f"Δ final vs {reference_label(aggregate)} {fmt_diff(m['paired']['final_accuracy'])}"
        )
    return lines
