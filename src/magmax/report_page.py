"""`magmax report`: one self-contained HTML page (figures embedded as base64 PNG, no external resource)
and the PNGs, for one or more run directories.

Per run directory, a section with:

* the final-accuracy table: for a single run its metrics ("one seed: no interval"); for a multi-seed
  directory (``DIR/seed-<s>/`` runs and ``DIR/aggregate.json``) the mean with its interval and the
  paired differences against the reference model;
* the accuracy on the seen tasks after each task (mean ± std over seeds for a multi-seed directory);
* every model's accuracy matrix as a heatmap and the forgetting of each task;
* the λ sweep of merges that have one (``lambdas`` in the config's merge entries);
* with ``save_checkpoints: true`` (θ0 and θ_t in ``checkpoints/``), per stream: MagMax's selection
  replayed (share of parameters from each task, overall and per layer), sign conflicts, ‖τ_t‖ and the
  cosine similarity of the task vectors (:mod:`magmax.analysis`).

Every input is read and checked before anything is written; the figures are drawn into a temporary
folder and moved to ``--out`` at the end.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from magmax.errors import ConfigError
from magmax.metrics import forgetting_per_task
from magmax.plots import (
    Curve,
    draw_accuracy,
    draw_forgetting,
    draw_heatmaps,
    draw_lambda_sweep,
    draw_norms,
    draw_selection,
    draw_task_matrix,
    is_task_aware,
    matrix_of,
    seen_curve,
)
from magmax.report import DECIMALS, label_of

METRICS = (
    ("final_accuracy", "final acc."),
    ("average_incremental_accuracy", "avg. incr. acc."),
    ("forgetting", "forgetting"),
    ("backward_transfer", "BWT"),
)


@dataclass
class RunSource:
    """A run directory as read: one run, or the seed runs of a multi-seed directory with their aggregate."""

    path: Path
    results: dict[str, Any]  # the run's results.json; for a multi-seed directory, the first seed's
    seeds: list[tuple[int, Path, dict[str, Any]]] = field(default_factory=list)
    aggregate: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None

    @property
    def multi_seed(self) -> bool:
        return self.aggregate is not None

    @property
    def runs(self) -> list[tuple[int | None, Path, dict[str, Any]]]:
        return list(self.seeds) if self.multi_seed else [(None, self.path, self.results)]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
        raise ConfigError(f"cannot read {what} '{path}' ({reason}); rerun the run or pass another RUN_DIR") from None


def _read_results(folder: Path) -> dict[str, Any]:
    f = folder / "results.json"
    if not f.is_file():
        status = folder / "status.json"
        state = _read_json(status, "status file").get("status") if status.is_file() else None
        why = f"its status is '{state}'" if state else "no status.json either"
        raise ConfigError(f"'{folder}' has no results.json ({why}); `magmax report` reads complete runs (status: complete)")
    results = _read_json(f, "results file")
    if not isinstance(results, dict) or "models" not in results or "test_sizes" not in results:
        raise ConfigError(f"'{f}' is not a results.json of `magmax run` (no models/test_sizes); pass a run directory")
    return results


def load_run(path: str | Path) -> RunSource:
    """Read a run directory (single or multi-seed); every problem is one ConfigError line."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"RUN_DIR '{path}' is not a folder; pass a run directory written by `magmax run`")
    agg_file = path / "aggregate.json"
    if agg_file.is_file():
        aggregate = _read_json(agg_file, "aggregate")
        if not isinstance(aggregate, dict) or not aggregate.get("seeds") or "models" not in aggregate:
            raise ConfigError(f"'{agg_file}' has no seeds or models; rerun the multi-seed run to write it again")
        seeds = []
        for seed in aggregate["seeds"]:
            sub = path / f"seed-{seed}"
            if not sub.is_dir():
                raise ConfigError(f"'{agg_file}' names seed {seed} but '{sub}' is missing; restore it or rerun that seed")
            seeds.append((int(seed), sub, _read_results(sub)))
        prov = seeds[0][1] / "provenance.json"
        return RunSource(path, seeds[0][2], seeds, aggregate, _read_json(prov, "provenance") if prov.is_file() else None)
    results = _read_results(path)
    prov = path / "provenance.json"
    return RunSource(path, results, provenance=_read_json(prov, "provenance") if prov.is_file() else None)


# -- numbers ------------------------------------------------------------------------------------------


def _f(value: Any, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{DECIMALS}f}" if signed else f"{value:.{DECIMALS}f}"


