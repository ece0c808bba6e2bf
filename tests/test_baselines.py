"""LwF, EWC and joint training: their defining behaviour on tiny models, and a tiny end-to-end run each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magmax.config import validate_config
from magmax.continual import ContinualRun
from magmax.training.baselines import ewc_penalty, lwf_distillation, tempered_softmax

from test_continual import image_root, raw_config  # noqa: F401  (module fixture and config builder)


def test_tempered_softmax_is_softmax_at_temperature():
    z = torch.randn(5, 7)
    torch.testing.assert_close(tempered_softmax(z, 2.0), F.softmax(z / 2.0, dim=1))


def test_lwf_gradient_vanishes_when_old_and_new_logits_agree():
    """KD(new, old) is minimised at new == old (up to the ε smoothing): LwF's loss is then plain CE."""
    old = torch.randn(6, 5) * 3
    new = old.clone().requires_grad_(True)
    kd = lwf_distillation(new, old, 2.0)
    kd.backward()
    assert new.grad.abs().max() < 1e-4
    target = tempered_softmax(old, 2.0)
    entropy = -(target * target.log()).sum(1).mean()
    assert float(kd.detach()) == pytest.approx(float(entropy), abs=1e-3)
    shifted = lwf_distillation(old + torch.randn(6, 5), old, 2.0)
    assert float(shifted) > float(kd.detach())


def test_lwf_matches_reference_formula():
    """The reference's cross_entropy(outputs, targets, exp=0.5): powered softmaxes, ε-smoothed outputs."""
    new, old = torch.randn(4, 3), torch.randn(4, 3)
    out = F.softmax(new, 1).pow(0.5)
    out = out / out.sum(1, keepdim=True)
    tar = F.softmax(old, 1).pow(0.5)
    tar = tar / tar.sum(1, keepdim=True)
    out = out + 1e-5 / 3
    out = out / out.sum(1, keepdim=True)
    expected = -(tar * out.log()).sum(1).mean()
    torch.testing.assert_close(lwf_distillation(new, old, 2.0), expected)


def test_ewc_penalty_zero_at_old_params_and_grows_with_fisher():
    layer = torch.nn.Linear(4, 3)
    old = {n: p.detach().clone() for n, p in layer.named_parameters()}
    fisher = {n: torch.rand_like(p) for n, p in layer.named_parameters()}
    assert float(ewc_penalty(layer, fisher, old).detach()) == 0.0
    with torch.no_grad():
        layer.weight.add_(0.1)
    small = float(ewc_penalty(layer, fisher, old).detach())
    big = float(ewc_penalty(layer, {n: 10 * f for n, f in fisher.items()}, old).detach())
    expected = float((fisher["weight"] * 0.01).sum() / 2)
    assert small == pytest.approx(expected, rel=1e-5)
    assert big == pytest.approx(10 * small, rel=1e-5)


@pytest.mark.parametrize("regularizer", ["lwf", "ewc"])
def test_baseline_streams_run_end_to_end(image_root, tmp_path, regularizer):  # noqa: F811
    cfg = raw_config(image_root, streams=[{"name": regularizer, "regularizer": regularizer, "merges": ["magmax"]}], merges=[{"method": "magmax"}],
                     keep_state=True)  # state/ is kept for the check below
    run = ContinualRun(validate_config(cfg), tmp_path / "run")
    results = run.run()
    rows = np.array(results["models"][f"{regularizer}:magmax"]["rows"])
    assert rows.shape == (3, 3)
    assert f"{regularizer}:finetune" in results["models"]
    if regularizer == "ewc":
        state = json.loads((tmp_path / "run" / "state" / f"stream-{regularizer}.json").read_text())
        assert state["regularizer"]["fisher"]  # the Fisher travels with the resume state


def test_ewc_fisher_is_combined_half_and_half(image_root, tmp_path, monkeypatch):  # noqa: F811
    import magmax.continual as continual_mod
    from magmax.training import baselines

    seen, made = [], []
    real_fisher = baselines.fisher_diagonal
    real_make = continual_mod.make_regularizer

    def fisher_spy(ctx, max_batches=None, targets="head"):
        f = real_fisher(ctx, max_batches, targets)
        seen.append({n: v.clone() for n, v in f.items()})
        return f

    def make_spy(stream):
        made.append(real_make(stream))
        return made[-1]

    monkeypatch.setattr(baselines, "fisher_diagonal", fisher_spy)
    monkeypatch.setattr(continual_mod, "make_regularizer", make_spy)
    cfg = validate_config(raw_config(image_root, streams=[{"name": "ewc", "regularizer": "ewc"}], merges=[{"method": "magmax"}]))
    ContinualRun(cfg, tmp_path / "run").run()
    assert len(seen) == 3
    # F starts at 0 and becomes ½F + ½F_new after every task.
    expected = {n: 0.5 * (0.5 * (0.5 * seen[0][n]) + 0.5 * seen[1][n]) + 0.5 * seen[2][n] for n in seen[0]}
    for n, f in made[0].fisher.items():
        torch.testing.assert_close(f, expected[n])


def test_joint_upper_bound_runs(image_root, tmp_path):  # noqa: F811
    cfg = raw_config(image_root, streams=[{"name": "seq"}], merges=[{"method": "average"}], joint=True)
    results = ContinualRun(validate_config(cfg), tmp_path / "run").run()
    joint = results["models"]["joint"]
    assert len(joint["rows"]) == 1 and 0 <= joint["metrics"]["final_accuracy"] <= 100
