"""CIFAR-100 reader: the python (folder and tar.gz), binary and npz layouts, the restricted unpickler,
and the real array file with the paper's split."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from magmax.data import load_dataset
from magmax.data.cifar100 import OFFICIAL_CLASSES
from magmax.data.safe_pickle import UnsafePickleError, load_numpy_pickle
from magmax.errors import DataError
from magmax.scenarios import class_incremental, class_order

REAL_NPZ = Path("/work/shared/data/cifar100/cifar100_uint8.npz")


def fake_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, size=n)


def to_planes(images: np.ndarray) -> np.ndarray:
    """The official row format written plainly: all red bytes, then green, then blue."""
    return np.stack([np.concatenate([img[:, :, ch].ravel() for ch in range(3)]) for img in images])


def python_parts(train, test, bytes_keys: bool = False) -> dict[str, dict]:
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)

    def batch(images, labels):
        return {key("data"): to_planes(images), key("fine_labels"): [int(x) for x in labels],
                key("coarse_labels"): [0] * len(labels), key("filenames"): [b"x.png"] * len(labels)}  # fmt: skip

    meta = {key("fine_label_names"): [n.encode() for n in OFFICIAL_CLASSES], key("coarse_label_names"): [b"c"] * 20}
    return {"train": batch(*train), "test": batch(*test), "meta": meta}


def write_python_dir(folder: Path, parts: dict[str, dict], protocol: int) -> Path:
    folder.mkdir(parents=True)
    for name, obj in parts.items():
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=protocol)
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("bytes_keys", [False, True])
def test_python_layout(tmp_path, protocol, bytes_keys):
    train, test = fake_images(7, 0), fake_images(3, 1)
    write_python_dir(tmp_path / "cifar-100-python", python_parts(train, test, bytes_keys), protocol)
    ds = load_dataset("cifar100", root=tmp_path)
    np.testing.assert_array_equal(ds.train.items, train[0])
    np.testing.assert_array_equal(ds.test.items, test[0])
    assert ds.train.labels.tolist() == train[1].tolist()
    assert ds.class_names[1] == "aquarium fish" and ds.info["layout"] == "python"
    assert len(ds.templates) == 18
    raw = load_dataset("cifar100", root=tmp_path, natural_names=False)
    assert raw.class_names == list(OFFICIAL_CLASSES)


def test_python_tar_gz_read_in_place(tmp_path):
    train, test = fake_images(5, 2), fake_images(4, 3)
    folder = write_python_dir(tmp_path / "src" / "cifar-100-python", python_parts(train, test), 2)
    archive = tmp_path / "dl" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    for root in (archive, archive.parent):
        ds = load_dataset("cifar100", root=root)
        assert ds.info["layout"] == "python-tar"
        np.testing.assert_array_equal(ds.test.items, test[0])
    assert not (archive.parent / "cifar-100-python").exists()  # nothing was extracted


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    parts = python_parts(fake_images(2, 0), fake_images(2, 1))
    parts["train"]["data"] = Exploit()
    write_python_dir(tmp_path / "cifar-100-python", parts, 2)
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", root=tmp_path)
    assert "system" in str(err.value) and "refused" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        load_numpy_pickle(pickle.dumps({"x": Exploit()}))
    # arrays, dtypes and numpy scalars are what it does allow
    back = load_numpy_pickle(pickle.dumps({"a": np.arange(3, dtype=np.int16), "s": np.float32(2.5)}, protocol=2))
    assert back["a"].dtype == np.int16 and back["a"].tolist() == [0, 1, 2] and back["s"] == 2.5


def test_binary_layout(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    splits = {"train.bin": fake_images(6, 4), "test.bin": fake_images(2, 5)}
    for name, (images, labels) in splits.items():
        records = [bytes([3, int(y)]) + to_planes(img[None])[0].tobytes() for img, y in zip(images, labels)]
        (folder / name).write_bytes(b"".join(records))
    (folder / "fine_label_names.txt").write_text("\n".join(OFFICIAL_CLASSES) + "\n\n")
    ds = load_dataset("cifar100", root=tmp_path)
    assert ds.info["layout"] == "binary"
    np.testing.assert_array_equal(ds.train.items, splits["train.bin"][0])
    assert ds.test.labels.tolist() == splits["test.bin"][1].tolist()
    assert ds.class_names[-1] == "worm"
    (folder / "test.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DataError, match="3074-byte records"):
        load_dataset("cifar100", root=tmp_path)


def test_npz_layout_and_layout_choice(tmp_path):
    train, test = fake_images(4, 6), fake_images(3, 7)
    np.savez(tmp_path / "c100.npz", x_train=train[0], y_train=train[1].astype(np.uint8), x_test=test[0], y_test=test[1])
    write_python_dir(tmp_path / "cifar-100-python", python_parts(fake_images(1, 8), fake_images(1, 9)), 4)
    auto = load_dataset("cifar100", root=tmp_path)
    assert auto.info["layout"] == "python"  # python is preferred when several layouts are present
    ds = load_dataset("cifar100", root=tmp_path, layout="npz")
    assert ds.info["layout"] == "npz" and ds.class_names[1] == "aquarium fish"  # built-in names
    np.testing.assert_array_equal(ds.train.items, train[0])
    (tmp_path / "classes.txt").write_text("\n".join(f"name_{i}" for i in range(100)))
    assert load_dataset("cifar100", root=tmp_path / "c100.npz").class_names[5] == "name 5"
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar100", root=tmp_path, layout="binary")


def test_malformed_python_batch(tmp_path):
    parts = python_parts(fake_images(2, 0), fake_images(2, 1))
    parts["train"]["fine_labels"] = [0, 100]
    write_python_dir(tmp_path / "cifar-100-python", parts, 4)
    with pytest.raises(DataError, match="labels span 0..100"):
        load_dataset("cifar100", root=tmp_path)


def test_missing_message(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", root=tmp_path)
    message = str(err.value)
    assert (
        "\n" not in message and str(tmp_path) in message and "cifar-100-python" in message and "toronto.edu" in message
    )


@pytest.mark.skipif(not REAL_NPZ.is_file(), reason="shared CIFAR-100 array file absent")
def test_real_cifar100_and_the_paper_split():
    ds = load_dataset("cifar100", root=REAL_NPZ.parent)
    assert ds.train.items.shape == (50000, 32, 32, 3) and ds.test.items.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.train.labels, minlength=100).tolist() == [500] * 100
    assert np.bincount(ds.test.labels, minlength=100).tolist() == [100] * 100
    assert ds.info["files"][0]["sha256"] == "d4c5a400a2ca0a4fc4ed54d7b300d59cb072653a702b672df4b3342c13da9929"
    assert ds.class_names[:2] == ["apple", "aquarium fish"]
    order = class_order("paper-cifar100", 100)
    tasks = class_incremental(ds, 10, order)
    assert tasks[0].classes == tuple(sorted(order[0:10])) == (11, 13, 41, 43, 53, 57, 63, 70, 86, 89)
    assert len(tasks[0].train) == 5000 and len(tasks[0].test) == 1000
    assert sorted(set(tasks[0].local_labels(tasks[0].train.labels).tolist())) == list(range(10))
    assert sum(len(t.test) for t in tasks) == 10000
    # channel means of the training set: the published CIFAR-100 figures
    means = ds.train.items[::10].reshape(-1, 3).mean(axis=0) / 255
    np.testing.assert_allclose(means, [0.5071, 0.4865, 0.4409], atol=3e-3)


def test_restricted_unpickler_rejects_globals_in_nested_objects():
    payload = pickle.dumps([{"ok": 1}, io.BytesIO])  # a class reference, not an instance: still a global
    with pytest.raises(UnsafePickleError, match="_io.BytesIO"):
        load_numpy_pickle(payload)
