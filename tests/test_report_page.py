"""`magmax report`: the HTML page and its figures, from hand-written run directories (no training here)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import magmax.plots as plots_mod
from magmax.cli import main as cli_main
from magmax.metrics import forgetting, forgetting_per_task
from magmax.plots import model_styles, seen_curve
from magmax.report import plot_accuracy
from magmax.report_page import build_report

SIZES = [10, 30, 20]


def _model(kind: str, rows: list[list[float]], **extra) -> dict:
    from magmax.metrics import summarize

    acc = np.asarray(rows, dtype=float)
    metrics = summarize(acc, SIZES) if acc.shape[0] == len(SIZES) else {
        "final_accuracy": float((acc[-1] * SIZES).sum() / sum(SIZES)), "average_incremental_accuracy": None,
        "forgetting": None, "backward_transfer": None}
    return {"kind": kind, "rows": rows, "overall": [metrics["final_accuracy"]], "task_aware": rows, "metrics": metrics, **extra}


def results_of(shift: float = 0.0) -> dict:
    seq = [[90 + shift, 5, 0], [40, 85, 0], [20 + shift, 30, 80]]
    mm = [[88, 5, 0], [70 + shift, 75, 0], [60, 65, 70 + shift]]
    models = {
        "zero-shot": _model("zero-shot", [[50, 40, 30]]),
        "seq:finetune": _model("finetune", seq, stream="seq", protocol="Seq-FT", method=None, scale=None),
        "seq:magmax": _model("merge", mm, stream="seq", protocol="Seq-FT", method="magmax", scale=0.5,
                             lambda_sweep=[{"scale": lam, "final_accuracy": 50 + 20 * lam + shift} for lam in (0.3, 0.5, 1.0)]),
        "joint": _model("joint", [[85, 80, 75]]),
    }
    from magmax.report import model_label

    for name, m in models.items():
        m["label"] = model_label(name, m, 3)
    return {"name": "hand", "complete": True, "seconds": 1.0, "device": "cpu",
            "tasks": [{"index": i, "name": f"task {i + 1}"} for i in range(3)], "test_sizes": SIZES,
            "headline": "task-agnostic accuracy on the whole test set", "models": models}


def write_run(folder: Path, results: dict, checkpoints: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "status.json").write_text(json.dumps({"status": "complete"}))
    (folder / "provenance.json").write_text(json.dumps({"seed": 3, "git": {"commit": "abc", "dirty": False}}))
    if checkpoints:
        ck = folder / "checkpoints"
        ck.mkdir()
        gen = torch.Generator().manual_seed(0)
        theta0 = {"enc.layers.0.w": torch.randn(6, 4, generator=gen), "enc.layers.1.w": torch.randn(5, generator=gen),
                  "proj.weight": torch.randn(3, 3, generator=gen), "steps": torch.tensor([1])}
        save_file(theta0, str(ck / "theta0.safetensors"))
        for t in range(1, 4):
            save_file({k: v + 0.1 * t * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                       for k, v in theta0.items()}, str(ck / f"seq-task{t}.safetensors"))
    return folder


AGGREGATE = {
    "seeds": [3, 4],
    "reference": "seq:finetune",
    "confidence": 0.95,
    "models": {
        "seq:finetune": {"label": "Seq-FT final (θ_3)", "metrics": {
            "final_accuracy": {"mean": 41.5, "std": 1.0, "ci_low": 32.5, "ci_high": 50.5, "n": 2, "values": [41, 42]},
            "average_incremental_accuracy": {"mean": 60.0, "std": 0.0, "ci_low": None, "ci_high": None, "n": 2, "values": [60, 60]},
            "forgetting": {"mean": 50.0, "std": 1.0, "ci_low": 45.0, "ci_high": 59.0, "n": 2, "values": [49, 51]},
            "backward_transfer": {"mean": -50.0, "std": 1.0, "ci_low": -59.0, "ci_high": -41.0, "n": 2, "values": [-51, -49]}},
            "paired": {}},
        "seq:magmax": {"label": "MagMax on Seq-FT τ", "metrics": {
            "final_accuracy": {"mean": 66.25, "std": 0.5, "ci_low": 61.75, "ci_high": 70.75, "n": 2, "values": [66, 66.5]},
            "average_incremental_accuracy": {"mean": 70.0, "std": 0.0, "ci_low": 70.0, "ci_high": 70.0, "n": 2, "values": [70, 70]},
            "forgetting": {"mean": 10.0, "std": 0.0, "ci_low": 10.0, "ci_high": 10.0, "n": 2, "values": [10, 10]},
            "backward_transfer": {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": 0, "values": []}},
            "paired": {"final_accuracy": {"mean_diff": 24.75, "std": 0.5, "ci_low": 20.25, "ci_high": 29.25, "n": 2, "values": [25, 24.5]}}},
    },
}


@pytest.fixture
def single_run(tmp_path) -> Path:
    return write_run(tmp_path / "run", results_of())


@pytest.fixture
def multi_run(tmp_path) -> Path:
    root = tmp_path / "multi"
    write_run(root / "seed-3", results_of(0.0))
    write_run(root / "seed-4", results_of(2.0), checkpoints=False)
    (root / "aggregate.json").write_text(json.dumps(AGGREGATE))
    return root


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_single_run_page_is_self_contained_and_embeds_every_png(single_run, tmp_path):
    page_path = build_report([single_run], tmp_path / "out")
    page = page_path.read_text()
    assert "One seed: no interval" in page
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == sorted(["accuracy.png", "matrices.png", "forgetting.png", "lambda-sweep.png", "seq-magmax-selection.png",
                           "seq-cosine.png", "seq-sign-conflicts.png", "seq-norms.png"])
    embedded = _images(page)
    assert sorted(embedded) == sorted((tmp_path / "out" / p).read_bytes() for p in pngs)
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") for b in embedded)
    # Nothing to fetch: no src/href other than the embedded data.
    assert not re.search(r'(src|href)="(?!data:)', page)
    # The table: the run's numbers, 2 decimals, labels escaped.
    mm = results_of()["models"]["seq:magmax"]["metrics"]
    assert f"<td class=\"num\">{mm['final_accuracy']:.2f}</td>" in page
    assert "MagMax on Seq-FT τ" in page and "zero-shot (θ0)" in page


def test_multi_seed_page_shows_intervals_and_paired_differences(multi_run, tmp_path):
    page = build_report([multi_run], tmp_path / "out").read_text()
    assert "one seed: no interval" not in page.lower()
    assert "Mean over 2 seeds (3, 4)" in page
    assert ">66.25 ± 4.50<" in page                 # mean ± half-width of the interval
    assert ">-50.00 ± 9.00<" in page
    assert ">50.00 [45.00, 59.00]<" in page          # an interval off the mean: its ends
    assert ">60.00<" in page                         # a mean without an interval is shown alone
    assert ">+24.75 ± 4.50<" in page                # paired difference against the reference
    paired = page.split("Paired differences")[1]
    assert "Seq-FT final (θ_3)" in paired.split("<tbody>")[0]  # named as the reference
    assert "<td>Seq-FT final (θ_3)</td>" not in paired        # and not a row of its own
    assert "(seed 3)" in page  # the analyses say which seed's checkpoints they read
    assert len(_images(page)) == 8


def test_multi_seed_curves_are_the_mean_over_seeds(multi_run, tmp_path, monkeypatch):
    drawn = {}
    real = plots_mod._save

    def keep(fig, path):
        drawn[Path(path).name] = [(ln.get_label(), list(ln.get_ydata())) for ln in fig.axes[0].get_lines()]
        real(fig, path)

    monkeypatch.setattr(plots_mod, "_save", keep)
    build_report([multi_run], tmp_path / "out")
    lines = dict(drawn["accuracy.png"])
    r0, r1 = results_of(0.0), results_of(2.0)
    for name in ("seq:magmax", "zero-shot"):
        expected = (np.asarray(seen_curve(r0["models"][name], r0)) + seen_curve(r1["models"][name], r1)) / 2
        assert np.allclose(lines[r0["models"][name]["label"]], expected)


def test_seen_curve_of_zero_shot_uses_its_row_with_test_sizes():
    r = results_of()
    a, b, c = r["models"]["zero-shot"]["rows"][0]
    expected = [a, (a * 10 + b * 30) / 40, (a * 10 + b * 30 + c * 20) / 60]
    assert seen_curve(r["models"]["zero-shot"], r) == pytest.approx(expected)
    seq = r["models"]["seq:finetune"]["rows"]
    assert seen_curve(r["models"]["seq:finetune"], r)[1] == pytest.approx((seq[1][0] * 10 + seq[1][1] * 30) / 40)


def test_run_accuracy_png_conventions(tmp_path, monkeypatch):
    """The run's accuracy.png: integer task ticks, every model its own colour AND marker, zero-shot a curve."""
    captured = []
    monkeypatch.setattr(plots_mod, "_save", lambda fig, path: captured.append(fig))
    r = results_of()
    plot_accuracy(r, tmp_path / "accuracy.png")
    (fig,) = captured
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [1, 2, 3]
    lines = [ln for ln in ax.get_lines() if ln.get_label() in {m["label"] for m in r["models"].values()}]
    assert len(lines) == 4
    assert len({ln.get_color() for ln in lines}) == 4 and len({ln.get_marker() for ln in lines}) == 4
    zs = next(ln for ln in lines if ln.get_label() == "zero-shot (θ0)")
    assert list(zs.get_ydata()) == pytest.approx(seen_curve(r["models"]["zero-shot"], r))


