"""SUN397 (Xiao et al. 2010): scene photos of 397 categories.

Layout: the task-vectors repository's image-folder split, ``sun397/{train,test}/<folder>/*.jpg``
(``val`` stands in when there is no ``test``), where a folder is the official category path
flattened, e.g. ``/a/abbey`` → ``a_abbey``, ``/a/apartment_building/outdoor`` →
``a_apartment_building_outdoor``. Found in an explicit ``root`` (``sun397`` or its parent),
``$MAGMAX_DATA/sun397`` or ``~/data``.

Class ids: sorted folder names. Names: the letter prefix dropped and ``_`` → space
(``apartment building outdoor``), as in the task-vectors code. Templates: the 2 SUN397 templates.
"""

from __future__ import annotations

import re
from pathlib import Path

from magmax.data.base import Dataset, DatasetReader, natural_name, register_reader
from magmax.data.folders import probe_tree, read_split_folders
from magmax.data.locate import candidate_dirs, locate
from magmax.data.templates import SUN397_TEMPLATES

LAYOUT = "sun397/train/<x_category>/ and sun397/test/<x_category>/ (or sun397/val/)"
SOURCE = (
    "https://vision.princeton.edu/projects/2010/SUN/ (SUN397.tar.gz), "
    "split into folders as in github.com/mlfoundations/task_vectors"
)

_LETTER_PREFIX = re.compile(r"^[a-z]_")


def class_name(folder: str) -> str:
    return natural_name(_LETTER_PREFIX.sub("", folder, count=1))


@register_reader("sun397")
class SUN397Reader(DatasetReader):
    modality = "image"
    summary = "SUN397: 397 scene categories (train/test image folders)"

    def read(self, root: Path | None, options) -> Dataset:
        train_dir, test_dir = locate(
            "sun397",
            candidate_dirs(root, ("sun397", "SUN397"), ["~/data"]),
            lambda c: probe_tree(c, ("sun397", "SUN397")),
            LAYOUT,
            SOURCE,
        )
        classes, train, test, listing = read_split_folders(train_dir, test_dir, "sun397")
        return Dataset(
            name="sun397",
            modality="image",
            class_names=[class_name(c) for c in classes],
            train=train,
            test=test,
            templates=list(SUN397_TEMPLATES),
            info={"root": str(train_dir.parent.resolve()), "listing": listing, "test_folder": test_dir.name},
        )
