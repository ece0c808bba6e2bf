"""One run of a sweep as a job: a picklable callable that submitit runs on a node (or locally).

The job is a normal run directory. It resumes whatever its directory holds (``state/progress.json``), so a
job that Slurm restarts from its original submission continues too; a complete run is not run again.
When submitit is told the job is preempted or out of time (SIGUSR2), it calls :meth:`SweepJob.checkpoint`,
requeues the returned submission and exits; the requeued job goes on from the last completed task.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magmax.rundir import RunDir, read_json


@dataclass(frozen=True)
class SweepJob:
    name: str
    config: str  # absolute path of the preset
    overrides: tuple[str, ...]
    out: str  # absolute path of the run directory
    resume: bool = False  # set by checkpoint(): this submission continues an interrupted job
    requeues: int = 0

    def __call__(self) -> dict[str, Any]:
        from magmax.cli_common import LineHooks
        from magmax.config import load_config
        from magmax.console import make_console, print_line
        from magmax.continual import ContinualRun

        run_dir = RunDir(self.out)
        console = make_console(stderr=True)  # progress on stderr, as `magmax run` prints it
        if run_dir.status() == "complete":
            print_line(console, f"{self.name}: already complete in {self.out}")
            return self.summary()
        cfg = load_config(self.config, list(self.overrides))
        resume = (run_dir.state / "progress.json").exists()
        what = "resuming after the last completed task" if resume else "starting"
        requeued = f" (requeued {self.requeues}x)" if self.requeues else ""
        print_line(console, f"{self.name}{requeued}: {what} in {self.out}", style="bold")
        hooks = LineHooks(console, None).hooks()
        # submitit owns the signals in a job: SIGUSR2 checkpoints and requeues, SIGTERM is left to it.
        ContinualRun(cfg, self.out, resume=resume, hooks=hooks, handle_sigterm=False).run()
        return self.summary()

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's hook on preemption or time-out: the same run, resumed, as the job's next submission."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(dataclasses.replace(self, resume=True, requeues=self.requeues + 1))

    def summary(self) -> dict[str, Any]:
        status = read_json(Path(self.out) / "status.json")
        return {"name": self.name, "dir": self.out, "status": status.get("status"), "finished": status.get("finished", time.strftime("%Y-%m-%dT%H:%M:%S"))}
