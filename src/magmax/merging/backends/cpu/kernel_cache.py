"""Whether numba's machine code for the CPU merge kernels is on disk already, without importing numba.

numba compiles each kernel on its first call in a process unless its cache holds the machine code from
an earlier one (``cache=True``). It looks for the cache, per source file, in the first of:
``$NUMBA_CACHE_DIR/<folder>_<sha1 of the folder path>``, the ``__pycache__`` folder beside the source
when it is writable (an editable install, or a virtual environment the user owns), and the user-wide
``~/.cache/numba/<folder>_<sha1>`` (a read-only site-packages). :func:`cache_dir` finds the same folder.

``magmax warmup`` (:func:`magmax.merging.backends.cpu.kernel_warmup.warm_up`) compiles every kernel there and then
writes :data:`MANIFEST`: the names of the cache files it produced. :func:`kernels_cached` is true while
every one of them is still there and every index is fresh: written by this numba version for this exact
kernel source (numba keys an index by the source's SHA-256; a changed source or another numba version
is a cache miss, and numba would compile again). It reads a few dozen small files and unpickles nothing.
A cache filled by merges alone (``MAGMAX_NATIVE=1``) has no manifest: it counts as not compiled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import pickle
import sys
from pathlib import Path

KERNEL_MODULE = "magmax.merging.backends.cpu.kernels"
"""The module whose ``@njit(cache=True)`` kernels the CPU merge path calls."""

MANIFEST = "magmax-kernels.txt"
"""Written by the warm-up beside the cache files it produced: their names, one a line."""


def kernel_source() -> Path | None:
    """The kernels' source file (found without importing it: that would import numba)."""
    spec = importlib.util.find_spec(KERNEL_MODULE)
    return Path(spec.origin) if spec is not None and spec.origin else None


def _subpath(source: Path) -> str:
    # numba.core.caching._CacheLocator.get_suitable_cache_subpath
    folder = os.path.dirname(os.path.abspath(source))
    return "_".join([os.path.split(folder)[-1], hashlib.sha1(folder.encode()).hexdigest()])


def _user_cache_root() -> Path:
    # numba's AppDirs(appname="numba").user_cache_dir
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "numba"
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(local) / "numba" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "numba"


def _writable(folder: Path) -> bool:
    existing = folder if folder.exists() else folder.parent
    return os.access(existing, os.W_OK | os.X_OK)


def cache_dir(source: Path | None = None) -> Path | None:
    """The folder numba reads and writes the kernels' machine code in (None: no source found)."""
    source = source or kernel_source()
    if source is None:
        return None
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"]) / _subpath(source)
    in_tree = source.parent / "__pycache__"
    if _writable(in_tree):
        return in_tree
    return _user_cache_root() / _subpath(source)


def numba_version() -> str | None:
    try:
        return importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        return None


def _fresh_index(path: Path, header: bytes, stamp: bytes) -> bool:
    """numba's index file: pickle(numba version) then pickle((source SHA-256, overloads))."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return data.startswith(header) and stamp in data[len(header):]


def kernels_cached() -> bool:
    """Every kernel's machine code that ``magmax warmup`` wrote is on disk, for this source and numba."""
    source, version = kernel_source(), numba_version()
    folder = cache_dir(source)
    if source is None or version is None or folder is None:
        return False
    try:
        names = [line.strip() for line in (folder / MANIFEST).read_text().splitlines() if line.strip()]
        stamp = hashlib.sha256(source.read_bytes()).digest()
    except OSError:
        return False
    header = pickle.dumps(version, protocol=-1)
    indexes = [name for name in names if name.endswith(".nbi")]
    if not indexes:
        return False
    for name in names:
        path = folder / name
        if name.endswith(".nbi") and not _fresh_index(path, header, stamp):
            return False
        if not path.is_file():
            return False
    return True


def cache_files(folder: Path, source: Path | None = None) -> list[str]:
    """The names of the kernels' cache files in ``folder`` (index ``.nbi`` and data ``.nbc``)."""
    source = source or kernel_source()
    if source is None or not folder.is_dir():
        return []
    prefix = source.stem + "."
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(prefix) and p.suffix in (".nbi", ".nbc"))


def write_manifest(folder: Path, names: list[str]) -> Path:
    """Record ``names`` (what the warm-up compiled) as the kernels :func:`kernels_cached` looks for."""
    path = folder / MANIFEST
    tmp = path.with_suffix(f".tmp.{os.getpid()}")
    tmp.write_text("".join(f"{name}\n" for name in names))
    os.replace(tmp, path)
    return path
