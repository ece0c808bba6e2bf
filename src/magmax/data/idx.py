"""IDX files (LeCun's MNIST format, also Fashion-MNIST), gzip-compressed or not.

Layout: a 4-byte magic ``00 00 <type> <ndim>`` (type 0x08 = uint8), then ``ndim`` big-endian uint32
sizes, then the row-major data. Images are ``00 00 08 03`` (magic 2051, 16-byte header: N, rows,
cols); labels ``00 00 08 01`` (magic 2049, 8-byte header: N).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from magmax.data.locate import malformed

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

SPLIT_PREFIX = {"train": "train", "test": "t10k"}
KIND = {"images": "images-idx3", "labels": "labels-idx1"}


def idx_file(folder: Path, split: str, kind: str) -> Path | None:
    """The file of ``split``/``kind`` in ``folder``: ``train-images-idx3-ubyte[.gz]`` (or the
    ``train-images.idx3-ubyte`` spelling of some unpacked copies)."""
    stem = f"{SPLIT_PREFIX[split]}-{KIND[kind]}-ubyte"
    dotted = f"{SPLIT_PREFIX[split]}-{kind}.{KIND[kind].split('-')[1]}-ubyte"
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        path = folder / name
        if path.is_file():
            return path
    return None


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        return fh.read()


def read_idx(path: Path, magic: int, dataset: str) -> np.ndarray:
    """The uint8 array stored in ``path``; a wrong magic number or truncated data is a DataError."""
    try:
        raw = _read_bytes(path)
    except (OSError, EOFError) as exc:
        raise malformed(dataset, path, f"unreadable ({exc})") from None
    if len(raw) < 4:
        raise malformed(dataset, path, "shorter than an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise malformed(dataset, path, f"IDX magic number {found}, expected {magic}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise malformed(dataset, path, f"{len(raw) - header} data bytes for shape {tuple(dims)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_pair(folder: Path, split: str, dataset: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Images [N, rows, cols] and labels [N] of one split, checked to have the same N."""
    images_path = idx_file(folder, split, "images")
    labels_path = idx_file(folder, split, "labels")
    if images_path is None or labels_path is None:
        raise malformed(dataset, folder, f"the {split} IDX image or label file is missing")
    images = read_idx(images_path, IMAGES_MAGIC, dataset)
    labels = read_idx(labels_path, LABELS_MAGIC, dataset)
    if len(images) != len(labels):
        raise malformed(dataset, folder, f"{len(images)} {split} images but {len(labels)} labels")
    return images, labels.astype(np.int64), [images_path, labels_path]


def has_idx_files(folder: Path) -> bool:
    return all(idx_file(folder, s, k) is not None for s in SPLIT_PREFIX for k in KIND)


def idx_dataset(folder: Path, name: str, class_names: list[str], templates: list[str]):
    """A Dataset from the four official IDX files in ``folder`` (60k/10k, labels checked against the classes)."""
    from magmax.data.base import Dataset, LabeledSet, check_labels
    from magmax.data.locate import describe_file

    x_train, y_train, train_files = read_idx_pair(folder, "train", name)
    x_test, y_test, test_files = read_idx_pair(folder, "test", name)
    n = len(class_names)
    return Dataset(
        name=name,
        modality="image",
        class_names=list(class_names),
        train=LabeledSet(x_train, check_labels(y_train, n, name, train_files[1])),
        test=LabeledSet(x_test, check_labels(y_test, n, name, test_files[1])),
        templates=list(templates),
        info={"files": [describe_file(p) for p in train_files + test_files], "split": "official"},
    )
