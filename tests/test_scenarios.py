"""Task streams: the protocol's chunking rule, the paper's class orders, label remapping and errors."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magmax.data import Dataset, LabeledSet
from magmax.errors import ConfigError
from magmax.scenarios import (
    PAPER_CIFAR100_ORDER,
    PAPER_IMAGENET_R_ORDER,
    Task,
    class_incremental,
    class_order,
    domain_incremental,
    split_classes,
)


def oracle_split(order: list[int], n: int) -> list[list[int]]:
    """Protocol §4 with exact rational arithmetic: sorted(order[floor(C/n*i) : floor(C/n*(i+1))])."""
    c = len(order)
    return [sorted(order[math.floor(Fraction(c, n) * i) : math.floor(Fraction(c, n) * (i + 1))]) for i in range(n)]


def reference_split(order: list[int], n: int) -> list[list[int]]:
    """The MagMax reference code's floating-point version of the same rule."""
    c = len(order)
    return [sorted(order[math.floor(c / n * i) : math.floor(c / n * (i + 1))]) for i in range(n)]


def toy_dataset(
    num_classes: int, per_class_train: int = 3, per_class_test: int = 2, domains: list[str] | None = None
) -> Dataset:
    def split(per_class: int) -> LabeledSet:
        labels = np.repeat(np.arange(num_classes), per_class)
        dom = None if domains is None else np.arange(len(labels)) % len(domains)
        return LabeledSet([f"sample {i} of class {y}" for i, y in enumerate(labels)], labels, dom)

    return Dataset(
        name="toy",
        modality="text",
        class_names=[f"class{c}" for c in range(num_classes)],
        train=split(per_class_train),
        test=split(per_class_test),
        templates=["{}"],
        domain_names=domains,
    )


# -- paper orders --------------------------------------------------------------------------------


def test_paper_orders_are_permutations_of_the_right_size():
    assert len(PAPER_CIFAR100_ORDER) == 100 and sorted(PAPER_CIFAR100_ORDER) == list(range(100))
    assert len(PAPER_IMAGENET_R_ORDER) == 200 and sorted(PAPER_IMAGENET_R_ORDER) == list(range(200))
    # spot checks against protocol.md §4 (first and last entries)
    assert PAPER_CIFAR100_ORDER[:5] == (70, 89, 11, 13, 63) and PAPER_CIFAR100_ORDER[-3:] == (12, 85, 32)
    assert PAPER_IMAGENET_R_ORDER[:5] == (186, 157, 67, 59, 117) and PAPER_IMAGENET_R_ORDER[-3:] == (189, 2, 27)
    assert class_order("paper-cub200", 200) == class_order("paper-imagenet-r", 200) == list(PAPER_IMAGENET_R_ORDER)
    assert class_order("paper-cifar100", 100) == list(PAPER_CIFAR100_ORDER)


def test_named_orders():
    assert class_order("natural", 7) == list(range(7))
    r0 = class_order("random", 50, seed=0)
    assert sorted(r0) == list(range(50))
    assert class_order("random", 50, seed=0) == r0
    assert class_order("random", 50, seed=1) != r0
    assert class_order([2, 0, 1], 3) == [2, 0, 1]


@pytest.mark.parametrize(
    "spec, n, fragment",
    [
        ("paper-cifar100", 10, "has 100 classes but the dataset has 10"),
        ("alphabetical", 10, "unknown class order 'alphabetical'"),
        ([0, 1, 1], 3, "repeated [1]"),
        ([0, 1, 3], 3, "out of range [3]"),
        ([0, 1], 3, "missing [2]"),
    ],
)
def test_bad_orders_are_one_line_config_errors(spec, n, fragment):
    with pytest.raises(ConfigError) as err:
        class_order(spec, n)
    assert fragment in str(err.value) and "\n" not in str(err.value)


