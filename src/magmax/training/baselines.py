"""LwF and EWC, the continual-learning baselines of the MagMax paper, as regularisers of the one loop.

In a data-parallel run the LwF teacher is the encoder every rank holds at the task's start (identical
across ranks), and the EWC Fisher is computed on rank 0 over the whole task and broadcast.

LwF (Li & Hoiem, ECCV 2016), as the MagMax reference applies it (protocol §1):

    L = CE(s·f_θ(x)·H_tᵀ, y) + w·KD,   KD = −(1/B) Σ_b Σ_c p_old[b,c]·log q_new[b,c]

with both distributions taken over the classes of ALL previous tasks (their heads concatenated):
p_old = softmax(z_old)^(1/T) renormalised, z_old the logits of the model after the previous task;
q_new = softmax(z_new)^(1/T) renormalised and smoothed (q + ε/C)/(1 + ε), ε = 1e-5, z_new the new
model's features through the same old heads. w = 0.3, T = 2 (softmax^(1/2) renormalised equals a
softmax at temperature 2). When old and new logits agree, KD is the entropy of p_old, a constant, so
its gradient is zero and training is plain CE.

EWC (Kirkpatrick et al., PNAS 2017), as the reference applies it:

    L = CE + λ/2 · Σ_i F_i (θ_i − θ_old,i)²,   λ = 1e6

F is a diagonal Fisher of the CE against the model's OWN predicted labels over the task's training set,
combined across tasks as F ← ½F + ½F_new (starting from F = 0); θ_old = the weights after the previous
task. Two ways to compute F_new (``ewc.fisher``):

* ``empirical`` (EWC as defined): F_new = (1/N) Σ_b |b|·g_b², g_b the gradient of batch b alone.
* ``reference`` (the MagMax reference's ``compute_fisher_matrix_diag``, quirks kept; the paper presets):
  gradients are never zeroed, so G_b = G_0 + Σ_{b' <= b} g_b' is a running sum that starts from G_0, the
  last (clipped) gradient of training, and F_new = Σ_b |b|·G_b² / ((N // B + 1)·B), B the batch size.
  λ = 1e6 was set against this Fisher, which is larger than the empirical one by orders of magnitude.

The predicted labels (``ewc.fisher_targets``) are the argmax of the head logits (class-incremental
reference), or of the raw image embedding taken as logits (the domain-incremental reference script
computes the CE on the encoder's output directly).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from magmax import distributed
from magmax.config import EwcConfig, LwfConfig, StreamConfig
from magmax.training.batches import batch_indices, take
from magmax.training.loop import logits_of, to_device
from magmax.training.regularizers import Regularizer, StepContext

KD_EPS = 1e-5


def tempered_softmax(logits: Tensor, temperature: float) -> Tensor:
    """softmax(z)^(1/T), renormalised (the reference's ``exp=1/T``)."""
    p = F.softmax(logits.float(), dim=1).pow(1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)


def lwf_distillation(new_logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    """The reference's KD term: cross-entropy of tempered old against tempered, ε-smoothed new."""
    target = tempered_softmax(old_logits, temperature)
    out = tempered_softmax(new_logits, temperature)
    out = out + KD_EPS / out.size(1)
    out = out / out.sum(dim=1, keepdim=True)
    return -(target * out.log()).sum(dim=1).mean()


@contextmanager
def swapped_encoder(backbone, encoder):
    current = backbone.encoder
    backbone.encoder = encoder
    try:
        yield
    finally:
        backbone.encoder = current


class LwF(Regularizer):
    name = "lwf"

    def __init__(self, cfg: LwfConfig):
        self.cfg = cfg
        self.old_encoder: torch.nn.Module | None = None
        self.old_head: Tensor | None = None

    def before_task(self, ctx: StepContext) -> None:
        if not ctx.previous_heads:
            self.old_encoder, self.old_head = None, None
            return
        # The model after the previous task = the current weights before this task starts.
        self.old_encoder = copy.deepcopy(ctx.backbone.encoder).eval()
        for p in self.old_encoder.parameters():
            p.requires_grad_(False)
        self.old_head = torch.cat(ctx.previous_heads)

    def penalty(self, ctx: StepContext, features: Tensor, batch: Any) -> Tensor | None:
        if self.old_encoder is None:
            return None
        with torch.no_grad(), swapped_encoder(ctx.backbone, self.old_encoder):
            old_logits = logits_of(ctx.backbone, ctx.backbone.features(batch), self.old_head)
        new_logits = logits_of(ctx.backbone, features, self.old_head)
        return self.cfg.weight * lwf_distillation(new_logits, old_logits, self.cfg.temperature)

    def after_task(self, ctx: StepContext) -> None:
        self.old_encoder, self.old_head = None, None


class EWC(Regularizer):
    name = "ewc"

    def __init__(self, cfg: EwcConfig):
        self.cfg = cfg
        self.fisher: dict[str, Tensor] = {}
        self.old_params: dict[str, Tensor] = {}

    def penalty(self, ctx: StepContext, features: Tensor, batch: Any) -> Tensor | None:
        if not self.fisher:
            return None
        return self.cfg.strength * ewc_penalty(ctx.backbone.encoder, self.fisher, self.old_params)

    def after_task(self, ctx: StepContext) -> None:
        encoder = ctx.backbone.encoder
        self.old_params = {n: p.detach().clone() for n, p in encoder.named_parameters() if p.requires_grad}
        if self.cfg.fisher == "reference":
            compute = lambda: reference_fisher_diagonal(ctx, self.cfg.fisher_targets)  # noqa: E731
        else:
            compute = lambda: fisher_diagonal(ctx, self.cfg.fisher_batches, self.cfg.fisher_targets)  # noqa: E731
        # Data-parallel: rank 0 computes the Fisher over the whole task, exactly as one process does (the
        # reference loop's running gradient sum starts from the reduced, clipped last gradient, which every
        # rank holds), and hands it to the other ranks.
        new = {n: f.to(encoder_device(encoder)) for n, f in distributed.from_main(compute).items()}
        encoder.zero_grad(set_to_none=True)
        d = self.cfg.fisher_decay
        self.fisher = {n: d * self.fisher.get(n, torch.zeros_like(f)) + (1 - d) * f for n, f in new.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "old_params": self.old_params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = dict(state.get("fisher", {}))
        self.old_params = dict(state.get("old_params", {}))


def encoder_device(encoder: torch.nn.Module) -> torch.device:
    return next(encoder.parameters()).device


def ewc_penalty(encoder: torch.nn.Module, fisher: dict[str, Tensor], old_params: dict[str, Tensor]) -> Tensor:
    """½ Σ_i F_i (θ_i − θ_old,i)² over the encoder's trainable parameters."""
    total = None
    for n, p in encoder.named_parameters():
        if n in fisher:
            term = (fisher[n].to(p.device) * (p - old_params[n].to(p.device)).pow(2)).sum() / 2
            total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def _self_labelled_loss(ctx: StepContext, batch: Any, targets: str) -> Tensor:
    """CE of the model's outputs against their own argmax: head logits, or the raw embedding as logits."""
    backbone = ctx.backbone
    with ctx.autocast():
        if targets == "embedding":
            outputs = backbone.embed(backbone.to_device(batch)).float()
        else:
            outputs = logits_of(backbone, backbone.features(batch), ctx.head)
    return F.cross_entropy(outputs, outputs.argmax(dim=1))


def _fisher_batches(ctx: StepContext, n_batches: int):
    """Training batches of the task (training crops), in a seeded order of their own."""
    backbone, task, cfg = ctx.backbone, ctx.task, ctx.cfg
    generator = torch.Generator().manual_seed(task.index)
    for idx in batch_indices(len(task.train), cfg.batch_size, n_batches, generator):
        yield len(idx), to_device(backbone.prepare(take(task.train.items, idx), train=True), ctx.device)


def fisher_diagonal(ctx: StepContext, max_batches: int | None = None, targets: str = "head") -> dict[str, Tensor]:
    """Empirical diagonal Fisher of CE against the model's own predictions over the task's training set."""
    backbone, task, cfg = ctx.backbone, ctx.task, ctx.cfg
    encoder = backbone.encoder
    params = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    n_batches = -(-len(task.train) // cfg.batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    backbone.train()
    seen = 0
    for size, batch in _fisher_batches(ctx, n_batches):
        encoder.zero_grad(set_to_none=True)
        _self_labelled_loss(ctx, batch, targets).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().pow(2) * size
        seen += size
    encoder.zero_grad(set_to_none=True)
    backbone.eval()
    return {n: f / max(seen, 1) for n, f in fisher.items()}


def reference_fisher_diagonal(ctx: StepContext, targets: str = "head") -> dict[str, Tensor]:
    """The MagMax reference's Fisher loop (module docstring, ``reference``): ``.grad`` is never zeroed, so it
    starts from the last training step's clipped gradient and accumulates; every batch adds |b|·G²."""
    backbone, task, cfg = ctx.backbone, ctx.task, ctx.cfg
    encoder = backbone.encoder
    params = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    # islice(loader, N // B + 1) over a loader of ceil(N / B) batches: every batch once.
    named_batches = len(task.train) // cfg.batch_size + 1
    n_batches = min(named_batches, -(-len(task.train) // cfg.batch_size))
    backbone.train()
    for size, batch in _fisher_batches(ctx, n_batches):
        _self_labelled_loss(ctx, batch, targets).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().pow(2) * size
    encoder.zero_grad(set_to_none=True)
    backbone.eval()
    divisor = named_batches * cfg.batch_size
    return {n: f / divisor for n, f in fisher.items()}


def make_baseline_regularizer(stream: StreamConfig) -> Regularizer:
    if stream.regularizer == "lwf":
        return LwF(stream.lwf)
    if stream.regularizer == "ewc":
        return EWC(stream.ewc)
    raise ValueError(stream.regularizer)
