"""Continual-learning regularisers as plug-ins of the one training loop.

A regulariser sees the task before training (``before_task``), adds a term to every step's loss
(``penalty``), and updates its memory after the task (``after_task``). Fine-tuning without one is
plain Seq-FT / Ind-FT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from magmax.config import TrainConfig
from magmax.models.base import Backbone
from magmax.scenarios import Task


@dataclass
class StepContext:
    """What a regulariser may look at: the model, the task, its head and the heads of earlier tasks."""

    backbone: Backbone
    task: Task
    head: Tensor                      # [k, D] frozen head of the current task's classes
    previous_heads: list[Tensor]      # heads of tasks 0..t-1 (class-incremental), for LwF
    device: torch.device
    cfg: TrainConfig
    autocast: Callable[[], Any]
    extra: dict[str, Any] = field(default_factory=dict)


class Regularizer:
    name = "none"

    def before_task(self, ctx: StepContext) -> None:
        """Called once before the first step of a task."""

    def penalty(self, ctx: StepContext, features: Tensor, batch: Any) -> Tensor | None:
        """An extra loss term for this (micro-)batch, or None."""
        return None

    def after_task(self, ctx: StepContext) -> None:
        """Called once after the last step of a task."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
