"""Lazy checkpoint readers, one tensor at a time (each an :class:`magmax.engine.TensorReader`, opened by
:func:`open_checkpoint`):

* a ``.safetensors`` file: the header is parsed once and every ``get`` reads exactly that tensor's
  bytes with a positioned read into a fresh tensor (or, inside :func:`recycled_read_buffers`, into a
  buffer no live tensor uses any more). No memory map, so neither the resident set nor the address
  space grows with the file: a merge runs under ``ulimit -v`` far below the checkpoints' size
  (bench/outofcore_memory.py), whatever the safetensors version (older ones return views of a mapping
  whose pages stay resident);
* a Hugging Face model folder: ``*.safetensors.index.json`` (sharded, via its ``weight_map``), a
  single ``model.safetensors``, or the same with ``pytorch_model.bin``;
* a torch state dict (``.pt/.pth/.bin``): ``torch.load(weights_only=True, mmap=True)``; each tensor
  is copied out and its mapped pages released, so resident memory stays one tensor deep. Legacy
  (non-zip) torch files cannot be mapped and are loaded whole. Anything ``weights_only`` refuses
  (a pickled module, ...) is refused with how to convert it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torch import Tensor

from magmax.checkpoints.format import CODE_TO_DTYPE, tensor_nbytes
from magmax.engine import TensorMeta
from magmax.errors import MergeInputError
from magmax.memory import release_pages
from magmax.thread_slot import ThreadSlot

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# The safetensors library refuses headers above 100 MB; so do we, before allocating one.
_MAX_HEADER_BYTES = 100_000_000


class CheckpointReader:
    """Common part of the file readers: a name for messages, the HF folder it came from, closing."""

    name: str
    model_folder: Path | None = None
    """The Hugging Face model folder this checkpoint was opened from (its config/tokenizer files)."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, key: str) -> TensorMeta:
        raise NotImplementedError

    def get(self, key: str) -> Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles (idempotent)."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class _Span:
    meta: TensorMeta
    start: int  # absolute offset in the file
    nbytes: int


def _bad_file(path: Path, why: str) -> MergeInputError:
    return MergeInputError(f"{path}: {why}; re-download or re-save this checkpoint")


