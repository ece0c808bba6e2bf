"""Statistics over seeds: the mean, the sample standard deviation and a Student-t interval.

For values x_1..x_n (one per seed)::

    mean = Σ x_i / n,   std = sqrt(Σ (x_i − mean)² / (n − 1))   (ddof = 1)
    interval = mean ± t_{(1+c)/2, n−1} · std / sqrt(n)            (c: the confidence, 0.95)

Paired differences take, seed by seed, a model's value minus the reference model's (all models of one
seed share its tasks, class order and test set), and summarise those differences the same way. With
one seed there is no standard deviation and no interval: those fields are ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from magmax.labels import label_of

METRICS = ("final_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer")
NO_INTERVAL = "one seed: no interval"


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t quantile t_{(1+confidence)/2, dof}."""
    from scipy import stats as scipy_stats  # imported here: scipy.stats takes a while to load

    return float(scipy_stats.t.ppf((1 + confidence) / 2, dof))


def summarize_values(values: Sequence[float | None], confidence: float = 0.95) -> dict[str, Any]:
    """mean, std (ddof=1), ci_low, ci_high, n and the values; ``None`` values (a metric the model lacks)
    are left out of n, and every statistic is ``None`` when fewer than two values remain for it."""
    present = [float(v) for v in values if v is not None]
    n = len(present)
    out: dict[str, Any] = {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": n, "values": list(values)}
    if n == 0:
        return out
    mean = math.fsum(present) / n
    out["mean"] = mean
    if n >= 2:
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in present) / (n - 1))
        half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
        out.update(std=std, ci_low=mean - half, ci_high=mean + half)
    return out


def paired_differences(values: Sequence[float | None], reference: Sequence[float | None], confidence: float = 0.95) -> dict[str, Any]:
    """The per-seed differences ``values − reference`` summarised (``mean_diff`` in place of ``mean``)."""
    if len(values) != len(reference):
        raise ValueError(f"{len(values)} values against {len(reference)} reference values")
    diffs = [None if v is None or r is None else float(v) - float(r) for v, r in zip(values, reference)]
    out = summarize_values(diffs, confidence)
    return {"mean_diff": out.pop("mean"), **out}


def aggregate_results(
    seeds: Sequence[int],
    results: Mapping[int, Mapping[str, Any]],
    reference: str,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The aggregate over seeds of complete runs' results.json dicts (``results[seed]``), the shape of
    ``DIR/aggregate.json``: seeds, reference, confidence and per model its label, metrics and paired
    differences against ``reference``."""
    first = results[seeds[0]]
    names = [n for n in first["models"] if all(n in results[s]["models"] for s in seeds)]
    if reference not in names:
        raise ValueError(f"reference model '{reference}' is not in the results; one of {names}")

    def series(name: str, metric: str) -> list[float | None]:
        return [results[s]["models"][name]["metrics"].get(metric) for s in seeds]

    models: dict[str, Any] = {}
    for name in names:
        models[name] = {
            "label": label_of(name, first["models"][name], first),
            "metrics": {m: summarize_values(series(name, m), confidence) for m in METRICS},
            "paired": {m: paired_differences(series(name, m), series(reference, m), confidence) for m in METRICS},
        }
    return {"seeds": list(seeds), "reference": reference, "confidence": confidence, "models": models}


def half_width(entry: Mapping[str, Any]) -> float | None:
    """Half the interval's width (``None`` without an interval)."""
    if entry.get("ci_low") is None or entry.get("ci_high") is None:
        return None
    return (entry["ci_high"] - entry["ci_low"]) / 2