def _interval(entry: dict[str, Any] | None, key: str = "mean", signed: bool = False) -> str:
    """``mean ± half-width`` for an interval centred on the mean, ``mean [low, high]`` for another one, the
    mean alone where there is no interval."""
    if not entry or entry.get(key) is None:
        return "–"
    mean, low, high = entry[key], entry.get("ci_low"), entry.get("ci_high")
    if low is None or high is None:
        return _f(mean, signed)
    half = (high - low) / 2
    if abs((low + high) / 2 - mean) <= 1e-9 * max(1.0, abs(mean)):
        return f"{_f(mean, signed)} ± {_f(half)}"
    return f"{_f(mean, signed)} [{_f(low, signed)}, {_f(high, signed)}]"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "run"


# -- the page ------------------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.6em; } table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; } .note { color: #555; font-size: .9em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; font-size: .9em; }
dl.meta dt { color: #555; } dl.meta dd { margin: 0; }
"""


class Page:
    """The page's HTML and its figures; figures are drawn into ``tmp`` and embedded as base64."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.parts: list[str] = []
        self.figures: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def text(self, tag: str, text: str, cls: str = "") -> None:
        attr = f' class="{cls}"' if cls else ""
        self.add(f"<{tag}{attr}>{html.escape(text)}</{tag}>")

    def figure(self, name: str, caption: str) -> None:
        """Embed the PNG ``tmp/name`` (just drawn) with its caption."""
        data = base64.b64encode((self.tmp / name).read_bytes()).decode("ascii")
        self.figures.append(name)
        self.add(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption, quote=True)}">'
            f"<figcaption>{html.escape(name)}: {html.escape(caption)}</figcaption></figure>"
        )

    def table(self, header: list[str], rows: list[list[str]], numeric_from: int = 1) -> None:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        num = ' class="num"'
        body = "".join(
            "<tr>" + "".join(f"<td{num if i >= numeric_from else ''}>{html.escape(c)}</td>" for i, c in enumerate(r)) + "</tr>"
            for r in rows
        )
        self.add(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def html(self, title: str) -> str:
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(self.parts)
            + "\n</body></html>\n"
        )


def _meta(page: Page, src: RunSource) -> None:
    r = src.results
    prov = src.provenance or {}
    tasks = r.get("tasks", [])
    items = [
        ("run directory", str(src.path)),
        ("tasks", f"{len(r['test_sizes'])}" + (": " + ", ".join(str(t.get("name", t.get("index"))) for t in tasks) if tasks and len(tasks) <= 20 else "")),
        ("accuracy", r.get("headline", "task-agnostic accuracy on the whole test set")),
        ("seeds", ", ".join(str(s) for s, _, _ in src.seeds) if src.multi_seed else str(prov.get("seed", "–"))),
        ("device", str(r.get("device", "–")) + (f" ({prov['cuda']})" if prov.get("cuda") else "")),
        ("backbone", json.dumps(prov["backbone"]) if prov.get("backbone") else "–"),
        ("magmax commit", str((prov.get("git") or {}).get("commit") or "–") + (" (uncommitted changes)" if (prov.get("git") or {}).get("dirty") else "")),
    ]
    page.add('<dl class="meta">' + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items) + "</dl>")


def _tables(page: Page, src: RunSource) -> None:
    r = src.results
    page.text("h3", "Final accuracy")
    if not src.multi_seed:
        page.text("p", "One seed: no interval. Accuracies in %.", "note")
        rows = []
        for name, m in r["models"].items():
            scale = m.get("scale")
            rows.append([label_of(name, m, r), "–" if scale is None else f"{scale:g}",
                         *(_f(m["metrics"].get(k)) for k, _ in METRICS)])
        page.table(["model", "λ", *(h for _, h in METRICS)], rows)
        return
    agg = src.aggregate or {}
    conf = agg.get("confidence", 0.95)
    n = len(agg.get("seeds", []))
    page.text("p", f"Mean over {n} seeds ({', '.join(str(s) for s in agg.get('seeds', []))}) ± the half-width of "
              f"its {conf:.0%} confidence interval ([low, high] where the interval is not centred on the mean); "
              "accuracies in %.", "note")
    rows = []
    for name, m in agg["models"].items():
        rows.append([m.get("label", name), *(_interval(m["metrics"].get(k)) for k, _ in METRICS)])
    page.table(["model", *(h for _, h in METRICS)], rows)
    ref = agg.get("reference")
    ref_label = agg["models"].get(ref, {}).get("label", ref)
    page.text("h3", "Paired differences")
    page.text("p", f"Per seed, the model's metric minus that of the reference, {ref_label}, on the same seed; "
              f"mean over seeds with its {conf:.0%} confidence interval. An interval that excludes 0 is a "
              "difference the seeds support.", "note")
    rows = []
    for name, m in agg["models"].items():
        if name == ref:
            continue
        rows.append([m.get("label", name), *(_interval((m.get("paired") or {}).get(k), "mean_diff", True) for k, _ in METRICS)])
    page.table(["model", *(f"Δ {h}" for _, h in METRICS)], rows)


