"""Every paper preset validates and prints its plan on a machine without the data (no download)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from magmax.config import load_config
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
    assert {m.method for m in cfg.merges} >= {"magmax", "average", "random", "ties"}
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
