"""Datasets as the continual-learning runner sees them, and the registry that makes a reader one file.

A :class:`Dataset` is two :class:`LabeledSet` splits over global class ids ``0..C-1`` plus the natural
class names and zero-shot templates that build the frozen head. A reader (one module each in this
package, decorated with :func:`register_reader`) turns an on-disk layout into a :class:`Dataset`; it
never downloads: a missing dataset is a one-line :class:`~magmax.errors.DataError` (see ``locate.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from magmax.errors import ConfigError, DataError

Modality = Literal["text", "image"]


class ImageFiles(list):
    """A list of image file paths (str): items that :meth:`LabeledSet.get` decodes lazily with PIL.

    A plain ``list[str]`` holds texts; this subclass marks the strings as files, so a set of a million
    images costs a million short strings in memory, not the pixels.
    """

    def take(self, idx: np.ndarray) -> ImageFiles:
        return ImageFiles(self[int(i)] for i in idx)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB from a grey [H, W] or [H, W, 1] array (channels repeated) or an RGB one."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image


def load_image(path: str) -> np.ndarray:
    """Decode one image file to HWC uint8 RGB (PIL converts palette, grey and alpha images)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}; replace or remove the file") from None


@dataclass
class LabeledSet:
    """N samples with global labels. ``items``: texts (``list[str]``), an image array (uint8
    [N, H, W, C] RGB or [N, H, W] grey) or :class:`ImageFiles` paths decoded on :meth:`get`."""

    items: Sequence
    labels: np.ndarray
    domains: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.items) != len(self.labels):
            raise ValueError(f"{len(self.items)} items but {len(self.labels)} labels")
        if self.domains is not None:
            self.domains = np.asarray(self.domains, dtype=np.int64).reshape(-1)
            if len(self.domains) != len(self.labels):
                raise ValueError(f"{len(self.domains)} domain ids but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray | Sequence[int]) -> LabeledSet:
        """The samples at ``idx`` (in that order); arrays are indexed, path and text lists re-listed."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if isinstance(self.items, np.ndarray):
            items: Sequence = self.items[idx]
        elif isinstance(self.items, ImageFiles):
            items = self.items.take(idx)
        else:
            items = [self.items[int(i)] for i in idx]
        domains = None if self.domains is None else self.domains[idx]
        return LabeledSet(items, self.labels[idx], domains)

    def where(self, mask: np.ndarray) -> LabeledSet:
        return self.subset(np.flatnonzero(mask))

    @property
    def is_image(self) -> bool:
        return isinstance(self.items, (np.ndarray, ImageFiles))

    def get(self, i: int) -> str | np.ndarray:
        """One item: the text, or the image as HWC uint8 RGB (grey images get three equal channels)."""
        if isinstance(self.items, np.ndarray):
            return _as_rgb(self.items[i])
        if isinstance(self.items, ImageFiles):
            return load_image(self.items[i])
        return self.items[i]

    def get_many(self, idx: Sequence[int]) -> list:
        return [self.get(int(i)) for i in idx]


@dataclass
class Dataset:
    name: str
    modality: Modality
    class_names: list[str]
    train: LabeledSet
    test: LabeledSet
    templates: list[str]
    domain_names: list[str] | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def with_splits(self, train: LabeledSet, test: LabeledSet, **info: Any) -> Dataset:
        return replace(self, train=train, test=test, info={**self.info, **info})


class ReaderOptions(BaseModel):
    """Options every reader takes. Subclasses add their own (each with a default and a docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_train_per_class: int | None = None
    """Keep at most this many training samples per class (a seeded choice, original order kept)."""
    max_test_per_class: int | None = None
    """Keep at most this many test samples per class."""
    subsample_seed: int = 0
    """Seed of the per-class caps above."""


class DatasetReader:
    """One on-disk layout → :class:`Dataset`. Subclasses set the class variables and :meth:`read`."""

    name: ClassVar[str]
    modality: ClassVar[Modality]
    summary: ClassVar[str]
    Options: ClassVar[type[ReaderOptions]] = ReaderOptions

    def read(self, root: Path | None, options: Any) -> Dataset:
        raise NotImplementedError


_READERS: dict[str, type[DatasetReader]] = {}


def register_reader(name: str):
    """Class decorator: make a reader available to :func:`magmax.data.load_dataset` by ``name``."""

    def wrap(cls: type[DatasetReader]) -> type[DatasetReader]:
        if name in _READERS and _READERS[name] is not cls:
            raise ValueError(f"dataset reader '{name}' registered twice")
        cls.name = name
        _READERS[name] = cls
        return cls

    return wrap


def readers() -> dict[str, type[DatasetReader]]:
    """Every registered reader by name. The package's ``__init__`` imports each reader module (which
    registers it), and Python runs a package's ``__init__`` before any of its modules, so by the time this
    module is importable the registry is full; this module never imports the readers itself."""
    return dict(sorted(_READERS.items()))


def get_reader(name: str) -> type[DatasetReader]:
    known = readers()
    if name not in known:
        raise ConfigError(f"unknown dataset '{name}'; choose one of: {', '.join(known)}")
    return known[name]


def validate_options(reader: type[DatasetReader], options: dict[str, Any]) -> ReaderOptions:
    try:
        return reader.Options(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "options"
        known = ", ".join(reader.Options.model_fields)
        raise ConfigError(
            f"dataset '{reader.name}': option '{where}': {err['msg']}; options of '{reader.name}' are: {known}"
        ) from None


def cap_per_class(split: LabeledSet, limit: int | None, seed: int) -> LabeledSet:
    """At most ``limit`` samples of each class, chosen by a seeded generator per class (so capping one
    class never changes another's choice), in their original order."""
    if limit is None:
        return split
    if limit < 1:
        raise ConfigError(f"a per-class cap must be at least 1, got {limit}")
    keep = []
    for c in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == c)
        if len(idx) > limit:
            rng = np.random.default_rng([seed, int(c)])
            idx = np.sort(rng.choice(idx, size=limit, replace=False))
        keep.append(idx)
    return split.subset(np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64))


def natural_name(raw: str) -> str:
    """``aquarium_fish`` → ``aquarium fish``: the spelling a zero-shot template reads best."""
    return raw.replace("_", " ").strip()


def check_labels(labels: np.ndarray, num_classes: int, dataset: str, where: object) -> np.ndarray:
    """Labels as int64, checked to lie in 0..num_classes-1 (a corrupt file must not become a silent
    out-of-range class)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"dataset '{dataset}': {where}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}; "
            "re-extract the official archive"
        )
    return labels
