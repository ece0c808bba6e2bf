"""Readers of the paper's benchmarks on tiny fakes in the official layouts: ImageNet-R, CUB-200,
Stanford Cars, DomainNet, SVHN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from magmax.data import load_dataset
from magmax.data.imagenet_r import DOMAINS as IMAGENET_R_DOMAINS
from magmax.data.imagenet_r import IMAGENET_R_CLASSES
from magmax.errors import ConfigError, DataError
from magmax.scenarios import PAPER_IMAGENET_R_ORDER, class_incremental, domain_incremental


def jpg(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path, format="JPEG")


# -- ImageNet-R -----------------------------------------------------------------------------------


def test_imagenet_r_class_table():
    names = [n for _, n in IMAGENET_R_CLASSES]
    wnids = [w for w, _ in IMAGENET_R_CLASSES]
    assert len(IMAGENET_R_CLASSES) == 200 and len(set(wnids)) == 200
    assert names == sorted(names)  # the reference's ImageFolder order over the renamed folders
    table = dict(IMAGENET_R_CLASSES)
    assert table["n01443537"] == "goldfish" and table["n02099601"] == "golden_retriever"
    assert table["n07714571"] == "cabbage" and table["n02102318"] == "cocker_spaniels"
    assert names[:3] == ["African_chameleon", "Granny_Smith", "accordion"]
    assert list(IMAGENET_R_DOMAINS) == [
        "tattoo", "sketch", "graphic", "painting", "art", "origami", "sculpture", "graffiti",
        "cartoon", "misc", "toy", "embroidery", "videogame", "sticker", "deviantart",
    ]  # fmt: skip


def make_imagenet_r(root: Path) -> dict[str, list[str]]:
    files = {
        "n01443537": [f"art_{i}.jpg" for i in range(4)] + ["tattoo_0.jpg", "sketch_3.jpg"],
        "n01694178": ["cartoon_1.jpg", "toy_2.jpg", "tattoo_9.jpg", "sketch_1.jpg"],
        "n07742313": [f"deviantart_{i}.jpg" for i in range(5)] + ["tattoo_1.jpg", "sketch_0.jpg"],
    }
    for wnid, names in files.items():
        for name in names:
            jpg(root / "imagenet-r" / wnid / name)
    return files


def test_imagenet_r_ids_split_and_domains(tmp_path):
    make_imagenet_r(tmp_path)
    ds = load_dataset("imagenet_r", root=tmp_path)
    total = 17
    assert len(ds.train) == int(0.8 * total) and len(ds.train) + len(ds.test) == total
    assert set(ds.train.items).isdisjoint(ds.test.items)
    assert ds.class_names[0] == "African chameleon" and ds.class_names[1] == "Granny Smith"
    goldfish = ds.class_names.index("goldfish")
    every = dict(zip(list(ds.train.items) + list(ds.test.items), np.concatenate([ds.train.labels, ds.test.labels])))
    assert every[str(tmp_path / "imagenet-r" / "n01443537" / "art_2.jpg")] == goldfish
    assert every[str(tmp_path / "imagenet-r" / "n07742313" / "tattoo_1.jpg")] == 1
    domains = dict(zip(list(ds.train.items) + list(ds.test.items), np.concatenate([ds.train.domains, ds.test.domains])))
    assert domains[str(tmp_path / "imagenet-r" / "n01694178" / "toy_2.jpg")] == IMAGENET_R_DOMAINS.index("toy")
    assert ds.domain_names == list(IMAGENET_R_DOMAINS) and len(ds.templates) == 80
    assert ds.info["split"] == {"kind": "random", "train_fraction": 0.8, "seed": 5} and ds.info["classes_present"] == 3
    assert load_dataset("imagenet_r", root=tmp_path).test.items == ds.test.items
    assert load_dataset("imagenet_r", root=tmp_path, seed=6).test.items != ds.test.items
    by_wnid = load_dataset("imagenet_r", root=tmp_path / "imagenet-r", class_ids="wnid")
    assert by_wnid.class_names[0] == "goldfish"  # n01443537 is the smallest wnid


def test_imagenet_r_domain_stream_and_renamed_folders(tmp_path):
    files = make_imagenet_r(tmp_path)
    (tmp_path / "imagenet-r" / "n01443537").rename(tmp_path / "imagenet-r" / "goldfish")  # the reference renames
    ds = load_dataset("imagenet_r", root=tmp_path, train_fraction=0.5)
    tasks = domain_incremental(ds, ["tattoo", "sketch"])
    assert [t.name for t in tasks] == ["tattoo", "sketch"] and tasks[0].classes == tuple(range(200))
    assert sorted(Path(p).name for p in tasks[0].train.items + tasks[0].test.items) == [
        "tattoo_0.jpg",
        "tattoo_1.jpg",
        "tattoo_9.jpg",
    ]
    assert sum(len(f) for f in files.values()) == len(ds.train) + len(ds.test)
    with pytest.raises(ConfigError, match="graphic has no training samples"):
        domain_incremental(ds)  # the default stream needs all 15 domains


def test_imagenet_r_bad_files(tmp_path):
    make_imagenet_r(tmp_path)
    jpg(tmp_path / "imagenet-r" / "n01443537" / "photo_1.jpg")
    with pytest.raises(DataError, match="photo_1.jpg: file name does not start with one of the 15 domains"):
        load_dataset("imagenet_r", root=tmp_path)
    (tmp_path / "imagenet-r" / "n01443537" / "photo_1.jpg").unlink()
    jpg(tmp_path / "imagenet-r" / "n99999999" / "art_0.jpg")
    with pytest.raises(DataError, match="n99999999: not one of the 200 ImageNet-R class folders"):
        load_dataset("imagenet_r", root=tmp_path)


def test_imagenet_r_paper_order_picks_reference_ids():
    # the MagMax reference's CLASSES list (src/datasets/imagenetr.py) puts these names at these ids,
    # so the paper's first classes (186, 157, ...) are the same classes here
    names = [n for _, n in IMAGENET_R_CLASSES]
    assert [names[c] for c in PAPER_IMAGENET_R_ORDER[:2]] == ["tree_frog", "school_bus"]
    assert names[199] == "zebra"


# -- CUB-200 --------------------------------------------------------------------------------------


def make_cub(root: Path) -> Path:
    folder = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images = [(1, classes[0], "a.jpg", 1), (2, classes[0], "b.jpg", 0), (3, classes[1], "c.jpg", 1),
              (4, classes[2], "d.jpg", 1), (5, classes[2], "e.jpg", 0), (6, classes[1], "f.jpg", 0)]  # fmt: skip
    for i, cls, name, _ in images:
        jpg(folder / "images" / cls / name, 10 * i)
    (folder / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    (folder / "images.txt").write_text("".join(f"{i} {c}/{n}\n" for i, c, n, _ in images))
    (folder / "image_class_labels.txt").write_text("".join(f"{i} {classes.index(c) + 1}\n" for i, c, _, _ in images))
    (folder / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in images))
    return folder


def test_cub200_official_files(tmp_path):
    folder = make_cub(tmp_path)
    ds = load_dataset("cub200", root=tmp_path)
    assert ds.class_names == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert ds.train.labels.tolist() == [0, 1, 2] and ds.test.labels.tolist() == [0, 2, 1]
    assert [Path(p).name for p in ds.test.items] == ["b.jpg", "e.jpg", "f.jpg"]
    assert ds.test.get(1)[0, 0, 0] in range(45, 56)  # image 5 was written with value 50 (JPEG rounding)
    assert len(ds.info["files"]) == 4 and len(ds.templates) == 80
    (folder / "train_test_split.txt").write_text("1 1\n")
    with pytest.raises(DataError, match="list different image ids"):
        load_dataset("cub200", root=folder)


# -- Stanford Cars --------------------------------------------------------------------------------


def annotations_mat(path: Path, rows: list[tuple[str, int]]) -> None:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    table = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (fname, cls) in enumerate(rows):
        table[0, i] = (
            np.array([[1]]),
            np.array([[1]]),
            np.array([[3]]),
            np.array([[3]]),
            np.array([[cls]], dtype=np.uint8),
            np.array([fname]),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"annotations": table})


def test_cars_devkit_mat_files(tmp_path):
    base = tmp_path / "stanford_cars"
    names = np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Volvo 240 Sedan 1993"]], dtype=object)
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(str(base / "devkit" / "cars_meta.mat"), {"class_names": names})
    annotations_mat(base / "devkit" / "cars_train_annos.mat", [("00001.jpg", 3), ("00002.jpg", 1)])
    annotations_mat(base / "cars_test_annos_withlabels.mat", [("00001.jpg", 2)])
    for split, files in (("cars_train", ["00001.jpg", "00002.jpg"]), ("cars_test", ["00001.jpg"])):
        for f in files:
            jpg(base / split / f)
    ds = load_dataset("cars", root=tmp_path)
    assert ds.class_names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Volvo 240 Sedan 1993"]
    assert ds.train.labels.tolist() == [2, 0] and ds.test.labels.tolist() == [1]
    assert ds.train.items == [str(base / "cars_train" / "00001.jpg"), str(base / "cars_train" / "00002.jpg")]
    assert ds.train.get(0).shape == (4, 4, 3) and len(ds.templates) == 8
    annotations_mat(base / "cars_test_annos_withlabels.mat", [("00001.jpg", 4)])
    with pytest.raises(DataError, match="labels span 3..3, expected 0..2"):
        load_dataset("cars", root=base)
    (base / "cars_test_annos_withlabels.mat").write_bytes(b"garbage")
    with pytest.raises(DataError, match="MATLAB"):
        load_dataset("cars", root=base)


# -- DomainNet ------------------------------------------------------------------------------------

OFFICIAL = {"aircraft_carrier": 0, "The_Eiffel_Tower": 1, "zebra": 2}


def make_domainnet(root: Path, domains=("clipart", "sketch")) -> Path:
    folder = root / "domainnet"
    for d in domains:
        for split, per_class in (("train", 2), ("test", 1)):
            lines = []
            for cls, label in OFFICIAL.items():
                for i in range(per_class):
                    rel = f"{d}/{cls}/{d}_{label:03d}_{split}{i}.jpg"
                    jpg(folder / rel)
                    lines.append(f"{rel} {label}")
            (folder / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_domainnet_split_files_ids_and_domains(tmp_path):
    make_domainnet(tmp_path)
    ds = load_dataset("domainnet", root=tmp_path, domains=["sketch", "clipart"])
    assert ds.class_names == ["The Eiffel Tower", "aircraft carrier", "zebra"]  # the reference's sorted folders
    assert ds.domain_names == ["sketch", "clipart"]
    assert len(ds.train) == 12 and len(ds.test) == 6
    assert ds.train.domains[:6].tolist() == [0] * 6  # sketch comes first, as ordered
    first = ds.train.items[0]
    assert "/sketch/aircraft_carrier/" in first and ds.train.labels[0] == 1
    official = load_dataset("domainnet", root=tmp_path, domains=["clipart", "sketch"], class_ids="official")
    assert official.class_names == ["aircraft carrier", "The Eiffel Tower", "zebra"] and official.train.labels[0] == 0
    tasks = domain_incremental(ds)
    assert [t.name for t in tasks] == ["sketch", "clipart"] and all(len(t.test) == 3 for t in tasks)


def test_domainnet_errors(tmp_path):
    folder = make_domainnet(tmp_path)
    with pytest.raises(DataError, match="real_train.txt: missing split file"):
        load_dataset("domainnet", root=tmp_path)  # the default reads all six domains
    with pytest.raises(ConfigError, match="distinct names"):
        load_dataset("domainnet", root=tmp_path, domains=["clipart", "photo"])
    text = (folder / "clipart_test.txt").read_text().replace("clipart_002_test0.jpg 2", "clipart_002_test0.jpg 0")
    (folder / "clipart_test.txt").write_text(text)
    with pytest.raises(DataError, match="class folder 'zebra' has labels 2 and 0"):
        load_dataset("domainnet", root=tmp_path, domains=["clipart"])
    (folder / "clipart" / "aircraft_carrier" / "clipart_000_train0.jpg").unlink()
    with pytest.raises(DataError, match="listed but missing"):
        load_dataset("domainnet", root=tmp_path, domains=["clipart"])


# -- SVHN -----------------------------------------------------------------------------------------


def test_svhn_mat_files(tmp_path):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8) for s, n in (("train", 5), ("test", 2))}
    labels = {"train": np.array([[10], [1], [9], [10], [3]]), "test": np.array([[2], [10]])}
    (tmp_path / "svhn").mkdir()
    for split in ("train", "test"):
        scipy.io.savemat(
            str(tmp_path / "svhn" / f"{split}_32x32.mat"),
            {"X": images[split].transpose(1, 2, 3, 0), "y": labels[split]},
        )
    ds = load_dataset("svhn", root=tmp_path)
    np.testing.assert_array_equal(ds.train.items, images["train"])
    assert ds.train.labels.tolist() == [0, 1, 9, 0, 3] and ds.test.labels.tolist() == [2, 0]
    assert ds.class_names == [str(d) for d in range(10)]


def test_paper_benchmarks_missing_messages(tmp_path):
    for name, hint in (
        ("imagenet_r", "imagenet-r.tar"),
        ("cars", "cars_meta.mat"),
        ("domainnet", "_train.txt"),
        ("svhn", "train_32x32.mat"),
    ):
        with pytest.raises(DataError) as err:
            load_dataset(name, root=tmp_path)
        assert "\n" not in str(err.value) and str(tmp_path) in str(err.value) and hint in str(err.value)


def test_class_incremental_on_imagenet_r_fake_keeps_reference_ids(tmp_path):
    make_imagenet_r(tmp_path)
    ds = load_dataset("imagenet_r", root=tmp_path)
    # a stream over the three classes present: a natural order over the 200 ids would make empty tasks
    with pytest.raises(ConfigError, match="has no training samples"):
        class_incremental(ds, 5, list(range(200)))
