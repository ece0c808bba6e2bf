"""Task streams: a dataset cut into the tasks that arrive one at a time (protocol §2 and §4).

* Class-incremental: the C classes, in a class order, are cut into n contiguous chunks; task i gets
  ``sorted(order[floor(C·i/n) : floor(C·(i+1)/n)])`` and the training and test samples of those
  classes. The floors are computed in exact integer arithmetic: the reference computes
  ``floor(C/n*i)`` in floating point, which agrees for every setting of the paper (C = 100, 196, 200
  with n = 5, 10, 20, 50) but loses a class for some others (C = 15, n = 11 gives 14.999... → 14).
  A task's training head covers only its classes; a label y maps to ``classes.index(y)``
  (sorted class-id order).
* Domain-incremental: one task per domain, every task with all classes (the head covers them all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from magmax.data.base import Dataset, LabeledSet
from magmax.errors import ConfigError

PAPER_CIFAR100_ORDER: tuple[int, ...] = (
    70, 89, 11, 13, 63, 53, 86, 57, 41, 43, 14, 98, 52, 73, 95, 96, 33, 16, 39, 74, 25, 88, 35, 28, 79, 82,
    72, 4, 30, 17, 59, 97, 36, 38, 29, 55, 83, 7, 22, 48, 19, 47, 2, 44, 67, 71, 34, 84, 6, 46, 61, 8, 80,
    10, 49, 15, 68, 9, 99, 40, 27, 45, 51, 37, 21, 64, 92, 24, 60, 31, 5, 91, 93, 90, 65, 66, 77, 20, 58,
    62, 23, 76, 75, 42, 0, 26, 87, 50, 3, 56, 81, 1, 94, 69, 18, 78, 54, 12, 85, 32,
)  # fmt: skip
"""The paper's CIFAR-100 class order (torchvision label ids), protocol §4."""

PAPER_IMAGENET_R_ORDER: tuple[int, ...] = (
    186, 157, 67, 59, 117, 1, 122, 14, 131, 40, 66, 199, 92, 170, 197, 118, 173, 37, 146, 191, 4, 198, 64,
    56, 51, 165, 0, 107, 175, 148, 187, 161, 137, 180, 133, 181, 177, 12, 20, 74, 143, 142, 110, 116, 194,
    138, 183, 89, 45, 121, 190, 94, 36, 83, 130, 120, 21, 38, 125, 145, 182, 103, 105, 61, 32, 141, 13,
    112, 111, 104, 26, 69, 39, 156, 147, 108, 72, 10, 96, 188, 16, 63, 152, 86, 160, 119, 184, 7, 172, 132,
    44, 42, 82, 15, 114, 127, 85, 168, 55, 65, 3, 95, 171, 176, 33, 43, 17, 97, 163, 62, 75, 123, 128, 124,
    99, 29, 28, 166, 41, 35, 76, 77, 5, 84, 102, 60, 78, 70, 164, 113, 30, 91, 81, 18, 155, 179, 73, 46,
    80, 31, 150, 79, 174, 153, 50, 144, 9, 167, 134, 135, 101, 49, 106, 154, 23, 100, 48, 25, 71, 139, 162,
    158, 159, 87, 90, 11, 24, 57, 19, 52, 129, 140, 178, 53, 169, 195, 126, 47, 151, 136, 22, 58, 34, 8,
    185, 54, 109, 193, 68, 192, 149, 115, 98, 88, 93, 6, 196, 189, 2, 27,
)  # fmt: skip
"""The paper's 200-class order shared by ImageNet-R and CUB-200, protocol §4."""

PAPER_ORDERS: dict[str, tuple[int, ...]] = {
    "paper-cifar100": PAPER_CIFAR100_ORDER,
    "paper-imagenet-r": PAPER_IMAGENET_R_ORDER,
    "paper-cub200": PAPER_IMAGENET_R_ORDER,
}
ORDER_NAMES = ("natural", "random", *PAPER_ORDERS)

_NAMES_IN_TASK_TITLE = 4


@dataclass(frozen=True)
class Task:
    index: int
    name: str
    classes: tuple[int, ...]
    train: LabeledSet
    test: LabeledSet

    def local_labels(self, labels: np.ndarray) -> np.ndarray:
        """Global class ids → positions in ``classes`` (0..k-1, sorted class-id order)."""
        labels = np.asarray(labels, dtype=np.int64)
        classes = np.asarray(self.classes, dtype=np.int64)
        pos = np.searchsorted(classes, labels)
        inside = (pos < len(classes)) & (classes[np.minimum(pos, len(classes) - 1)] == labels)
        if not inside.all():
            stray = sorted(set(labels[~inside].tolist()))[:5]
            raise ValueError(f"labels {stray} are not classes of task {self.index + 1} ({self.name})")
        return pos


