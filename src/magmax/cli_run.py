"""`magmax run CONFIG.yaml` and `magmax demo`: the continual-learning runner with progress and a final table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from magmax.cli import app
from magmax.config import RunConfig, load_config
from magmax.console import make_console, print_error, print_line
from magmax.presets import demo_config_path


class LineHooks:
    """Progress as lines (task headings, evaluations, periodic training lines, each with an ETA for the
    run), in terminals and logs alike; on a terminal also a live bar for the task being trained."""

    def __init__(self, console: Console, progress: Progress | None):
        self.console = console
        self.progress = progress
        self.bar: int | None = None

    def on_phase(self, text: str) -> None:
        print_line(self.console, text, style="bold")

    def on_line(self, text: str) -> None:
        print_line(self.console, text)

    def on_task_start(self, stream: str, task, index: int) -> None:
        if self.progress is None:
            return
        if self.bar is not None:
            self.progress.remove_task(self.bar)
        self.bar = self.progress.add_task(escape(f"{stream} task {index + 1}"), total=None, loss=float("nan"), lr=0.0)

    def on_step(self, info) -> None:
        if self.progress is not None and self.bar is not None:
            self.progress.update(self.bar, total=info.total, completed=info.step + 1, loss=info.loss, lr=info.lr)

    def hooks(self):
        from magmax.continual import ProgressHooks

        return ProgressHooks(on_phase=self.on_phase, on_task_start=self.on_task_start, on_step=self.on_step, on_line=self.on_line)


def with_keep_state(cfg: RunConfig, keep_state: bool) -> RunConfig:
    """--keep-state turns the config's keep_state on (it never turns a config's ``keep_state: true`` off)."""
    return cfg.model_copy(update={"keep_state": True}) if keep_state else cfg


def default_out(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def execute(cfg: RunConfig, out: Path, resume: bool, again: str, progress_interval: float = 30.0) -> dict:
    """Run ``cfg`` into ``out`` with progress lines; ``again`` is the command that resumes it (for the hint).
    In a data-parallel run only rank 0 prints."""
    from magmax import distributed
    from magmax.continual import ContinualRun, RunInterrupted
    from magmax.report import RESULTS_TABLE_MIN_WIDTH, results_lines, results_table

    if not distributed.is_main():
        try:
            return ContinualRun(cfg, out, resume=resume).run()
        except KeyboardInterrupt as exc:
            raise typer.Exit(143 if isinstance(exc, RunInterrupted) else 130) from None

    console = make_console(stderr=True)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
        TimeElapsedColumn(),
        TextColumn("ETA task"),
        TimeRemainingColumn(),
    ]
    # Off a terminal a live bar prints nothing useful: the lines alone carry the progress there.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        hooks = LineHooks(console, progress if console.is_terminal else None)
        run = ContinualRun(cfg, out, resume=resume, hooks=hooks.hooks(), progress_interval=progress_interval)
        try:
            results = run.run()
        except KeyboardInterrupt as exc:
            sigterm = isinstance(exc, RunInterrupted)
            progress.stop()
            print_error(console, f"run interrupted ({'SIGTERM' if sigterm else 'Ctrl-C'}); '{out}' keeps the state "
                        f"after the last completed task; continue with: {again} --out {out} --resume")
            raise typer.Exit(143 if sigterm else 130) from None
    stdout = make_console()
    if stdout.width >= RESULTS_TABLE_MIN_WIDTH:
        stdout.print(results_table(results))
    else:
        for line in results_lines(results):
            print_line(stdout, line, indent=4)
    print_line(console, f"run directory: {out}  ({results['seconds']:.0f} s)")
    return results


@app.command("run")
def run_command(
    config: Path = typer.Argument(..., help="YAML run config (see configs/paper/, or `magmax demo`)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: --set train.steps=100 (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/NAME-TIMESTAMP)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out after its last completed task"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved plan and exit"),
    keep_state: bool = typer.Option(False, "--keep-state", help="keep the resume state DIR/state/ when the run completes"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="data-parallel processes on this machine (one per GPU): "
                              "launches `torchrun --standalone --nproc_per_node N -m magmax run ...`"),
) -> None:
    """Run a continual-learning experiment: fine-tune through the task stream, merge after every task, evaluate."""
    cfg = with_keep_state(load_config(config, set_ or []), keep_state)
    if dry_run:
        from magmax.plan import print_plan

        print_plan(cfg, make_console())
        return
    if resume and out is None:
        raise typer.BadParameter("--resume needs --out DIR (the run to continue)")
    again = f"magmax run {config}" + (f" --nproc {nproc}" if nproc > 1 else "")
    if nproc > 1 and not launched():
        launch(config, set_ or [], out or default_out(cfg), resume, keep_state, nproc)
        return
    from magmax import distributed
    from magmax.continual import resolve_device

    distributed.init_from_env(resolve_device(cfg.device))
    # Every rank must write into the same folder: rank 0's default name (its timestamp) for all.
    try:
        out = Path(distributed.run_on_main(lambda: str(out or default_out(cfg))))
        execute(cfg, out, resume, again=again)
    finally:
        distributed.destroy()


def launched() -> bool:
    from magmax.distributed import launched as inside

    return inside()


def launch(config: Path, sets: list[str], out: Path, resume: bool, keep_state: bool, nproc: int) -> None:
    """``--nproc N``: the same command under torch's elastic launcher (torchrun), N processes on this machine."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args = ["--standalone", "--nproc_per_node", str(nproc), "-m", "magmax", "run", str(config), "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    if resume:
        args.append("--resume")
    if keep_state:
        args.append("--keep-state")
    try:
        torchrun(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values() if f.exitcode and f.exitcode > 0]
        if 2 in codes:  # a user error: rank 0 has said what and where
            raise typer.Exit(2) from None
        print_error(make_console(stderr=True), f"a rank of the {nproc}-process run failed (see above); '{out}' keeps "
                    f"the state after the last completed task; continue with: magmax run {config} --nproc {nproc} "
                    f"--out {out} --resume")
        raise typer.Exit(min(codes) if codes else 1) from None


@app.command("demo")
def demo_command(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/demo-...)"),
    image: bool = typer.Option(False, "--image", help="the image stream (EfficientNet-Lite0 on Fashion-MNIST) instead of text"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted demo in --out"),
    keep_state: bool = typer.Option(False, "--keep-state", help="keep the resume state DIR/state/ when the run completes"),
) -> None:
    """The embedded demo: a real pre-trained model on real data shipped by registry packages, no download."""
    cfg = with_keep_state(load_config(demo_config_path("image" if image else "text"), set_ or []), keep_state)
    execute(cfg, out or default_out(cfg), resume, again="magmax demo" + (" --image" if image else ""))
