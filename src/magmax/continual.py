"""The continual-learning runner: task stream × fine-tuning protocol × merge methods → results.

For every stream (Seq-FT starts each task from θ_{t−1}, Ind-FT from θ0; LwF / EWC add a regulariser):

    for task t:  θ_t = finetune(start, D_t)                  (fresh optimiser and schedule)
                 τ_t = θ_t − θ0                              (always relative to the PRE-TRAINED θ0)
                 for each merge m: state_m ← m.update(state_m, τ_t)   (magmax.Merger, O(1) task vectors)
                 evaluate θ_t and θ0 + λ_m·τ*_m on every task's test set with the all-class head

Memory holds θ0, θ_t and the merge states, whatever the number of tasks. After every task the state
needed to continue (θ_t, merger and regulariser states, results so far) is written atomically under
``DIR/state``; ``resume=True`` continues after the last completed task and, on CPU, ends with exactly
the numbers of an uninterrupted run (every random draw of task t derives from (seed, stream, t)). A run
that completes removes ``DIR/state`` (the size of a few models) unless ``keep_state`` is set.

Progress is plain lines (front ends print them, ``DIR/log.txt`` keeps them): one per task and per
evaluation, and one at least every ``progress_interval`` seconds while training, each with the time
elapsed and an ETA for the whole run (:class:`magmax.progress.RunClock`).

Under torchrun (``WORLD_SIZE`` > 1) the run is data-parallel (:mod:`magmax.distributed`): every rank
trains on its share of each batch and evaluates a share of the test batches; merges and the Fisher
are computed on rank 0 and broadcast; rank 0 alone writes the run directory and reads it on --resume.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from magmax import distributed
from magmax.api import Merger
from magmax.merging import create_method
from magmax.config import MergeConfig, RunConfig, StreamConfig
from magmax.errors import ConfigError, MagmaxError
from magmax.evaluation import EvalResult, EvalSet, evaluate
from magmax.labels import model_label, protocol_names
from magmax.metrics import summarize
from magmax.models.base import Backbone
from magmax.models.registry import build_backbone
from magmax.progress import RunClock
from magmax.report import write_results
from magmax.rundir import RunDir, provenance, read_json, write_json
from magmax.scenarios import Task
from magmax.state_io import load_state, save_state
from magmax.task_stream import load_stream
from magmax.training.batches import steps_per_task
from magmax.training.joint import train_joint
from magmax.training.loop import StepInfo, finetune
from magmax.training.regularizers import Regularizer

ZERO_SHOT = "zero-shot"
JOINT = "joint"


def model_name(stream: str, what: str) -> str:
    return f"{stream}:{what}"


def task_seed(seed: int, stream_index: int, task_index: int) -> int:
    return seed * 1_000_003 + stream_index * 10_007 + task_index


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but CUDA is not available; set device: cpu or auto")
    return torch.device(name)


def merge_options(merge: MergeConfig, backbone: Backbone) -> dict[str, Any]:
    """The method options of ``merge``, with ``population: whole_model`` turned into the count of the
    frozen tower's zero entries that TIES ranks with the trained ones (as the reference does)."""
    options = dict(merge.options)
    if merge.population == "whole_model":
        options["zero_entries"] = backbone.reference_frozen_numel()
    return options


def make_regularizer(stream: StreamConfig) -> Regularizer | None:
    if stream.regularizer == "none":
        return None
    from magmax.training.baselines import make_baseline_regularizer

    return make_baseline_regularizer(stream)


