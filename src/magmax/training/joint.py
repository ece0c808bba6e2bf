"""Joint training: one model fine-tuned on every task's data at once with the all-class head.

The usual upper bound of continual learning (not in the MagMax reference): the same optimiser and
schedule, the union of the tasks' training sets, epochs (or steps) as configured per task, labels
remapped to rows of the all-class head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from magmax.scenarios import Task
from magmax.training.batches import concat_items
from magmax.training.loop import finetune

if TYPE_CHECKING:
    from magmax.continual import ContinualRun


def concat_sets(sets):
    """One LabeledSet from several (arrays concatenated, lists joined)."""
    first = sets[0]
    items = concat_items([s.items for s in sets])
    labels = np.concatenate([s.labels for s in sets])
    domains = None if first.domains is None else np.concatenate([s.domains for s in sets])
    return type(first)(items=items, labels=labels, domains=domains)


def train_joint(run: "ContinualRun", seed: int) -> None:
    tasks = run.tasks
    train = concat_sets([t.train for t in tasks])
    task = Task(index=0, name="joint (all tasks)", classes=tuple(run.class_ids), train=train, test=concat_sets([t.test for t in tasks]))
    labels = np.asarray([run.row_of[int(c)] for c in train.labels], dtype=np.int64)
    finetune(
        run.backbone, task, run.head_all, run.cfg.train,
        seed=seed, device=run.device, on_step=run.step_hook, train_set=train, labels=labels,
    )
