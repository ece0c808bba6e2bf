"""The output folder: :class:`AtomicOutput` puts everything in a hidden folder next to OUT that is renamed
into place at the end, so OUT is complete or absent; :func:`copy_model_files` brings a model folder's
non-weight files (config, tokenizer) along.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from magmax.checkpoints.format import SINGLE_FILE_NAME
from magmax.errors import MergeInputError


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _partial_pattern(out: Path) -> re.Pattern[str]:
    """The hidden work folders of OUT: ``.OUT.<pid>@<host>.<hex>.partial`` (the owner in the name, so a
    later run can tell a folder left by a killed merge from one a running merge writes)."""
    return re.compile(re.escape(f".{out.name}.") + r"(\d+)@([A-Za-z0-9._-]+)\.[0-9a-f]{8}\.partial")


def _make_partial_folder(out: Path) -> Path:
    # os.mkdir, not tempfile.mkdtemp: mkdtemp makes 0700 folders, and this one becomes OUT, whose mode
    # must follow the umask as any folder made by mkdir does (others may need to read the model).
    while True:
        folder = out.parent / f".{out.name}.{os.getpid()}@{_HOST}.{uuid.uuid4().hex[:8]}.partial"
        try:
            os.mkdir(folder, 0o777)
            return folder
        except FileExistsError:
            continue


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process, alive
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove OUT's work folders whose merge was killed (SIGKILL, power loss): those of this host whose
    process is gone. A folder of a live process (a concurrent merge) or of another host is kept."""
    pattern = _partial_pattern(out)
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or match.group(2) != _HOST or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class AtomicOutput:
    """OUT appears complete or not at all.

    Everything is written into :attr:`folder`, a hidden temporary folder next to OUT (same file
    system, so the final rename is atomic). :meth:`commit` renames it (or, for an OUT ending in
    ``.safetensors``, the single file ``model.safetensors`` in it) to OUT; leaving the ``with`` block
    without committing removes it. An existing OUT is an error unless ``force``, and then replaced only
    at commit. OUT may not be, or contain, one of ``inputs``.

    The folder's name records its owner (``.OUT.<pid>@<host>.<hex>.partial``): opening OUT again removes
    the folders of this host's merges of OUT whose process is gone (killed by SIGKILL), never a live one's.
    """

    def __init__(self, out: Path | str, *, force: bool = False, inputs: Sequence[Path | str] = ()):
        self.out = Path(out)
        self.force = force
        self.single_file = self.out.suffix == ".safetensors"
        resolved = self.out.resolve()
        for source in inputs:
            source_resolved = Path(source).resolve()
            if source_resolved == resolved or resolved in source_resolved.parents:
                raise MergeInputError(
                    f"output {self.out} is or contains the input {source}; choose another output path"
                )
        if _exists(self.out) and not force:
            raise MergeInputError(
                f"output {self.out} already exists; pass --force to replace it, or choose another output path"
            )
        try:
            # Folders made for OUT's parent are removed again if the merge fails.
            parent = self.out.parent.absolute()
            self._made = [p for p in (*reversed(parent.parents), parent) if not p.exists()]
            self.out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.out)
            self.folder = _make_partial_folder(self.out)
        except OSError as exc:
            raise MergeInputError(
                f"cannot create the output next to {self.out} ({exc.strerror}); choose a writable location"
            ) from None
        self.committed = False

    def commit(self) -> None:
        source = self.folder / SINGLE_FILE_NAME if self.single_file else self.folder
        try:
            if _exists(self.out):
                if not self.force:
                    raise MergeInputError(f"output {self.out} appeared during the merge; pass --force to replace it")
                # Move the old OUT aside first: rename cannot replace a non-empty folder.
                old = self.out.parent / f".{self.out.name}.replaced-{uuid.uuid4().hex[:8]}"
                os.rename(self.out, old)
                os.rename(source, self.out)
                _remove(old)
            else:
                os.rename(source, self.out)
        except OSError as exc:
            raise MergeInputError(
                f"cannot move the merged model to {self.out} ({exc.strerror}); check that location"
            ) from None
        self.committed = True
        if self.single_file:
            shutil.rmtree(self.folder, ignore_errors=True)

    def abort(self) -> None:
        if not self.committed:
            shutil.rmtree(self.folder, ignore_errors=True)
            for folder in reversed(self._made):
                with contextlib.suppress(OSError):  # not empty: someone else uses it now
                    folder.rmdir()

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


# Weights that the merged checkpoint replaces; everything else of a model folder is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf")


def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def copy_model_files(source: Path, target: Path) -> list[Path]:
    """Copy a model folder's non-weight files (config.json, tokenizer, generation config, subfolders
    such as sentence-transformers' ``1_Pooling``) into ``target``; hidden entries are skipped."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n.startswith(".") or (_is_weight_file(n) and not Path(folder, n).is_dir())}

    copied: list[Path] = []

    def copy(src: str, dst: str) -> str:
        copied.append(Path(dst))
        return shutil.copy2(src, dst)

    try:
        mode = stat.S_IMODE(target.stat().st_mode)
        shutil.copytree(source, target, ignore=ignore, copy_function=copy, dirs_exist_ok=True)
        # copytree gives target the source folder's mode; it keeps its own (made under the umask).
        os.chmod(target, mode)
    except (OSError, shutil.Error) as exc:
        raise MergeInputError(f"cannot copy the model files of {source} ({exc}); check that folder") from None
    return copied
