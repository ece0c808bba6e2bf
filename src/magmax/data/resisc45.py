"""NWPU-RESISC45 (Cheng et al. 2017): 31,500 256×256 aerial scenes, 45 classes × 700.

Two layouts, in ``resisc45/`` below an explicit ``root`` (or the root itself), ``$MAGMAX_DATA/resisc45``
or ``~/data``:

* split files (task-vectors / torchgeo): ``resisc45/<class>/<class>_NNN.jpg`` (or the archive's
  ``NWPU-RESISC45/<class>/`` below it) and ``resisc45-train.txt`` / ``resisc45-test.txt`` listing the
  file names of each split (the splits of Neumann et al. 2019, "In-domain representation learning for
  remote sensing"); ``resisc45-val.txt`` is not read.
* folders (MagMax's copy): ``resisc45/{train,test}/<class>/*.jpg``.

Class ids: sorted class folder names (``airplane`` ... ``wetland``); names with ``_`` → space.
Templates: the 18 RESISC45 templates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magmax.data.base import Dataset, DatasetReader, ImageFiles, LabeledSet, natural_name, register_reader
from magmax.data.folders import images_under, probe_tree, read_split_folders, subfolders
from magmax.data.locate import candidate_dirs, describe_file, locate, malformed
from magmax.data.templates import RESISC45_TEMPLATES

SPLIT_FILES = {"train": "resisc45-train.txt", "test": "resisc45-test.txt"}
LAYOUT = "resisc45/<class>/*.jpg with resisc45-train.txt and resisc45-test.txt, or resisc45/{train,test}/<class>/"
SOURCE = (
    "the NWPU-RESISC45 archive (NWPU-RESISC45.rar) and the split files of github.com/microsoft/torchgeo "
    "(resisc45-*.txt)"
)


def probe(candidate: Path) -> tuple[str, Path, Path] | None:
    for folder in (candidate / "resisc45", candidate):
        if all((folder / f).is_file() for f in SPLIT_FILES.values()):
            images = folder / "NWPU-RESISC45" if (folder / "NWPU-RESISC45").is_dir() else folder
            return "split-files", folder, images
    tree = probe_tree(candidate, ("resisc45",))
    if tree is not None:
        return "folders", tree[0], tree[1]
    return None


@register_reader("resisc45")
class RESISC45Reader(DatasetReader):
    modality = "image"
    summary = "NWPU-RESISC45: 45 aerial scene classes (split files or train/test folders)"

    def read(self, root: Path | None, options) -> Dataset:
        layout, first, second = locate(
            "resisc45", candidate_dirs(root, ("resisc45",), ["~/data"]), probe, LAYOUT, SOURCE
        )
        if layout == "folders":
            classes, train, test, listing = read_split_folders(first, second, "resisc45")
            info = {"layout": layout, "root": str(first.parent.resolve()), "listing": listing}
        else:
            classes, train, test = self._from_split_files(first, second)
            info = {"layout": layout, "files": [describe_file(first / f) for f in SPLIT_FILES.values()]}
        return Dataset(
            name="resisc45",
            modality="image",
            class_names=[natural_name(c) for c in classes],
            train=train,
            test=test,
            templates=list(RESISC45_TEMPLATES),
            info={**info, "split": "official split files" if layout == "split-files" else "folders"},
        )

    @staticmethod
    def _from_split_files(folder: Path, images: Path) -> tuple[list[str], LabeledSet, LabeledSet]:
        classes = [c for c in subfolders(images) if c not in ("train", "test", "val", "NWPU-RESISC45")]
        if not classes:
            raise malformed("resisc45", images, "no class folders")
        members = {
            s: {ln.strip() for ln in (folder / f).read_text().splitlines() if ln.strip()}
            for s, f in SPLIT_FILES.items()
        }
        splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
        for label, cls in enumerate(classes):
            for rel in images_under(images / cls):
                base = Path(rel).name
                for split, names in members.items():
                    if base in names:
                        splits[split][0].append(str(images / cls / rel))
                        splits[split][1].append(label)
        sets = []
        for split, (paths, labels) in splits.items():
            if not paths:
                raise malformed("resisc45", folder / SPLIT_FILES[split], "lists no image found under the class folders")
            sets.append(LabeledSet(ImageFiles(paths), np.asarray(labels)))
        return classes, sets[0], sets[1]
