"""Evaluation on the task stream's test sets with the all-class (task-agnostic) head.

One forward pass per model over the concatenated test sets of every task gives, from the same
features: the task-agnostic accuracy per task (argmax over ALL classes — the paper's metric), the
task-aware accuracy per task (argmax over that task's classes only), and the accuracy on the whole
test set. Accuracies are percentages. In a data-parallel run the ranks share the batches and gather
the features, then every rank scores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from magmax import distributed
from magmax.models.base import Backbone
from magmax.scenarios import Task
from magmax.training.batches import concat_items, take
from magmax.training.loop import autocast_for, logits_of, to_device


@dataclass
class EvalSet:
    """The concatenated test sets of all tasks, with each sample's task and global label."""

    items: Sequence
    labels: np.ndarray
    task_of: np.ndarray
    tasks: list[Task]
    order: np.ndarray  # evaluation order (text: by length, so padded batches are short)

    @classmethod
    def from_tasks(cls, tasks: list[Task]) -> "EvalSet":
        parts = [t.test for t in tasks]
        items = concat_items([p.items for p in parts])
        labels = np.concatenate([p.labels for p in parts]).astype(np.int64)
        task_of = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
        if type(items) is list and items and isinstance(items[0], str):  # texts (not ImageFiles paths)
            order = np.argsort([len(x) for x in items], kind="stable")
        else:
            order = np.arange(len(labels))
        return cls(items, labels, task_of, tasks, order)

    @property
    def sizes(self) -> list[int]:
        return [int((self.task_of == i).sum()) for i in range(len(self.tasks))]


def batch_share(n: int, batch_size: int, rank: int, world: int) -> range:
    """Evaluation batches (of ``batch_size``, in evaluation order) that rank ``rank`` computes: a
    contiguous block, the first ranks one more where they do not divide evenly."""
    batches = -(-n // batch_size)
    base, extra = divmod(batches, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@torch.no_grad()
def compute_features(backbone: Backbone, evalset: EvalSet, batch_size: int, device: torch.device, precision: str = "auto") -> Tensor:
    """Features of every test sample. In a data-parallel run each rank computes a block of the same
    batches one process would and every rank gets all of them, so the features are the same bits."""
    backbone.eval()
    autocast = autocast_for(device, precision)
    n, world = len(evalset.order), distributed.world_size()
    mine = batch_share(n, batch_size, distributed.rank(), world)
    chunks = []
    for b in mine:
        idx = evalset.order[b * batch_size : (b + 1) * batch_size]
        batch = to_device(backbone.prepare(take(evalset.items, idx), train=False), device)
        with autocast():
            chunks.append(backbone.features(batch).float().cpu())
    if world > 1:
        dim = distributed.max_int(chunks[0].shape[1] if chunks else 0)
        local = torch.cat(chunks) if chunks else torch.empty(0, dim)
        counts = [
            sum(min(batch_size, n - b * batch_size) for b in batch_share(n, batch_size, r, world)) for r in range(world)
        ]
        out = distributed.gather_rows(local, counts)
    else:
        out = torch.cat(chunks)
    features = torch.empty_like(out)
    features[torch.as_tensor(evalset.order)] = out
    return features


@dataclass
class EvalResult:
    per_task: list[float]          # task-agnostic accuracy on each task's test set (%)
    per_task_aware: list[float]    # task-aware accuracy (argmax over the task's classes) (%)
    overall: float                 # task-agnostic accuracy on all test samples (%)

    def to_json(self) -> dict:
        return {"per_task": self.per_task, "per_task_aware": self.per_task_aware, "overall": self.overall}


def score(backbone: Backbone, features: Tensor, evalset: EvalSet, head_all: Tensor, class_ids: Sequence[int]) -> EvalResult:
    """Accuracies from features; ``head_all`` rows correspond to the global ``class_ids``."""
    logits = logits_of(backbone, features, head_all.cpu().float())
    class_ids_t = torch.as_tensor(list(class_ids))
    labels = torch.as_tensor(evalset.labels)
    agnostic = class_ids_t[logits.argmax(dim=1)] == labels
    row_of = {c: i for i, c in enumerate(class_ids)}
    per_task, aware = [], []
    for t, task in enumerate(evalset.tasks):
        mask = torch.as_tensor(evalset.task_of == t)
        per_task.append(100.0 * float(agnostic[mask].float().mean()))
        rows = torch.as_tensor([row_of[c] for c in task.classes])
        sub = logits[mask][:, rows]
        pred = torch.as_tensor(task.classes)[sub.argmax(dim=1)]
        aware.append(100.0 * float((pred == labels[mask]).float().mean()))
    return EvalResult(per_task, aware, 100.0 * float(agnostic.float().mean()))


def evaluate(backbone: Backbone, evalset: EvalSet, head_all: Tensor, class_ids: Sequence[int], batch_size: int, device: torch.device, precision: str = "auto") -> EvalResult:
    return score(backbone, compute_features(backbone, evalset, batch_size, device, precision), evalset, head_all, class_ids)
