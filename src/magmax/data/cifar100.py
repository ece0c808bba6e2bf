"""CIFAR-100 (Krizhevsky 2009): 60,000 32×32 RGB images, 100 fine classes, the official 50,000/10,000
split. Label ids are the official fine-label ids (alphabetical class names, the ids of torchvision's
``CIFAR100``), so the paper's class order applies as is.

Three layouts, found in an explicit ``root`` (a folder, or the file/archive itself),
``$MAGMAX_DATA/cifar100`` or ``~/data``:

* ``python``: the official ``cifar-100-python`` folder (files ``train``, ``test``, ``meta``) or the
  ``cifar-100-python.tar.gz`` archive, read in place. The files are pickles; they are read with an
  unpickler that resolves only numpy's array-rebuilding functions (``safe_pickle.py``), so a tampered
  file cannot run code. Images: ``data`` uint8 [N, 3072] = R, G, B planes of 32×32, row-major.
* ``binary``: the official ``cifar-100-binary`` folder: ``train.bin``/``test.bin`` made of 3,074-byte
  records (coarse label, fine label, 3,072 pixel bytes as above) and ``fine_label_names.txt``.
* ``npz``: one array file with ``x_train`` [N, 32, 32, 3] uint8 (HWC RGB), ``y_train``, ``x_test``,
  ``y_test`` (any ``.npz`` with those keys; loaded with ``allow_pickle=False``), class names from a
  ``classes.txt`` beside it or the built-in official list.

Class names: the official spellings with ``_`` → space (``aquarium_fish`` → ``aquarium fish``);
``natural_names=False`` keeps the underscores, which is what the MagMax reference fed its templates.
Templates: the 18 CIFAR-100 templates of the CLIP paper.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from magmax.data.base import (
    Dataset,
    DatasetReader,
    LabeledSet,
    ReaderOptions,
    check_labels,
    natural_name,
    register_reader,
)
from magmax.data.locate import candidate_dirs, describe_file, locate, malformed
from magmax.data.safe_pickle import UnsafePickleError, load_numpy_pickle
from magmax.data.templates import CIFAR100_TEMPLATES

OFFICIAL_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip
"""The 100 fine-label names in official id order (``meta``'s ``fine_label_names``)."""

NUM_CLASSES = 100
IMAGE_BYTES = 3 * 32 * 32
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
LAYOUT = (
    "cifar-100-python/ (train, test, meta) or cifar-100-python.tar.gz, cifar-100-binary/ (train.bin, test.bin), "
    "or an .npz with x_train/y_train/x_test/y_test"
)
SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html (cifar-100-python.tar.gz)"

Layout = Literal["auto", "python", "binary", "npz"]


@dataclass
class Found:
    layout: Literal["python", "python-tar", "binary", "npz"]
    path: Path
    files: list[Path] = field(default_factory=list)


def _python_dir(folder: Path) -> Found | None:
    if all((folder / n).is_file() for n in ("train", "test", "meta")):
        return Found("python", folder, [folder / n for n in ("train", "test", "meta")])
    return None


def _binary_dir(folder: Path) -> Found | None:
    if all((folder / n).is_file() for n in ("train.bin", "test.bin")):
        return Found("binary", folder, [folder / "train.bin", folder / "test.bin"])
    return None


def _npz_file(path: Path) -> Found | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if all(k in npz.files for k in NPZ_KEYS):
                return Found("npz", path, [path])
    except (OSError, ValueError):
        return None
    return None


def _python_tar(path: Path) -> Found | None:
    return Found("python-tar", path, [path]) if tarfile.is_tarfile(path) else None


def probe(candidate: Path, layout: Layout) -> Found | None:
    """The first CIFAR-100 layout at ``candidate`` (the file itself, the folder, or a known child)."""
    want = {"python": ("python", "python-tar"), "binary": ("binary",), "npz": ("npz",)}.get(layout)
    checks: list = []
    if candidate.is_file():
        if candidate.suffix == ".npz":
            checks.append(lambda: _npz_file(candidate))
        elif candidate.name.endswith((".tar.gz", ".tgz", ".tar")):
            checks.append(lambda: _python_tar(candidate))
    elif candidate.is_dir():
        checks += [
            lambda: _python_dir(candidate),
            lambda: _python_dir(candidate / "cifar-100-python"),
            lambda: _binary_dir(candidate),
            lambda: _binary_dir(candidate / "cifar-100-binary"),
        ]
        tar = candidate / "cifar-100-python.tar.gz"
        if tar.is_file():
            checks.append(lambda: _python_tar(tar))
        for npz in sorted(candidate.glob("*.npz")):
            checks.append(lambda npz=npz: _npz_file(npz))
    for check in checks:
        found = check()
        if found is not None and (want is None or found.layout in want):
            return found
    return None


def _text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = load_numpy_pickle(data)
    except UnsafePickleError as exc:
        raise malformed(
            "cifar100",
            where,
            f"the pickle refers to {exc}, which a CIFAR file never does; refused to load it",
            "replace it with the official cifar-100-python files",
        ) from None
    except Exception as exc:  # noqa: BLE001  (any parse failure of a corrupt pickle is the same user error)
        raise malformed("cifar100", where, f"not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise malformed("cifar100", where, f"holds a {type(obj).__name__}, expected a dict")
    return {_text(k): v for k, v in obj.items()}


def _planes_to_hwc(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _python_split(batch: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    if "data" not in batch or "fine_labels" not in batch:
        raise malformed("cifar100", where, "no 'data'/'fine_labels' entries (is this CIFAR-10?)")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise malformed("cifar100", where, f"'data' is {data.dtype} {data.shape}, expected uint8 [N, {IMAGE_BYTES}]")
    labels = check_labels(batch["fine_labels"], NUM_CLASSES, "cifar100", where)
    if len(labels) != len(data):
        raise malformed("cifar100", where, f"{len(data)} images but {len(labels)} labels")
    return _planes_to_hwc(data), labels


class CIFAR100Options(ReaderOptions):
    layout: Layout = "auto"
    """Which layout to accept: ``auto`` (the first found: python, binary, npz), or one of them."""
    natural_names: bool = True
    """Replace ``_`` with a space in class names (False keeps the official spellings)."""


@register_reader("cifar100")
class CIFAR100Reader(DatasetReader):
    modality = "image"
    summary = "CIFAR-100: 50k/10k 32x32 RGB, 100 classes (official python/binary archives or an .npz)"
    Options = CIFAR100Options

    def read(self, root: Path | None, options: CIFAR100Options) -> Dataset:
        candidates = candidate_dirs(root, ("cifar100", "cifar-100"), ["~/data"])
        found = locate("cifar100", candidates, lambda c: probe(c, options.layout), LAYOUT, SOURCE)
        reader = {"python": self._python, "python-tar": self._python_tar, "binary": self._binary, "npz": self._npz}
        (x_train, y_train), (x_test, y_test), names, files = reader[found.layout](found)
        if len(names) != NUM_CLASSES:
            raise malformed("cifar100", found.path, f"{len(names)} class names, expected {NUM_CLASSES}")
        return Dataset(
            name="cifar100",
            modality="image",
            class_names=[natural_name(n) if options.natural_names else n for n in names],
            train=LabeledSet(x_train, y_train),
            test=LabeledSet(x_test, y_test),
            templates=list(CIFAR100_TEMPLATES),
            info={"layout": found.layout, "files": [describe_file(p) for p in files], "split": "official"},
        )

    # -- layouts ----------------------------------------------------------------------------------
    def _python(self, found: Found):
        parts = {
            name: _unpickle((found.path / name).read_bytes(), str(found.path / name))
            for name in ("train", "test", "meta")
        }
        return self._from_python_parts(parts, str(found.path)) + (found.files,)

    def _python_tar(self, found: Found):
        parts = {}
        with tarfile.open(found.path) as tar:
            members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            for name in ("train", "test", "meta"):
                if name not in members:
                    raise malformed(
                        "cifar100",
                        found.path,
                        f"the archive has no '{name}' file",
                        "use the official cifar-100-python.tar.gz",
                    )
                handle = tar.extractfile(members[name])
                assert handle is not None  # a regular file member always has a handle
                parts[name] = _unpickle(handle.read(), f"{found.path}:{members[name].name}")
        return self._from_python_parts(parts, str(found.path)) + (found.files,)

    @staticmethod
    def _from_python_parts(parts: dict[str, dict], where: str):
        train = _python_split(parts["train"], f"{where}/train")
        test = _python_split(parts["test"], f"{where}/test")
        names = parts["meta"].get("fine_label_names")
        if names is None:
            raise malformed("cifar100", f"{where}/meta", "no 'fine_label_names' entry")
        return train, test, [_text(n) for n in names]

    def _binary(self, found: Found):
        splits = []
        for name in ("train.bin", "test.bin"):
            raw = np.fromfile(found.path / name, dtype=np.uint8)
            if raw.size == 0 or raw.size % (IMAGE_BYTES + 2):
                raise malformed(
                    "cifar100", found.path / name, f"{raw.size} bytes is not a whole number of 3074-byte records"
                )
            records = raw.reshape(-1, IMAGE_BYTES + 2)
            labels = check_labels(records[:, 1], NUM_CLASSES, "cifar100", found.path / name)
            splits.append((_planes_to_hwc(records[:, 2:]), labels))
        names_file = found.path / "fine_label_names.txt"
        if names_file.is_file():
            names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
            files = found.files + [names_file]
        else:
            names, files = list(OFFICIAL_CLASSES), found.files
        return splits[0], splits[1], names, files

    def _npz(self, found: Found):
        with np.load(found.path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in NPZ_KEYS}
        splits = []
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
                raise malformed(
                    "cifar100", found.path, f"x_{split} is {x.dtype} {x.shape}, expected uint8 [N, 32, 32, 3]"
                )
            if len(x) != len(y):
                raise malformed("cifar100", found.path, f"{len(x)} {split} images but {len(y)} labels")
            splits.append((x, check_labels(y, NUM_CLASSES, "cifar100", f"{found.path}:y_{split}")))
        names_file = found.path.parent / "classes.txt"
        if names_file.is_file():
            names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
            files = found.files + [names_file]
        else:
            names, files = list(OFFICIAL_CLASSES), found.files
        return splits[0], splits[1], names, files
