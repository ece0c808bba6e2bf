"""DTD (Cimpoi et al. 2014), the Describable Textures Dataset: 5,640 images of 47 texture classes.

Layout: the task-vectors repository's image-folder split, ``dtd/{train,test}/<class>/*.jpg``
(``val`` stands in when there is no ``test``; task-vectors evaluates on ``val``, MagMax on
``test``). Found in an explicit ``root`` (``dtd`` or its parent), ``$MAGMAX_DATA/dtd`` or ``~/data``.
Class ids: sorted folder names; names with ``_`` → space. Templates: the 8 DTD templates.
"""

from __future__ import annotations

from pathlib import Path

from magmax.data.base import Dataset, DatasetReader, natural_name, register_reader
from magmax.data.folders import probe_tree, read_split_folders
from magmax.data.locate import candidate_dirs, locate
from magmax.data.templates import DTD_TEMPLATES

LAYOUT = "dtd/train/<class>/ and dtd/test/<class>/ (or dtd/val/)"
SOURCE = (
    "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (dtd-r1.0.1.tar.gz), "
    "split into folders as in github.com/mlfoundations/task_vectors"
)


@register_reader("dtd")
class DTDReader(DatasetReader):
    modality = "image"
    summary = "DTD: 47 texture classes (train/test image folders)"

    def read(self, root: Path | None, options) -> Dataset:
        train_dir, test_dir = locate(
            "dtd", candidate_dirs(root, ("dtd",), ["~/data"]), lambda c: probe_tree(c, ("dtd",)), LAYOUT, SOURCE
        )
        classes, train, test, listing = read_split_folders(train_dir, test_dir, "dtd")
        return Dataset(
            name="dtd",
            modality="image",
            class_names=[natural_name(c) for c in classes],
            train=train,
            test=test,
            templates=list(DTD_TEMPLATES),
            info={"root": str(train_dir.parent.resolve()), "listing": listing, "test_folder": test_dir.name},
        )