# -- chunking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes, order_name", [(100, "paper-cifar100"), (200, "paper-imagenet-r")])
@pytest.mark.parametrize("n_tasks", [5, 10, 20, 50])
def test_paper_settings_follow_the_protocol(num_classes, order_name, n_tasks):
    order = class_order(order_name, num_classes)
    tasks = split_classes(order, n_tasks)
    assert tasks == oracle_split(order, n_tasks) == reference_split(order, n_tasks)
    assert [len(t) for t in tasks] == [num_classes // n_tasks] * n_tasks
    assert sorted(c for t in tasks for c in t) == list(range(num_classes))
    assert tasks[0] == sorted(order[: num_classes // n_tasks])


def test_uneven_split_puts_the_remainder_where_the_floors_do():
    order = [9, 3, 0, 7, 1, 8, 2, 6, 4, 5]
    # floor(10/3*i) = 0, 3, 6, 10
    assert split_classes(order, 3) == [[0, 3, 9], [1, 7, 8], [2, 4, 5, 6]]


def test_exact_arithmetic_keeps_every_class_where_the_float_rule_drops_one():
    order = list(range(15))
    ours = split_classes(order, 11)
    assert sorted(c for t in ours for c in t) == order
    assert sum(len(t) for t in reference_split(order, 11)) == 14  # the reference loses class 14


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 120).flatmap(lambda c: st.tuples(st.permutations(list(range(c))), st.integers(1, c))))
def test_chunking_properties(case):
    order, n = case
    tasks = split_classes(order, n)
    assert tasks == oracle_split(order, n)
    sizes = [len(t) for t in tasks]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert all(t == sorted(t) for t in tasks)
    assert sorted(c for t in tasks for c in t) == sorted(order)


@pytest.mark.parametrize("n", [0, -1, 11])
def test_impossible_task_counts(n):
    with pytest.raises(ConfigError, match="task"):
        split_classes(list(range(10)), n)


# -- class-incremental streams -------------------------------------------------------------------


def test_class_incremental_selects_samples_and_remaps_labels_in_sorted_order():
    ds = toy_dataset(6)
    order = [5, 2, 0, 4, 3, 1]
    tasks = class_incremental(ds, 2, order)
    assert [t.classes for t in tasks] == [(0, 2, 5), (1, 3, 4)]
    assert [t.index for t in tasks] == [0, 1]
    assert tasks[0].name == "task 1: class0, class2, class5"
    for task in tasks:
        assert set(task.train.labels) == set(task.classes) and len(task.train) == 3 * 3
        assert set(task.test.labels) == set(task.classes) and len(task.test) == 3 * 2
        # the samples are exactly those of the task's classes, in dataset order
        expected = [s for s, y in zip(ds.train.items, ds.train.labels) if y in task.classes]
        assert list(task.train.items) == expected
    local = tasks[0].local_labels(np.array([5, 0, 2, 2]))
    assert local.tolist() == [2, 0, 1, 1]
    assert tasks[1].local_labels(tasks[1].train.labels).tolist() == [[1, 3, 4].index(y) for y in tasks[1].train.labels]


def test_local_labels_rejects_foreign_classes():
    task = class_incremental(toy_dataset(4), 2, [0, 1, 2, 3])[0]
    with pytest.raises(ValueError, match=r"\[3\]"):
        task.local_labels(np.array([0, 3]))


def test_long_task_titles_are_abbreviated():
    tasks = class_incremental(toy_dataset(12), 2, list(range(12)))
    assert tasks[0].name == "task 1: class0, class1, class2, class3, ... (+2)"


def test_class_incremental_errors():
    ds = toy_dataset(4)
    with pytest.raises(ConfigError, match="5 tasks but only 4 classes"):
        class_incremental(ds, 5, [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="not a permutation"):
        class_incremental(ds, 2, [0, 1, 2])
    # class 3 has training samples but no test samples: its task cannot be evaluated
    keep = ds.test.labels != 3
    holey = Dataset(ds.name, ds.modality, ds.class_names, ds.train, ds.test.where(keep), ds.templates)
    with pytest.raises(ConfigError) as err:
        class_incremental(holey, 4, [0, 1, 2, 3])
    assert "task 4: class3 has no test samples" in str(err.value) and "\n" not in str(err.value)


def test_task_is_frozen():
    task = class_incremental(toy_dataset(2), 1, [0, 1])[0]
    assert isinstance(task, Task)
    with pytest.raises(AttributeError):
        task.index = 3  # type: ignore[misc]


# -- domain-incremental streams ------------------------------------------------------------------


def test_domain_incremental_default_and_custom_order():
    ds = toy_dataset(3, per_class_train=4, per_class_test=4, domains=["a", "b"])
    tasks = domain_incremental(ds)
    assert [t.name for t in tasks] == ["a", "b"]
    assert all(t.classes == (0, 1, 2) for t in tasks)
    assert set(tasks[0].train.domains) == {0} and set(tasks[1].test.domains) == {1}
    assert len(tasks[0].train) + len(tasks[1].train) == len(ds.train)
    reordered = domain_incremental(ds, ["b", "a"])
    assert [t.name for t in reordered] == ["b", "a"] and [t.index for t in reordered] == [0, 1]
    assert reordered[0].train.items == tasks[1].train.items
    # every class is in every task, so local labels are the global ones
    assert reordered[0].local_labels(np.array([2, 0])).tolist() == [2, 0]


def test_domain_incremental_errors():
    with pytest.raises(ConfigError, match="has no domains"):
        domain_incremental(toy_dataset(2))
    ds = toy_dataset(2, domains=["a", "b", "c"])
    with pytest.raises(ConfigError, match="distinct domains"):
        domain_incremental(ds, ["a", "z"])
    with pytest.raises(ConfigError, match="distinct domains"):
        domain_incremental(ds, ["a", "a"])
    # 2 classes x 2 test samples = 4 samples over 3 domains: domain 'c' (ids 2) gets one; drop it
    emptied = Dataset(
        ds.name,
        ds.modality,
        ds.class_names,
        ds.train,
        ds.test.where(ds.test.domains != 2),
        ds.templates,
        ds.domain_names,
    )
    with pytest.raises(ConfigError, match="c has no test samples"):
        domain_incremental(emptied)
