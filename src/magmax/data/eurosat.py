"""EuroSAT RGB (Helber et al. 2019): 27,000 64×64 Sentinel-2 land-cover patches, 10 classes.

Layout: the task-vectors repository's split of the RGB archive into image-folder trees,
``EuroSAT_splits/{train,test}/<Class>/*.jpg`` (MagMax's copy names the folder ``EuroSAT_Splitted``;
``eurosat/`` is accepted too); ``val`` stands in when there is no ``test``. Found in an explicit
``root`` (that folder or its parent), ``$MAGMAX_DATA/eurosat`` or ``~/data``.

Class ids: sorted folder names (``AnnualCrop`` ... ``SeaLake``). Names: the CLIP paper's wording
that the task-vectors code maps the folders to (``AnnualCrop`` → ``annual crop land``,
``SeaLake`` → ``lake or sea``, ...); an unknown folder gets its CamelCase split into lower-case words.
Templates: the 3 EuroSAT templates.
"""

from __future__ import annotations

import re
from pathlib import Path

from magmax.data.base import Dataset, DatasetReader, register_reader
from magmax.data.folders import probe_tree, read_split_folders
from magmax.data.locate import candidate_dirs, locate
from magmax.data.templates import EUROSAT_TEMPLATES

CLIP_NAMES = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}

FOLDERS = ("EuroSAT_splits", "EuroSAT_Splitted", "eurosat", "EuroSAT")
LAYOUT = "EuroSAT_splits/train/<Class>/ and EuroSAT_splits/test/<Class>/ (the task-vectors split of EuroSAT RGB)"
SOURCE = "the EuroSAT RGB archive (github.com/phelber/EuroSAT), split as in github.com/mlfoundations/task_vectors"


def class_name(folder: str) -> str:
    return CLIP_NAMES.get(folder) or " ".join(w.lower() for w in re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", folder))


@register_reader("eurosat")
class EuroSATReader(DatasetReader):
    modality = "image"
    summary = "EuroSAT RGB: 10 land-cover classes (task-vectors train/test folders)"

    def read(self, root: Path | None, options) -> Dataset:
        train_dir, test_dir = locate(
            "eurosat", candidate_dirs(root, ("eurosat",), ["~/data"]), lambda c: probe_tree(c, FOLDERS), LAYOUT, SOURCE
        )
        classes, train, test, listing = read_split_folders(train_dir, test_dir, "eurosat")
        return Dataset(
            name="eurosat",
            modality="image",
            class_names=[class_name(c) for c in classes],
            train=train,
            test=test,
            templates=list(EUROSAT_TEMPLATES),
            info={"root": str(train_dir.parent.resolve()), "listing": listing, "test_folder": test_dir.name},
        )
