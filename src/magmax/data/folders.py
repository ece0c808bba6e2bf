"""Image-folder trees: ``<split>/<class>/**/<image>``, the layout of torchvision's ``ImageFolder``.

Class ids follow ``ImageFolder``: the sorted (case-sensitive, code-point order) class folder names of
the training split, so ids match checkpoints and class orders made with torchvision.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from magmax.data.base import ImageFiles, LabeledSet
from magmax.data.locate import describe_listing, malformed

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif"})


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def subfolders(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders (``ImageFolder`` order)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def images_under(folder: Path) -> list[str]:
    """Image files below ``folder`` (recursively, links followed), as sorted paths relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        found += [n if rel == "." else os.path.join(rel, n) for n in filenames if is_image(n)]
    return sorted(found)


def scan_classes(split_dir: Path, class_ids: dict[str, int], dataset: str) -> tuple[LabeledSet, dict]:
    """The images of one split folder whose class folders are all in ``class_ids``."""
    paths: list[str] = []
    labels: list[int] = []
    rels: list[str] = []
    for name in subfolders(split_dir):
        if name not in class_ids:
            raise malformed(dataset, split_dir / name, "a class folder that the training split does not have")
        files = images_under(split_dir / name)
        paths += [str(split_dir / name / f) for f in files]
        labels += [class_ids[name]] * len(files)
        rels += [f"{name}/{f}" for f in files]
    return LabeledSet(ImageFiles(paths), np.asarray(labels, dtype=np.int64)), describe_listing(split_dir, rels)


def read_split_folders(train_dir: Path, test_dir: Path, dataset: str) -> tuple[list[str], LabeledSet, LabeledSet, dict]:
    """Class folder names (sorted, the ids) and both splits of a ``train``/``test`` tree."""
    classes = subfolders(train_dir)
    if not classes:
        raise malformed(dataset, train_dir, "no class folders")
    ids = {c: i for i, c in enumerate(classes)}
    train, train_info = scan_classes(train_dir, ids, dataset)
    test, test_info = scan_classes(test_dir, ids, dataset)
    for split, ls, where in (("train", train, train_dir), ("test", test, test_dir)):
        if len(ls) == 0:
            raise malformed(dataset, where, f"no image files in the {split} split")
    return classes, train, test, {"train": train_info, "test": test_info}


def first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    return None


def probe_tree(
    candidate: Path, names: tuple[str, ...], test_names: tuple[str, ...] = ("test", "val")
) -> tuple[Path, Path] | None:
    """``(train, test)`` folders of a ``<name>/train``, ``<name>/test`` tree below ``candidate`` (or
    at it), the test split being the first of ``test_names`` present."""
    for folder in [candidate / n for n in names] + [candidate]:
        train = folder / "train"
        test = first_existing(folder, test_names)
        if train.is_dir() and test is not None:
            return train, test
    return None
