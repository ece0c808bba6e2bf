"""Stanford Cars (Krause et al. 2013): 16,185 photos of 196 car models, the official 8,144/8,041 split.

Layout (torchvision's ``StanfordCars``, which the MagMax reference copies): ``stanford_cars/`` with
``devkit/cars_meta.mat`` (``class_names``), ``devkit/cars_train_annos.mat``,
``cars_test_annos_withlabels.mat`` (beside ``devkit/`` or inside it), and the image folders
``cars_train/`` and ``cars_test/``. Each annotation has ``fname`` and ``class`` (1..196). Found in an
explicit ``root`` (``stanford_cars`` or its parent), ``$MAGMAX_DATA/cars`` or ``~/data``. The ``.mat``
files are MATLAB v5 files read with ``scipy.io.loadmat`` (no code runs).

Class ids: official class − 1 (the natural order 0..195 of the paper). Names: ``cars_meta.mat`` as is
(``AM General Hummer SUV 2000``). Templates: the 8 Stanford Cars templates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magmax.data.base import Dataset, DatasetReader, ImageFiles, LabeledSet, check_labels, register_reader
from magmax.data.locate import candidate_dirs, describe_file, describe_listing, locate, malformed
from magmax.data.templates import CARS_TEMPLATES
from magmax.errors import ConfigError

LAYOUT = (
    "stanford_cars/ with devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, "
    "cars_train/ and cars_test/"
)
SOURCE = "the Stanford Cars archives (car_devkit.tgz, cars_train.tgz, cars_test.tgz, cars_test_annos_withlabels.mat)"


def loadmat(path: Path, dataset: str) -> dict:
    """``scipy.io.loadmat(path, squeeze_me=True)`` with one-line errors."""
    try:
        import scipy.io
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise ConfigError(f"dataset '{dataset}' reads MATLAB files and needs scipy; run 'pip install scipy'") from None
    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except (MatReadError, ValueError, OSError, TypeError, NotImplementedError) as exc:
        raise malformed(dataset, path, f"not a readable MATLAB v5 file ({exc})") from None


def _test_annotations(folder: Path) -> Path | None:
    for path in (folder / "cars_test_annos_withlabels.mat", folder / "devkit" / "cars_test_annos_withlabels.mat"):
        if path.is_file():
            return path
    return None


def probe(candidate: Path) -> Path | None:
    for folder in (candidate / "stanford_cars", candidate):
        if (
            (folder / "devkit" / "cars_meta.mat").is_file()
            and (folder / "devkit" / "cars_train_annos.mat").is_file()
            and _test_annotations(folder) is not None
            and (folder / "cars_train").is_dir()
            and (folder / "cars_test").is_dir()
        ):
            return folder
    return None


def annotations(path: Path, image_dir: Path, num_classes: int) -> tuple[LabeledSet, list[str]]:
    table = loadmat(path, "cars").get("annotations")
    if table is None or getattr(table, "dtype", None) is None or table.dtype.names is None:
        raise malformed("cars", path, "no 'annotations' struct array")
    if not {"fname", "class"} <= set(table.dtype.names):
        raise malformed("cars", path, f"annotations have fields {table.dtype.names}, expected 'fname' and 'class'")
    table = np.atleast_1d(table)
    names = [str(row["fname"]) for row in table]
    labels = check_labels(np.asarray([int(row["class"]) for row in table]) - 1, num_classes, "cars", path)
    return LabeledSet(ImageFiles(str(image_dir / n) for n in names), labels), names


@register_reader("cars")
class CarsReader(DatasetReader):
    modality = "image"
    summary = "Stanford Cars: 196 car models, official 8,144/8,041 split (devkit .mat files)"

    def read(self, root: Path | None, options) -> Dataset:
        folder = locate("cars", candidate_dirs(root, ("cars", "stanford_cars"), ["~/data"]), probe, LAYOUT, SOURCE)
        meta_path = folder / "devkit" / "cars_meta.mat"
        class_names = [str(n) for n in np.atleast_1d(loadmat(meta_path, "cars").get("class_names", []))]
        if not class_names:
            raise malformed("cars", meta_path, "no 'class_names'")
        train_annos = folder / "devkit" / "cars_train_annos.mat"
        test_annos = _test_annotations(folder)
        assert test_annos is not None  # the probe checked it
        train, train_files = annotations(train_annos, folder / "cars_train", len(class_names))
        test, test_files = annotations(test_annos, folder / "cars_test", len(class_names))
        return Dataset(
            name="cars",
            modality="image",
            class_names=class_names,
            train=train,
            test=test,
            templates=list(CARS_TEMPLATES),
            info={
                "files": [describe_file(p) for p in (meta_path, train_annos, test_annos)],
                "listing": {
                    "train": describe_listing(folder / "cars_train", train_files),
                    "test": describe_listing(folder / "cars_test", test_files),
                },
                "split": "official",
            },
        )
