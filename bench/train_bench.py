"""Training throughput of one fine-tuning step of the CLIP ViT-B/16 vision tower: ours against the fp32 reference step.

Run on demand (this is not a test):

    .venv/bin/python bench/train_bench.py                          # GPU if there is one: ViT-B/16, batch 128
    .venv/bin/python bench/train_bench.py --device cpu --tiny      # a small tower, a minute or two on a CPU
    .venv/bin/python bench/train_bench.py --jpeg-dir DIR           # data rows from your own image folder

The model is a transformers ``CLIPVisionModelWithProjection`` built in code with random weights (no
download): ViT-B/16 at 224 px (hidden 768, 12 layers, 12 heads, MLP 3072, projection 512), or with
``--tiny`` a 2-layer tower of width 64 (patch 16, 224 px, projection 64). One step, for every row:

    f = normalize(encoder(x)),  logits = 100 · f · Hᵀ  (H: fixed random unit rows, 100 classes),
    loss = CE(logits, y),  backward,  clip_grad_norm 1.0,  AdamW(lr 1e-5, wd 0.1).step()

Rows, all measured in the same run on the same device:

* **reference fp32**: the step written plainly, as the MagMax reference trains: fp32 and
  ``torch.optim.AdamW`` with its defaults (foreach kernels on CUDA).
* **ours**: the product's pieces — ``magmax.training.loop.autocast_for`` (``--precision``, default
  ``auto``: bf16 autocast on CUDA, fp32 on CPU), ``make_optimizer`` (fused AdamW on CUDA),
  ``logits_of`` and ``Backbone.features`` with the product's ``CLIPVisionEncoder``.
* **ours + compile**: the same with ``torch.compile(backbone.features)``, as ``train.compile`` does
  (on CUDA by default; on CPU only with ``--compile``).
* **… + JPEG folder**: the product's training loop itself, ``magmax.training.loop.finetune``, on a
  folder of JPEG files read by ``magmax.data.load_dataset("imagefolder")``: each batch is decoded and
  randomly cropped to 224 px by ``magmax.models.preprocess`` (the backbone's ``prepare``), prepared ahead
  by ``magmax.training.batches.prefetch`` in ``--threads`` threads and pinned on CUDA.
* **JPEG loading only**: that data path with no training step — the ceiling of the JPEG rows here.

Timing. Synthetic rows: ``--warmup`` untimed steps (compilation included), then ``--steps`` steps, each
ended by ``torch.cuda.synchronize`` on CUDA; img/s = batch / median step time. JPEG rows: a warm-up call
of ``finetune`` (compilation, page cache), then a timed call of ``--data-steps`` steps. Prepared batches
arrive in bursts (each thread prepares a whole batch) and the prefetch queue fills up ahead of a slow
consumer, so a median step would hide waits for data: img/s is the rate over the SECOND half of the
timed steps (images over wall time, synchronised at both ends only, so steps overlap as in training),
when the queue has settled; "from start" is every image of the call over its whole wall time, start-up
and the first batch's preparation included — a lower bound. A folder whose size is not a multiple of the
batch gives a short last batch per epoch, which ``torch.compile`` recompiles for once (``--make-jpegs``
rounds up to whole batches to keep that out of the window).

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak resident set during
the row (``VmHWM``, reset through ``/proc/self/clear_refs`` before each row)."""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from magmax.config import TrainConfig
from magmax.data import load_dataset
from magmax.errors import MagmaxError
from magmax.models.base import Backbone
from magmax.models.clip_hf import CLIPVisionEncoder
from magmax.models.preprocess import ImageTransform
from magmax.scenarios import Task
from magmax.training.batches import batch_indices, prefetch, take
from magmax.training.loop import StepInfo, autocast_for, finetune, logits_of, make_optimizer, pin_batch

NUM_CLASSES = 100
LOGIT_SCALE = 100.0
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-5, 0.1, 1.0
PHOTO_SIZE = (500, 375)  # width, height: a typical ImageNet photo


# -- model ---------------------------------------------------------------------------------------------