def class_order(spec: str | Sequence[int], num_classes: int, seed: int = 0) -> list[int]:
    """A permutation of 0..C-1: ``"natural"``, ``"random"`` (seeded), a paper order, or an explicit list."""
    if isinstance(spec, str):
        if spec == "natural":
            return list(range(num_classes))
        if spec == "random":
            return [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]
        if spec not in PAPER_ORDERS:
            raise ConfigError(
                f"unknown class order '{spec}'; choose one of: {', '.join(ORDER_NAMES)} or give a list of class ids"
            )
        order = list(PAPER_ORDERS[spec])
        if len(order) != num_classes:
            raise ConfigError(f"class order '{spec}' has {len(order)} classes but the dataset has {num_classes}")
        return order
    order = [int(c) for c in spec]
    check_permutation(order, num_classes)
    return order


def check_permutation(order: Sequence[int], num_classes: int) -> None:
    if len(order) != num_classes or sorted(order) != list(range(num_classes)):
        extra = sorted(set(order) - set(range(num_classes)))
        lacking = sorted(set(range(num_classes)) - set(order))
        repeated = sorted({c for c in order if list(order).count(c) > 1}) if len(set(order)) != len(order) else []
        raise ConfigError(
            f"the class order is not a permutation of 0..{num_classes - 1}: {len(order)} entries"
            f"{f', missing {lacking[:5]}' if lacking else ''}{f', out of range {extra[:5]}' if extra else ''}"
            f"{f', repeated {repeated[:5]}' if repeated else ''}; list every class id exactly once"
        )


def split_classes(order: Sequence[int], n_tasks: int) -> list[list[int]]:
    """Protocol §4: task i gets ``sorted(order[floor(C·i/n) : floor(C·(i+1)/n)])``."""
    num_classes = len(order)
    if n_tasks < 1:
        raise ConfigError(f"the number of tasks must be at least 1, got {n_tasks}")
    if n_tasks > num_classes:
        raise ConfigError(f"{n_tasks} tasks but only {num_classes} classes; use at most {num_classes} tasks")
    bounds = [num_classes * i // n_tasks for i in range(n_tasks + 1)]
    return [sorted(int(c) for c in order[bounds[i] : bounds[i + 1]]) for i in range(n_tasks)]


def _title(index: int, classes: Sequence[int], names: Sequence[str]) -> str:
    shown = ", ".join(names[c] for c in classes[:_NAMES_IN_TASK_TITLE])
    more = len(classes) - _NAMES_IN_TASK_TITLE
    return f"task {index + 1}: {shown}" + (f", ... (+{more})" if more > 0 else "")


def class_incremental(ds: Dataset, n_tasks: int, order: Sequence[int]) -> list[Task]:
    """The class-incremental stream of ``ds`` in ``order`` (a permutation of its class ids)."""
    order = list(order)
    check_permutation(order, ds.num_classes)
    tasks = []
    for i, classes in enumerate(split_classes(order, n_tasks)):
        train = ds.train.where(np.isin(ds.train.labels, classes))
        test = ds.test.where(np.isin(ds.test.labels, classes))
        name = _title(i, classes, ds.class_names)
        _require_samples(ds.name, name, train, test)
        tasks.append(Task(i, name, tuple(classes), train, test))
    return tasks


def domain_incremental(ds: Dataset, domain_order: Sequence[str] | None = None) -> list[Task]:
    """One task per domain, in ``domain_order`` (default: ``ds.domain_names``, which the ImageNet-R and
    DomainNet readers give in the paper's order); every task has all classes."""
    if ds.domain_names is None or ds.train.domains is None or ds.test.domains is None:
        raise ConfigError(f"dataset '{ds.name}' has no domains; domain-incremental streams need a dataset with domains")
    order = list(ds.domain_names if domain_order is None else domain_order)
    unknown = [d for d in order if d not in ds.domain_names]
    if unknown or len(set(order)) != len(order) or not order:
        raise ConfigError(
            f"domain order {order} must list distinct domains of '{ds.name}': {', '.join(ds.domain_names)}"
        )
    classes = tuple(range(ds.num_classes))
    tasks = []
    for i, domain in enumerate(order):
        d = ds.domain_names.index(domain)
        train = ds.train.where(ds.train.domains == d)
        test = ds.test.where(ds.test.domains == d)
        _require_samples(ds.name, domain, train, test)
        tasks.append(Task(i, domain, classes, train, test))
    return tasks


def _require_samples(dataset: str, task: str, train: LabeledSet, test: LabeledSet) -> None:
    for split, ls in (("training", train), ("test", test)):
        if len(ls) == 0:
            raise ConfigError(
                f"dataset '{dataset}': {task} has no {split} samples; "
                "use fewer tasks, another class order, or complete data"
            )