def _names(src: RunSource) -> list[str]:
    """Models present in every run of the source, in the first run's order."""
    return [n for n in src.results["models"] if all(n in res["models"] for _, _, res in src.runs)]


def _curves(page: Page, src: RunSource, prefix: str) -> None:
    r = src.results
    n_tasks = len(r["test_sizes"])
    curves = []
    for name in _names(src):
        values = np.asarray([seen_curve(res["models"][name], res) for _, _, res in src.runs])
        band = values.std(axis=0, ddof=1).tolist() if len(values) > 1 else None
        curves.append(Curve(name, label_of(name, r["models"][name], r), values.mean(axis=0).tolist(), band))
    fname = f"{prefix}accuracy.png"
    basis = "task-aware accuracy" if is_task_aware(r) else "accuracy"
    ylabel = f"{basis} on seen tasks (%)"
    draw_accuracy(curves, n_tasks, r["name"], page.tmp / fname, ylabel)
    page.text("h3", "Accuracy after each task")
    extra = f" Mean over {len(src.runs)} seeds, shaded ± one standard deviation." if src.multi_seed else ""
    page.figure(fname, f"{basis} on the tasks seen so far after learning each task (test-set weighted). "
                "Zero-shot (θ0) and joint are computed on the same basis from their single evaluation." + extra)


def _matrices(page: Page, src: RunSource, prefix: str) -> None:
    r = src.results
    n_tasks = len(r["test_sizes"])
    mats, forgets = [], []
    for name in _names(src):
        m = r["models"][name]
        stack = [matrix_of(res["models"][name], res) for _, _, res in src.runs]
        if stack[0].shape != (n_tasks, n_tasks):
            continue
        mats.append((label_of(name, m, r), np.mean(stack, axis=0)))
        if n_tasks > 1:
            forgets.append((name, label_of(name, m, r), np.mean([forgetting_per_task(a) for a in stack], axis=0).tolist()))
    if not mats:
        return
    page.text("h3", "Accuracy matrices")
    fname = f"{prefix}matrices.png"
    seeds = f" (mean over {len(src.runs)} seeds)" if src.multi_seed else ""
    draw_heatmaps(mats, page.tmp / fname)
    page.figure(fname, f"accuracy (%) on each task's test set (column) after learning each task (row){seeds}; "
                "entries right of the diagonal are tasks not yet learned.")
    if forgets:
        page.text("h3", "Forgetting per task")
        fname = f"{prefix}forgetting.png"
        draw_forgetting(forgets, page.tmp / fname)
        page.figure(fname, f"forgetting of task j: its best accuracy after tasks j..T−1 minus its final accuracy{seeds}; "
                    "the mean over j is the forgetting in the table.")


def _sweeps(page: Page, src: RunSource, prefix: str) -> None:
    r = src.results
    series = []
    for name in _names(src):
        if not all("lambda_sweep" in res["models"][name] for _, _, res in src.runs):
            continue
        sweep = r["models"][name]["lambda_sweep"]
        lambdas = [e["scale"] for e in sweep]
        accs = np.mean([[e["final_accuracy"] for e in res["models"][name]["lambda_sweep"]] for _, _, res in src.runs], axis=0)
        series.append((name, label_of(name, r["models"][name], r), lambdas, accs.tolist(), r["models"][name].get("scale")))
    if not series:
        return
    page.text("h3", "λ sweep")
    fname = f"{prefix}lambda-sweep.png"
    draw_lambda_sweep(series, page.tmp / fname, r["name"])
    seeds = f" (mean over {len(src.runs)} seeds)" if src.multi_seed else ""
    page.figure(fname, f"final accuracy of the merged model after the last task against λ{seeds}; circled: the λ of the run.")


def _streams(results: dict[str, Any]) -> dict[str, list[str]]:
    """stream → the methods merged on it."""
    out: dict[str, list[str]] = {}
    for m in results["models"].values():
        if m.get("stream"):
            methods = out.setdefault(m["stream"], [])
            if m.get("method"):
                methods.append(m["method"])
    return out


