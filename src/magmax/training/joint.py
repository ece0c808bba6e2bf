"""Joint training: one model fine-tuned on every task's data at once with the all-class head.

The usual upper bound of continual learning (not in the MagMax reference): the same optimiser and
schedule, the union of the tasks' training sets, epochs (or steps) as configured per task, labels
remapped to rows of the all-class head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from magmax.config import TrainConfig
from magmax.models.base import Backbone
from magmax.scenarios import Task
from magmax.training.batches import concat_items
from magmax.training.loop import StepInfo, finetune


def concat_sets(sets):
    """One LabeledSet from several (arrays concatenated, lists joined)."""
    first = sets[0]
    items = concat_items([s.items for s in sets])
    labels = np.concatenate([s.labels for s in sets])
    domains = None if first.domains is None else np.concatenate([s.domains for s in sets])
    return type(first)(items=items, labels=labels, domains=domains)


def train_joint(
    backbone: Backbone,
    tasks: Sequence[Task],
    head_all: Tensor,
    class_ids: Sequence[int],
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    on_step: Callable[[StepInfo], None] | None = None,
) -> None:
    """Fine-tune ``backbone`` on the union of ``tasks`` against ``head_all``, whose row i is class
    ``class_ids[i]``."""
    train = concat_sets([t.train for t in tasks])
    task = Task(index=0, name="joint (all tasks)", classes=tuple(class_ids), train=train, test=concat_sets([t.test for t in tasks]))
    row_of: Mapping[int, int] = {int(c): i for i, c in enumerate(class_ids)}
    labels = np.asarray([row_of[int(c)] for c in train.labels], dtype=np.int64)
    finetune(
        backbone, task, head_all, cfg,
        seed=seed, device=device, on_step=on_step, train_set=train, labels=labels,
    )
