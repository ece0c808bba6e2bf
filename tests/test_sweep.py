"""`magmax sweep`: expansion of presets × overrides × seeds, jobs through submitit (debug, local, a fake
Slurm), the state file, --status, and a job preempted and requeued that ends with an uninterrupted run's numbers."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

import magmax.continual as continual_mod
from magmax.cli import main as cli_main
from magmax.config import validate_config
from magmax.continual import ContinualRun
from magmax.errors import ConfigError
from magmax.sweep_config import expand, load_sweep, parse_time, tag
from magmax.sweep_job import SweepJob
from test_continual import image_root, raw_config  # noqa: F401  (the module's fixture and config)

pytest.importorskip("submitit")


STEPS = 5


def tiny(root: Path, steps: int = STEPS) -> dict:
    """One stream, one merge, 3 tasks: about a second a run."""
    return raw_config(root, streams=[{"name": "seq"}], merges=[{"method": "magmax"}], zero_shot=False,
                      train={"lr": 1e-3, "batch_size": 8, "warmup_steps": 1, "steps": steps, "eval_batch_size": 32})


def write(path: Path, obj: dict) -> Path:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


def rows(results: dict) -> dict:
    return {name: m["rows"] for name, m in results["models"].items()}


@pytest.fixture(scope="module")
def reference(image_root, tmp_path_factory):
    """The accuracy rows of `magmax run a.yaml --set seed=S` run here, uninterrupted (each seed run once)."""
    done: dict[int, dict] = {}

    def of(seed: int) -> dict:
        if seed not in done:
            out = tmp_path_factory.mktemp("reference") / f"seed{seed}"
            done[seed] = rows(ContinualRun(validate_config({**tiny(image_root), "seed": seed}), out).run())
        return done[seed]

    return of


def test_expansion_names_overrides_and_order(image_root, tmp_path):
    write(tmp_path / "a.yaml", tiny(image_root))
    (tmp_path / "more").mkdir()
    write(tmp_path / "more" / "b.yaml", tiny(image_root))
    sweep = {"presets": ["a.yaml", "more/b.yaml"], "seeds": [1, 2], "set": {"train.warmup_steps": 0},
             "overrides": [{}, {"train.lr": 3e-5}], "grid": {"merges.0.options.scale": [0.5, 1.0]}, "out": "sw"}
    path = write(tmp_path / "sweep.yaml", sweep)
    runs = expand(load_sweep(path), path)
    assert len(runs) == 2 * 2 * 2 * 2
    expected = [
        (p, tag_, s)
        for p in ("a", "b")
        for tag_ in ("merges.0.options.scale=0.5", "merges.0.options.scale=1.0",
                     "train.lr=3e-05,merges.0.options.scale=0.5", "train.lr=3e-05,merges.0.options.scale=1.0")
        for s in (1, 2)
    ]
    assert [r.name for r in runs] == [f"{p}-{t}-seed{s}" for p, t, s in expected]
    assert all(r.dir == (tmp_path / "sw" / r.name) for r in runs)
    r = runs[5]  # a, lr 3e-5, scale 0.5, seed 2: common set first, then the entry, the grid, the seed
    assert r.overrides == ("train.warmup_steps=0", "train.lr=3e-05", "merges.0.options.scale=0.5", "seed=2")
    cfg = validate_config({**tiny(image_root), "seed": 2})
    from magmax.config import load_config

    resolved = load_config(r.preset, list(r.overrides))
    assert resolved.seed == 2 and resolved.train.lr == 3e-5 and resolved.train.warmup_steps == 0
    assert resolved.merges[0].options == {"scale": 0.5} and cfg.train.lr == 1e-3
    # No seeds: each preset's own seed (raw_config's 3); no overrides: no tag.
    path = write(tmp_path / "plain.yaml", {"presets": ["a.yaml"]})
    (plain,) = expand(load_sweep(path), path)
    assert plain.name == "a-seed3" and plain.overrides == ("seed=3",) and plain.dir == tmp_path / "runs" / "plain" / "a-seed3"
    # String values keep their text in names; long tags are cut and end with a hash.
    assert tag((("scenario.class_order", "paper-cifar100"),)) == "scenario.class_order=paper-cifar100"
    long = tag(tuple((f"merges.{i}.options.scale", 0.123456) for i in range(9)))
    assert len(long) == 80 and long != tag(tuple((f"merges.{i}.options.scale", 0.123457) for i in range(9)))


@pytest.mark.parametrize(
    "value, minutes", [(240, 240), ("240", 240), ("04:00:00", 240), ("30:00", 30), ("1-00:00:00", 1440), ("1-4", 1680), ("0:30:01", 31)]
)
def test_time_limits(value, minutes):
    assert parse_time(value) == minutes


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"presets": ["a.yaml"], "set": {"seed": 4}}, "'set' sets seed; list the seeds in 'seeds:'"),
        ({"presets": ["a.yaml"], "job": {"gpu": 2}}, "sweep key 'job.gpu': unknown key (did you mean 'gpus'?)"),
        ({"presets": ["a.yaml"], "job": {"time": "four hours"}}, "sweep key 'job.time'"),
        ({"presets": ["missing.yaml"]}, "preset 'missing.yaml' not found"),
        ({"presets": ["a.yaml"], "overrides": [{"train.lrr": 1.0}]}, "preset a.yaml with train.lrr=1.0: "),
        ({"presets": ["a.yaml", "a.yaml"]}, "two runs would share the folder 'a-seed3'"),
        ({"presets": ["a.yaml"], "executor": "slurm", "job": {"partition": "gpu"}}, "needs Slurm's sbatch and srun"),
    ],
)
def test_bad_sweeps_are_one_line_exit_2_and_submit_nothing(image_root, tmp_path, capsys, monkeypatch, sweep, message):
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))  # no sbatch here
    write(tmp_path / "a.yaml", tiny(image_root))
    path = write(tmp_path / "sweep.yaml", sweep)
    assert cli_main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "runs").exists()


def test_missing_submitit_names_the_extra(image_root, tmp_path, capsys, monkeypatch):
    write(tmp_path / "a.yaml", tiny(image_root))
    path = write(tmp_path / "sweep.yaml", {"presets": ["a.yaml"], "executor": "local"})
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert cli_main(["sweep", str(path)]) == 2
    assert 'pip install "magmax[cluster]"' in capsys.readouterr().err


def test_debug_sweep_runs_dry_run_status_and_resubmission(image_root, tmp_path, capsys, reference):
    write(tmp_path / "a.yaml", tiny(image_root))
    path = write(tmp_path / "sweep.yaml", {"presets": ["a.yaml"], "seeds": [1, 2], "executor": "debug", "out": "sw"})
    assert cli_main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"2 runs into {tmp_path / 'sw'} (executor: debug):"
    assert f"a-seed2: magmax run {tmp_path / 'a.yaml'} --set seed=2 --out {tmp_path / 'sw' / 'a-seed2'}" in " ".join(out.split())
    assert not (tmp_path / "sw").exists()
    assert cli_main(["sweep", str(path), "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 runs: 2 not submitted"

    assert cli_main(["sweep", str(path)]) == 0
    err = capsys.readouterr().err
    assert "complete a-seed1" in err and "complete a-seed2" in err and "2 runs complete" in err
    for seed in (1, 2):  # each run is `magmax run a.yaml --set seed=S`: the same numbers as that run
        got = json.loads((tmp_path / "sw" / f"a-seed{seed}" / "results.json").read_text())
        assert rows(got) == reference(seed)
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert state["runs"]["a-seed2"]["overrides"] == ["seed=2"] and state["runs"]["a-seed2"]["jobs"][0]["id"] == "debug-1"

    assert cli_main(["sweep", str(path), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["a-seed1", "done", "job", "debug-0"] and lines[-1] == "2 runs: 2 done"
    # A failed run shows as failed and is the only one submitted again (and resumes where it stopped).
    status = tmp_path / "sw" / "a-seed2" / "status.json"
    status.write_text(json.dumps({"status": "failed", "error": "out of memory"}))
    assert cli_main(["sweep", str(path), "--status"]) == 0
    out = capsys.readouterr().out
    assert "a-seed2  failed" in out and "out of memory" in out and out.splitlines()[-1] == "2 runs: 1 done, 1 failed"
    status.write_text(json.dumps({"status": "complete"}))
    assert cli_main(["sweep", str(path)]) == 0
    assert "nothing to submit" in capsys.readouterr().err


def test_preempted_job_requeues_itself_and_ends_with_the_uninterrupted_numbers(image_root, tmp_path, monkeypatch, reference):
    """What submitit does on SIGUSR2: call the job's checkpoint(), save the submission it returns, exit;
    the requeued submission then runs. Here the exit comes as the second task starts."""
    preset = write(tmp_path / "a.yaml", tiny(image_root))
    expected = reference(1)
    job = SweepJob("a-seed1", str(preset), ("seed=1",), str(tmp_path / "sw" / "a-seed1"))
    real_finetune = continual_mod.finetune
    calls = []
    requeued = []

    def preempt_at_task_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and not requeued:
            requeued.append(job.checkpoint())
            raise SystemExit(144)  # submitit's LocalJobEnvironment._requeue
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(continual_mod, "finetune", preempt_at_task_2)
    with pytest.raises(SystemExit):
        job()
    run_dir = tmp_path / "sw" / "a-seed1"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and "exit (code 144)" in status["reason"]
    assert json.loads((run_dir / "state" / "progress.json").read_text())["streams"]["seq"]["completed"] == 1
    (submission,) = requeued
    assert submission.function.resume and submission.function.requeues == 1 and submission.function.out == job.out
    summary = submission.result()
    assert summary["status"] == "complete" and len(calls) == 4  # tasks 2 and 3 again, task 1 not retrained
    assert rows(json.loads((run_dir / "results.json").read_text())) == expected
    # Slurm may also restart the job from its original submission: a complete run is not run again.
    assert job()["status"] == "complete" and len(calls) == 4


def _task_process(controller_pid: int) -> psutil.Process | None:
    try:
        children = psutil.Process(controller_pid).children()
    except psutil.NoSuchProcess:
        return None
    return next((c for c in children if "submitit.core._submit" in " ".join(c.cmdline())), None)


def test_local_executor_runs_in_parallel_and_a_job_signalled_usr2_is_requeued_and_resumed(image_root, tmp_path, capsys, reference):
    """Two runs as local submitit jobs, both at once; the first gets SIGUSR2 (Slurm's warning before a
    preemption or the time limit) during its second task: submitit checkpoints and requeues it, and the
    requeued job resumes its run directory and ends with an uninterrupted run's numbers."""
    preset = write(tmp_path / "a.yaml", tiny(image_root))
    sweep = write(tmp_path / "sweep.yaml", {"presets": ["a.yaml"], "seeds": [1, 2], "executor": "local", "parallel": 2,
                                            "out": "sw", "job": {"gpus": 0, "time": 30}})
    run_dir = tmp_path / "sw" / "a-seed1"
    signalled: list[int] = []

    def preempt() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not signalled:
            progress = run_dir / "state" / "progress.json"
            state_file = tmp_path / "sw" / "sweep.json"
            try:
                done = json.loads(progress.read_text())["streams"].get("seq", {}).get("completed", 0)
                jobs = json.loads(state_file.read_text())["runs"]["a-seed1"]["jobs"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.02)
                continue
            task = _task_process(int(jobs[-1]["id"])) if done >= 1 else None
            if task is not None:
                task.send_signal(signal.SIGUSR2)
                signalled.append(done)
            time.sleep(0.02)

    watcher = threading.Thread(target=preempt, daemon=True)
    watcher.start()
    assert cli_main(["sweep", str(sweep)]) == 0, capsys.readouterr().err
    watcher.join(timeout=5)
    assert signalled, "the job was never signalled"
    log = run_dir.joinpath("log.txt").read_text()
    assert signalled[0] < 3, "signalled after the run's last task: nothing was left to resume"
    assert "stopped by the process exiting (code 144)" in log, log  # caught inside the run, which was resumed
    job_logs = "".join(p.read_text() for p in (tmp_path / "sw" / ".submitit").glob("*/*_log.err"))
    assert "a-seed1 (requeued 1x): resuming after the last completed task" in job_logs, job_logs
    for seed in (1, 2):
        assert rows(json.loads((tmp_path / "sw" / f"a-seed{seed}" / "results.json").read_text())) == reference(seed)
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [len(state["runs"][n]["jobs"]) for n in ("a-seed1", "a-seed2")] == [1, 1]  # requeued, not resubmitted