def vision_config(tiny: bool) -> CLIPVisionConfig:
    """ViT-B/16 as in openai/clip-vit-base-patch16, or a 2-layer tower of width 64 with the same patching."""
    if tiny:
        return CLIPVisionConfig(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            patch_size=16, image_size=224, projection_dim=64,
        )  # fmt: skip
    return CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        patch_size=16, image_size=224, projection_dim=512,
    )  # fmt: skip


def build_vision_model(config: CLIPVisionConfig, device: torch.device, seed: int = 0) -> CLIPVisionModelWithProjection:
    """A random-init ``CLIPVisionModelWithProjection``; the same seed gives every row the same weights."""
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(config).to(device).train()


class VisionTowerBackbone(Backbone):
    """A ``Backbone`` around a bare CLIP vision tower: the product's encoder, features and preprocessing.

    ``CLIPBackbone`` needs a full CLIPModel (text tower included) to build its head; the benchmark has a
    fixed random head instead, so it wraps the same ``CLIPVisionEncoder`` and ``ImageTransform``.
    """

    modality = "image"

    def __init__(self, model: torch.nn.Module, image_size: int, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.encoder = CLIPVisionEncoder(model.vision_model, model.visual_projection)
        self.logit_scale = LOGIT_SCALE
        self.transform = ImageTransform(size=image_size)

    def prepare(self, items, train: bool, generator: torch.Generator | None = None) -> Tensor:
        return self.transform(items, train, generator or self.augmentation_generator)

    def embed(self, batch: Tensor) -> Tensor:
        return self.encoder(batch)

    def encode_class_texts(self, texts: list[str]) -> Tensor:
        raise NotImplementedError("the benchmark's head is a fixed random matrix; this backbone has no text tower")


def random_head(classes: int, dim: int, device: torch.device, seed: int = 1) -> Tensor:
    """A fixed classification head [classes, dim] with unit-norm rows."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(classes, dim, generator=generator), dim=-1).to(device)


# -- measurement ---------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name} line")


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:  # resets VmHWM to the current RSS
            clear_refs.write("5")
    except OSError:
        pass  # no /proc (not Linux): the peak is then the process's peak so far


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return _status_bytes("VmHWM")
    except (OSError, RuntimeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Row:
    name: str
    data: str
    precision: str
    optimizer: str
    compiled: bool
    step_seconds: list[float] = field(default_factory=list)
    images_per_s: float = 0.0
    from_start_per_s: float | None = None  # JPEG rows: the lower bound, start-up included
    peak_bytes: int = 0


# -- synthetic rows: pure compute on tensors already on the device --------------------------------------


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    synchronize(device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def synthetic_batch(config: CLIPVisionConfig, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return x.to(device), y.to(device)


def reference_row(config: CLIPVisionConfig, batch: int, steps: int, warmup: int, device: torch.device) -> Row:
    """The reference's step: fp32, plain AdamW (foreach on CUDA), the loss read every step for logging."""
    reset_peak_memory(device)
    model = build_vision_model(config, device)
    head = random_head(NUM_CLASSES, config.projection_dim, device)
    x, y = synthetic_batch(config, batch, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        features = F.normalize(model(pixel_values=x).image_embeds, dim=-1)
        loss = F.cross_entropy(LOGIT_SCALE * features @ head.T, y)
        loss.backward()
        float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()

    defaults = "foreach" if device.type == "cuda" else "for-loop"  # torch's default per device
    row = Row("reference fp32", "synthetic, on device", "fp32", f"AdamW defaults ({defaults})", False)
    row.step_seconds = time_steps(step, warmup, steps, device)
    row.images_per_s = batch / statistics.median(row.step_seconds)
    row.peak_bytes = peak_memory(device)
    return row


def ours_row(
    config: CLIPVisionConfig, cfg: TrainConfig, compiled: bool, steps: int, warmup: int, device: torch.device
) -> Row:
    """``finetune``'s step on a batch already on the device, built from the product's functions."""
    reset_peak_memory(device)
    backbone = VisionTowerBackbone(build_vision_model(config, device), config.image_size)
    head = random_head(NUM_CLASSES, config.projection_dim, device)
    x, y = synthetic_batch(config, cfg.batch_size, device)
    params = [p for p in backbone.encoder.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    autocast = autocast_for(device, cfg.precision)
    features_fn = torch.compile(backbone.features) if compiled else backbone.features
    backbone.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            features = features_fn(x)
            loss = F.cross_entropy(logits_of(backbone, features, head), y)
        loss.backward()
        float(loss.detach())  # finetune reads the loss every step (NaN check, progress)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()

    name = "ours + compile" if compiled else "ours"
    row = Row(name, "synthetic, on device", precision_label(cfg.precision, device), optimizer_label(device), compiled)
    row.step_seconds = time_steps(step, warmup, steps, device)
    row.images_per_s = cfg.batch_size / statistics.median(row.step_seconds)
    row.peak_bytes = peak_memory(device)
    return row


# -- JPEG rows: the product's training loop on files ----------------------------------------------------


def make_jpegs(root: Path, count: int, classes: int = NUM_CLASSES, seed: int = 0) -> None:
    """``count`` photo-sized JPEGs (500×375, quality 90, about 100 kB: ImageNet's typical size) in
    ``root/train/<class>/``, round robin over ``classes`` folders, and one small image per class in
    ``root/test/<class>/`` (the image-folder reader requires a test split).

    Each image is a smooth random colour field (an 8×6 grid upsampled bicubically) plus uniform noise of
    ±36 levels, so decoding costs what a real photo's does (pure noise would be far larger files).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = PHOTO_SIZE
    for c in range(classes):
        (root / "train" / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
        test_dir = root / "test" / f"class_{c:03d}"
        test_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(test_dir / "0.jpg", quality=90)
    for i in range(count):
        colour_field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(colour_field.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = smooth + rng.integers(-36, 37, smooth.shape, dtype=np.int16)
        path = root / "train" / f"class_{i % classes:03d}" / f"{i:06d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)


def jpeg_task(root: Path) -> Task:
    dataset = load_dataset("imagefolder", root=root)
    return Task(0, "jpeg-bench", tuple(range(dataset.num_classes)), dataset.train, dataset.test)


def images_per_step(num_samples: int, batch: int, steps: int, seed: int) -> list[int]:
    """Batch sizes of ``finetune``'s steps (the last batch of an epoch may be short)."""
    return [len(idx) for idx in batch_indices(num_samples, batch, steps, torch.Generator().manual_seed(seed))]


def jpeg_row(
    config: CLIPVisionConfig,
    cfg: TrainConfig,
    task: Task,
    compiled: bool,
    data_steps: int,
    warmup: int,
    device: torch.device,
) -> Row:
    """``finetune`` itself: warm-up call, then a timed call whose step ends are taken in ``on_step``."""
    reset_peak_memory(device)
    backbone = VisionTowerBackbone(build_vision_model(config, device), config.image_size)
    head = random_head(len(task.classes), config.projection_dim, device)
    run_cfg = cfg.model_copy(update={"compile": compiled, "warmup_steps": 0})
    if warmup > 0:
        finetune(backbone, task, head, run_cfg.model_copy(update={"steps": warmup}), seed=0, device=device)
    half = data_steps // 2
    ends: list[float] = []

    def on_step(info: StepInfo) -> None:
        # Synchronise only where the window opens and closes, so the loop overlaps steps as in training
        # (finetune reads the loss every step, which already keeps the other timestamps near step ends).
        if info.step in (half - 1, data_steps - 1):
            synchronize(device)
        ends.append(time.perf_counter())

    synchronize(device)
    start = time.perf_counter()
    timed_cfg = run_cfg.model_copy(update={"steps": data_steps})
    finetune(backbone, task, head, timed_cfg, seed=1, device=device, on_step=on_step)
    sizes = images_per_step(len(task.train), cfg.batch_size, data_steps, seed=1)
    name = "ours + compile + JPEG folder" if compiled else "ours + JPEG folder"
    data = f"JPEG files, {cfg.num_workers} threads" + (", pinned" if device.type == "cuda" else "")
    row = Row(name, data, precision_label(cfg.precision, device), optimizer_label(device), compiled)
    row.step_seconds = list(np.diff([start, *ends]))
    window_start = ends[half - 1] if half > 0 else start
    row.images_per_s = sum(sizes[half:]) / (ends[-1] - window_start)
    row.from_start_per_s = sum(sizes) / (ends[-1] - start)
    row.peak_bytes = peak_memory(device)
    return row


def loading_row(task: Task, cfg: TrainConfig, image_size: int, data_steps: int, device: torch.device) -> Row:
    """The data path alone — the same files, crops, threads and pinning as ``finetune``, no training step:
    the ceiling the JPEG rows can reach on this machine."""
    reset_peak_memory(device)
    transform = ImageTransform(size=image_size)
    pin = device.type == "cuda"

    def prepare(job: tuple[int, np.ndarray]) -> Tensor:
        step, idx = job
        crops = torch.Generator().manual_seed(step)
        batch = transform(take(task.train.items, idx), True, crops)
        return pin_batch(batch) if pin else batch

    indices = list(batch_indices(len(task.train), cfg.batch_size, data_steps, torch.Generator().manual_seed(1)))
    half = data_steps // 2
    start = time.perf_counter()
    ends = []
    for _ in prefetch(enumerate(indices), prepare, cfg.num_workers):
        ends.append(time.perf_counter())
    sizes = [len(idx) for idx in indices]
    data = f"JPEG files, {cfg.num_workers} threads" + (", pinned" if pin else "")
    row = Row("JPEG loading only (no step)", data, "—", "—", False)
    row.step_seconds = list(np.diff([start, *ends]))
    row.images_per_s = sum(sizes[half:]) / (ends[-1] - (ends[half - 1] if half > 0 else start))
    row.from_start_per_s = sum(sizes) / (ends[-1] - start)
    row.peak_bytes = peak_memory(device)
    return row


# -- report ---------------------------------------------------------------------------------------------


def precision_label(precision: str, device: torch.device) -> str:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return f"{precision} → {'bf16 autocast' if use_bf16 else 'fp32'}"


def optimizer_label(device: torch.device) -> str:
    return "make_optimizer: AdamW " + ("fused" if device.type == "cuda" else "(not fused on CPU)")


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def render(rows: Sequence[Row], header: Sequence[str]) -> str:
    reference = next((r for r in rows if r.name == "reference fp32"), None)
    lines = [*header, ""]
    columns = ("row", "data", "precision", "optimizer", "img/s", "× fp32", "step ms: median [min–max]",
               "from start img/s", "peak memory")  # fmt: skip
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r.images_per_s / reference.images_per_s:.2f}×" if reference else "—"
        from_start = f"{r.from_start_per_s:,.1f}" if r.from_start_per_s is not None else "—"
        lines.append(
            f"| {r.name} | {r.data} | {r.precision} | {r.optimizer} | {r.images_per_s:,.1f} | {ratio} | "
            f"{1000 * statistics.median(r.step_seconds):,.1f} [{1000 * min(r.step_seconds):,.1f}–"
            f"{1000 * max(r.step_seconds):,.1f}] | {from_start} | {r.peak_bytes / 2**20:,.0f} MiB |"
        )
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    add("--tiny", action="store_true", help="2-layer tower of width 64 instead of ViT-B/16")
    add("--batch", type=int, default=128)
    add("--steps", type=int, default=20, help="timed steps of the synthetic rows")
    add("--warmup", type=int, default=3, help="untimed steps first (compilation included)")
    add("--data-steps", type=int, default=None, help="timed steps of a JPEG row (default: steps + 4·threads)")
    add("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="ours: train.precision")
    add("--threads", type=int, default=os.cpu_count() or 1, help="data-preparation threads (train.num_workers)")
    add("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile rows (default: on CUDA)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--jpeg-dir", type=Path, help="an image folder (root/train/<class>/, root/test/<class>/)")
    data.add_argument("--make-jpegs", type=int, metavar="N",
                      help="generate N 500×375 JPEGs in a temporary folder, rounded up to whole batches "
                      "(default: 4·batch)")  # fmt: skip
    data.add_argument("--no-jpeg", action="store_true", help="synthetic rows only")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "data_steps", "threads", "torch_threads", "make_jpegs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


def describe_run(
    args: argparse.Namespace, config: CLIPVisionConfig, device: torch.device, data_steps: int, compiled: bool
) -> list[str]:
    """The lines above the table: what ran, where, when."""
    import transformers  # for its version

    probe = build_vision_model(config, torch.device("cpu"))
    n_params = sum(p.numel() for p in probe.parameters())
    model_name = "tiny CLIP vision tower" if args.tiny else "CLIP ViT-B/16 vision tower"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"**{model_name}** (random init): hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads, MLP {config.intermediate_size}, patch {config.patch_size}, "
        f"{config.image_size} px, projection {config.projection_dim}; {n_params / 1e6:.2f} M parameters; "
        f"attention: {probe.config._attn_implementation}",
        f"machine: {machine_name(device)}; torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), "
        f"transformers {transformers.__version__}; {now}",
        f"batch {args.batch}, {NUM_CLASSES}-class head (JPEG rows: the folder's classes); synthetic rows: "
        f"{args.warmup} warm-up + {args.steps} timed steps (img/s = batch / median step); JPEG rows: a warm-up "
        f"call of {args.warmup} step(s), then {data_steps} timed steps (img/s over the second half)",
    ]
    if not compiled:
        why = "CPU: pass --compile to add them" if device.type == "cpu" else "--no-compile"
        lines.append(f"torch.compile rows skipped ({why})")
    return lines


def jpeg_folder(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    """The folder the JPEG rows read (made in ``scratch`` unless ``--jpeg-dir`` names one), and its description."""
    if args.jpeg_dir is not None:
        return args.jpeg_dir, f"JPEG folder: {args.jpeg_dir}"
    # whole batches only: a short last batch would make torch.compile recompile for its shape
    count = -(-(args.make_jpegs or 4 * args.batch) // args.batch) * args.batch
    start = time.perf_counter()
    make_jpegs(scratch, count)
    took = time.perf_counter() - start
    return scratch, (
        f"JPEG folder: {count} generated 500×375 JPEGs (about 100 kB each, in the page cache), "
        f"{NUM_CLASSES} classes, made in {took:.1f} s"
    )


def run(args: argparse.Namespace, device: torch.device) -> str:
    compiled = args.compile if args.compile is not None else device.type == "cuda"
    data_steps = args.data_steps or args.steps + 4 * args.threads
    config = vision_config(args.tiny)
    cfg = TrainConfig(
        lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, batch_size=args.batch, steps=args.steps,
        precision=args.precision, num_workers=args.threads,
    )  # fmt: skip
    header = describe_run(args, config, device, data_steps, compiled)
    print("\n".join(header), file=sys.stderr, flush=True)
    rows: list[Row] = []

    def add(make_row: Callable[[], Row], compiles: bool = False) -> None:
        if compiles:
            torch._dynamo.reset()  # each row compiles its own model: no stale guards, no recompile limit
        row = make_row()
        rows.append(row)
        print(f"  {row.name} [{row.data}]: {row.images_per_s:,.1f} img/s", file=sys.stderr, flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory(prefix="magmax-jpegs-") as scratch:
        task = None
        if not args.no_jpeg:  # read (or make) the folder first: a bad --jpeg-dir fails before any timing
            root, described = jpeg_folder(args, Path(scratch))
            header.append(described)
            task = jpeg_task(root)
        add(lambda: reference_row(config, args.batch, args.steps, args.warmup, device))
        add(lambda: ours_row(config, cfg, False, args.steps, args.warmup, device))
        if compiled:
            add(lambda: ours_row(config, cfg, True, args.steps, args.warmup, device), compiles=True)
        if task is not None:
            add(lambda: loading_row(task, cfg, config.image_size, data_steps, device))
            add(lambda: jpeg_row(config, cfg, task, False, data_steps, args.warmup, device))
            if compiled:
                add(lambda: jpeg_row(config, cfg, task, True, data_steps, args.warmup, device), compiles=True)
    return render(rows, header)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"train_bench: --device cuda, but torch {torch.__version__} sees no CUDA device; "
              "run with --device cpu --tiny", file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    try:
        table = run(args, device)
    except MagmaxError as err:  # a --jpeg-dir that is not an image folder, for one
        print(f"train_bench: {err}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
