"""MNIST (LeCun et al. 1998): 70,000 28×28 greyscale digits, the official 60,000/10,000 split.

Layout: the four official IDX files, gzip-compressed or not, in one folder
(``train-images-idx3-ubyte[.gz]`` ... ``t10k-labels-idx1-ubyte[.gz]``), or torchvision's
``MNIST/raw/`` below the root (the layout of the task-vectors and MagMax code, which use
``torchvision.datasets.MNIST``). Looked for in an explicit ``root``, ``$MAGMAX_DATA/mnist``, and
``~/data``. Class names ``"0"`` .. ``"9"`` and the single template ``a photo of the number: "{}".``,
as in the task-vectors repository.
"""

from __future__ import annotations

from pathlib import Path

from magmax.data.base import Dataset, DatasetReader, register_reader
from magmax.data.fashion_mnist import probe_idx_folder
from magmax.data.idx import idx_dataset
from magmax.data.locate import candidate_dirs, locate
from magmax.data.templates import MNIST_TEMPLATES

LAYOUT = (
    "the four MNIST IDX files (train-images-idx3-ubyte[.gz] ... t10k-labels-idx1-ubyte[.gz]) or MNIST/raw/ with them"
)
SOURCE = "yann.lecun.com/exdb/mnist (or any mirror of the four IDX files)"


@register_reader("mnist")
class MNISTReader(DatasetReader):
    modality = "image"
    summary = "MNIST: 60k/10k 28x28 grey digits (official IDX files)"

    def read(self, root: Path | None, options) -> Dataset:
        candidates = candidate_dirs(root, ("mnist", "MNIST"), ["~/data"])
        folder = locate("mnist", candidates, lambda c: probe_idx_folder(c, "MNIST"), LAYOUT, SOURCE)
        return idx_dataset(folder, "mnist", [str(d) for d in range(10)], MNIST_TEMPLATES)
