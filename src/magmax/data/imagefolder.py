"""Any image-folder tree: ``root/train/<class>/**/<image>`` and ``root/test/<class>/...`` (``val`` is
accepted when there is no ``test``). Class ids are the sorted class folder names of the training split
(torchvision ``ImageFolder`` order); class names are those folder names with ``_`` → space.

With ``domain_level=True`` the tree has one more level, ``root/<split>/<domain>/<class>/...``: classes
are the sorted union over domains, every sample records its domain (sorted domain folder names), and
the dataset suits :func:`magmax.scenarios.domain_incremental`.

The root is the explicit ``root`` or ``$MAGMAX_DATA/imagefolder``; ``templates`` names a set of
``magmax.data.templates.TEMPLATE_SETS`` or is a list of strings with one ``{}``.
"""

from __future__ import annotations

from pathlib import Path

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
from magmax.data.folders import first_existing, images_under, read_split_folders, subfolders
from magmax.data.locate import candidate_dirs, describe_listing, locate, malformed
from magmax.data.templates import template_set

LAYOUT = (
    "root/train/<class>/<images> and root/test/<class>/<images> (or root/<split>/<domain>/<class>/ with domain_level)"
)
SOURCE = "your own files: any tree in torchvision ImageFolder layout"


class ImageFolderOptions(ReaderOptions):
    dataset_name: str = "imagefolder"
    """Name of the resulting dataset (``Dataset.name``)."""
    templates: str | list[str] = "simple"
    """A named template set (``simple``, ``imagenet``, ``cifar100``...) or a list with one ``{}`` each."""
    domain_level: bool = False
    """Read ``root/<split>/<domain>/<class>/...`` and record each sample's domain."""
    natural_names: bool = True
    """Replace ``_`` with a space in class folder names."""


def probe(candidate: Path) -> tuple[Path, Path] | None:
    train = first_existing(candidate, ("train",))
    test = first_existing(candidate, ("test", "val"))
    return (train, test) if train is not None and test is not None else None


@register_reader("imagefolder")
class ImageFolderReader(DatasetReader):
    modality = "image"
    summary = "a generic train/test image-folder tree (optionally with a domain level)"
    Options = ImageFolderOptions

    def read(self, root: Path | None, options: ImageFolderOptions) -> Dataset:
        templates = template_set(options.templates)
        train_dir, test_dir = locate("imagefolder", candidate_dirs(root, ("imagefolder",)), probe, LAYOUT, SOURCE)
        if options.domain_level:
            classes, domains, train, test, listing = self._with_domains(train_dir, test_dir)
        else:
            classes, train, test, listing = read_split_folders(train_dir, test_dir, "imagefolder")
            domains = None
        return Dataset(
            name=options.dataset_name,
            modality="image",
            class_names=[natural_name(c) if options.natural_names else c for c in classes],
            train=train,
            test=test,
            templates=templates,
            domain_names=domains,
            info={
                "root": str(train_dir.parent.resolve()),
                "class_folders": classes,
                "listing": listing,
                "split": "folders",
            },
        )

    @staticmethod
    def _with_domains(train_dir: Path, test_dir: Path):
        domains = subfolders(train_dir)
        if not domains:
            raise malformed(
                "imagefolder",
                train_dir,
                "no domain folders",
                "use root/<split>/<domain>/<class>/ or domain_level=False",
            )
        classes = sorted({c for d in domains for c in subfolders(train_dir / d)})
        class_ids = {c: i for i, c in enumerate(classes)}
        domain_ids = {d: i for i, d in enumerate(domains)}
        splits, listing = [], {}
        for split, split_dir in (("train", train_dir), ("test", test_dir)):
            paths, labels, doms, rels = [], [], [], []
            for domain in subfolders(split_dir):
                if domain not in domain_ids:
                    raise malformed(
                        "imagefolder", split_dir / domain, "a domain folder that the training split does not have"
                    )
                for cls in subfolders(split_dir / domain):
                    if cls not in class_ids:
                        raise malformed(
                            "imagefolder",
                            split_dir / domain / cls,
                            "a class folder that the training split does not have",
                        )
                    files = images_under(split_dir / domain / cls)
                    paths += [str(split_dir / domain / cls / f) for f in files]
                    rels += [f"{domain}/{cls}/{f}" for f in files]
                    labels += [class_ids[cls]] * len(files)
                    doms += [domain_ids[domain]] * len(files)
            if not paths:
                raise malformed("imagefolder", split_dir, f"no image files in the {split} split")
            splits.append(LabeledSet(ImageFiles(paths), np.asarray(labels), np.asarray(doms)))
            listing[split] = describe_listing(split_dir, rels)
        return classes, domains, splits[0], splits[1], listing
