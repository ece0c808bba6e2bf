"""GTSRB (Stallkamp et al. 2012), the German Traffic Sign Recognition Benchmark: 43 classes, the
official 39,209/12,630 train/test split.

Layout (torchvision's ``GTSRB``, used by the task-vectors and MagMax code): ``gtsrb/`` with
``GTSRB/Training/<00000..00042>/*.ppm`` (``GTSRB-Training_fixed.zip``),
``GTSRB/Final_Test/Images/*.ppm`` (``GTSRB_Final_Test_Images.zip``) and ``GT-final_test.csv``
(``GTSRB_Final_Test_GT.zip``: ``;``-separated, columns ``Filename`` and ``ClassId``). Found in an
explicit ``root`` (``gtsrb`` or its parent), ``$MAGMAX_DATA/gtsrb`` or ``~/data``.

Class ids: the official ids (folder ``00012`` = 12). Names: the CLIP paper's descriptive names
(``red and white circle 20 kph speed limit`` ...), as in the task-vectors code. Templates: the 3
GTSRB templates.
"""

from __future__ import annotations

import csv
from pathlib import Path

from magmax.data.base import Dataset, DatasetReader, ImageFiles, LabeledSet, check_labels, register_reader
from magmax.data.folders import images_under, subfolders
from magmax.data.locate import candidate_dirs, describe_file, describe_listing, locate, malformed
from magmax.data.templates import GTSRB_TEMPLATES

CLASS_NAMES = (
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)

LAYOUT = "gtsrb/GTSRB/Training/<class id>/*.ppm, gtsrb/GTSRB/Final_Test/Images/*.ppm and gtsrb/GT-final_test.csv"
SOURCE = (
    "https://benchmark.ini.rub.de/ (GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip, GTSRB_Final_Test_GT.zip)"
)


def _test_csv(folder: Path) -> Path | None:
    for path in (folder / "GT-final_test.csv", folder / "GTSRB" / "GT-final_test.csv"):
        if path.is_file():
            return path
    return None


def probe(candidate: Path) -> Path | None:
    for folder in (candidate / "gtsrb", candidate / "GTSRB", candidate):
        if (
            (folder / "GTSRB" / "Training").is_dir()
            and (folder / "GTSRB" / "Final_Test" / "Images").is_dir()
            and _test_csv(folder)
        ):
            return folder
    return None


@register_reader("gtsrb")
class GTSRBReader(DatasetReader):
    modality = "image"
    summary = "GTSRB: 43 traffic-sign classes, official train/test split"

    def read(self, root: Path | None, options) -> Dataset:
        folder = locate("gtsrb", candidate_dirs(root, ("gtsrb", "GTSRB"), ["~/data"]), probe, LAYOUT, SOURCE)
        training = folder / "GTSRB" / "Training"
        paths, labels, rels = [], [], []
        for name in subfolders(training):
            if not name.isdigit():
                raise malformed("gtsrb", training / name, "class folders are named by class id (00000 ... 00042)")
            files = images_under(training / name)
            paths += [str(training / name / f) for f in files]
            rels += [f"{name}/{f}" for f in files]
            labels += [int(name)] * len(files)
        train = LabeledSet(ImageFiles(paths), check_labels(labels, len(CLASS_NAMES), "gtsrb", training))

        csv_path = _test_csv(folder)
        assert csv_path is not None  # the probe checked it
        images = folder / "GTSRB" / "Final_Test" / "Images"
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter=";", skipinitialspace=True))
        if not rows or not {"Filename", "ClassId"} <= set(rows[0]):
            raise malformed("gtsrb", csv_path, "no 'Filename' and 'ClassId' columns")
        test = LabeledSet(
            ImageFiles(str(images / r["Filename"]) for r in rows),
            check_labels([int(r["ClassId"]) for r in rows], len(CLASS_NAMES), "gtsrb", csv_path),
        )
        if len(train) == 0:
            raise malformed("gtsrb", training, "no training images")
        return Dataset(
            name="gtsrb",
            modality="image",
            class_names=list(CLASS_NAMES),
            train=train,
            test=test,
            templates=list(GTSRB_TEMPLATES),
            info={
                "files": [describe_file(csv_path)],
                "listing": {"train": describe_listing(training, rels)},
                "split": "official",
            },
        )
