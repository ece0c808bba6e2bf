"""Image-folder readers: imagefolder (with and without domains), EuroSAT, DTD, SUN397, RESISC45, GTSRB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magmax.data import ImageFiles, load_dataset
from magmax.errors import ConfigError, DataError


def png(path: Path, value: int, fmt: str = "PNG") -> None:
    """A 4x3 image whose every pixel is (value, value+1, value+2): decoding it proves the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((3, 4, 3), [value, value + 1, value + 2], dtype=np.uint8)).save(path, format=fmt)


def tree(root: Path, split: str, classes: dict[str, int], ext: str = "png", fmt: str = "PNG") -> None:
    for cls, count in classes.items():
        for i in range(count):
            png(root / split / cls / f"img_{i}.{ext}", 10 * i, fmt)


def test_imagefolder_classes_labels_and_pixels(tmp_path):
    tree(tmp_path, "train", {"b_class": 2, "a_class": 3, "C": 1})
    tree(tmp_path, "val", {"a_class": 1, "b_class": 1})
    (tmp_path / "train" / "a_class" / "notes.txt").write_text("not an image")
    png(tmp_path / "train" / "a_class" / "nested" / "deep.png", 200)
    ds = load_dataset("imagefolder", root=tmp_path, dataset_name="mine", templates="cifar100")
    assert ds.name == "mine" and ds.class_names == ["C", "a class", "b class"]  # code-point order, like ImageFolder
    assert np.bincount(ds.train.labels).tolist() == [1, 4, 2] and ds.test.labels.tolist() == [1, 2]
    assert isinstance(ds.train.items, ImageFiles) and ds.domain_names is None
    paths = list(ds.train.items)
    image = ds.train.get(paths.index(str(tmp_path / "train" / "a_class" / "nested" / "deep.png")))
    assert image.shape == (3, 4, 3) and image[0, 0].tolist() == [200, 201, 202]
    assert len(ds.templates) == 18
    assert ds.info["listing"]["train"]["files"] == 7
    assert load_dataset("imagefolder", root=tmp_path, templates=["art of {}"]).templates == ["art of {}"]
    with pytest.raises(ConfigError):
        load_dataset("imagefolder", root=tmp_path, templates="nope")


def test_imagefolder_test_class_unknown_to_train(tmp_path):
    tree(tmp_path, "train", {"a": 1})
    tree(tmp_path, "test", {"a": 1, "zzz": 1})
    with pytest.raises(DataError, match="zzz: a class folder that the training split does not have"):
        load_dataset("imagefolder", root=tmp_path)


def test_imagefolder_domain_level(tmp_path):
    for split in ("train", "test"):
        tree(tmp_path / split, "photo", {"cat": 2, "dog": 1})
        tree(tmp_path / split, "sketch", {"dog": 1, "emu": 1})
    ds = load_dataset("imagefolder", root=tmp_path, domain_level=True)
    assert ds.class_names == ["cat", "dog", "emu"] and ds.domain_names == ["photo", "sketch"]
    assert ds.train.labels.tolist() == [0, 0, 1, 1, 2] and ds.train.domains.tolist() == [0, 0, 0, 1, 1]


def test_imagefolder_missing(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", root=tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value) and "root/train/<class>" in str(err.value)


def test_eurosat_names_and_folder_spellings(tmp_path):
    classes = {"AnnualCrop": 1, "SeaLake": 1, "HerbaceousVegetation": 1, "NewThing": 1}
    tree(tmp_path / "EuroSAT_Splitted", "train", classes, "jpg", "JPEG")
    tree(tmp_path / "EuroSAT_Splitted", "test", classes, "jpg", "JPEG")
    ds = load_dataset("eurosat", root=tmp_path)
    assert ds.class_names == ["annual crop land", "brushland or shrubland", "new thing", "lake or sea"]
    assert len(ds.templates) == 3


def test_dtd_uses_val_when_no_test(tmp_path):
    tree(tmp_path / "dtd", "train", {"banded": 2, "zig_zagged": 1})
    tree(tmp_path / "dtd", "val", {"banded": 1})
    ds = load_dataset("dtd", root=tmp_path)
    assert ds.class_names == ["banded", "zig zagged"] and ds.info["test_folder"] == "val" and len(ds.test) == 1


def test_sun397_drops_the_letter_prefix(tmp_path):
    classes = {"a_abbey": 1, "a_apartment_building_outdoor": 1, "b_bakery": 1}
    tree(tmp_path / "sun397", "train", classes)
    tree(tmp_path / "sun397", "test", classes)
    ds = load_dataset("sun397", root=tmp_path / "sun397")
    assert ds.class_names == ["abbey", "apartment building outdoor", "bakery"]


def test_resisc45_split_files_layout(tmp_path):
    root = tmp_path / "resisc45"
    for cls in ("airplane", "sea_ice"):
        for i in range(3):
            png(root / "NWPU-RESISC45" / cls / f"{cls}_{i:03d}.jpg", i, "JPEG")
    (root / "resisc45-train.txt").write_text("airplane_000.jpg\nairplane_001.jpg\nsea_ice_002.jpg\n")
    (root / "resisc45-test.txt").write_text("airplane_002.jpg\nsea_ice_000.jpg\n")
    (root / "resisc45-val.txt").write_text("sea_ice_001.jpg\n")
    ds = load_dataset("resisc45", root=tmp_path)
    assert ds.class_names == ["airplane", "sea ice"] and ds.info["layout"] == "split-files"
    assert [Path(p).name for p in ds.train.items] == ["airplane_000.jpg", "airplane_001.jpg", "sea_ice_002.jpg"]
    assert ds.train.labels.tolist() == [0, 0, 1] and ds.test.labels.tolist() == [0, 1]
    assert len(ds.templates) == 18


def test_resisc45_folder_layout(tmp_path):
    tree(tmp_path / "resisc45", "train", {"beach": 1, "airplane": 2})
    tree(tmp_path / "resisc45", "test", {"beach": 1})
    ds = load_dataset("resisc45", root=tmp_path)
    assert ds.info["layout"] == "folders" and ds.class_names == ["airplane", "beach"] and ds.test.labels.tolist() == [1]


def test_gtsrb_training_folders_and_test_csv(tmp_path):
    root = tmp_path / "gtsrb"
    for cls, count in ((0, 2), (12, 1)):
        for i in range(count):
            png(root / "GTSRB" / "Training" / f"{cls:05d}" / f"00000_{i:05d}.ppm", cls, "PPM")
    for i in range(3):
        png(root / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", 50 + i, "PPM")
    (root / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
        "00000.ppm;4;3;0;0;3;2;12\n00001.ppm;4;3;0;0;3;2;0\n00002.ppm;4;3;0;0;3;2;42\n"
    )
    ds = load_dataset("gtsrb", root=tmp_path)
    assert len(ds.class_names) == 43 and ds.class_names[14] == "stop"
    assert ds.train.labels.tolist() == [0, 0, 12] and ds.test.labels.tolist() == [12, 0, 42]
    assert ds.test.get(2)[0, 0].tolist() == [52, 53, 54]
    (root / "GT-final_test.csv").write_text("Filename;ClassId\n00000.ppm;43\n")
    with pytest.raises(DataError, match="labels span 43..43"):
        load_dataset("gtsrb", root=tmp_path)
