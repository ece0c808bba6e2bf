"""Merging methods: one module each, registered by name. Importing this package registers them all."""

from __future__ import annotations

from magmax.merging.base import (
    MergeMethod,
    MethodOptions,
    TaskSlices,
    create_method,
    discover,
    get_method_class,
    register,
    registry,
)

discover()  # imports every method module, which registers it

__all__ = ["MergeMethod", "MethodOptions", "TaskSlices", "create_method", "get_method_class", "register", "registry"]
