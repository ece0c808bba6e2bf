"""Fine-tuning one task: the protocol's optimiser and schedule, plain cross-entropy on a frozen head.

Per task (protocol §3): a FRESH AdamW (lr 1e-5, betas 0.9/0.999, weight decay 0.1) and a fresh
warm-up + cosine schedule; gradient-norm clipping at 1.0; batch 128; logits = s·f(x)·Hᵀ with H the
frozen zero-shot head restricted to the task's classes (labels remapped to 0..k−1 in sorted class-id
order). On CUDA: bf16 autocast and fused AdamW; on CPU: fp32, seeded and deterministic. Gradient
accumulation splits a batch into ``grad_accum`` micro-batches (same update as the whole batch).

Data-parallel (torchrun, :mod:`magmax.distributed`): the batch indices and every step's crop generator
are drawn exactly as in one process; rank r then trains on its contiguous share of the global batch
(:func:`magmax.distributed.share`) in ``grad_accum`` micro-batches, each micro-batch's loss weighted by
its rows over the GLOBAL batch's rows, and the gradients are summed across ranks before clipping. A
W-rank run therefore takes the steps of the one-process run with ``grad_accum`` × W micro-batches, up to
the order in which the micro-batches' gradients are added.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from magmax import distributed
from magmax.config import TrainConfig
from magmax.errors import TrainingError
from magmax.models.base import Backbone
from magmax.scenarios import Task
from magmax.training.batches import batch_indices, prefetch, steps_per_task, take
from magmax.training.regularizers import Regularizer, StepContext
from magmax.training.schedule import warmup_cosine_lr


@dataclass
class StepInfo:
    task: int
    step: int
    total: int
    loss: float
    lr: float


def autocast_for(device: torch.device, precision: str) -> Callable[[], Any]:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return lambda: torch.autocast(device_type=device.type, enabled=False)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def pin_batch(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: v.pin_memory() for k, v in batch.items()}
    return batch


def slice_batch(batch: Any, rows: slice) -> Any:
    if isinstance(batch, Tensor):
        return batch[rows]
    if isinstance(batch, dict):
        return {k: v[rows] for k, v in batch.items()}
    return batch


def logits_of(backbone: Backbone, features: Tensor, head: Tensor) -> Tensor:
    return backbone.logit_scale * features.float() @ head.T


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )


def finetune(
    backbone: Backbone,
    task: Task,
    head: Tensor,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    regularizer: Regularizer | None = None,
    previous_heads: list[Tensor] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    train_set=None,
    labels: np.ndarray | None = None,
) -> int:
    """Train ``backbone.encoder`` in place on ``task`` (or on ``train_set``/``labels`` if given); returns steps run.

    Everything random (batch order, dropout, crops) derives from ``seed``, so a task replayed after a
    resume gives the same weights bit for bit on CPU.
    """
    data = train_set if train_set is not None else task.train
    targets = labels if labels is not None else task.local_labels(task.train.labels)
    if len(data) == 0:
        raise TrainingError(f"task {task.index + 1} ('{task.name}') has no training samples; check the data and the class split")
    total = steps_per_task(len(data), cfg.batch_size, cfg.epochs, cfg.steps)
    torch.manual_seed(seed)
    backbone.seed_augmentation(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = backbone.encoder
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    autocast = autocast_for(device, cfg.precision)
    head = head.to(device)
    ctx = StepContext(backbone, task, head, [h.to(device) for h in previous_heads or []], device, cfg, autocast)
    if regularizer is not None:
        regularizer.before_task(ctx)
    backbone.train()
    world = distributed.world_size()
    micro = distributed.micro_batch(cfg.batch_size, cfg.grad_accum, world)
    pin = device.type == "cuda"
    features_fn = torch.compile(backbone.features) if cfg.compile else backbone.features

    def prepare(job: tuple[int, np.ndarray]) -> Any:
        # Each step draws its crops from its own generator, so the result does not depend on how many
        # threads prepare batches, in which order they finish, or how the step is split (grad_accum, ranks).
        step, idx = job
        crops = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if world == 1:
            batch = backbone.prepare(take(data.items, idx), train=True, generator=crops)
        else:
            rows = distributed.share(len(idx), cfg.batch_size)
            if rows.start == rows.stop:
                return None  # a short batch (end of an epoch) may leave this rank nothing
            batch = backbone.prepare_rows(take(data.items, idx), rows, train=True, generator=crops)
        return pin_batch(batch) if pin else batch

    jobs = enumerate(batch_indices(len(data), cfg.batch_size, total, generator))
    for (step, idx), full_batch in prefetch(jobs, prepare, cfg.num_workers):
        lr = warmup_cosine_lr(step, cfg.lr, cfg.warmup_steps, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        mine = idx[distributed.share(len(idx), cfg.batch_size)] if world > 1 else idx
        for start in range(0, len(mine), micro):
            chunk = slice(start, start + micro)
            batch = to_device(slice_batch(full_batch, chunk), device)
            y = torch.as_tensor(targets[mine[chunk]], dtype=torch.long).to(device, non_blocking=True)
            with autocast():
                features = features_fn(batch)
                loss = F.cross_entropy(logits_of(backbone, features, head), y)
                if regularizer is not None:
                    extra = regularizer.penalty(ctx, features, batch)
                    if extra is not None:
                        loss = loss + extra
            weight = len(y) / len(idx)  # rows over the GLOBAL batch: the ranks' gradients are summed
            (loss * weight).backward()
            loss_value += float(loss.detach()) * weight
        distributed.all_reduce_gradients(params)
        loss_value = distributed.all_reduce_sum(loss_value)
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"task {task.index + 1} ('{task.name}'), step {step}: loss is {loss_value}; "
                "lower train.lr or check the data; the run keeps the state after the last completed task"
            )
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if on_step is not None:
            on_step(StepInfo(task.index, step, total, loss_value, lr))
    backbone.eval()
    distributed.broadcast_module_(encoder)  # ranks hold identical weights; rank 0's, should a kernel differ
    if regularizer is not None:
        regularizer.after_task(ctx)
    return total