def read_safetensors_header(
    path: Path, handle: io.RawIOBase, file_size: int
) -> tuple[dict[str, _Span], dict[str, str]]:
    """Tensor spans (in file order) and ``__metadata__`` of a safetensors file, fully validated.

    Checks what the safetensors library checks: the header fits in the file, every entry has a known
    dtype, a shape and offsets of exactly numel·itemsize bytes, and the entries tile the data buffer
    with neither gaps nor overlaps up to the last byte of the file (so truncation is caught here).
    """
    prefix = handle.read(8)
    if prefix is None or len(prefix) < 8:
        raise _bad_file(path, "not a safetensors file (shorter than the 8-byte header length)")
    header_len = struct.unpack("<Q", prefix)[0]
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise _bad_file(
            path, f"truncated or not a safetensors file (header of {header_len} bytes in a file of {file_size})"
        )
    raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad_file(path, "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise _bad_file(path, "not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    spans: dict[str, _Span] = {}
    ordered: list[tuple[int, int, str]] = []
    for key, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise _bad_file(path, f"tensor '{key}' has a malformed header entry") from None
        if code not in CODE_TO_DTYPE:
            raise MergeInputError(
                f"{path}: tensor '{key}' has dtype {code}, which this torch ({torch.__version__}) cannot hold; "
                "convert the checkpoint to a float or integer dtype torch supports"
            )
        meta = TensorMeta(shape, CODE_TO_DTYPE[code])
        if min(shape, default=0) < 0 or begin < 0 or end - begin != tensor_nbytes(meta):
            raise _bad_file(
                path, f"tensor '{key}' has data_offsets [{begin}, {end}] that do not fit its shape and dtype"
            )
        spans[key] = _Span(meta, data_start + begin, end - begin)
        ordered.append((begin, end, key))
    ordered.sort()
    position = 0
    for begin, end, key in ordered:
        if begin != position:
            raise _bad_file(path, f"tensor '{key}' starts at data offset {begin}, expected {position} (gap or overlap)")
        position = end
    if data_start + position != file_size:
        what = "truncated" if data_start + position > file_size else "has trailing bytes"
        raise _bad_file(path, f"{what}: the header describes {data_start + position} bytes, the file has {file_size}")
    return {key: spans[key] for _, _, key in ordered}, metadata


class ReadBuffers:
    """Byte buffers for the readers' positioned reads, used again once nothing refers to them.

    A read into fresh memory runs at the page-fault rate (about 2 GB/s here, against 7.5 GB/s into
    memory already touched: docs/benchmarks.md). Each buffer is as large as the largest tensor, so any
    read fits one (as a leading slice); a buffer is free again when no tensor made from it is alive
    (its storage's use count, which views of the returned tensor raise too). At most ``count`` buffers,
    so the memory they hold stays a fixed number of largest tensors whatever the number of models;
    past that, reads get fresh memory as before.
    """

    def __init__(self, nbytes: int, count: int):
        self.nbytes = nbytes
        self.count = count
        self._buffers: list[Tensor] = []

    _use_count = getattr(torch._C, "_storage_Use_Count", None)  # absent: every read gets fresh memory

    @classmethod
    def _free(cls, buffer: Tensor) -> bool:
        # Two references when only this pool holds the buffer: its tensor and the storage object asked.
        return cls._use_count(buffer.untyped_storage()._cdata) <= 2

    def take(self, nbytes: int) -> Tensor:
        """``nbytes`` bytes to read into (uint8, contiguous): a free buffer's leading slice, else fresh."""
        if nbytes <= self.nbytes and self._use_count is not None:
            for buffer in self._buffers:
                if self._free(buffer):
                    return buffer[:nbytes]
            if len(self._buffers) < self.count:
                self._buffers.append(torch.empty(self.nbytes, dtype=torch.uint8))
                return self._buffers[-1][:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8)


_read_buffers: ThreadSlot[ReadBuffers] = ThreadSlot()


def recycled_read_buffers(nbytes: int, count: int) -> AbstractContextManager[ReadBuffers]:
    """Within the block, safetensors reads of this thread go into :class:`ReadBuffers` (released after)."""
    return _read_buffers.holding(ReadBuffers(nbytes, count))


class SafetensorsReader(CheckpointReader):
    """One ``.safetensors`` file; ``get`` reads one tensor with a positioned read (no memory map)."""

    def __init__(self, path: Path | str, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(self.path)
        try:
            self._file: io.FileIO | None = io.FileIO(self.path, "r")
            file_size = os.fstat(self._file.fileno()).st_size
        except OSError as exc:
            raise MergeInputError(
                f"{self.path}: cannot open ({exc.strerror}); check the path and its permissions"
            ) from None
        try:
            self._spans, self.metadata = read_safetensors_header(self.path, self._file, file_size)
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._spans)

    def meta(self, key: str) -> TensorMeta:
        return self._spans[key].meta

    def get(self, key: str) -> Tensor:
        span = self._spans[key]
        if self._file is None:
            raise ValueError(f"{self.name} is closed")
        pool = _read_buffers.get()
        data = pool.take(span.nbytes) if pool is not None else torch.empty(span.nbytes, dtype=torch.uint8)
        view = memoryview(data.numpy())
        done = 0
        try:
            self._file.seek(span.start)
            # A single read() returns at most ~2 GiB on Linux, and less on some file systems: loop.
            while done < span.nbytes:
                got = self._file.readinto(view[done:])
                if not got:
                    raise _bad_file(
                        self.path,
                        f"tensor '{key}' is cut short at byte {span.start + done} (file truncated while reading)",
                    )
                done += got
        except OSError as exc:
            raise MergeInputError(
                f"{self.path}: cannot read tensor '{key}' ({exc.strerror}); check the file and disk"
            ) from None
        return data.view(span.meta.dtype).reshape(span.meta.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


_CONVERT_HINT = (
    "in code you trust, save the weights alone: torch.save(model.state_dict(), 'model.pt') "
    "or safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
)


class TorchReader(CheckpointReader):
    """A torch state dict file, loaded with ``weights_only=True`` and memory-mapped where possible."""

    def __init__(self, path: Path | str, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(self.path)
        # Only the zip format (torch >= 1.6 default) can be mapped; legacy files load whole.
        self.mapped = zipfile.is_zipfile(self.path)
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=self.mapped)
        except pickle.UnpicklingError:
            raise MergeInputError(
                f"{self.path}: torch.load(weights_only=True) refuses it (not a plain state dict, e.g. a pickled "
                f"nn.Module, which is never unpickled here, or not a torch file at all); {_CONVERT_HINT}"
            ) from None
        except OSError as exc:
            raise MergeInputError(
                f"{self.path}: cannot open ({exc.strerror}); check the path and its permissions"
            ) from None
        except Exception as exc:  # torch reports corrupt files as RuntimeError, EOFError, KeyError, ...
            raise _bad_file(self.path, f"unreadable or truncated torch checkpoint ({type(exc).__name__})") from None
        if not isinstance(state, Mapping):
            raise MergeInputError(f"{self.path}: holds a {type(state).__name__}, not a state dict; {_CONVERT_HINT}")
        for key, value in state.items():
            if not isinstance(value, Tensor) or not isinstance(key, str):
                hint = (
                    f"if '{key}' holds the weights, save it alone: torch.save(checkpoint['{key}'], 'model.pt')"
                    if isinstance(value, Mapping)
                    else _CONVERT_HINT
                )
                raise MergeInputError(f"{self.path}: entry '{key}' is a {type(value).__name__}, not a tensor; {hint}")
        self._state: Mapping[str, Tensor] | None = state

    def _tensors(self) -> Mapping[str, Tensor]:
        if self._state is None:
            raise ValueError(f"{self.name} is closed")
        return self._state

    def keys(self) -> list[str]:
        return list(self._tensors())

    def meta(self, key: str) -> TensorMeta:
        tensor = self._tensors()[key]
        return TensorMeta(tuple(tensor.shape), tensor.dtype)

    def get(self, key: str) -> Tensor:
        source = self._tensors()[key]
        tensor = source.clone()
        if self.mapped:
            release_pages(source)
        return tensor

    def close(self) -> None:
        self._state = None


def _open_file(path: Path, name: str) -> CheckpointReader:
    if path.name.endswith(".index.json"):
        return ShardedReader(path, name)
    if path.suffix == ".safetensors":
        return SafetensorsReader(path, name)
    if path.suffix in TORCH_SUFFIXES:
        return TorchReader(path, name)
    raise MergeInputError(
        f"{path}: unknown checkpoint format '{path.suffix}'; give a .safetensors file, a Hugging Face model "
        "folder, a *.index.json of shards, or a torch state dict (.pt/.pth/.bin)"
    )


def _escapes_folder(file_name: str) -> bool:
    """Whether a shard name of an index leaves its folder: absolute, or going up with ``..``.

    Judged on the name alone, not the resolved path: a Hugging Face cache folder holds symlinks to blobs
    elsewhere, which are the folder's own files."""
    name = PurePosixPath(file_name.replace("\\", "/"))
    return name.is_absolute() or ".." in name.parts or PureWindowsPath(file_name).drive != ""


class ShardedReader(CheckpointReader):
    """Shards listed by a Hugging Face ``*.index.json`` (``{"weight_map": {key: shard file}}``)."""

    def __init__(self, index_path: Path | str, name: str | None = None):
        self.path = Path(index_path)
        self.name = name or str(self.path)
        try:
            index = json.loads(self.path.read_text())
        except OSError as exc:
            raise MergeInputError(
                f"{self.path}: cannot open ({exc.strerror}); check the path and its permissions"
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _bad_file(self.path, "not a JSON shard index") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise _bad_file(self.path, "has no weight_map of tensor name → shard file")
        self._shards: dict[str, CheckpointReader] = {}
        self._where: dict[str, CheckpointReader] = {}
        try:
            for key, file_name in weight_map.items():
                if _escapes_folder(file_name):
                    raise MergeInputError(
                        f"{self.path}: weight_map entry '{key}' → '{file_name}' points outside the model folder; "
                        "shards must be files in that folder (fix the index or re-download the model)"
                    )
            for file_name in sorted(set(weight_map.values())):
                shard_path = self.path.parent / file_name
                if not shard_path.is_file():
                    raise MergeInputError(
                        f"{self.path}: shard '{file_name}' of its weight_map is missing; re-download the model"
                    )
                self._shards[file_name] = _open_file(shard_path, str(shard_path))
            for file_name, shard in self._shards.items():
                for key in shard.keys():
                    if weight_map.get(key) == file_name:
                        self._where[key] = shard
            absent = [key for key in weight_map if key not in self._where]
            if absent:
                raise _bad_file(
                    self.path.parent / weight_map[absent[0]],
                    f"tensor '{absent[0]}' listed in {self.path.name} is not in this shard",
                )
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, key: str) -> TensorMeta:
        return self._where[key].meta(key)

    def get(self, key: str) -> Tensor:
        return self._where[key].get(key)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


# In order of preference; a pattern that matches several files is ambiguous, not a choice to guess.
_FOLDER_PATTERNS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "*.safetensors.index.json",
    "*.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
)


def find_weights(folder: Path) -> Path:
    """The weight file (or shard index) of a model folder, preferring safetensors as transformers does."""
    for pattern in _FOLDER_PATTERNS:
        matches = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches[:3])
            raise MergeInputError(
                f"{folder}: several weight files ({names}, ...) and no shard index; pass the checkpoint file itself"
            )
    raise MergeInputError(
        f"{folder}: no weights found (model.safetensors, *.safetensors.index.json, *.safetensors, "
        "pytorch_model.bin, *.pt, *.pth); pass the checkpoint file itself"
    )


def open_checkpoint(path: Path | str, name: str | None = None) -> CheckpointReader:
    """A lazy reader for a safetensors file, a torch state dict, a shard index or an HF model folder."""
    path = Path(path)
    label = name or str(path)
    if path.is_dir():
        reader = _open_file(find_weights(path), label)
        reader.model_folder = path
        return reader
    if not path.exists():
        raise MergeInputError(f"{path}: no such file or folder; check the path")
    return _open_file(path, label)