def _analyses(page: Page, src: RunSource, prefix: str) -> None:
    from magmax.analysis import analyse_checkpoints

    found = next(((seed, path, res) for seed, path, res in src.runs if (path / "checkpoints").is_dir()), None)
    page.text("h3", "Task vectors and merges")
    if found is None:
        page.text("p", "No checkpoints/ folder: run with save_checkpoints: true for the task-vector analyses.", "note")
        return
    seed, path, res = found
    ckpt = path / "checkpoints"
    theta0 = ckpt / "theta0.safetensors"
    if not theta0.is_file():
        page.text("p", f"{ckpt} has no theta0.safetensors (θ0), which task vectors need; rerun with "
                  "save_checkpoints: true to have it.", "note")
        return
    n_tasks = len(res["test_sizes"])
    where = f" (seed {seed})" if seed is not None else ""
    page.text("p", "τ_t = θ_t − θ0 from the saved checkpoints" + where + ". MagMax's selection is the rule replayed "
              "on them: per parameter the task of largest |τ_t|, ties to the later task. Sign conflicts: among "
              "the entries where both task vectors are non-zero, the fraction of opposite signs.", "note")
    for stream, methods in _streams(res).items():
        files = [ckpt / f"{stream}-task{t}.safetensors" for t in range(1, n_tasks + 1)]
        missing = [f.name for f in files if not f.is_file()]
        protocol = next((m.get("protocol") for m in res["models"].values() if m.get("stream") == stream), stream)
        page.text("h4", f"{protocol} (stream {stream})")
        if missing:
            page.text("p", f"{ckpt} lacks {missing[0]}: no analysis of this stream.", "note")
            continue
        stats = analyse_checkpoints(theta0, files)
        tag = f"{prefix}{_slug(stream)}-"
        if "magmax" in methods:
            fname = f"{tag}magmax-selection.png"
            draw_selection(stats["selection"]["share"], stats["selection"]["layer_share"], page.tmp / fname,
                           f"MagMax on {protocol} τ: which task each parameter comes from")
            tied = 100 * stats["selection"]["tied_share"]
            page.figure(fname, "share of the parameters MagMax takes from each task's vector, over all parameters "
                        f"and per layer, among those where one task alone has the largest |τ|. Left out: {tied:.1f}% "
                        "where tasks tie (no task moved them, or only weight decay did, alike in every task).")
        fname = f"{tag}cosine.png"
        draw_task_matrix(stats["cosine"], page.tmp / fname, f"{protocol}: cosine similarity of task vectors", "cosine", -1, 1, "RdBu_r")
        page.figure(fname, "cosine similarity τ_i·τ_j / (‖τ_i‖ ‖τ_j‖).")
        fname = f"{tag}sign-conflicts.png"
        draw_task_matrix(stats["sign_conflicts"]["pairwise"], page.tmp / fname, f"{protocol}: sign conflicts", "fraction", 0, 1, "Reds")
        page.figure(fname, "fraction of entries with opposite signs among those where both task vectors are non-zero; "
                    f"over all task vectors, {stats['sign_conflicts']['overall']:.1%} of the entries non-zero in two or "
                    "more disagree in sign.")
        fname = f"{tag}norms.png"
        draw_norms(stats["norms"], page.tmp / fname, f"{protocol}: ‖τ_t‖")
        page.figure(fname, "L2 norm of each task vector over all floating-point parameters.")
        rows = [[str(t + 1), f"{stats['norms'][t]:.4g}"] + ([f"{100 * stats['selection']['share'][t]:.1f}"] if "magmax" in methods else [])
                for t in range(n_tasks)]
        page.table(["task", "‖τ_t‖₂"] + (["MagMax selection (%)"] if "magmax" in methods else []), rows)


def build_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write ``out/report.html`` and its PNGs for ``run_dirs``; returns the page's path."""
    sources = [load_run(p) for p in run_dirs]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; pass a folder for the report")
    with tempfile.TemporaryDirectory(prefix="magmax-report-") as tmp:
        page = Page(Path(tmp))
        title = "magmax report: " + ", ".join(s.results.get("name", s.path.name) for s in sources)
        page.text("h1", title)
        page.text("p", f"Written {time.strftime('%Y-%m-%d %H:%M')} by `magmax report` from "
                  + ", ".join(str(s.path) for s in sources) + ".", "note")
        for i, src in enumerate(sources):
            prefix = "" if len(sources) == 1 else f"{i + 1}-{_slug(src.results.get('name', src.path.name))}-"
            kind = f"multi-seed, {len(src.seeds)} seeds" if src.multi_seed else "one seed"
            page.text("h2", f"{src.results.get('name', src.path.name)} ({kind})")
            _meta(page, src)
            _tables(page, src)
            _curves(page, src, prefix)
            _matrices(page, src, prefix)
            _sweeps(page, src, prefix)
            _analyses(page, src, prefix)
        text = page.html(title)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name in page.figures:
                shutil.copyfile(Path(tmp) / name, out / name)
            (out / "report.html.tmp").write_text(text, encoding="utf-8")
            (out / "report.html.tmp").replace(out / "report.html")
        except OSError as exc:
            raise ConfigError(f"cannot write the report to '{out}' ({exc.strerror}); choose a writable --out") from None
    return out / "report.html"
