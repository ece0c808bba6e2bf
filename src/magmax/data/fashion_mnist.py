"""Fashion-MNIST (Xiao et al. 2017): 70,000 28×28 greyscale product photos, 10 classes, the official
60,000/10,000 split.

Layout: the four official IDX files, gzip-compressed or not, in one folder:
``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
``t10k-labels-idx1-ubyte[.gz]``. Looked for in an explicit ``root`` (or its ``FashionMNIST/raw``, the
torchvision layout), ``$MAGMAX_DATA/fashion_mnist`` (or ``fashion-mnist``), and Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).

Images are returned as uint8 [N, 28, 28] (grey); ``LabeledSet.get`` gives them as RGB. Class names are
the official ones in plain words (``T-shirt/top`` → ``T-shirt or top``, ``Ankle boot`` → ``ankle boot``).
"""

from __future__ import annotations

from pathlib import Path

from magmax.data.base import Dataset, DatasetReader, register_reader
from magmax.data.idx import has_idx_files, idx_dataset
from magmax.data.locate import candidate_dirs, locate
from magmax.data.templates import FASHION_MNIST_TEMPLATES

CLASS_NAMES = [
    "T-shirt or top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]

LAYOUT = "the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...)"
SOURCE = "'apt-get install dataset-fashion-mnist' or github.com/zalandoresearch/fashion-mnist"


def probe_idx_folder(candidate: Path, torchvision_name: str) -> Path | None:
    for folder in (candidate, candidate / torchvision_name / "raw", candidate / "raw"):
        if folder.is_dir() and has_idx_files(folder):
            return folder
    return None


@register_reader("fashion_mnist")
class FashionMNISTReader(DatasetReader):
    modality = "image"
    summary = "Fashion-MNIST: 60k/10k 28x28 grey product photos, 10 classes (official IDX files)"

    def read(self, root: Path | None, options) -> Dataset:
        candidates = candidate_dirs(root, ("fashion_mnist", "fashion-mnist"), ["/usr/share/datasets/fashion-mnist"])
        folder = locate("fashion_mnist", candidates, lambda c: probe_idx_folder(c, "FashionMNIST"), LAYOUT, SOURCE)
        return idx_dataset(folder, "fashion_mnist", list(CLASS_NAMES), FASHION_MNIST_TEMPLATES)
