"""`magmax run --dry-run`: the resolved plan of a run — tasks, classes per task, steps, peak LR, methods.

It reads the dataset when it is there; when it is not (a preset on a machine without the data), it
plans from the dataset's official sizes and says so, so every preset can be checked anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from magmax.config import MergeConfig, RunConfig, StreamConfig
from magmax.errors import DataError
from magmax.merging import create_method
from magmax.scenarios import class_order, split_classes
from magmax.training.batches import steps_per_task
from magmax.training.schedule import peak_lr

# Official training-set sizes and class counts, for planning without the files.
OFFICIAL = {
    "cifar100": (100, 50_000),
    "imagenet_r": (200, 24_000),      # 80% of 30,000
    "cub200": (200, 5_994),
    "cars": (196, 8_144),
    "domainnet": (345, 409_832),
    "mnist": (10, 60_000),
    "svhn": (10, 73_257),
    "eurosat": (10, 21_600),
    "resisc45": (45, 18_900),
    "sun397": (397, 19_850),
    "dtd": (47, 3_760),
    "gtsrb": (43, 26_640),
    "fashion_mnist": (10, 60_000),
}
IMAGENET_R_DOMAINS = 15
DOMAINNET_DOMAINS = 6


@dataclass
class PlannedTask:
    name: str
    classes: list[int]
    train_size: int
    estimated: bool
    class_names: list[str] | None = None


def _official_class_names(cfg: RunConfig) -> list[str] | None:
    """Class names known without the files (CIFAR-100's, spelled as the reader's options spell them)."""
    if cfg.data is None or cfg.data.name != "cifar100":
        return None
    from magmax.data.base import natural_name
    from magmax.data.cifar100 import OFFICIAL_CLASSES

    natural = cfg.data.options.get("natural_names", True)
    return [natural_name(n) if natural else n for n in OFFICIAL_CLASSES]


def _multi_dataset_tasks(cfg: RunConfig) -> tuple[list[PlannedTask], str]:
    from magmax.data import load_dataset

    tasks, estimated, offset = [], [], 0
    for dcfg in cfg.scenario.datasets or []:
        try:
            ds = load_dataset(dcfg.name, cfg.resolved_data_root(dcfg), **dcfg.options)
            n_classes, n_train, est = len(ds.class_names), len(ds.train), False
        except DataError:
            if dcfg.name not in OFFICIAL:
                raise
            (n_classes, n_train), est = OFFICIAL[dcfg.name], True
            estimated.append(dcfg.name)
        tasks.append(PlannedTask(dcfg.name, list(range(offset, offset + n_classes)), n_train, est))
        offset += n_classes
    note = f"data not found for {', '.join(estimated)}: official sizes used" if estimated else "sizes read from the data"
    return tasks, note


def _planned_tasks(cfg: RunConfig) -> tuple[list[PlannedTask], str]:
    from magmax.data import load_dataset
    from magmax.task_stream import build_tasks

    if cfg.scenario.kind == "multi_dataset":
        return _multi_dataset_tasks(cfg)
    try:
        dataset = load_dataset(cfg.data.name, cfg.resolved_data_root(), **cfg.data.options)
    except DataError as exc:
        note = f"data not found ({exc}); sizes are the official ones, split evenly"
        if cfg.data.name not in OFFICIAL:
            raise
        n_classes, n_train = OFFICIAL[cfg.data.name]
        names = _official_class_names(cfg)
        if cfg.scenario.kind == "class_incremental":
            order = class_order(cfg.scenario.class_order, n_classes, seed=cfg.seed)
            groups = split_classes(order, cfg.scenario.n_tasks)
            return [PlannedTask(f"task {i + 1}", g, round(n_train * len(g) / n_classes), True,
                                None if names is None else [names[c] for c in g]) for i, g in enumerate(groups)], note
        domains = cfg.scenario.domain_order or []
        count = len(domains) or (IMAGENET_R_DOMAINS if cfg.data.name == "imagenet_r" else DOMAINNET_DOMAINS)
        names = domains or [f"domain {i + 1}" for i in range(count)]
        return [PlannedTask(n, list(range(n_classes)), round(n_train / count), True) for n in names], note
    tasks = build_tasks(cfg, dataset)
    return [PlannedTask(t.name, list(t.classes), len(t.train), False, [dataset.class_names[c] for c in t.classes])
            for t in tasks], "sizes read from the data"


PRECISION = {
    "fp32": "fp32 in training, the Fisher and evaluation (the reference's)",
    "bf16": "bf16 autocast in training, the Fisher and evaluation",
    "auto": "bf16 autocast on CUDA, fp32 on CPU (training, the Fisher, evaluation)",
}


def coefficient(method: str, scale: float) -> str:
    """How the merged model is formed from the task vectors, with the coefficient written out."""
    if method == "average":
        return f"θ0 + {scale:g}·mean_t τ_t"
    if method == "task_arithmetic":
        return f"θ0 + {scale:g}·Σ_t τ_t"
    return f"θ0 + {scale:g}·τ*"


def ties_population(cfg: RunConfig, merge: MergeConfig, method) -> str:
    """What a TIES merge ranks and, where the shapes are known, which fraction of the trained weights it keeps."""
    from magmax.merging._sparsify import keep_fraction
    from magmax.models.shapes import trained_and_frozen_numel

    fraction = keep_fraction(method.options.k)
    if method.options.threshold != "global":
        return f"top-{fraction:.0%} of each tensor"
    counts = trained_and_frozen_numel(cfg.backbone)
    if merge.population == "trained":
        return f"top-{fraction:.0%} over the trained weights' whole τ: keeps {min(fraction, 1):.1%} of the trained weights"
    if counts is None:
        return f"top-{fraction:.0%} over the whole model's τ (frozen tower's zeros counted; sizes known at run time)"
    trained, frozen = counts
    kept = min(1.0, (int((trained + frozen) * fraction) + 1) / trained) if fraction < 1 else 1.0
    return (f"top-{fraction:.0%} over the whole model's τ ({trained:,} trained + {frozen:,} frozen zero entries): "
            f"keeps {kept:.1%} of the trained weights")


def fisher_text(stream: StreamConfig) -> str:
    e = stream.ewc
    how = ("reference loop (gradients accumulate, ÷ (N // batch + 1)·batch)" if e.fisher == "reference"
           else "empirical (per-batch gradients, ÷ N)")
    targets = "argmax of the head logits" if e.fisher_targets == "head" else "argmax of the image embedding"
    return f"EWC λ={e.strength:g}, Fisher {how}, labels {targets}, F ← {e.fisher_decay:g}·F + {1 - e.fisher_decay:g}·F_new"


def print_plan(cfg: RunConfig, console: Console) -> None:
    tasks, note = _planned_tasks(cfg)
    tr = cfg.train
    table = Table(title=f"{cfg.name}: {len(tasks)} tasks ({cfg.scenario.kind}), seed {cfg.seed}")
    for col in ("task", "classes", "train samples", "steps", "peak LR"):
        table.add_column(col, justify="right" if col != "classes" else "left")
    for i, t in enumerate(tasks):
        epochs = cfg.scenario.epochs[i] if cfg.scenario.epochs else tr.epochs
        steps = steps_per_task(t.train_size, tr.batch_size, epochs, None if cfg.scenario.epochs else tr.steps)
        shown = ", ".join(map(str, t.classes[:12])) + (f", … ({len(t.classes)})" if len(t.classes) > 12 else f" ({len(t.classes)})")
        table.add_row(t.name, shown, ("≈" if t.estimated else "") + str(t.train_size), str(steps), f"{peak_lr(tr.lr, tr.warmup_steps, steps):.2e}")
    console.print(table)
    console.print(f"[dim]{escape(note)}[/]")
    console.print(
        f"backbone: {cfg.backbone.kind} {cfg.backbone.name_or_path or ''} | AdamW lr {tr.lr:g} betas {tr.betas[0]:g}/{tr.betas[1]:g} "
        f"wd {tr.weight_decay:g} clip {tr.grad_clip} batch {tr.batch_size} (accum {tr.grad_accum}) warm-up {tr.warmup_steps} steps, "
        + ("per-task epochs " + "/".join(f"{e:g}" for e in cfg.scenario.epochs) if cfg.scenario.epochs else f"{'steps ' + str(tr.steps) if tr.steps else f'{tr.epochs:g} epochs'} per task"),
        markup=False,
    )
    console.print(f"precision: {tr.precision}: {PRECISION[tr.precision]}", markup=False)
    for s in cfg.streams:
        merges = ", ".join(
            f"{m.name} (λ={create_method(m.method, **m.options).scale:g}: {coefficient(m.method, create_method(m.method, **m.options).scale)})"
            for m in cfg.merges_for(s)
        )
        start = "θ_{t-1} (Seq-FT)" if s.start == "previous" else "θ0 (Ind-FT)"
        reg = {"none": "", "lwf": f", LwF weight {s.lwf.weight:g} T {s.lwf.temperature:g}", "ewc": f", {fisher_text(s)}"}[s.regularizer]
        console.print(f"stream {s.name}: start {start}{reg}; merges: {merges or '-'}", markup=False)
    for m in cfg.merges:
        method = create_method(m.method, **m.options)
        if m.method == "ties":
            console.print(f"merge {m.name}: {ties_population(cfg, m, method)}", markup=False)
        if m.lambdas:
            console.print(f"merge {m.name}: after the last task also evaluated at λ = {', '.join(f'{v:g}' for v in m.lambdas)}", markup=False)
    extras = [x for x, on in (("zero-shot", cfg.zero_shot), ("joint", cfg.joint)) if on]
    console.print(f"also: {', '.join(extras) or '-'}; data root: {cfg.resolved_data_root() or '(reader default)'}", markup=False)
    named = [t.class_names if t.class_names is not None else [str(c) for c in t.classes] for t in tasks]
    unnamed = "" if all(t.class_names is not None for t in tasks) else " (ids: names need the data)"
    if len(tasks) > 1 and all(t.classes == tasks[0].classes for t in tasks):
        console.print(f"classes (every task, {len(tasks[0].classes)}){unnamed}: {', '.join(named[0])}", markup=False)
        return
    console.print(f"classes per task{unnamed}:", markup=False)
    for t, names in zip(tasks, named):
        console.print(f"  {t.name}: {', '.join(names)}", markup=False)
