"""End-to-end and protocol tests of the continual runner on a tiny random CLIP and a tiny image folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import magmax.continual as continual_mod
import magmax.training.loop as loop_mod
from magmax.cli import main as cli_main
from magmax.config import validate_config
from magmax.continual import ContinualRun
from magmax.errors import TrainingError
from magmax.training.schedule import warmup_cosine_lr

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220)]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """6 classes of 16×16 images whose colour says the class (noise added), 8 train / 4 test each."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def raw_config(root: Path, **overrides) -> dict:
    cfg = {
        "name": "tiny",
        "seed": 3,
        "device": "cpu",
        "data": {"name": "imagefolder", "root": str(root)},
        "scenario": {"kind": "class_incremental", "n_tasks": 3, "class_order": "random"},
        "backbone": {"kind": "clip", "tiny": True, "image_size": 32},
        "train": {"lr": 1e-3, "batch_size": 8, "warmup_steps": 2, "steps": 4, "eval_batch_size": 32},
        "streams": [{"name": "seq"}, {"name": "ind", "start": "pretrained", "merges": ["magmax"]}],
        "merges": [{"method": "magmax"}, {"method": "average"}, {"method": "ties"}],
    }
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_tiny_clip_end_to_end(image_root, tmp_path):
    out = tmp_path / "run"
    results = ContinualRun(validate_config(raw_config(image_root)), out).run()
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and len(saved["tasks"]) == 3
    assert sum(t["n_test"] for t in saved["tasks"]) == 24
    for name in ("zero-shot", "seq:finetune", "seq:magmax", "seq:average", "seq:ties", "ind:finetune", "ind:magmax"):
        assert name in saved["models"], name
    rows = np.array(saved["models"]["seq:magmax"]["rows"])
    assert rows.shape == (3, 3) and ((rows >= 0) & (rows <= 100)).all()
    m = saved["models"]["seq:finetune"]["metrics"]
    assert m["forgetting"] is not None and m["backward_transfer"] is not None
    assert saved["models"]["seq:magmax"]["scale"] == 0.5
    assert (out / "results.csv").read_text().startswith("model,")
    assert (out / "results.md").read_text().startswith("| model |")
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["base_weights_sha256"]) == 64 and prov["seed"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    assert results["models"]["seq:magmax"]["rows"] == saved["models"]["seq:magmax"]["rows"]


def test_protocol_heads_starts_and_task_vectors(image_root, tmp_path, monkeypatch):
    """Training head = the task's classes (labels remapped in sorted order); evaluation head = all classes;
    Seq-FT starts from θ_{t-1}, Ind-FT from θ0; every merger's τ is taken against θ0."""
    calls = []
    real_finetune = continual_mod.finetune

    def spy(backbone, task, head, cfg, **kw):
        start = {k: v.clone() for k, v in backbone.encoder.state_dict().items()}
        steps = real_finetune(backbone, task, head, cfg, **kw)
        calls.append({"task": task, "head": head.clone(), "start": start, "end": {k: v.clone() for k, v in backbone.encoder.state_dict().items()}})
        return steps

    ce_calls = []
    real_ce = loop_mod.F.cross_entropy

    def ce_spy(logits, target, *a, **k):
        ce_calls.append((logits.shape[1], target.clone()))
        return real_ce(logits, target, *a, **k)

    monkeypatch.setattr(continual_mod, "finetune", spy)
    monkeypatch.setattr(loop_mod.F, "cross_entropy", ce_spy)
    cfg = validate_config(raw_config(image_root, merges=[{"method": "average"}], streams=[{"name": "seq"}, {"name": "ind", "start": "pretrained"}]))
    run = ContinualRun(cfg, tmp_path / "run")
    run.run()
    assert run.head_all.shape[0] == 6  # evaluation head: every class of the stream
    seq, ind = calls[:3], calls[3:]
    for t, call in enumerate(seq):
        task = call["task"]
        assert list(task.classes) == sorted(task.classes)
        assert torch.equal(call["head"], run.head_all[[run.row_of[c] for c in task.classes]])
        start_expected = run.theta0 if t == 0 else seq[t - 1]["end"]
        assert all(torch.equal(call["start"][k], start_expected[k]) for k in start_expected)
    for call in ind:
        assert all(torch.equal(call["start"][k], run.theta0[k]) for k in run.theta0)
    # Cross-entropy saw only the current task's classes with local labels 0..k-1.
    k_seen = {k for k, _ in ce_calls}
    assert k_seen == {2}
    assert all(int(t.max()) < 2 and int(t.min()) >= 0 for _, t in ce_calls)
    # Average of Seq-FT τ's: merged = θ0 + mean(θ_t − θ0), τ relative to θ0 (not θ_{t-1}).
    from magmax import Merger

    merger = Merger("average", run.theta0)
    for call in seq:
        merger.add(call["end"])
    expected = {k: run.theta0[k] + torch.stack([c["end"][k] - run.theta0[k] for c in seq]).mean(0) for k in run.theta0 if run.theta0[k].is_floating_point()}
    merged = merger.merged()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)


