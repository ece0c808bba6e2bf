"""The task stream a run config names: the tasks, the head groups that build the all-class head, and the
data's provenance (read by :class:`magmax.continual.ContinualRun`; :mod:`magmax.plan` uses the same
task split to plan a run without running it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from magmax.config import RunConfig
from magmax.data import load_dataset
from magmax.scenarios import Task, class_incremental, class_order, domain_incremental


@dataclass
class HeadGroup:
    """Classes whose head rows come from one dataset's class names and templates."""

    class_ids: list[int]
    names: list[str]
    templates: list[str]


def build_tasks(cfg: RunConfig, dataset) -> list[Task]:
    sc = cfg.scenario
    if sc.kind == "class_incremental":
        order = class_order(sc.class_order, len(dataset.class_names), seed=cfg.seed)
        return class_incremental(dataset, sc.n_tasks, order)
    return domain_incremental(dataset, sc.domain_order)


def load_stream(cfg: RunConfig) -> tuple[list[Task], list[HeadGroup], dict[str, Any]]:
    """The task stream, the head groups (class names + templates) and the data provenance."""
    if cfg.scenario.kind != "multi_dataset":
        dataset = load_dataset(cfg.data.name, cfg.resolved_data_root(), **cfg.data.options)
        tasks = build_tasks(cfg, dataset)
        ids = sorted({c for t in tasks for c in t.classes})
        group = HeadGroup(ids, [dataset.class_names[c] for c in ids], list(dataset.templates))
        return tasks, [group], dict(getattr(dataset, "info", {}))
    # One task per dataset; class ids offset so that datasets never share a head row.
    tasks, groups, info, offset = [], [], {}, 0
    for i, dcfg in enumerate(cfg.scenario.datasets or []):
        ds = load_dataset(dcfg.name, cfg.resolved_data_root(dcfg), **dcfg.options)
        n = len(ds.class_names)
        ids = list(range(offset, offset + n))
        shift = lambda s: type(s)(items=s.items, labels=s.labels + offset, domains=s.domains)  # noqa: E731
        tasks.append(Task(index=i, name=ds.name, classes=tuple(ids), train=shift(ds.train), test=shift(ds.test)))
        groups.append(HeadGroup(ids, list(ds.class_names), list(ds.templates)))
        info[ds.name] = dict(getattr(ds, "info", {}))
        offset += n
    return tasks, groups, info
