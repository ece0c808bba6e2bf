"""Merging methods: one module each, registered by name. Importing this package registers them all."""

from __future__ import annotations

import importlib
import pkgutil

from magmax.merging.base import (
    MergeMethod,
    MethodOptions,
    TaskSlices,
    create_method,
    get_method_class,
    register,
    registry,
)

# A new method is one file in this folder that applies @register: discovered here, nothing else to edit.
for _info in pkgutil.iter_modules(__path__):
    if not _info.ispkg and _info.name not in ("base", "fold") and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["MergeMethod", "MethodOptions", "TaskSlices", "create_method", "get_method_class", "register", "registry"]
