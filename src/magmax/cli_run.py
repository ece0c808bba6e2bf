"""`magmax run CONFIG.yaml` and `magmax demo`: the continual-learning runner with progress and a final table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from magmax.cli_common import LineHooks
from magmax.config import RunConfig, load_config
from magmax.console import make_console, print_error, print_line
from magmax.errors import ConfigError
from magmax.rundir import read_json
from magmax.presets import demo_config_path


def with_keep_state(cfg: RunConfig, keep_state: bool) -> RunConfig:
    """--keep-state turns the config's keep_state on (it never turns a config's ``keep_state: true`` off)."""
    return cfg.model_copy(update={"keep_state": True}) if keep_state else cfg


def default_out(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def execute(cfg: RunConfig, out: Path, resume: bool, again: str, progress_interval: float = 30.0) -> dict:
    """Run ``cfg`` into ``out`` with progress lines; ``again`` is the command that resumes it (for the hint).
    In a data-parallel run only rank 0 prints.

    With ``seeds`` set, one run per seed under ``out/seed-<s>/`` and the aggregate (:mod:`magmax.multiseed`)."""
    from magmax import distributed
    from magmax.continual import ContinualRun, RunInterrupted
    from magmax.multiseed import MultiSeedRun, is_multiseed_dir
    from magmax.stats import NO_INTERVAL

    if not distributed.is_main():
        try:  # the same run as rank 0's (one per seed in turn), without printing
            return (ContinualRun if cfg.seeds is None else MultiSeedRun)(cfg, out, resume=resume).run()
        except KeyboardInterrupt as exc:
            raise typer.Exit(143 if isinstance(exc, RunInterrupted) else 130) from None

    console = make_console(stderr=True)
    if resume and cfg.seeds is None and is_multiseed_dir(out):
        seeds = ",".join(str(s) for s in read_json(out / "status.json")["seeds"])
        raise ConfigError(f"--resume: '{out}' holds a multi-seed run (seeds {seeds}); resume it with --seeds {seeds} "
                          "or the config's seeds")
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
        kind = ContinualRun if cfg.seeds is None else MultiSeedRun
        run = kind(cfg, out, resume=resume, hooks=hooks.hooks(), progress_interval=progress_interval)
        try:
            results = run.run()
        except KeyboardInterrupt as exc:
            sigterm = isinstance(exc, RunInterrupted)
            progress.stop()
            print_error(console, f"run interrupted ({'SIGTERM' if sigterm else 'Ctrl-C'}); '{out}' keeps the state "
                        f"after the last completed task; continue with: {again} --out {out} --resume")
            raise typer.Exit(143 if sigterm else 130) from None
    if cfg.seeds is None:
        print_results(results)
        print_line(console, f"{NO_INTERVAL} (--seeds 5,6,7 gives the mean and an interval over seeds)")
    else:
        print_aggregate(results["aggregate"], results["name"])
    print_line(console, f"run directory: {out}  ({results['seconds']:.0f} s)")
    return results


def print_results(results: dict) -> None:
    from magmax.report import RESULTS_TABLE_MIN_WIDTH, results_lines, results_table

    stdout = make_console()
    if stdout.width >= RESULTS_TABLE_MIN_WIDTH:
        stdout.print(results_table(results))
    else:
        for line in results_lines(results):
            print_line(stdout, line, indent=4)


def print_aggregate(aggregate: dict, name: str) -> None:
    from magmax.seeds_report import AGGREGATE_TABLE_MIN_WIDTH, aggregate_lines, aggregate_table

    stdout = make_console()
    if stdout.width >= AGGREGATE_TABLE_MIN_WIDTH:
        stdout.print(aggregate_table(aggregate, name))
    else:
        for line in aggregate_lines(aggregate, name):
            print_line(stdout, line, indent=4)


def seed_overrides(seeds: Optional[str]) -> list[str]:
    """``--seeds 5,6,7`` as the config override ``seeds=[5, 6, 7]`` (validated with the rest of the config)."""
    if seeds is None:
        return []
    parts = [p.strip() for p in seeds.split(",")]
    if not all(p.lstrip("-").isdigit() for p in parts):
        raise ConfigError(f"--seeds '{seeds}': expected integers separated by commas, e.g. --seeds 5,6,7")
    return [f"seeds=[{', '.join(parts)}]"]


def again_with(command: str, seeds: Optional[str]) -> str:
    return command + (f" --seeds {seeds}" if seeds else "")


def run_command(
    config: Path = typer.Argument(..., help="YAML run config (see configs/paper/, or `magmax demo`)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: --set train.steps=100 (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/NAME-TIMESTAMP)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out after its last completed task"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved plan and exit"),
    keep_state: bool = typer.Option(False, "--keep-state", help="keep the resume state DIR/state/ when the run completes"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="data-parallel processes on this machine (one per GPU): "
                              "launches `torchrun --standalone --nproc_per_node N -m magmax run ...`"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="run once per seed into DIR/seed-<s>/ and aggregate: --seeds 5,6,7"),
) -> None:
    """Run a continual-learning experiment: fine-tune through the task stream, merge after every task, evaluate."""
    cfg = with_keep_state(load_config(config, (set_ or []) + seed_overrides(seeds)), keep_state)
    if dry_run:
        from magmax.plan import print_plan

        console = make_console()
        print_plan(cfg if cfg.seeds is None else cfg.for_seed(cfg.seeds[0]), console)
        if cfg.seeds is not None:
            order = "; with class_order: random each seed draws its own order" if cfg.scenario.class_order == "random" else ""
            print_line(console, f"seeds {', '.join(map(str, cfg.seeds))}: one run each into DIR/seed-<s>/ (the plan of "
                       f"seed {cfg.seeds[0]} is shown{order}); aggregate against {cfg.reference_model()}")
        return
    if resume and out is None:
        raise typer.BadParameter("--resume needs --out DIR (the run to continue)")
    again = again_with(f"magmax run {config}" + (f" --nproc {nproc}" if nproc > 1 else ""), seeds)
    if nproc > 1 and not launched():
        launch(config, (set_ or []) + seed_overrides(seeds), out or default_out(cfg), resume, keep_state, nproc)
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


def demo_command(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/demo-...)"),
    image: bool = typer.Option(False, "--image", help="the image stream (EfficientNet-Lite0 on Fashion-MNIST) instead of text"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted demo in --out"),
    keep_state: bool = typer.Option(False, "--keep-state", help="keep the resume state DIR/state/ when the run completes"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="run once per seed into DIR/seed-<s>/ and aggregate: --seeds 5,6,7"),
) -> None:
    """The embedded demo: a real pre-trained model on real data shipped by registry packages, no download."""
    overrides = (set_ or []) + seed_overrides(seeds)
    cfg = with_keep_state(load_config(demo_config_path("image" if image else "text"), overrides), keep_state)
    execute(cfg, out or default_out(cfg), resume, again=again_with("magmax demo" + (" --image" if image else ""), seeds))
