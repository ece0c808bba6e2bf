"""SVHN (Netzer et al. 2011), cropped digits: 32×32 RGB house-number digits, the official
73,257/26,032 train/test split (``extra`` is not read).

Layout: the official format-2 files ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB v5: ``X``
uint8 [32, 32, 3, N], ``y`` [N, 1] with 1..10, where 10 stands for the digit 0), in ``svhn/`` (the
torchvision layout of the task-vectors and MagMax code) or the folder itself; found in an explicit
``root``, ``$MAGMAX_DATA/svhn`` or ``~/data``.

Labels: the digit (10 → 0), as torchvision does. Class names ``"0"`` .. ``"9"``; template
``a photo of the number: "{}".``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magmax.data.base import Dataset, DatasetReader, LabeledSet, check_labels, register_reader
from magmax.data.cars import loadmat
from magmax.data.locate import candidate_dirs, describe_file, locate, malformed
from magmax.data.templates import SVHN_TEMPLATES

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
LAYOUT = "svhn/train_32x32.mat and svhn/test_32x32.mat (format 2, cropped digits)"
SOURCE = "http://ufldl.stanford.edu/housenumbers/ (train_32x32.mat, test_32x32.mat)"


def probe(candidate: Path) -> Path | None:
    for folder in (candidate / "svhn", candidate):
        if all((folder / f).is_file() for f in FILES.values()):
            return folder
    return None


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    mat = loadmat(path, "svhn")
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        raise malformed("svhn", path, "no 'X'/'y' arrays (is this the format-2 cropped-digits file?)")
    x = np.asarray(x)
    if x.ndim == 3:  # loadmat(squeeze_me=True) drops N when a file holds one image
        x = x[..., None]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise malformed("svhn", path, f"'X' is {x.dtype} {x.shape}, expected uint8 [32, 32, 3, N]")
    labels = np.atleast_1d(np.asarray(y, dtype=np.int64)).reshape(-1)
    if len(labels) != x.shape[3]:
        raise malformed("svhn", path, f"{x.shape[3]} images but {len(labels)} labels")
    labels = np.where(labels == 10, 0, labels)
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), check_labels(labels, 10, "svhn", path)


@register_reader("svhn")
class SVHNReader(DatasetReader):
    modality = "image"
    summary = "SVHN cropped digits: 73,257/26,032 32x32 RGB, 10 classes (official .mat files)"

    def read(self, root: Path | None, options) -> Dataset:
        folder = locate("svhn", candidate_dirs(root, ("svhn", "SVHN"), ["~/data"]), probe, LAYOUT, SOURCE)
        (x_train, y_train), (x_test, y_test) = (read_mat(folder / FILES[s]) for s in ("train", "test"))
        return Dataset(
            name="svhn",
            modality="image",
            class_names=[str(d) for d in range(10)],
            train=LabeledSet(x_train, y_train),
            test=LabeledSet(x_test, y_test),
            templates=list(SVHN_TEMPLATES),
            info={"files": [describe_file(folder / f) for f in FILES.values()], "split": "official"},
        )
