"""Dataset readers: one module each, registered by name; importing this package registers them all.

``load_dataset(name, root=None, **options)`` finds the files (explicit root, else ``$MAGMAX_DATA`` and
the dataset's subfolder, else the reader's default locations), reads them without downloading
anything, applies the per-class caps every reader accepts, and returns a :class:`Dataset`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from magmax.data.base import (
    Dataset,
    DatasetReader,
    ImageFiles,
    LabeledSet,
    Modality,
    ReaderOptions,
    cap_per_class,
    get_reader,
    readers,
    register_reader,
    validate_options,
)

_HELPERS = {"base", "locate", "templates", "idx", "safe_pickle", "folders", "splits"}

# A new reader is one file in this folder that applies @register_reader: discovered here.
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _HELPERS and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def dataset_names() -> list[str]:
    return list(readers())


def load_dataset(name: str, root: str | Path | None = None, **options: Any) -> Dataset:
    """Read dataset ``name``; ``options`` are the reader's (see ``get_reader(name).Options``)."""
    reader = get_reader(name)
    opts = validate_options(reader, options)
    ds = reader().read(None if root is None else Path(root).expanduser(), opts)
    caps = {"max_train_per_class": opts.max_train_per_class, "max_test_per_class": opts.max_test_per_class}
    if any(v is not None for v in caps.values()):
        ds = ds.with_splits(
            cap_per_class(ds.train, opts.max_train_per_class, opts.subsample_seed),
            cap_per_class(ds.test, opts.max_test_per_class, opts.subsample_seed + 1),
            caps={**caps, "seed": opts.subsample_seed},
        )
    ds.info.setdefault("dataset", name)
    ds.info["sizes"] = {"train": len(ds.train), "test": len(ds.test), "classes": ds.num_classes}
    ds.info["class_names"] = list(ds.class_names)
    if ds.domain_names is not None:
        ds.info["domain_names"] = list(ds.domain_names)
    return ds


__all__ = [
    "Dataset",
    "DatasetReader",
    "ImageFiles",
    "LabeledSet",
    "Modality",
    "ReaderOptions",
    "dataset_names",
    "get_reader",
    "load_dataset",
    "register_reader",
]
