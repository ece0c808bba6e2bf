"""DomainNet (Peng et al. 2019): about 600k images of 345 classes in 6 domains, the official split.

Layout: the official per-domain archives extracted into one folder (``domainnet/``) beside the
official split files: ``<domain>_train.txt`` and ``<domain>_test.txt`` whose lines are
``<domain>/<class>/<file>.jpg <label>``, and the images ``<domain>/<class>/<file>.jpg``. Found in an
explicit ``root`` (that folder or its parent), ``$MAGMAX_DATA/domainnet`` or ``~/data``. Only the
first image of each split file is checked to exist when loading (checking 600k files costs minutes).

Class ids (``class_ids="reference"``, default): the class folder names sorted in code-point order
(``The_Eiffel_Tower`` first), as the MagMax reference's ``ImageFolder`` numbers them; ``"official"``
uses the labels of the split files. Either way the label of every line is checked to agree with its
class folder. Names: folder names with ``_`` → space.

Domains: ``domain_names`` are the protocol's domain-incremental order (clipart, sketch, real,
infograph, quickdraw, painting) restricted to ``domains`` when given (then in that order).
Templates: the 80 ImageNet templates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from magmax.data.base import (
    Dataset,
    DatasetReader,
    ImageFiles,
    LabeledSet,
    ReaderOptions,
    natural_name,
    register_reader,
)
from magmax.data.locate import candidate_dirs, describe_file, locate, malformed
from magmax.data.templates import IMAGENET_TEMPLATES
from magmax.errors import ConfigError

DOMAINS = ("clipart", "sketch", "real", "infograph", "quickdraw", "painting")
"""The 6 domains in the paper's domain-incremental order (protocol §4)."""

LAYOUT = (
    "domainnet/ with <domain>_train.txt, <domain>_test.txt ('<domain>/<class>/<file> <label>' lines) "
    "and <domain>/<class>/ images"
)
SOURCE = "http://ai.bu.edu/M3SDA/ (the six domain zips and their train/test txt files)"


def probe(candidate: Path) -> Path | None:
    for folder in (candidate / "domainnet", candidate / "DomainNet", candidate):
        if folder.is_dir() and any((folder / f"{d}_train.txt").is_file() for d in DOMAINS):
            return folder
    return None


class DomainNetOptions(ReaderOptions):
    domains: list[str] | None = None
    """Domains to read, in this order (default: all six in the protocol's order)."""
    class_ids: Literal["reference", "official"] = "reference"
    """``reference``: sorted class folder names (MagMax code); ``official``: the split files' labels."""


def read_split_file(path: Path) -> list[tuple[str, int]]:
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0].count("/") < 2:
            raise malformed("domainnet", path, f"line {number} is not '<domain>/<class>/<file> <label>'")
        lines.append((parts[0], int(parts[1])))
    if not lines:
        raise malformed("domainnet", path, "no samples")
    return lines


@register_reader("domainnet")
class DomainNetReader(DatasetReader):
    modality = "image"
    summary = "DomainNet: 345 classes x 6 domains, official split files"
    Options = DomainNetOptions

    def read(self, root: Path | None, options: DomainNetOptions) -> Dataset:
        domains = list(options.domains) if options.domains is not None else list(DOMAINS)
        unknown = [d for d in domains if d not in DOMAINS]
        if unknown or not domains or len(set(domains)) != len(domains):
            raise ConfigError(f"domainnet: domains={domains}; give distinct names from: {', '.join(DOMAINS)}")
        folder = locate(
            "domainnet", candidate_dirs(root, ("domainnet", "DomainNet"), ["~/data"]), probe, LAYOUT, SOURCE
        )

        split_lines: dict[str, list[tuple[int, str, int]]] = {"train": [], "test": []}  # (domain id, path, label)
        files = []
        for d, domain in enumerate(domains):
            for split in ("train", "test"):
                path = folder / f"{domain}_{split}.txt"
                if not path.is_file():
                    raise malformed(
                        "domainnet",
                        path,
                        "missing split file",
                        f"put the official {domain}_{split}.txt beside the images",
                    )
                lines = read_split_file(path)
                if not (folder / lines[0][0]).is_file():
                    raise malformed(
                        "domainnet",
                        folder / lines[0][0],
                        "listed but missing",
                        f"extract the official {domain}.zip into {folder}",
                    )
                split_lines[split] += [(d, rel, label) for rel, label in lines]
                files.append(path)

        official: dict[str, int] = {}
        for lines in split_lines.values():
            for _, rel, label in lines:
                name = rel.split("/")[1]
                if official.setdefault(name, label) != label:
                    raise malformed(
                        "domainnet", folder, f"class folder '{name}' has labels {official[name]} and {label}"
                    )
        if len(set(official.values())) != len(official):
            raise malformed("domainnet", folder, "two class folders share one label")
        if options.class_ids == "reference":
            classes = sorted(official)
        else:
            by_label = {label: name for name, label in official.items()}
            if sorted(by_label) != list(range(len(by_label))):
                raise malformed(
                    "domainnet",
                    folder,
                    "official labels are not 0..C-1 for the domains read",
                    "use class_ids='reference'",
                )
            classes = [by_label[i] for i in range(len(by_label))]
        class_id = {c: i for i, c in enumerate(classes)}

        def labeled(lines: list[tuple[int, str, int]]) -> LabeledSet:
            return LabeledSet(
                ImageFiles(str(folder / rel) for _, rel, _ in lines),
                np.asarray([class_id[rel.split("/")[1]] for _, rel, _ in lines]),
                np.asarray([d for d, _, _ in lines]),
            )

        return Dataset(
            name="domainnet",
            modality="image",
            class_names=[natural_name(c) for c in classes],
            train=labeled(split_lines["train"]),
            test=labeled(split_lines["test"]),
            templates=list(IMAGENET_TEMPLATES),
            domain_names=domains,
            info={
                "files": [describe_file(p) for p in files],
                "class_ids": options.class_ids,
                "split": "official split files",
            },
        )
