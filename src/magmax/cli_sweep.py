"""`magmax sweep SWEEP.yaml`: presets × seeds × overrides as jobs (Slurm or local), `--status`, `--dry-run`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from magmax.console import make_console, print_error, print_line

STATES = ("done", "running", "pending", "interrupted", "failed", "not submitted")


def sweep_command(
    sweep_file: Path = typer.Argument(..., help="YAML sweep file: presets × seeds × overrides, executor and job resources"),
    status: bool = typer.Option(False, "--status", help="show which runs are pending, running, done or failed; submit nothing"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the runs the sweep expands into; submit nothing"),
) -> None:
    """Submit a sweep's runs as jobs (Slurm through submitit, or here), each a resumable run directory.

    Submitting the same file again submits only the runs that are not complete, queued or running; each resumes after its last completed task."""
    from magmax.sweep import Events, SweepState, run_debug, run_local, run_states, scheduler_states, submit_slurm, to_submit
    from magmax.sweep_config import expand, load_sweep, sweep_out

    sweep = load_sweep(sweep_file)
    runs = expand(sweep, sweep_file)
    out = sweep_out(sweep, sweep_file)
    name = sweep.name or sweep_file.stem
    console, err = make_console(), make_console(stderr=True)
    if dry_run:
        print_line(console, f"{len(runs)} runs into {out} (executor: {sweep.executor}):", style="bold")
        for run in runs:
            sets = " ".join(f"--set {s}" for s in run.overrides)
            print_line(console, f"  {run.name}: magmax run {run.preset} {sets} --out {run.dir}", indent=4)
        return
    state = SweepState(out, sweep_file, sweep.executor)
    if status:
        rows = run_states(runs, state, scheduler_states(state, out))
        width = max(len(r.run.name) for r in rows)
        for r in rows:
            jobs = f"job {r.jobs[-1]}" if r.jobs else ""
            line = f"{r.run.name:<{width}}  {r.state:<13}  {jobs}"
            print_line(console, (line + ("  " + r.detail if r.detail else "")).rstrip(), indent=width + 2)
        counts = Counter(r.state for r in rows)
        print_line(console, f"{len(rows)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s]), style="bold")
        return

    events = Events(
        on_submit=lambda run, job: print_line(err, f"submitted {run.name} (job {job})"),
        on_skip=lambda run, why: print_line(err, f"skipped {run.name}: {why}"),
        on_finish=lambda run, st, detail: print_line(err, f"{st} {run.name}" + (f": {detail}" if detail else "") + ("" if st == "complete" else f" (log: {run.dir / 'log.txt'})")),
    )
    todo = to_submit(runs, state, scheduler_states(state, out), events)
    if not todo:
        print_line(err, f"nothing to submit: every run of {sweep_file} is complete, queued or running "
                        f"(see magmax sweep {sweep_file} --status)")
        return
    if sweep.executor == "slurm":
        submit_slurm(sweep, name, todo, out, state, events)
        print_line(err, f"{len(todo)} runs queued on Slurm; follow them with: magmax sweep {sweep_file} --status")
        return
    try:
        outcome = run_local(sweep, todo, out, state, events) if sweep.executor == "local" else run_debug(todo, state, events)
    except KeyboardInterrupt:
        print_error(err, f"sweep interrupted (Ctrl-C); its running jobs were stopped after their last completed task; "
                         f"submit it again to resume: magmax sweep {sweep_file}")
        raise typer.Exit(130) from None
    missing = [n for n, st in outcome.items() if st != "complete"]
    if missing:
        print_error(err, f"{len(missing)} of {len(outcome)} runs did not complete ({', '.join(missing)}); see "
                         f"magmax sweep {sweep_file} --status; submitting the sweep again resumes them")
        raise typer.Exit(1)
    print_line(err, f"{len(outcome)} runs complete in {out}")
