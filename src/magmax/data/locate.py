"""Where a reader looks for its files, the one-line error when they are absent, and provenance records.

Search order (the contract): an explicit ``root`` only; else every folder of ``$MAGMAX_DATA`` (several
may be joined with ``os.pathsep``) with the dataset's subfolder names and then the folder itself; else
the reader's default locations. Each reader's probe then recognises its layout inside a candidate (the
candidate itself, or a known child such as ``cifar-100-python``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from magmax.errors import DataError

T = TypeVar("T")

HOME_DATA_DIRS = ("~/data", "~/datasets")
"""Common home locations probed last by every reader."""

HASH_LIMIT_BYTES = 2 << 30
"""Files larger than this are recorded by size only: hashing them would dominate loading."""


def candidate_dirs(
    root: str | Path | None, subfolders: Sequence[str], defaults: Iterable[str | Path] = ()
) -> list[Path]:
    """The folders a reader probes, in order, without duplicates."""
    if root is not None:
        return [Path(root).expanduser()]
    found: list[Path] = []
    for base in filter(None, os.environ.get("MAGMAX_DATA", "").split(os.pathsep)):
        base_path = Path(base).expanduser()
        found += [base_path / sub for sub in subfolders] + [base_path]
    found += [Path(d).expanduser() for d in defaults]
    for home in HOME_DATA_DIRS:
        found += [Path(home).expanduser() / sub for sub in subfolders]
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


def locate(
    dataset: str,
    candidates: Sequence[Path],
    probe: Callable[[Path], T | None],
    layout: str,
    source: str,
) -> T:
    """The first candidate the probe recognises; else a one-line DataError naming every path searched."""
    for path in candidates:
        found = probe(path)
        if found is not None:
            return found
    raise missing(dataset, candidates, layout, source)


def missing(dataset: str, searched: Sequence[Path | str], layout: str, source: str) -> DataError:
    where = ", ".join(str(p) for p in searched) or "(nowhere: no root given and MAGMAX_DATA unset)"
    return DataError(f"dataset '{dataset}' not found in {where}; expected {layout}; get it from {source}")


def malformed(dataset: str, path: Path | str, problem: str, fix: str = "re-extract the official archive") -> DataError:
    return DataError(f"dataset '{dataset}': {path}: {problem}; {fix}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(path: Path) -> dict:
    """Provenance of one file read: absolute path, size and (below HASH_LIMIT_BYTES) its sha256."""
    path = Path(path).resolve()
    size = path.stat().st_size
    record: dict = {"path": str(path), "bytes": size}
    if size <= HASH_LIMIT_BYTES:
        record["sha256"] = sha256_file(path)
    return record


def describe_listing(root: Path, relpaths: Iterable[str]) -> dict:
    """Provenance of a file tree without reading every file: how many, and a digest of the sorted list
    of relative paths (two trees with the same digest hold the same file names)."""
    names = sorted(relpaths)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    return {"path": str(Path(root).resolve()), "files": len(names), "listing_sha256": digest}
