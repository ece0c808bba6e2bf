"""What a newcomer sees: hints that name real files, output that fits a pipe, the run's ETA, labels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from magmax.cli import main as cli_main
from magmax.merging import registry
from magmax.progress import RunClock, format_duration

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "magmax"


def test_every_configs_path_named_in_the_sources_exists():
    named = set()
    for py in SRC.rglob("*.py"):
        named |= {m.rstrip(".,;:)`'\"") for m in re.findall(r"configs/[\w./-]*", py.read_text())}
    assert "configs/paper/cifar100-10.yaml" in named
    missing = [p for p in sorted(named) if not (REPO / p).exists()]
    assert not missing, missing


def test_missing_config_hint_names_files_that_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli_main(["run", str(tmp_path / "nope.yaml")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "nope.yaml' not found" in err
    named = [p for p in re.findall(r"[\w./-]+\.yaml", err) if not p.endswith("nope.yaml")]
    assert len(named) == 2, err  # the repository preset and the packaged demo
    for p in named:
        assert Path(p).is_file(), p


def test_list_methods_fits_a_pipe(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert cli_main(["list-methods"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    for name, cls in registry().items():
        assert any(line.startswith(f"{name}  (default λ") for line in lines), name
        assert cls.reference.split(",")[0] in out
    # A wide $COLUMNS gets the table, no wider than asked.
    monkeypatch.setenv("COLUMNS", "220")
    assert cli_main(["list-methods"]) == 0
    wide = capsys.readouterr().out.splitlines()
    assert any(line.startswith("┃ method") for line in wide) and max(len(line) for line in wide) <= 220


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_run_eta_from_the_pace_of_steps_and_evaluations():
    clock = FakeClock()
    run = RunClock(total_steps=10, total_evals=4, clock=clock)
    assert run.eta() is None  # nothing measured yet
    clock.now += 5  # zero-shot evaluation: 5 s
    run.evaluated()
    assert run.eta() is None  # no step measured yet, 10 to go
    run.start_training()
    for _ in range(4):
        clock.now += 2  # 2 s a step
        run.step()
    run.end_training()
    # 6 steps × 2 s + 3 evaluations × (5 s of non-training time / 1 evaluation)
    assert run.eta() == pytest.approx(6 * 2 + 3 * 5)
    clock.now += 1  # an evaluation of 1 s: non-training time 6 s over 2 evaluations
    run.evaluated()
    assert run.eta() == pytest.approx(6 * 2 + 2 * 3)
    assert run.summary() == "elapsed 14s, ETA run 18s"
    assert [format_duration(s) for s in (None, 0.4, 59, 61, 3600 + 125)] == ["?", "0s", "59s", "1m01s", "1h02m"]


def test_results_files_table_and_plot_share_labels_and_round(tmp_path, monkeypatch):
    import matplotlib.figure
    from rich.console import Console

    from magmax.report import SINGLE_SEED_NOTE, results_table, write_results

    row = [42.30000078678131, 57.123456]
    results = {
        "name": "t",
        "tasks": [{"index": 0}, {"index": 1}],
        "test_sizes": [10, 10],
        "models": {
            "zero-shot": {"kind": "zero-shot", "rows": [row], "overall": [49.7],
                          "metrics": {"final_accuracy": 42.30000078678131, "average_incremental_accuracy": None,
                                      "forgetting": None, "backward_transfer": None}},
            "s:finetune": {"kind": "finetune", "stream": "s", "protocol": "Seq-FT", "method": None, "scale": None,
                           "rows": [row, row], "overall": [1.0, 2.0],
                           "metrics": {"final_accuracy": 12.345, "average_incremental_accuracy": 1.0,
                                       "forgetting": 0.0, "backward_transfer": 0.0}},
            "s:mm": {"kind": "merge", "stream": "s", "protocol": "Seq-FT", "method": "magmax", "scale": 0.5,
                     "rows": [row, row], "overall": [1.0, 2.0],
                     "metrics": {"final_accuracy": 1.0, "average_incremental_accuracy": 1.0,
                                 "forgetting": 0.0, "backward_transfer": 0.0}},
        },
    }
    expected = ["zero-shot (θ0)", "Seq-FT final (θ_2)", "mm on Seq-FT τ"]  # a merge's own label wins
    legends = []
    real_savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        legends.extend(t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts())
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    write_results(tmp_path, results)
    assert legends == expected
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert [line.split(",")[1] for line in csv_lines[1:]] == expected
    assert csv_lines[1].split(",")[4:6] == ["", "42.30"] and csv_lines[1].endswith(",42.30,57.12")
    assert csv_lines[2].split(",")[5] == "12.35"
    md_lines = (tmp_path / "results.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in md_lines[2:] if line.startswith("|")] == expected
    assert md_lines[-2:] == ["", SINGLE_SEED_NOTE]
    import json

    assert json.loads((tmp_path / "results.json").read_text())["models"]["zero-shot"]["rows"][0][0] == 42.30000078678131
    console = Console(width=60, record=True)
    console.print(results_table(results))
    text = console.export_text()
    assert all(label.split()[0] in text for label in expected) and max(map(len, text.splitlines())) <= 60
    assert "12.35" in text and "42.30" in text


def test_long_progress_lines_wrap_with_an_indent_and_keep_the_eta_whole():
    from magmax.console import wrap_line

    line = "  eval MagMax on Seq-FT τ: all 49.30 | per task " + " ".join(["55.0"] * 20) + " | elapsed 3m07s, ETA run 14m05s"
    pieces = wrap_line(line, 60)
    assert max(map(len, pieces)) <= 60 and len(pieces) > 1
    assert pieces[0].startswith("  eval MagMax") and all(p.startswith(" " * 10) for p in pieces[1:])
    assert pieces[-1].strip() == "elapsed 3m07s, ETA run 14m05s"  # the timing is never split
    assert " ".join(p.strip() for p in pieces) == line.strip()  # nothing lost, nothing added
    assert wrap_line("short | line", 80) == ["short | line"]


def test_results_table_fits_80_columns_and_a_narrow_console_gets_lines():
    from rich.console import Console

    from magmax.report import RESULTS_TABLE_MIN_WIDTH, results_lines, results_table

    metrics = {"final_accuracy": 33.333, "average_incremental_accuracy": 61.111, "forgetting": -0.5, "backward_transfer": -37.5}
    models = {
        f"seq:{m}": {"kind": "merge", "stream": "seq", "protocol": "Seq-FT", "method": m, "scale": 0.55,
                     "rows": [[1.0]], "metrics": metrics}
        for m in ("average", "magmax", "ties")
    }
    results = {"name": "t", "tasks": [{}], "models": models}
    console = Console(width=80, record=True)
    console.print(results_table(results))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    assert "│ Average on Seq-FT τ │ 0.55 │ 33.33 │      61.11 │      -0.50 │ -37.50 │" in text
    assert RESULTS_TABLE_MIN_WIDTH <= 80
    assert results_lines(results)[1] == "Average on Seq-FT τ (λ 0.55): final 33.33, avg. incr. 61.11, forgetting -0.50, BWT -37.50"