def test_training_lr_follows_schedule_and_labels_remap(image_root, tmp_path):
    cfg = validate_config(raw_config(image_root, train={"lr": 1e-3, "batch_size": 4, "warmup_steps": 3, "steps": 7}))
    run = ContinualRun(cfg, tmp_path / "run")
    run.dir.create(False)
    run.log = run.dir.logger()
    run.setup()
    seen = []
    task = run.tasks[1]
    loop_mod.finetune(run.backbone, task, run.head_for(task), cfg.train, seed=0, device=torch.device("cpu"), on_step=seen.append)
    lrs = [s.lr for s in seen]
    assert lrs == [warmup_cosine_lr(i, 1e-3, 3, 7) for i in range(7)]
    assert lrs[0] == pytest.approx(1e-3 / 3) and lrs[2] == pytest.approx(1e-3) and lrs[3] == pytest.approx(1e-3)
    assert list(task.local_labels(np.array(sorted(task.classes)))) == [0, 1]


def _write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resume_after_sigkill_gives_identical_numbers(image_root, tmp_path):
    cfg = raw_config(image_root, train={"lr": 1e-3, "batch_size": 8, "warmup_steps": 2, "steps": 8, "eval_batch_size": 32})
    path = _write_yaml(tmp_path / "cfg.yaml", cfg)
    reference = ContinualRun(validate_config(cfg), tmp_path / "reference").run()
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "magmax", "run", str(path), "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "state" / "progress.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if progress.exists() and json.loads(progress.read_text()).get("streams", {}).get("seq", {}).get("completed", 0) >= 1:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail("no task completed in time")
        time.sleep(0.3)  # well inside the next task
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((out / "status.json").read_text())["status"] == "running"  # not presented as complete
    assert not (out / "results.json").exists()
    assert cli_main(["run", str(path), "--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    for name, model in reference["models"].items():
        assert resumed["models"][name]["rows"] == model["rows"], name


def test_nan_loss_stops_with_task_and_step_and_keeps_last_good_state(image_root, tmp_path):
    cfg = validate_config(raw_config(image_root, streams=[{"name": "seq"}], merges=[{"method": "magmax"}]))

    def poison(info):
        if info.task == 1 and info.step == 1:
            with torch.no_grad():
                next(run.backbone.encoder.parameters()).fill_(float("nan"))

    run = ContinualRun(cfg, tmp_path / "run", hooks=continual_mod.ProgressHooks(on_step=poison))
    with pytest.raises(TrainingError, match=r"task 2 .*step 2"):
        run.run()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "step 2" in status["error"]
    progress = json.loads((tmp_path / "run" / "state" / "progress.json").read_text())
    assert progress["streams"]["seq"]["completed"] == 1
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["train"].update(lrr=1), "train.lrr': unknown key"),
        (lambda c: c["train"].update(steps="many"), "train.steps"),
        (lambda c: c["scenario"].update(n_tasks=7), "7 tasks"),
        (lambda c: c["data"].update(root="/nonexistent/folder"), "/nonexistent/folder"),
        (lambda c: c["merges"].append({"method": "magmax", "options": {"bogus": 1}}), "bogus"),
        # a misspelt required key: named as unknown, with the key meant (not reported as missing)
        (lambda c: c.update(bakcbone=c.pop("backbone")), "'bakcbone': unknown key (did you mean 'backbone'?)"),
        (lambda c: c["data"].update(nmae=c["data"].pop("name")), "'data.nmae': unknown key (did you mean 'name'?)"),
        (lambda c: c["streams"][0].update(nam=c["streams"][0].pop("name")),
         "'streams.0.nam': unknown key (did you mean 'name'?)"),
    ],
)
def test_bad_config_is_one_line_exit_2(image_root, tmp_path, capsys, mutate, message):
    cfg = raw_config(image_root)
    mutate(cfg)
    path = _write_yaml(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "out"
    assert cli_main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err
    assert not (out / "results.json").exists()


def test_empty_task_is_refused(image_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    for c in (4, 5):  # the last task (classes 4, 5 in natural order) has no test images
        for f in (root / "test" / f"class_{c}").iterdir():
            f.unlink()
    cfg = raw_config(root, scenario={"kind": "class_incremental", "n_tasks": 3, "class_order": "natural"})
    path = _write_yaml(tmp_path / "cfg.yaml", cfg)
    assert cli_main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "task 3" in err and "Traceback" not in err, err


def test_unwritable_output_folder(image_root, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    path = _write_yaml(tmp_path / "cfg.yaml", raw_config(image_root))
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a path under a file instead
            target = tmp_path / "a-file"
            target.write_text("x")
            out = target / "run"
        else:
            out = locked / "run"
        assert cli_main(["run", str(path), "--out", str(out)]) == 2
        assert "cannot write the run directory" in " ".join(capsys.readouterr().err.split())
    finally:
        locked.chmod(0o700)


def test_existing_run_directory_needs_resume(image_root, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    path = _write_yaml(tmp_path / "cfg.yaml", raw_config(image_root))
    assert cli_main(["run", str(path), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("resume", [False, True])
def test_run_that_failed_in_set_up_starts_again_in_its_directory(image_root, tmp_path, capsys, resume):
    """A run with nothing to resume (set-up failed, or killed before the first resume point) is no dead
    end: a plain rerun, or --resume, starts it again in the same directory and says so."""
    small = {"lr": 1e-3, "batch_size": 8, "warmup_steps": 1, "steps": 2, "eval_batch_size": 32}
    cfg = raw_config(image_root, streams=[{"name": "seq"}], merges=[{"method": "average"}], zero_shot=False,
                     train=small, scenario={"kind": "class_incremental", "n_tasks": 2, "class_order": "natural"})
    out = tmp_path / "out"
    broken = _write_yaml(tmp_path / "broken.yaml", {**cfg, "data": {"name": "imagefolder", "root": str(tmp_path / "none")}})
    assert cli_main(["run", str(broken), "--out", str(out)]) == 2
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
    assert not (out / "state" / "progress.json").exists()
    capsys.readouterr()
    path = _write_yaml(tmp_path / "cfg.yaml", cfg)
    assert cli_main(["run", str(path), "--out", str(out), *(["--resume"] if resume else [])]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"'{out}' holds a run that stopped before its first resume point" in err and "starting it again" in err
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    results = json.loads((out / "results.json").read_text())
    assert len(results["models"]["seq:average"]["rows"]) == 2
    # A run with state keeps needing --resume.
    assert cli_main(["run", str(path), "--out", str(out)]) == 2
    assert "already holds a run; pass --resume" in " ".join(capsys.readouterr().err.split())


def test_grad_accumulation_and_worker_threads_give_the_same_update(image_root, tmp_path):
    """Micro-batches (grad_accum) and threaded batch preparation change nothing but speed."""
    base = raw_config(image_root)
    states, grads = [], []
    for accum, workers in ((1, 0), (2, 0), (1, 2)):
        train = {**base["train"], "batch_size": 8, "grad_accum": accum, "num_workers": workers, "steps": 3}
        cfg = validate_config({**base, "train": train})
        run = ContinualRun(cfg, tmp_path / f"run{accum}{workers}")
        run.dir.create(False)
        run.log = run.dir.logger()
        run.setup()
        task = run.tasks[0]
        loop_mod.finetune(run.backbone, task, run.head_for(task), cfg.train, seed=1, device=torch.device("cpu"))
        states.append(run.encoder_state())
        # The gradient of the last step is left in .grad: compare it (Adam's update amplifies rounding).
        grads.append({n: p.grad.clone() for n, p in run.backbone.encoder.named_parameters() if p.grad is not None})
    for k in states[0]:
        assert torch.equal(states[0][k], states[2][k]), k  # threads: bit for bit
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        # accumulation: the same mean gradient, summed in another order
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-6)