def test_slurm_submission_through_a_fake_sbatch_and_status_through_a_fake_sacct(image_root, tmp_path, capsys, monkeypatch):
    """The #SBATCH lines carry the sweep file's resources; one array of jobs; --status reads sacct; a
    second submission skips the runs still queued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch-calls"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncat \"$1\" >> {calls}\necho 'Submitted batch job 4242'\n")
    (bin_dir / "sacct").write_text("#!/bin/sh\nprintf 'JobID|State|NodeList\\n4242_0|RUNNING|n1\\n4242_1|PENDING|None\\n'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; never called here
    for f in ("sbatch", "sacct", "srun"):
        (bin_dir / f).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    write(tmp_path / "a.yaml", tiny(image_root))
    sweep = write(tmp_path / "sweep.yaml", {
        "name": "cifar", "presets": ["a.yaml"], "seeds": [1, 2], "executor": "slurm", "parallel": 1, "out": "sw",
        "job": {"gpus": 2, "cpus": 4, "mem_gb": 32, "time": "01:30:00", "partition": "gpu", "account": "proj",
                "constraint": "a100", "setup": ["source venv/bin/activate"], "slurm_extra": {"exclude": "node12"}},
    })
    assert cli_main(["sweep", str(sweep)]) == 0
    err = capsys.readouterr().err
    assert "submitted a-seed1 (job 4242_0)" in err and "submitted a-seed2 (job 4242_1)" in err and "2 runs queued" in err
    script = calls.read_text()
    assert script.count("#!/bin/bash") == 1  # one array for the whole sweep
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=32GB", "#SBATCH --time=90", "#SBATCH --array=0-1%1", "#SBATCH --constraint=a100",
                 "#SBATCH --exclude=node12", "#SBATCH --job-name=cifar", "#SBATCH --signal=USR2@90", "source venv/bin/activate"):
        assert line in script, line
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [state["runs"][n]["jobs"][0]["id"] for n in ("a-seed1", "a-seed2")] == ["4242_0", "4242_1"]
    # The array's pickles name the jobs: the first one is `a.yaml --set seed=1` into sw/a-seed1.
    import submitit

    pickled = submitit.helpers.DelayedSubmission.load(tmp_path / "sw" / ".submitit" / "4242_0" / "4242_0_submitted.pkl")
    assert pickled.function == SweepJob("a-seed1", str(tmp_path / "a.yaml"), ("seed=1",), str(tmp_path / "sw" / "a-seed1"))

    assert cli_main(["sweep", str(sweep), "--status"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "2 runs: 1 running, 1 pending"
    assert "slurm RUNNING" in out and "slurm PENDING" in out
    assert cli_main(["sweep", str(sweep)]) == 0
    err = capsys.readouterr().err
    assert "skipped a-seed1: running as job 4242_0" in err and "nothing to submit" in err
