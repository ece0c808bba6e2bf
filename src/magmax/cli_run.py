"""`magmax run CONFIG.yaml` and `magmax demo`: the continual-learning runner with progress and a final table."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from magmax.cli import app
from magmax.config import RunConfig, load_config

console = Console(stderr=True)


class RichHooks:
    """Progress bars: one per task (steps, loss, lr, ETA); evaluation results as log lines."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.bar: int | None = None

    def on_phase(self, text: str) -> None:
        self.progress.console.print(f"[bold]{escape(text)}[/]")

    def on_task_start(self, stream: str, task, index: int) -> None:
        if self.bar is not None:
            self.progress.remove_task(self.bar)
        self.bar = self.progress.add_task(f"{stream} task {index + 1}", total=None, loss=float("nan"), lr=0.0)

    def on_step(self, info) -> None:
        if self.bar is not None:
            self.progress.update(self.bar, total=info.total, completed=info.step + 1, loss=info.loss, lr=info.lr)

    def on_eval(self, name: str, result) -> None:
        per_task = " ".join(f"{a:5.1f}" for a in result.per_task)
        self.progress.console.print(f"  eval {name:<22} all {result.overall:6.2f}  per task [{per_task}]")


def default_out(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def execute(cfg: RunConfig, out: Path, resume: bool) -> dict:
    from magmax.continual import ContinualRun, ProgressHooks
    from magmax.report import results_table

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        hooks = RichHooks(progress)
        run = ContinualRun(
            cfg, out, resume=resume,
            hooks=ProgressHooks(hooks.on_phase, hooks.on_task_start, hooks.on_step, hooks.on_eval),
        )
        results = run.run()
    Console().print(results_table(results))
    console.print(f"run directory: {out}  ({results['seconds']:.0f} s)")
    return results


@app.command("run")
def run_command(
    config: Path = typer.Argument(..., help="YAML run config (see configs/)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: --set train.steps=100 (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/NAME-TIMESTAMP)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out after its last completed task"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved plan and exit"),
) -> None:
    """Run a continual-learning experiment: fine-tune through the task stream, merge after every task, evaluate."""
    cfg = load_config(config, set_ or [])
    if dry_run:
        from magmax.plan import print_plan

        print_plan(cfg, Console())
        return
    if resume and out is None:
        raise typer.BadParameter("--resume needs --out DIR (the run to continue)")
    execute(cfg, out or default_out(cfg), resume)


DEMOS = {"text": "demo_text.yaml", "image": "demo_image.yaml"}


def demo_config_path(kind: str) -> Path:
    return Path(str(resources.files("magmax.presets") / DEMOS[kind]))


@app.command("demo")
def demo_command(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/demo-...)"),
    image: bool = typer.Option(False, "--image", help="the image stream (EfficientNet-Lite0 on Fashion-MNIST) instead of text"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted demo in --out"),
) -> None:
    """The embedded demo: a real pre-trained model on real data shipped by registry packages, no download."""
    cfg = load_config(demo_config_path("image" if image else "text"), set_ or [])
    execute(cfg, out or default_out(cfg), resume)
