"""A multi-seed run (``seeds: [5, 6, 7]`` or ``--seeds 5,6,7``): one single-seed run per seed, then the
aggregate over seeds.

Layout::

    DIR/config.yaml        the resolved config (with its seeds)
    DIR/status.json        {"status": "running" | "failed" | "interrupted" | "complete", "seeds": [...],
                            "complete": [seeds done], ...}
    DIR/log.txt            which seed ran, was skipped or stopped the run
    DIR/seed-<s>/          a normal run directory (:class:`magmax.continual.ContinualRun`) of the config
                           with ``seed: s``: the same files and numbers as ``magmax run`` with that seed
    DIR/aggregate.json     per model and metric: mean, std, Student-t interval, n, per-seed values, and the
                           paired differences against the reference model (:mod:`magmax.stats`)
    DIR/results.md         the aggregate as tables (mean ± half-width; paired differences)
    DIR/results.csv        the aggregate, one row per model

The aggregate files appear only when every seed has completed. ``resume=True`` resumes the seeds that
did not finish (each from its own last completed task) and skips the complete ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from magmax.config import RunConfig
from magmax.continual import ContinualRun, ProgressHooks, RunInterrupted
from magmax.errors import ConfigError, MagmaxError
from magmax.rundir import RunDir, read_json, write_json
from magmax.seeds_report import write_aggregate
from magmax.stats import aggregate_results


def seed_dir(out: str | Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys that must match for --resume (keep_state and aggregate only act at the end)."""
    return {k: v for k, v in config.items() if k not in ("keep_state", "aggregate")}


def is_multiseed_dir(path: str | Path) -> bool:
    status = Path(path) / "status.json"
    return status.is_file() and "seeds" in read_json(status)


class MultiSeedRun:
    def __init__(
        self,
        cfg: RunConfig,
        out: str | Path,
        *,
        resume: bool = False,
        hooks: ProgressHooks | None = None,
        progress_interval: float = 30.0,
    ):
        if not cfg.seeds:
            raise ConfigError("a multi-seed run needs seeds, e.g. seeds: [5, 6, 7] or --seeds 5,6,7")
        self.cfg = cfg
        self.dir = RunDir(out)
        self.resume = resume
        self.hooks = hooks or ProgressHooks()
        self.progress_interval = progress_interval
        self.seeds: list[int] = list(cfg.seeds)
        self.complete: list[int] = []

    def _phase(self, text: str) -> None:
        self.log.info(text)
        if self.hooks.on_phase:
            self.hooks.on_phase(text)

    def _status(self, status: str, **extra: Any) -> None:
        write_json(self.dir.path / "status.json", {"status": status, "seeds": self.seeds, "complete": self.complete, **extra})

    def _open(self, resolved: dict[str, Any]) -> None:
        """Make DIR, or reopen it for --resume; refuse anything else."""
        path = self.dir.path
        if not self.resume:
            if path.exists() and any(path.iterdir()):
                raise ConfigError(f"output folder '{path}' already holds a run; pass --resume to continue it or choose another --out")
        else:
            if not is_multiseed_dir(path):
                raise ConfigError(f"--resume: '{path}' holds no multi-seed run (no status.json with seeds); "
                                  "resume a single-seed run without seeds, or start a new run")
            if self.dir.status() == "complete":
                raise ConfigError(f"--resume: the run in '{path}' is already complete, nothing to resume; "
                                  f"its aggregate is in {path / 'aggregate.json'}")
            started = yaml_config(path)
            if comparable(started) != comparable(resolved):
                raise ConfigError(f"--resume: the config differs from the one '{path}' was started with "
                                  f"(seeds {started.get('seeds')}); resume with the same config")
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory '{path}' ({exc.strerror}); choose a writable --out") from None

    def run(self) -> dict[str, Any]:
        resolved = self.cfg.model_dump(mode="json")
        self._open(resolved)
        self.log = self.dir.logger()
        self.dir.write_config(resolved)
        t0 = time.time()
        self._status("running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        results: dict[int, dict[str, Any]] = {}
        try:
            for i, seed in enumerate(self.seeds):
                results[seed] = self._run_seed(i, seed)
                self.complete.append(seed)
                self._status("running", current=None)
            reference = self.cfg.reference_model()
            aggregate = aggregate_results(self.seeds, results, reference, self.cfg.aggregate.confidence)
            first = results[self.seeds[0]]
            headline = first.get("headline", "task-agnostic accuracy on the whole test set")
            write_aggregate(self.dir.path, aggregate, self.cfg.name, headline)
        except KeyboardInterrupt as exc:
            reason = "SIGTERM" if isinstance(exc, RunInterrupted) else "KeyboardInterrupt (Ctrl-C)"
            self.log.error(f"interrupted by {reason}; continue with --resume --out {self.dir.path}")
            self._status("interrupted", reason=f"interrupted by {reason}", interrupted=time.strftime("%Y-%m-%dT%H:%M:%S"))
            raise
        except BaseException as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.log.error(f"error: {message}" if isinstance(exc, MagmaxError) else f"error: {type(exc).__name__}: {message}")
            self._status("failed", error=message)
            raise
        seconds = time.time() - t0
        self._status("complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.log.info(f"complete in {seconds:.0f} s: {self.dir.path / 'aggregate.json'}")
        return {"name": self.cfg.name, "seconds": seconds, "headline": headline, "aggregate": aggregate, "results": results}

    def _run_seed(self, i: int, seed: int) -> dict[str, Any]:
        sub = seed_dir(self.dir.path, seed)
        where = f"seed {seed} ({i + 1}/{len(self.seeds)})"
        sub_dir = RunDir(sub)
        if sub_dir.status() == "complete" and (sub / "results.json").is_file():
            self._phase(f"{where}: complete in {sub}, skipped")
            return read_json(sub / "results.json")
        resumable = (sub_dir.state / "progress.json").is_file()
        self._phase(f"{where}: {'resuming' if resumable else 'running'} in {sub}")
        self._status("running", current=seed)
        run = ContinualRun(self.cfg.for_seed(seed), sub, resume=resumable, hooks=self.hooks,
                           progress_interval=self.progress_interval)
        return run.run()


def yaml_config(path: Path) -> dict[str, Any]:
    import yaml

    file = path / "config.yaml"
    if not file.is_file():
        raise ConfigError(f"--resume: '{path}' has no config.yaml; start a new run")
    return yaml.safe_load(file.read_text()) or {}
