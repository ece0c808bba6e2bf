"""Data containers, the reader registry, option validation, root search and templates."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from magmax.data import ImageFiles, LabeledSet, dataset_names, get_reader, load_dataset
from magmax.data.base import cap_per_class, check_labels
from magmax.data.locate import candidate_dirs, describe_file, describe_listing
from magmax.data.templates import (
    CARS_TEMPLATES,
    CIFAR100_TEMPLATES,
    IMAGENET_TEMPLATES,
    TEMPLATE_SETS,
    template_set,
)
from magmax.errors import ConfigError, DataError

ALL_READERS = {
    "wordnet", "fashion_mnist", "cifar100", "imagefolder", "imagenet_r", "cub200", "cars", "domainnet",
    "mnist", "svhn", "eurosat", "resisc45", "sun397", "dtd", "gtsrb",
}  # fmt: skip


def test_every_reader_is_registered():
    assert set(dataset_names()) == ALL_READERS
    for name in ALL_READERS:
        reader = get_reader(name)
        assert reader.name == name and reader.modality in ("text", "image") and reader.summary


def test_unknown_dataset_and_option_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="unknown dataset 'cifar1000'"):
        load_dataset("cifar1000")
    with pytest.raises(ConfigError) as err:
        load_dataset("wordnet", colour="red")
    assert "option 'colour'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="option 'test_fraction'"):
        load_dataset("wordnet", test_fraction=1.5)


def test_labeled_set_subset_get_and_grey_to_rgb():
    grey = np.arange(4 * 2 * 3, dtype=np.uint8).reshape(4, 2, 3)
    ls = LabeledSet(grey, [0, 1, 0, 1])
    sub = ls.subset([3, 1])
    assert sub.labels.tolist() == [1, 1] and sub.labels.dtype == np.int64
    np.testing.assert_array_equal(sub.items[0], grey[3])
    rgb = ls.get(2)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], grey[2])
    texts = LabeledSet(["a", "b", "c"], [2, 1, 0], domains=[0, 0, 1])
    assert texts.get(1) == "b"
    picked = texts.where(texts.labels > 0)
    assert picked.items == ["a", "b"] and picked.domains.tolist() == [0, 0]
    with pytest.raises(ValueError):
        LabeledSet(["a"], [0, 1])


def test_image_files_decode_lazily_to_rgb(tmp_path):
    paths = []
    for i, mode in enumerate(["L", "RGBA", "P"]):
        path = tmp_path / f"{i}.png"
        Image.new(mode, (5, 4), color=7 if mode != "RGBA" else (7, 8, 9, 10)).save(path)
        paths.append(str(path))
    ls = LabeledSet(ImageFiles(paths), [0, 1, 2])
    assert ls.is_image
    for i in range(3):
        image = ls.get(i)
        assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    sub = ls.subset([2, 0])
    assert isinstance(sub.items, ImageFiles) and sub.items == [paths[2], paths[0]]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        LabeledSet(ImageFiles([str(tmp_path / "broken.png")]), [0]).get(0)


def test_cap_per_class_is_seeded_per_class_and_keeps_order():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    ls = LabeledSet(list(range(20)), labels)
    capped = cap_per_class(ls, 4, seed=3)
    assert np.bincount(capped.labels).tolist() == [4, 3, 4]
    assert capped.items == sorted(capped.items)
    assert cap_per_class(ls, 4, seed=3).items == capped.items
    # a class's choice does not depend on the other classes present
    only0 = cap_per_class(ls.where(labels == 0), 4, seed=3)
    assert only0.items == [i for i, y in zip(capped.items, capped.labels) if y == 0]
    assert cap_per_class(ls, None, 0) is ls


def test_check_labels():
    assert check_labels([0, 2], 3, "x", "f").tolist() == [0, 2]
    with pytest.raises(DataError, match="labels span 0..3, expected 0..2"):
        check_labels([0, 3], 3, "x", "f")


def test_candidate_dirs_order(tmp_path, monkeypatch):
    explicit = tmp_path / "explicit"
    assert candidate_dirs(explicit, ("sub",), ["/usr/share/x"]) == [explicit]
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("MAGMAX_DATA", f"{a}:{b}")
    found = candidate_dirs(None, ("sub",), ["/usr/share/x"])
    assert found[:5] == [a / "sub", a, b / "sub", b, __import__("pathlib").Path("/usr/share/x")]


def test_missing_dataset_message_names_paths_layout_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGMAX_DATA", str(tmp_path / "store"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DataError) as err:
        load_dataset("cub200")
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "store" / "cub200") in message and "CUB_200_2011" in message and "caltech.edu" in message


def test_info_records_sizes_and_names(tmp_path):
    (tmp_path / "train" / "b").mkdir(parents=True)
    (tmp_path / "test" / "b").mkdir(parents=True)
    for split in ("train", "test"):
        Image.new("RGB", (2, 2)).save(tmp_path / split / "b" / "x.png")
    ds = load_dataset("imagefolder", root=tmp_path)
    assert ds.info["sizes"] == {"train": 1, "test": 1, "classes": 1}
    assert ds.info["class_names"] == ["b"] and ds.info["dataset"] == "imagefolder"


def test_describe_file_and_listing(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    record = describe_file(path)
    assert record["bytes"] == 3
    assert record["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert describe_listing(tmp_path, ["b", "a"]) == describe_listing(tmp_path, ["a", "b"])
    assert describe_listing(tmp_path, ["a"])["listing_sha256"] != describe_listing(tmp_path, ["b"])["listing_sha256"]


def test_templates():
    assert len(CIFAR100_TEMPLATES) == 18 and len(IMAGENET_TEMPLATES) == 80 and len(CARS_TEMPLATES) == 8
    assert len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert CIFAR100_TEMPLATES[0] == "a photo of a {}." and CIFAR100_TEMPLATES[-1] == "a photo of the big {}."
    for templates in TEMPLATE_SETS.values():
        assert templates and all(t.count("{}") == 1 for t in templates)
    assert template_set("cars") == list(CARS_TEMPLATES)
    assert template_set(["x {} y"]) == ["x {} y"]
    with pytest.raises(ConfigError, match="exactly one"):
        template_set(["no slot"])
    with pytest.raises(ConfigError, match="unknown template set"):
        template_set("klingon")