def test_model_styles_differ_in_colour_and_marker():
    names = ["zero-shot", "joint"] + [f"s:m{i}" for i in range(10)]
    styles = model_styles(names)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    assert all(styles[a].colour != styles[b].colour and styles[a].marker != styles[b].marker for a, b in pairs)
    many = model_styles([f"s:m{i}" for i in range(40)])
    assert len({(s.colour, s.marker, s.linestyle) for s in many.values()}) == 40


def test_forgetting_per_task_against_hand_values():
    acc = np.array([[90.0, 0, 0], [40, 85, 0], [20, 30, 80]])
    assert forgetting_per_task(acc) == [70.0, 55.0]
    assert np.mean(forgetting_per_task(acc)) == forgetting(acc)
    assert forgetting_per_task(acc[:1]) == []


def test_cli_default_out_and_errors(single_run, tmp_path, capsys):
    assert cli_main(["report", str(single_run)]) == 0
    assert (single_run / "report" / "report.html").is_file()
    # A run still running: one line, exit 2, nothing written.
    running = tmp_path / "running"
    running.mkdir()
    (running / "status.json").write_text(json.dumps({"status": "running"}))
    capsys.readouterr()
    assert cli_main(["report", str(running), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "has no results.json (its status is 'running')" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o1").exists()
    # A good run before a bad one: still nothing written.
    assert cli_main(["report", str(single_run), str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "is not a folder" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    assert cli_main(["report", str(single_run), str(single_run)]) == 2
    assert "pass --out DIR" in capsys.readouterr().err


def test_multi_seed_dir_missing_a_seed(multi_run, tmp_path, capsys):
    shutil.rmtree(multi_run / "seed-4")
    assert cli_main(["report", str(multi_run), "--out", str(tmp_path / "o")]) == 2
    assert "names seed 4 but" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_without_theta0_the_page_says_so(tmp_path):
    run = write_run(tmp_path / "run", results_of())
    (run / "checkpoints" / "theta0.safetensors").unlink()
    page = build_report([run], tmp_path / "out").read_text()
    assert "has no theta0.safetensors" in page
    assert not (tmp_path / "out" / "seq-cosine.png").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_renders_in_headless_chromium(single_run, multi_run, tmp_path):
    """Every <img> decodes in a real browser (naturalWidth > 0) and the console shows no error."""
    page = build_report([single_run, multi_run], tmp_path / "out").read_text()
    n_images = page.count("<img ")
    assert n_images == 16
    probe = ("<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
             "document.title = 'loaded ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length + ' of ' + imgs.length; });"
             "</script>")
    test_copy = tmp_path / "probe.html"
    test_copy.write_text(page.replace("</body>", probe + "</body>"))
    profile = tmp_path / "profile"
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", test_copy.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", out.stdout).group(1)
    assert title == f"loaded {n_images} of {n_images}"
    console = [ln for ln in out.stderr.splitlines() if "CONSOLE" in ln]
    assert console == [], console
