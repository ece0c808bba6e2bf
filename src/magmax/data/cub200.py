"""CUB-200-2011 (Wah et al. 2011): 11,788 bird photos, 200 species, the official 5,994/5,794 split.

Layout: the extracted official ``CUB_200_2011.tgz``: ``CUB_200_2011/`` with ``images.txt``
(``<image id> <relative path>``), ``image_class_labels.txt`` (``<image id> <class id 1..200>``),
``train_test_split.txt`` (``<image id> <1 = train, 0 = test>``), ``classes.txt``
(``<class id> <NNN.Name>``) and ``images/<NNN.Name>/<file>.jpg``. Found in an explicit ``root`` (that
folder or its parent), ``$MAGMAX_DATA/cub200`` or ``~/data``.

Class ids: the official class id − 1 (= the sorted ``NNN.Name`` folders the MagMax reference reads
with ``ImageFolder``), so the paper's 200-class order applies. Names: ``001.Black_footed_Albatross``
→ ``Black footed Albatross`` (the reference's spelling). Templates: the 80 ImageNet templates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magmax.data.base import Dataset, DatasetReader, ImageFiles, LabeledSet, natural_name, register_reader
from magmax.data.locate import candidate_dirs, describe_file, locate, malformed
from magmax.data.templates import IMAGENET_TEMPLATES

FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
LAYOUT = "CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/"
SOURCE = "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)"


def probe(candidate: Path) -> Path | None:
    for folder in (candidate / "CUB_200_2011", candidate):
        if all((folder / f).is_file() for f in FILES):
            return folder
    return None


def read_pairs(path: Path) -> dict[int, str]:
    """``<int id> <value>`` lines → {id: value} (values may contain no spaces except after the id)."""
    pairs: dict[int, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value:
            raise malformed("cub200", path, f"line {number} is not '<id> <value>'")
        pairs[int(key)] = value.strip()
    return pairs


@register_reader("cub200")
class CUB200Reader(DatasetReader):
    modality = "image"
    summary = "CUB-200-2011: 200 bird species, official 5,994/5,794 split"

    def read(self, root: Path | None, options) -> Dataset:
        folder = locate("cub200", candidate_dirs(root, ("cub200", "CUB_200_2011"), ["~/data"]), probe, LAYOUT, SOURCE)
        images, labels, is_train, classes = (read_pairs(folder / f) for f in FILES)
        class_ids = sorted(classes)
        if class_ids != list(range(1, len(class_ids) + 1)):
            raise malformed("cub200", folder / "classes.txt", "class ids are not 1..N")
        if not (images.keys() == labels.keys() == is_train.keys()):
            raise malformed(
                "cub200", folder, "images.txt, image_class_labels.txt and train_test_split.txt list different image ids"
            )
        ids = sorted(images)
        y = np.asarray([int(labels[i]) - 1 for i in ids])
        if y.min() < 0 or y.max() >= len(class_ids):
            raise malformed("cub200", folder / "image_class_labels.txt", f"class ids outside 1..{len(class_ids)}")
        flags = np.asarray([is_train[i] for i in ids])
        if not set(flags) <= {"0", "1"}:
            raise malformed("cub200", folder / "train_test_split.txt", "flags other than 0/1")
        full = LabeledSet(ImageFiles(str(folder / "images" / images[i]) for i in ids), y)
        return Dataset(
            name="cub200",
            modality="image",
            class_names=[natural_name(classes[c].split(".", 1)[-1]) for c in class_ids],
            train=full.where(flags == "1"),
            test=full.where(flags == "0"),
            templates=list(IMAGENET_TEMPLATES),
            info={"files": [describe_file(folder / f) for f in FILES], "split": "official train_test_split.txt"},
        )
