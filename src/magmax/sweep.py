"""`magmax sweep`: submit a sweep's runs as jobs (Slurm or local, through submitit) and report their state.

``OUT/sweep.json`` records, per run, its folder, preset, seed, overrides and the ids of the jobs submitted
for it; ``OUT/.submitit/<job id>/`` holds submitit's pickles and the jobs' stdout/stderr. What a run has
done is read from its own ``status.json`` (the run directory is the truth); the scheduler's state of its
last job tells a queued job from a dead one.

Submitting the same sweep again submits only the runs that are neither complete nor queued or running,
each resuming from its last completed task.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magmax.errors import ConfigError, MagmaxError
from magmax.rundir import RunDir, read_json, write_json
from magmax.sweep_config import PlannedRun, SweepConfig
from magmax.sweep_job import SweepJob

STATE_FILE = "sweep.json"
# Slurm job states in which the job will still run (or is running): such a run is not submitted again.
SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
POLL_S = 0.2


def need_submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError('magmax sweep submits jobs through submitit: pip install "magmax[cluster]"') from None
    return submitit


def make_job(run: PlannedRun) -> SweepJob:
    return SweepJob(run.name, str(run.preset), run.overrides, str(run.dir))


# -- the state file ------------------------------------------------------------------------------------


class SweepState:
    """``OUT/sweep.json``: the sweep's runs and the jobs submitted for each (written atomically)."""

    def __init__(self, out: Path, sweep_file: Path, executor: str):
        self.path = out / STATE_FILE
        self.data: dict[str, Any] = {"sweep": str(sweep_file.resolve()), "executor": executor, "runs": {}}
        if self.path.exists():
            self.data["runs"] = read_json(self.path).get("runs", {})

    def jobs(self, name: str) -> list[dict[str, Any]]:
        return self.data["runs"].get(name, {}).get("jobs", [])

    def record(self, run: PlannedRun, job_id: str, executor: str) -> None:
        entry = self.data["runs"].setdefault(run.name, {})
        entry.update({"dir": str(run.dir), "preset": str(run.preset), "seed": run.seed, "overrides": list(run.overrides)})
        entry.setdefault("jobs", []).append({"id": job_id, "executor": executor, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.data)


# -- where each run stands ---------------------------------------------------------------------------


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def scheduler_states(state: SweepState, out: Path) -> dict[str, str]:
    """The scheduler's state of each run's last job: a Slurm state (via sacct; UNKNOWN where it cannot
    tell), ALIVE / GONE for a local job's process, or GONE for a job run in this process."""
    last = {name: entry["jobs"][-1] for name, entry in state.data["runs"].items() if entry.get("jobs")}
    states: dict[str, str] = {}
    slurm = {name: job["id"] for name, job in last.items() if job["executor"] == "slurm"}
    if slurm:
        if shutil.which("sacct") is None:
            states.update({name: "UNKNOWN" for name in slurm})
        else:
            submitit = need_submitit()
            jobs = {name: submitit.SlurmJob(folder=out / ".submitit" / "%j", job_id=jid) for name, jid in slurm.items()}
            states.update({name: (job.state or "UNKNOWN").split()[0] for name, job in jobs.items()})
    for name, job in last.items():
        if job["executor"] == "local":
            states[name] = "ALIVE" if _pid_alive(job["id"]) else "GONE"
        elif job["executor"] == "debug":
            states[name] = "GONE"
    return states


@dataclass
class RunState:
    run: PlannedRun
    state: str  # not submitted | pending | running | done | failed | interrupted (resumed when submitted again)
    detail: str
    jobs: list[str]


def _progress(run_dir: RunDir) -> str:
    progress = run_dir.state / "progress.json"
    if not progress.exists():
        return ""
    streams = read_json(progress).get("streams", {})
    return ", ".join(f"{name} {entry.get('completed', 0)} tasks" for name, entry in streams.items())


def run_states(runs: list[PlannedRun], state: SweepState, scheduler: dict[str, str]) -> list[RunState]:
    rows = []
    for run in runs:
        run_dir = RunDir(run.dir)
        jobs = [job["id"] for job in state.jobs(run.name)]
        status = read_json(run.dir / "status.json") if (run.dir / "status.json").exists() else None
        sched = scheduler.get(run.name)
        active = sched in SLURM_ACTIVE or sched == "ALIVE"
        gone = sched is not None and not active and sched != "UNKNOWN"
        progress = _progress(run_dir)
        if status is not None and status["status"] == "complete":
            row = ("done", f"finished {status.get('finished', '?')}")
        elif status is not None and status["status"] in ("failed", "interrupted"):
            why = status.get("error") or status.get("reason") or ""
            if active:  # a requeued job waits or has started again
                row = ("pending" if sched != "RUNNING" else "running", f"requeued after: {why}")
            else:
                row = (status["status"], why)
        elif status is not None:  # running
            row = ("interrupted", f"job {sched.lower()} while the run was going") if gone else ("running", "")
        elif not jobs:
            row = ("not submitted", "")
        else:
            row = ("failed", f"job {sched.lower()} before the run started") if gone else (
                ("running", "starting") if sched in ("RUNNING", "ALIVE") else ("pending", ""))
        detail = "; ".join(p for p in (row[1], progress) if p)
        if sched not in (None, "ALIVE", "GONE"):
            detail = "; ".join(p for p in (detail, f"slurm {sched}") if p)
        rows.append(RunState(run, row[0], detail, jobs))
    return rows


# -- submission ----------------------------------------------------------------------------------------


@dataclass
class Events:
    """What the front end prints as the sweep goes (all optional)."""

    on_submit: Callable[[PlannedRun, str], None] | None = None
    on_skip: Callable[[PlannedRun, str], None] | None = None
    on_finish: Callable[[PlannedRun, str, str], None] | None = None  # run, status, detail


def to_submit(runs: list[PlannedRun], state: SweepState, scheduler: dict[str, str], events: Events) -> list[PlannedRun]:
    """The runs that are neither complete nor queued or running (those are reported as skipped)."""
    todo = []
    for row in run_states(runs, state, scheduler):
        if row.state == "done":
            reason = "complete"
        elif row.state in ("pending", "running"):
            reason = f"{row.state} as job {row.jobs[-1]}"
        else:
            todo.append(row.run)
            continue
        if events.on_skip:
            events.on_skip(row.run, reason)
    return todo


def _finished(run: PlannedRun, events: Events, error: str = "") -> str:
    status_file = run.dir / "status.json"
    status = read_json(status_file) if status_file.exists() else {"status": "failed", "error": error or "the job ended before the run started"}
    detail = status.get("error") or status.get("reason") or ""
    if events.on_finish:
        events.on_finish(run, status["status"], detail)
    return status["status"]


def submit_slurm(sweep: SweepConfig, name: str, runs: list[PlannedRun], out: Path, state: SweepState, events: Events) -> None:
    """One Slurm job array of the runs (sbatch through submitit); returns once they are queued."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ConfigError("executor: slurm needs Slurm's sbatch and srun on this machine (a login node); "
                          "use executor: local to run the sweep here")
    executor = slurm_executor(sweep, name, out)
    with executor.batch():
        jobs = [executor.submit(make_job(run)) for run in runs]
    for run, job in zip(runs, jobs):
        state.record(run, job.job_id, "slurm")
        if events.on_submit:
            events.on_submit(run, job.job_id)
    state.save()


def slurm_executor(sweep: SweepConfig, name: str, out: Path):
    submitit = need_submitit()
    job = sweep.job
    executor = submitit.SlurmExecutor(folder=out / ".submitit" / "%j", max_num_timeout=job.max_requeues)
    params: dict[str, Any] = {
        "job_name": name, "time": job.time_min, "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": job.cpus,
        "array_parallelism": sweep.parallel, "setup": list(job.setup), "additional_parameters": dict(job.slurm_extra),
    }
    if job.gpus:
        params["gpus_per_node"] = job.gpus
    optional = {"partition": job.partition, "account": job.account, "qos": job.qos, "constraint": job.constraint,
                "mem": f"{job.mem_gb:g}GB" if job.mem_gb else None}
    params.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def run_local(sweep: SweepConfig, runs: list[PlannedRun], out: Path, state: SweepState, events: Events) -> dict[str, str]:
    """The runs as local submitit jobs, ``parallel`` at a time, each slot with its own GPUs; waits for all."""
    submitit = need_submitit()
    job_opts = sweep.job
    executor = submitit.LocalExecutor(folder=out / ".submitit" / "%j", max_num_timeout=job_opts.max_requeues)
    executor.update_parameters(timeout_min=job_opts.time_min, gpus_per_node=job_opts.gpus)
    pending, active, free = list(runs), {}, list(range(sweep.parallel))
    outcome: dict[str, str] = {}
    try:
        while pending or active:
            while pending and free:
                slot, run = free.pop(0), pending.pop(0)
                if job_opts.gpus:
                    executor.update_parameters(visible_gpus=tuple(range(slot * job_opts.gpus, (slot + 1) * job_opts.gpus)))
                job = executor.submit(make_job(run))
                state.record(run, job.job_id, "local")
                state.save()
                if events.on_submit:
                    events.on_submit(run, job.job_id)
                active[slot] = (run, job)
            time.sleep(POLL_S)
            for slot, (run, job) in list(active.items()):
                if job.done():
                    del active[slot]
                    free.append(slot)
                    outcome[run.name] = _finished(run, events)
    except BaseException:
        for run, job in active.values():
            job.cancel(check=False)
        raise
    return outcome


def run_debug(runs: list[PlannedRun], state: SweepState, events: Events) -> dict[str, str]:
    """The runs one after another in this process (no submitit, no requeue): for trying a sweep file."""
    outcome: dict[str, str] = {}
    for i, run in enumerate(runs):
        state.record(run, f"debug-{i}", "debug")
        state.save()
        if events.on_submit:
            events.on_submit(run, f"debug-{i}")
        error = ""
        try:
            make_job(run)()
        except MagmaxError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - one run's bug must not stop the others; its log has the traceback
            error = f"{type(exc).__name__}: {exc}"
        outcome[run.name] = _finished(run, events, error)
    return outcome
