"""IDX readers (Fashion-MNIST, MNIST): gzip and plain files, header validation, the real Debian copy."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from magmax.data import load_dataset
from magmax.errors import DataError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """The IDX encoding written plainly: magic, big-endian sizes, raw uint8 data."""
    return (
        struct.pack(">I", magic)
        + b"".join(struct.pack(">I", d) for d in array.shape)
        + array.astype(np.uint8).tobytes()
    )


def write_idx_set(
    folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, dotted: bool = False, seed: int = 0
):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        arrays[prefix] = (images, labels)
        for kind, array, magic in (("images", images, 2051), ("labels", labels, 2049)):
            sub = {"images": "idx3", "labels": "idx1"}[kind]
            name = f"{prefix}-{kind}.{sub}-ubyte" if dotted else f"{prefix}-{kind}-{sub}-ubyte"
            data = idx_bytes(array, magic)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx(tmp_path, gz):
    arrays = write_idx_set(tmp_path / "fm", gz=gz)
    ds = load_dataset("fashion_mnist", root=tmp_path / "fm")
    np.testing.assert_array_equal(ds.train.items, arrays["train"][0])
    np.testing.assert_array_equal(ds.test.labels, arrays["t10k"][1].astype(np.int64))
    assert ds.train.items.shape == (12, 28, 28) and ds.train.get(0).shape == (28, 28, 3)
    assert ds.class_names[0] == "T-shirt or top" and ds.class_names[9] == "ankle boot" and len(ds.class_names) == 10
    assert len(ds.info["files"]) == 4 and all("sha256" in f for f in ds.info["files"])


def test_mnist_torchvision_layout_and_dotted_names(tmp_path):
    arrays = write_idx_set(tmp_path / "data" / "MNIST" / "raw", gz=False, dotted=True)
    ds = load_dataset("mnist", root=tmp_path / "data")
    np.testing.assert_array_equal(ds.test.items, arrays["t10k"][0])
    assert ds.class_names == [str(d) for d in range(10)]
    assert ds.templates == ['a photo of the number: "{}".']


def test_bad_magic_truncation_and_count_mismatch(tmp_path):
    folder = tmp_path / "fm"
    write_idx_set(folder, gz=False)
    images = folder / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(struct.pack(">I", 2049) + good[4:])
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        load_dataset("fashion_mnist", root=folder)
    images.write_bytes(good[:-7])
    with pytest.raises(DataError, match="data bytes for shape"):
        load_dataset("fashion_mnist", root=folder)
    images.write_bytes(good)
    labels = folder / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(11, dtype=np.uint8), 2049))
    with pytest.raises(DataError, match="12 train images but 11 labels"):
        load_dataset("fashion_mnist", root=folder)
    labels.write_bytes(idx_bytes(np.full(12, 10, dtype=np.uint8), 2049))
    with pytest.raises(DataError, match="labels span 10..10"):
        load_dataset("fashion_mnist", root=folder)


def test_missing_idx_files_message(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("mnist", root=tmp_path / "empty")
    assert "\n" not in str(err.value) and str(tmp_path / "empty") in str(err.value) and "idx3-ubyte" in str(err.value)


@pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist():
    ds = load_dataset("fashion_mnist", max_test_per_class=100)
    assert ds.train.items.shape == (60000, 28, 28) and ds.train.items.dtype == np.uint8
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10
    assert np.bincount(ds.test.labels).tolist() == [100] * 10
    assert ds.train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the official first ten labels
    assert ds.info["files"][0]["path"].startswith(str(DEBIAN_FASHION))
