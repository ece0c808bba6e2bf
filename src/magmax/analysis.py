"""What the task vectors of a stream look like: MagMax's choice, sign conflicts, norms, cosine similarity.

Given θ0 and the fine-tuned θ_1..θ_T of one stream (τ_t = θ_t − θ0 on the floating-point tensors):

* **MagMax selection**: the MagMax rule replayed, per parameter the task of largest |τ_t| (ties to the
  LATER task, as :mod:`magmax.merging.magmax` folds), counted per tensor over the parameters where one
  task alone has the largest |τ_t|; ``share`` is the fraction of those taken from each task,
  ``layer_share`` the same per layer (:func:`layer_of`). Parameters where two or more tasks tie for the
  largest |τ_t| are counted apart as ``tied``: no task moved them (τ = 0), or only weight decay did,
  which moves a parameter by the same amount in every Ind-FT task of equal length. The tie rule alone
  would hand them all to the last task, which says nothing about the tasks.
* **sign conflicts**: ``pairwise[i][j]`` = among the entries where τ_i and τ_j are both non-zero, the
  fraction of opposite signs; ``overall`` = among the entries where at least two task vectors are
  non-zero, the fraction where their non-zero signs are not all the same.
* **norms**: ‖τ_t‖₂ over all its entries; **cosine**: τ_i·τ_j / (‖τ_i‖ ‖τ_j‖) (0 where a norm is 0).

:class:`TaskVectorStats` accumulates tensor by tensor, so a stream of large checkpoints is read one
tensor at a time (:func:`analyse_checkpoints`), never as T whole models in memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from magmax.taskvector import is_mergeable

_INDEX = re.compile(r"^\d+$")


def layer_of(key: str) -> str:
    """The layer a tensor belongs to: the key up to its first numeric part (``encoder.layers.3``), else the
    key without its last part (``visual.conv1.weight`` → ``visual.conv1``)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if _INDEX.match(part):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or key


def magmax_winner(taus: Sequence[Tensor]) -> Tensor:
    """Per entry, the index of the task MagMax takes: largest |τ_t|, ties to the later task."""
    best = taus[0].abs()
    winner = torch.zeros(taus[0].shape, dtype=torch.int64)
    for t, tau in enumerate(taus[1:], start=1):
        mag = tau.abs()
        take = mag >= best
        winner[take] = t
        best = torch.where(take, mag, best)
    return winner


@dataclass
class TaskVectorStats:
    """Accumulates the statistics of T task vectors, one tensor (``add(key, [τ_1[key], …])``) at a time."""

    n_tasks: int
    selected: dict[str, list[int]] = field(default_factory=dict)
    tied: dict[str, int] = field(default_factory=dict)
    _dots: Tensor | None = None
    _both: Tensor | None = None
    _opposite: Tensor | None = None
    _multi: int = 0
    _conflict: int = 0

    def __post_init__(self) -> None:
        n = self.n_tasks
        self._dots = torch.zeros(n, n, dtype=torch.float64)
        self._both = torch.zeros(n, n, dtype=torch.int64)
        self._opposite = torch.zeros(n, n, dtype=torch.int64)

    def add(self, key: str, taus: Sequence[Tensor]) -> None:
        if len(taus) != self.n_tasks:
            raise ValueError(f"{key}: {len(taus)} task vectors for {self.n_tasks} tasks")
        flat = torch.stack([t.detach().reshape(-1).to(torch.float64) for t in taus])  # T × n
        winner = magmax_winner(list(flat))
        magnitude = flat.abs()
        tied = magnitude.eq(magnitude.amax(0)).sum(0) >= 2
        self.selected[key] = torch.bincount(winner[~tied], minlength=self.n_tasks).tolist()
        self.tied[key] = int(tied.sum())
        self._dots += flat @ flat.T
        sign = torch.sign(flat)
        nonzero = (sign != 0).to(torch.float64)
        self._both += (nonzero @ nonzero.T).round().to(torch.int64)
        self._opposite += ((sign @ sign.T).neg() + nonzero @ nonzero.T).div(2).round().to(torch.int64)
        # Entries with two or more non-zero signs that are not all equal.
        count = nonzero.sum(0)
        multi = count >= 2
        positive = (sign > 0).sum(0)
        negative = (sign < 0).sum(0)
        self._multi += int(multi.sum())
        self._conflict += int((multi & (positive > 0) & (negative > 0)).sum())

    def result(self) -> dict[str, Any]:
        n = self.n_tasks
        total = [sum(c[t] for c in self.selected.values()) for t in range(n)]
        untied = sum(total)
        tied = sum(self.tied.values())
        numel = untied + tied
        layers: dict[str, list[int]] = {}
        for key, counts in self.selected.items():
            acc = layers.setdefault(layer_of(key), [0] * n)
            for t in range(n):
                acc[t] += counts[t]
        norms = self._dots.diagonal().sqrt()
        denom = torch.outer(norms, norms)
        cosine = torch.where(denom > 0, self._dots / denom.clamp_min(1e-300), torch.zeros_like(denom))
        both = self._both.to(torch.float64)
        pairwise = torch.where(both > 0, self._opposite / both.clamp_min(1), torch.zeros_like(both))
        return {
            "n_tasks": n,
            "numel": numel,
            "selection": {
                "share": [c / untied if untied else 0.0 for c in total],
                "layer_share": {
                    layer: [c / sum(counts) if sum(counts) else 0.0 for c in counts] for layer, counts in layers.items()
                },
                "counts": total,
                "tied": tied,
                "tied_share": tied / numel if numel else 0.0,
            },
            "sign_conflicts": {
                "pairwise": pairwise.tolist(),
                "overall": self._conflict / self._multi if self._multi else 0.0,
            },
            "norms": norms.tolist(),
            "cosine": cosine.tolist(),
        }


def analyse(theta0: Mapping[str, Tensor], thetas: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
    """The statistics of τ_t = θ_t − θ0 over the floating-point tensors of θ0 (state dicts in memory)."""
    stats = TaskVectorStats(len(thetas))
    for key, base in theta0.items():
        if is_mergeable(base.dtype):
            stats.add(key, [theta[key].to(torch.float32) - base.to(torch.float32) for theta in thetas])
    return stats.result()


def analyse_checkpoints(theta0: str | Path, thetas: Sequence[str | Path]) -> dict[str, Any]:
    """:func:`analyse` on safetensors files, reading one tensor of every file at a time."""
    from contextlib import ExitStack

    from safetensors import safe_open

    with ExitStack() as stack:
        base = stack.enter_context(safe_open(str(theta0), "pt"))
        files = [stack.enter_context(safe_open(str(p), "pt")) for p in thetas]
        stats = TaskVectorStats(len(files))
        for key in base.keys():
            b = base.get_tensor(key)
            if not is_mergeable(b.dtype):
                continue
            b32 = b.to(torch.float32)
            stats.add(key, [f.get_tensor(key).to(torch.float32) - b32 for f in files])
    return stats.result()
