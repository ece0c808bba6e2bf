"""Continual-learning regularisers as plug-ins of the one training loop.

A regulariser sees the task before training (``before_task``), adds a term to every step's loss
(``penalty``), and updates its memory after the task (``after_task``). Fine-tuning without one is
plain Seq-FT / Ind-FT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from magmax.training.loop import StepContext


class Regularizer:
    name = "none"

    def before_task(self, ctx: "StepContext") -> None:
        """Called once before the first step of a task."""

    def penalty(self, ctx: "StepContext", features: Tensor, batch: Any) -> Tensor | None:
        """An extra loss term for this (micro-)batch, or None."""
        return None

    def after_task(self, ctx: "StepContext") -> None:
        """Called once after the last step of a task."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
