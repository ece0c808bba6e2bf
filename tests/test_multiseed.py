"""Multi-seed runs: the statistics against hand-computed values, and real tiny runs (one per seed)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

import magmax.continual as continual_mod
from magmax.cli import main as cli_main
from magmax.config import validate_config
from magmax.continual import ContinualRun
from magmax.errors import ConfigError
from magmax.multiseed import MultiSeedRun
from magmax.stats import aggregate_results, paired_differences, summarize_values
from test_continual import image_root, raw_config  # noqa: F401  (module fixture and config builder)

# Student-t quantiles 0.975 (tables: 4.303 and 12.706), in closed form: with 2 degrees of freedom
# t = (2p − 1)·sqrt(2 / (4p(1 − p))) = 0.95·sqrt(2 / 0.0975); with 1, t = tan(π(p − 1/2)) = tan(0.475π).
T_975_2DOF = 4.302652729749464
T_975_1DOF = 12.706204736174696


def test_summary_of_three_seeds_by_hand():
    s = summarize_values([70.0, 72.0, 77.0])
    # mean 73; deviations −3, −1, 4 → Σ² = 26, std = sqrt(26 / 2) = sqrt(13)
    assert s["mean"] == pytest.approx(73.0)
    assert s["std"] == pytest.approx(math.sqrt(13))
    half = T_975_2DOF * math.sqrt(13) / math.sqrt(3)  # = 8.9566...
    assert half == pytest.approx(8.95668, abs=1e-4)
    assert s["ci_low"] == pytest.approx(73.0 - half) and s["ci_high"] == pytest.approx(73.0 + half)
    assert s["n"] == 3 and s["values"] == [70.0, 72.0, 77.0]
    # Another level: 90% with 2 dof is 2.919986
    s90 = summarize_values([70.0, 72.0, 77.0], confidence=0.90)
    assert s90["ci_high"] - 73.0 == pytest.approx(2.919986 * math.sqrt(13 / 3), rel=1e-6)


def test_one_seed_has_no_interval_and_missing_metrics_stay_missing():
    assert summarize_values([61.5]) == {"mean": 61.5, "std": None, "ci_low": None, "ci_high": None, "n": 1, "values": [61.5]}
    assert summarize_values([None, None]) == {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": 0, "values": [None, None]}


def test_paired_differences_by_hand():
    model, reference = [70.0, 72.0, 77.0], [68.0, 71.0, 73.0]
    p = paired_differences(model, reference)
    # differences 2, 1, 4: mean 7/3, deviations −1/3, −4/3, 5/3 → Σ² = 42/9, std = sqrt(7/3)
    assert p["values"] == [2.0, 1.0, 4.0] and p["n"] == 3
    assert p["mean_diff"] == pytest.approx(7 / 3)
    assert p["std"] == pytest.approx(math.sqrt(7 / 3))
    half = T_975_2DOF * math.sqrt(7 / 3) / math.sqrt(3)
    assert (p["ci_low"], p["ci_high"]) == (pytest.approx(7 / 3 - half), pytest.approx(7 / 3 + half))
    # The paired interval is far narrower than the unpaired spread of either model (the point of pairing).
    assert p["ci_high"] - p["ci_low"] < summarize_values(model)["ci_high"] - summarize_values(model)["ci_low"]


def _results(final: dict[str, float], forgetting: float | None = 1.0) -> dict:
    models = {}
    for name, value in final.items():
        kind = "zero-shot" if name == "zero-shot" else ("finetune" if name.endswith(":finetune") else "merge")
        models[name] = {"kind": kind, "stream": "seq", "protocol": "Seq-FT", "method": "magmax" if kind == "merge" else None,
                        "metrics": {"final_accuracy": value, "average_incremental_accuracy": value + 1,
                                    "forgetting": None if kind == "zero-shot" else forgetting, "backward_transfer": None if kind == "zero-shot" else -forgetting}}
    return {"name": "t", "tasks": [{}, {}], "models": models}


def test_aggregate_shape_and_numbers():
    results = {
        5: _results({"zero-shot": 10.0, "seq:finetune": 68.0, "seq:magmax": 70.0}, forgetting=1.0),
        6: _results({"zero-shot": 10.0, "seq:finetune": 71.0, "seq:magmax": 72.0}, forgetting=2.0),
        7: _results({"zero-shot": 10.0, "seq:finetune": 73.0, "seq:magmax": 77.0}, forgetting=6.0),
    }
    agg = aggregate_results([5, 6, 7], results, "seq:finetune")
    assert set(agg) == {"seeds", "reference", "confidence", "models"}
    assert agg["seeds"] == [5, 6, 7] and agg["reference"] == "seq:finetune" and agg["confidence"] == 0.95
    assert list(agg["models"]) == ["zero-shot", "seq:finetune", "seq:magmax"]
    mm = agg["models"]["seq:magmax"]
    assert mm["label"] == "MagMax on Seq-FT τ" and agg["models"]["seq:finetune"]["label"] == "Seq-FT final (θ_2)"
    assert set(mm) == {"label", "metrics", "paired"}
    assert set(mm["metrics"]) == set(mm["paired"]) == {"final_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer"}
    fa = mm["metrics"]["final_accuracy"]
    assert set(fa) == {"mean", "std", "ci_low", "ci_high", "n", "values"}
    assert fa["values"] == [70.0, 72.0, 77.0] and fa["mean"] == pytest.approx(73.0)
    assert fa["ci_high"] == pytest.approx(73.0 + T_975_2DOF * math.sqrt(13 / 3))
    pd = mm["paired"]["final_accuracy"]
    assert set(pd) == {"mean_diff", "std", "ci_low", "ci_high", "n", "values"}
    assert pd["values"] == [2.0, 1.0, 4.0] and pd["mean_diff"] == pytest.approx(7 / 3)
    # forgetting 1, 2, 6 for every model but zero-shot: the same in both → paired difference 0 ± 0
    assert mm["paired"]["forgetting"]["values"] == [0.0, 0.0, 0.0] and mm["paired"]["forgetting"]["ci_high"] == 0.0
    assert mm["metrics"]["forgetting"]["mean"] == pytest.approx(3.0)
    # zero-shot has no forgetting: null statistics, n = 0; the reference's own differences are 0.
    assert agg["models"]["zero-shot"]["metrics"]["forgetting"]["n"] == 0
    assert agg["models"]["zero-shot"]["metrics"]["forgetting"]["mean"] is None
    assert agg["models"]["seq:finetune"]["paired"]["final_accuracy"]["mean_diff"] == 0.0
    two = aggregate_results([5, 6], results, "seq:magmax")
    assert two["models"]["seq:finetune"]["paired"]["final_accuracy"]["values"] == [-2.0, -1.0]
    assert two["models"]["seq:finetune"]["paired"]["final_accuracy"]["ci_high"] == pytest.approx(-1.5 + T_975_1DOF * math.sqrt(0.5) / math.sqrt(2))
    json.dumps(agg)  # plain JSON
    with pytest.raises(ValueError, match="joint"):
        aggregate_results([5], results, "joint")


def test_config_seeds_and_reference(image_root):
    cfg = validate_config(raw_config(image_root, seeds=[3, 4]))
    assert cfg.reference_model() == "seq:finetune"
    assert cfg.for_seed(4).seed == 4 and cfg.for_seed(4).seeds is None
    ind_only = raw_config(image_root, streams=[{"name": "ind", "start": "pretrained"}, {"name": "s2"}])
    assert validate_config(ind_only).reference_model() == "s2:finetune"
    assert validate_config(raw_config(image_root, aggregate={"reference": "ind:magmax"})).reference_model() == "ind:magmax"
    for bad, words in (({"seeds": []}, "seeds is empty"), ({"seeds": [3, 3]}, "distinct"),
                       ({"aggregate": {"reference": "ind:average"}}, "aggregate.reference 'ind:average' is not a model")):
        with pytest.raises(ConfigError, match=words):
            validate_config(raw_config(image_root, **bad))


def small(root: Path, **overrides) -> dict:
    """The tiny run cut down: two tasks, two steps each, one stream and one merge (the fewest models that
    still have a paired difference)."""
    cfg = raw_config(root, streams=[{"name": "seq"}], merges=[{"method": "magmax"}])
    cfg["scenario"] = {**cfg["scenario"], "n_tasks": 2}
    cfg["train"] = {**cfg["train"], "steps": 2}
    return {**cfg, **overrides}


def _rows(results: dict) -> dict:
    return {name: (m["rows"], m["metrics"]) for name, m in results["models"].items()}


def test_tiny_multiseed_run_equals_single_seed_runs_and_resumes(image_root, tmp_path, monkeypatch):
    single = {s: ContinualRun(validate_config(small(image_root, seed=s)), tmp_path / f"single-{s}").run() for s in (3, 4)}
    # class_order: random → the seeds see different class orders.
    assert single[3]["tasks"] != single[4]["tasks"]
    cfg = validate_config(small(image_root, seeds=[3, 4]))
    out = tmp_path / "multi"
    calls = []
    real_run = continual_mod.ContinualRun.run

    def interrupt_second(self):
        calls.append(self.cfg.seed)
        if self.cfg.seed == 4 and len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(self)

    monkeypatch.setattr(continual_mod.ContinualRun, "run", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        MultiSeedRun(cfg, out).run()
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and status["seeds"] == [3, 4] and status["complete"] == [3]
    assert not (out / "aggregate.json").exists() and not (out / "results.md").exists()
    with pytest.raises(ConfigError, match="already holds a run"):
        MultiSeedRun(cfg, out).run()
    with pytest.raises(ConfigError, match="config differs"):
        MultiSeedRun(validate_config(small(image_root, seeds=[3, 5])), out, resume=True).run()
    done = json.loads((out / "seed-3" / "results.json").read_text())
    mtime = (out / "seed-3" / "results.json").stat().st_mtime_ns
    result = MultiSeedRun(cfg, out, resume=True).run()
    assert calls == [3, 4, 4]  # resume ran seed 4 only: seed 3 was complete and skipped
    assert (out / "seed-3" / "results.json").stat().st_mtime_ns == mtime
    assert json.loads((out / "seed-3" / "results.json").read_text()) == done
    for s in (3, 4):
        sub = json.loads((out / f"seed-{s}" / "results.json").read_text())
        assert _rows(sub) == _rows(single[s]) and sub["tasks"] == single[s]["tasks"]
        assert json.loads((out / f"seed-{s}" / "status.json").read_text())["status"] == "complete"
        assert yaml.safe_load((out / f"seed-{s}" / "config.yaml").read_text())["seed"] == s
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert yaml.safe_load((out / "config.yaml").read_text())["seeds"] == [3, 4]
    agg = json.loads((out / "aggregate.json").read_text())
    assert agg == json.loads(json.dumps(result["aggregate"]))
    assert agg["seeds"] == [3, 4] and agg["reference"] == "seq:finetune"
    values = [single[s]["models"]["seq:magmax"]["metrics"]["final_accuracy"] for s in (3, 4)]
    fa = agg["models"]["seq:magmax"]["metrics"]["final_accuracy"]
    assert fa["values"] == values and fa["mean"] == pytest.approx(sum(values) / 2)
    half = T_975_1DOF * abs(values[0] - values[1]) / math.sqrt(2) / math.sqrt(2)
    assert fa["ci_high"] - fa["mean"] == pytest.approx(half)
    refs = [single[s]["models"]["seq:finetune"]["metrics"]["final_accuracy"] for s in (3, 4)]
    assert agg["models"]["seq:magmax"]["paired"]["final_accuracy"]["values"] == pytest.approx([v - r for v, r in zip(values, refs)])
    md = (out / "results.md").read_text()
    assert "mean over 2 seeds (3, 4)" in md and "MagMax on Seq-FT τ" in md and "Paired difference against Seq-FT final (θ_2)" in md
    assert f"{fa['mean']:.2f} ± {half:.2f}" in md
    with (out / "results.csv").open() as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert rows["seq:magmax"]["final_accuracy_mean"] == f"{fa['mean']:.2f}" and rows["seq:magmax"]["final_accuracy_n"] == "2"
    with pytest.raises(ConfigError, match="already complete"):
        MultiSeedRun(cfg, out, resume=True).run()


def test_cli_seeds_one_seed_says_no_interval(image_root, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(small(image_root, zero_shot=False)))
    out = tmp_path / "one"
    assert cli_main(["run", str(config), "--seeds", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "seed 3, one seed: no interval" in printed.out
    agg = json.loads((out / "aggregate.json").read_text())
    fa = agg["models"]["seq:magmax"]["metrics"]["final_accuracy"]
    assert fa["n"] == 1 and fa["ci_low"] is None and fa["std"] is None
    assert "one seed: no interval" in (out / "results.md").read_text()
    assert (out / "seed-3" / "results.json").is_file()
    # The single-seed run's own results.md says it has no interval.
    assert "One seed: no interval" in (out / "seed-3" / "results.md").read_text()
    assert cli_main(["run", str(config), "--out", str(out), "--resume"]) == 2
    assert "holds a multi-seed run (seeds 3); resume it with --seeds 3" in capsys.readouterr().err
    assert cli_main(["run", str(config), "--seeds", "3,x", "--out", str(tmp_path / "x")]) == 2
    assert "--seeds '3,x': expected integers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