@dataclass
class ProgressHooks:
    """Callbacks for a front end; all optional.

    ``on_phase`` gets the headings (set-up, each task) and ``on_line`` every other progress line
    (evaluations, periodic training lines); both are plain text, also written to ``DIR/log.txt``.
    """

    on_phase: Callable[[str], None] | None = None
    on_task_start: Callable[[str, Task, int], None] | None = None
    on_step: Callable[[StepInfo], None] | None = None
    on_eval: Callable[[str, EvalResult], None] | None = None
    on_line: Callable[[str], None] | None = None


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread so the run records it as it records Ctrl-C."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`RunInterrupted` (main thread only: elsewhere signals are not ours)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise RunInterrupted("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys that must match for --resume (keep_state only says what to do at the end; seeds
    and aggregate belong to a multi-seed run, which compares them itself)."""
    return {k: v for k, v in config.items() if k not in ("keep_state", "seeds", "aggregate")}


class ContinualRun:
    def __init__(
        self,
        cfg: RunConfig,
        out: str | Path,
        *,
        resume: bool = False,
        hooks: ProgressHooks | None = None,
        progress_interval: float = 30.0,
        handle_sigterm: bool = True,
    ):
        self.cfg = cfg
        # False where a job runner owns the signals (submitit's requeue on preemption: magmax.sweep).
        self.handle_sigterm = handle_sigterm
        self.dir = RunDir(out)
        self.resume = resume
        self.hooks = hooks or ProgressHooks()
        self.progress_interval = progress_interval
        self.clock: RunClock | None = None
        self._where = ""
        self._last_line = time.monotonic()

    # -- progress lines -----------------------------------------------------------------------------
    def _timing(self) -> str:
        return self.clock.summary() if self.clock is not None else "ETA run ?"

    def _phase(self, text: str) -> None:
        self.log.info(text)
        self._last_line = time.monotonic()
        if self.hooks.on_phase:
            self.hooks.on_phase(text)

    def _line(self, text: str) -> None:
        self.log.info(text)
        self._last_line = time.monotonic()
        if self.hooks.on_line:
            self.hooks.on_line(text)

    def step_hook(self, info: StepInfo) -> None:
        """Called after every training step (tasks and joint): the clock, periodic lines, the front end's hook."""
        if self.clock is not None:
            self.clock.step()
        if time.monotonic() - self._last_line >= self.progress_interval:
            self._line(f"{self._where} step {info.step + 1}/{info.total} loss {info.loss:.4f} lr {info.lr:.2e}, {self._timing()}")
        if self.hooks.on_step:
            self.hooks.on_step(info)

    def _training(self, where: str) -> None:
        self._where = where
        if self.clock is not None:
            self.clock.start_training()

    def _planned_work(self) -> tuple[int, int]:
        """(training steps, evaluations) this process still has to do."""
        cfg = self.cfg
        steps = evals = 0
        if cfg.zero_shot and self.progress["zero_shot"] is None:
            evals += 1
        for stream in cfg.streams:
            done = self.progress["streams"].get(stream.name, {}).get("completed", 0)
            per_task_evals = int(stream.evaluate_finetuned) + len(cfg.merges_for(stream))
            if done < len(self.tasks):
                evals += sum(len(m.lambdas or []) for m in cfg.merges_for(stream))
            for t in range(done, len(self.tasks)):
                tc = self.train_config(t)
                steps += steps_per_task(len(self.tasks[t].train), tc.batch_size, tc.epochs, tc.steps)
                evals += per_task_evals
        if cfg.joint and self.progress["joint"] is None:
            n = sum(len(t.train) for t in self.tasks)
            steps += steps_per_task(n, cfg.train.batch_size, cfg.train.epochs, cfg.train.steps)
            evals += 1
        return steps, evals

    # -- set-up -----------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.device = distributed.local_device(resolve_device(cfg.device))
        self.tasks, groups, self.data_info = load_stream(cfg)
        self.evalset = EvalSet.from_tasks(self.tasks)
        torch.manual_seed(cfg.seed)
        self.backbone: Backbone = build_backbone(cfg.backbone).to(self.device)
        self.theta0 = {k: v.detach().cpu().clone() for k, v in self.backbone.encoder.state_dict().items()}
        # The head is built ONCE from the frozen pre-trained text side and never trained nor merged.
        self.class_ids = [c for g in groups for c in g.class_ids]
        self.head_all = torch.cat([self.backbone.class_embeddings(g.names, g.templates).float().cpu() for g in groups])
        self.row_of = {c: i for i, c in enumerate(self.class_ids)}

    def train_config(self, t: int):
        """train settings of task t: the scenario's per-task epochs, where given, override train.epochs."""
        epochs = self.cfg.scenario.epochs
        if epochs is None:
            return self.cfg.train
        return self.cfg.train.model_copy(update={"epochs": epochs[t], "steps": None})

    def head_for(self, task: Task) -> torch.Tensor:
        return self.head_all[[self.row_of[c] for c in task.classes]]

    def load_encoder(self, state: dict[str, torch.Tensor]) -> None:
        self.backbone.encoder.load_state_dict(state)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.backbone.encoder.state_dict().items()}

    def label(self, name: str, after_task: int | None = None) -> str:
        """The model's display label (the one the results table, files and plot use)."""
        stream, _, what = name.partition(":")
        merge = next((m for m in self.cfg.merges if m.name == what), None) if what else None
        entry = {
            "kind": name if not what else ("finetune" if merge is None else "merge"),
            "protocol": self.protocols.get(stream, stream),
            "method": None if merge is None else merge.method,
        }
        return model_label(name, entry, len(self.tasks), after_task)

    def eval_current(self, name: str, after_task: int | None = None, note: str = "") -> EvalResult:
        res = evaluate(self.backbone, self.evalset, self.head_all, self.class_ids, self.cfg.train.eval_batch_size, self.device, self.cfg.train.precision)
        if self.clock is not None:
            self.clock.evaluated()
        per_task = " ".join(f"{a:.1f}" for a in res.per_task)
        self._line(f"  eval {self.label(name, after_task)}{f' ({note})' if note else ''}: all {res.overall:.2f} | per task {per_task} | {self._timing()}")
        if self.hooks.on_eval:
            self.hooks.on_eval(name, res)
        return res

    # -- progress (resume) --------------------------------------------------------------------------
    def _save_progress(self) -> None:
        if self.dir.writer:
            write_json(self.dir.state / "progress.json", self.progress)

    def _fresh_progress(self) -> dict[str, Any]:
        return {"config": self.cfg.model_dump(mode="json"), "zero_shot": None, "joint": None, "streams": {}}

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        distributed.init_from_env(resolve_device(self.cfg.device))
        self.dir.writer = distributed.is_main()
        restart = distributed.run_on_main(lambda: self.dir.create(self.resume))
        self.log = self.dir.logger()
        if restart is not None:
            self._phase(restart)
        resolved = self.cfg.model_dump(mode="json")
        if self.resume and restart is None:
            self.progress = distributed.run_on_main(lambda: read_json(self.dir.state / "progress.json"))
            if comparable_config(self.progress["config"]) != comparable_config(resolved):
                message = f"--resume: the config differs from the one '{self.dir.path}' was started with; resume with the same config"
                self.log.error(f"error: {message}")
                raise ConfigError(message)
        else:
            self.progress = self._fresh_progress()
        self.dir.write_config(resolved)
        self.dir.set_status("running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        try:
            with sigterm_raises() if self.handle_sigterm else nullcontext():
                results = self._run()
        except KeyboardInterrupt as exc:
            reason = "SIGTERM" if isinstance(exc, RunInterrupted) else "KeyboardInterrupt (Ctrl-C)"
            self.log.error(f"interrupted by {reason}; continue with --resume --out {self.dir.path}")
            self.dir.set_status("interrupted", reason=f"interrupted by {reason}", interrupted=time.strftime("%Y-%m-%dT%H:%M:%S"))
            raise
        except SystemExit as exc:
            # Not a failure of the run: a job runner ends the process (submitit, when the job is preempted or
            # times out, saves its resubmission and exits; the requeued job resumes here).
            self.log.error(f"stopped by the process exiting (code {exc.code}); continue with --resume --out {self.dir.path}")
            self.dir.set_status("interrupted", reason=f"process exit (code {exc.code})", interrupted=time.strftime("%Y-%m-%dT%H:%M:%S"))
            raise
        except BaseException as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, MagmaxError):
                self.log.error(f"error: {message}")
            else:  # not a user error: the log keeps the whole traceback for the bug report
                self.log.exception(f"error: {type(exc).__name__}: {message}")
            self.dir.set_status("failed", error=message)
            raise
        kept = self.cfg.keep_state
        self.dir.set_status("complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), state="kept" if kept else "removed")
        if not kept and self.dir.writer:
            # The resume state (θ_t and merger states: several models' worth) has no use once the run is complete.
            shutil.rmtree(self.dir.state, ignore_errors=True)
        self.log.info(f"complete in {results['seconds']:.0f} s" + ("; resume state kept in state/" if kept else ""))
        return results

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.time()
        self._phase("loading data and model")
        self.setup()
        self.protocols = protocol_names(cfg.streams)
        self.clock = RunClock(*self._planned_work())
        if self.dir.writer:
            write_json(
                self.dir.path / "provenance.json",
                provenance(cfg.seed, self.theta0, self.data_info, cfg.backbone.model_dump(mode="json")),
            )
        if cfg.save_checkpoints:  # θ0 beside θ_t: what the task vectors (and `magmax report`'s analyses) need
            self._save_checkpoint(self.theta0, "theta0")
        self.log.info(f"{len(self.tasks)} tasks: " + "; ".join(f"{t.name} ({len(t.train)} train / {len(t.test)} test)" for t in self.tasks))
        if cfg.zero_shot and self.progress["zero_shot"] is None:
            self._phase("evaluating the pre-trained model (zero-shot)")
            self.load_encoder(self.theta0)
            self.progress["zero_shot"] = self.eval_current(ZERO_SHOT).to_json()
            self._save_progress()
        for s_idx, stream in enumerate(cfg.streams):
            self._run_stream(s_idx, stream)
        if cfg.joint and self.progress["joint"] is None:
            self._phase(f"joint training on all tasks (upper bound); {self._timing()}")
            self.load_encoder(self.theta0)
            self._training("[joint]")
            train_joint(
                self.backbone, self.tasks, self.head_all, self.class_ids, cfg.train,
                seed=task_seed(cfg.seed, len(cfg.streams), 0), device=self.device, on_step=self.step_hook,
            )
            self.clock.end_training()
            self.progress["joint"] = self.eval_current(JOINT).to_json()
            self._save_progress()
        results = self.results(time.time() - t0)
        if self.dir.writer:
            write_results(self.dir.path, results)
        return results

    def _stream_state_path(self, stream: StreamConfig) -> Path:
        return self.dir.state / f"stream-{stream.name}"

    def _run_stream(self, s_idx: int, stream: StreamConfig) -> None:
        cfg = self.cfg
        merges = cfg.merges_for(stream)
        entry = self.progress["streams"].setdefault(stream.name, {"completed": 0, "rows": {}})
        done = entry["completed"]
        if done == len(self.tasks):
            return
        merge_configs = {m.name: m for m in merges}
        mergers = {m.name: Merger(m.method, self.theta0, **merge_options(m, self.backbone)) for m in merges}
        regularizer = make_regularizer(stream)
        if done > 0:
            base = self._stream_state_path(stream)
            saved, theta = distributed.from_main(lambda: (load_state(base), load_file(str(base) + ".theta.safetensors")))
            self.load_encoder(theta)
            for name, merger in mergers.items():
                merger.load_state_dict(saved["mergers"][name])
            if regularizer is not None:
                regularizer.load_state_dict(saved["regularizer"])
        else:
            self.load_encoder(self.theta0)
        for t in range(done, len(self.tasks)):
            task = self.tasks[t]
            where = f"[{stream.name}] task {t + 1}/{len(self.tasks)}"
            self._phase(f"{where}: {task.name} ({len(task.train)} training samples); {self._timing()}")
            if stream.start == "pretrained":
                self.load_encoder(self.theta0)
            if self.hooks.on_task_start:
                self.hooks.on_task_start(stream.name, task, t)
            previous_heads = [self.head_for(p) for p in self.tasks[:t]]
            self._training(where)
            finetune(
                self.backbone, task, self.head_for(task), self.train_config(t),
                seed=task_seed(cfg.seed, s_idx, t), device=self.device, regularizer=regularizer,
                previous_heads=previous_heads, on_step=self.step_hook,
            )
            self.clock.end_training()
            theta_t = self.encoder_state()
            rows = entry["rows"]
            if stream.evaluate_finetuned:
                name = model_name(stream.name, "finetune")
                rows.setdefault(name, []).append(self.eval_current(name, t + 1).to_json())
            for label, merger in mergers.items():
                merger.add(theta_t)
                merged = distributed.from_main(merger.merged)  # rank 0's merge, on every rank
                self.load_encoder(merged)
                name = model_name(stream.name, label)
                rows.setdefault(name, []).append(self.eval_current(name, t + 1).to_json())
                if cfg.save_checkpoints and t == len(self.tasks) - 1:
                    self._save_checkpoint(merged, f"{stream.name}-{label}-final")
                del merged
                lambdas = merge_configs[label].lambdas
                if lambdas and t == len(self.tasks) - 1:  # the λ sweep of the final merge (opt-in: evaluations cost)
                    sweep = entry.setdefault("sweeps", {})[name] = []
                    for lam in lambdas:
                        self.load_encoder(distributed.from_main(lambda: merger.merged(scale=lam)))  # noqa: B023 (called at once)
                        sweep.append({"scale": lam, **self.eval_current(name, t + 1, f"λ {lam:g}").to_json()})
            self.load_encoder(theta_t)
            if cfg.save_checkpoints:
                self._save_checkpoint(theta_t, f"{stream.name}-task{t + 1}")
            # Resume point: θ_t and every state, then the progress record that points at them.
            if self.dir.writer:
                base = self._stream_state_path(stream)
                tmp = Path(str(base) + ".theta.safetensors.tmp")
                save_file({k: v.contiguous() for k, v in theta_t.items()}, str(tmp))
                tmp.replace(str(base) + ".theta.safetensors")
                save_state(
                    {
                        "mergers": {n: m.state_dict() for n, m in mergers.items()},
                        "regularizer": regularizer.state_dict() if regularizer is not None else {},
                    },
                    base,
                )
            entry["completed"] = t + 1
            self._save_progress()
            del theta_t

    def _save_checkpoint(self, state: dict[str, torch.Tensor], name: str) -> None:
        if not self.dir.writer:
            return
        folder = self.dir.path / "checkpoints"
        folder.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"{name}.safetensors"))

    # -- results ------------------------------------------------------------------------------------
    def results(self, seconds: float) -> dict[str, Any]:
        task_aware = self.cfg.scenario.task_aware
        # Task-aware settings (e.g. 8 datasets) report the unweighted mean over tasks, as that literature does.
        sizes = [1] * len(self.tasks) if task_aware else self.evalset.sizes
        models: dict[str, Any] = {}
        protocols = protocol_names(self.cfg.streams)
        if self.progress["zero_shot"] is not None:
            zs = self.progress["zero_shot"]
            models[ZERO_SHOT] = {"kind": "zero-shot", "rows": [zs["per_task"]], "overall": [zs["overall"]], "task_aware": [zs["per_task_aware"]]}
        for stream in self.cfg.streams:
            sweeps = self.progress["streams"].get(stream.name, {}).get("sweeps", {})
            for name, rows in self.progress["streams"].get(stream.name, {}).get("rows", {}).items():
                what = name.split(":", 1)[1]
                merge = next((m for m in self.cfg.merges if m.name == what), None)
                models[name] = {
                    "kind": "finetune" if merge is None else "merge",
                    "stream": stream.name,
                    "protocol": protocols[stream.name],
                    "method": None if merge is None else merge.method,
                    "scale": None if merge is None else create_method(merge.method, **merge.options).scale,
                    "rows": [r["per_task"] for r in rows],
                    "overall": [r["overall"] for r in rows],
                    "task_aware": [r["per_task_aware"] for r in rows],
                }
                if name in sweeps:
                    models[name]["lambda_sweep"] = [
                        {"scale": r["scale"], "final_accuracy": float(np.mean(r["per_task_aware"])) if task_aware else r["overall"],
                         "per_task": r["per_task"], "per_task_aware": r["per_task_aware"]}
                        for r in sweeps[name]
                    ]
        if self.progress["joint"] is not None:
            j = self.progress["joint"]
            models[JOINT] = {"kind": "joint", "rows": [j["per_task"]], "overall": [j["overall"]], "task_aware": [j["per_task_aware"]]}
        for name, m in models.items():
            m["label"] = model_label(name, m, len(self.tasks))
            acc = np.asarray(m["task_aware" if task_aware else "rows"], dtype=float)
            if acc.shape[0] == len(self.tasks):
                m["metrics"] = summarize(acc, sizes)
            else:  # evaluated once (zero-shot, joint): no stream of rows, only the final model
                final = float(np.mean(acc[-1])) if task_aware else m["overall"][-1]
                m["metrics"] = {"final_accuracy": final, "average_incremental_accuracy": None, "forgetting": None, "backward_transfer": None}
        return {
            "name": self.cfg.name,
            "complete": True,
            "seconds": seconds,
            "device": str(self.device),
            "tasks": [
                {"index": t.index, "name": t.name, "classes": list(t.classes), "n_train": len(t.train), "n_test": len(t.test)}
                for t in self.tasks
            ],
            "test_sizes": sizes,
            "headline": "task-aware accuracy, mean over tasks" if task_aware else "task-agnostic accuracy on the whole test set",
            "models": models,
        }
