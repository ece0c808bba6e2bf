"""Checkpoints on disk, one tensor at a time: lazy readers and an atomic, sharded safetensors writer.

Readers (each an :class:`magmax.engine.TensorReader`, opened by :func:`open_checkpoint`):

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

Writer: the output's keys, shapes and dtypes are known before the first tensor is merged (they are the
base's), so :class:`ShardedSafetensorsWriter` plans the shards up front, writes each shard's header
when the shard is opened, and streams every tensor to its offset as it arrives: nothing is buffered
beyond the tensor in hand and the shard names (``model-00001-of-0000N``) are final from the start.
:class:`AtomicOutput` puts it all in a hidden folder next to OUT that is renamed into place at the
end, so OUT is complete or absent.

safetensors format: 8-byte little-endian header length N, N bytes of JSON
``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` (offsets relative
to the end of the header, tiling the data without gaps), then the raw little-endian tensor data.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import stat
import struct
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from magmax.engine import TensorMeta
from magmax.errors import MergeInputError
from magmax.memory import release_pages
from magmax.thread_slot import ThreadSlot

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# The safetensors library refuses headers above 100 MB; so do we, before allocating one.
_MAX_HEADER_BYTES = 100_000_000

_CODE_TO_DTYPE: dict[str, torch.dtype] = {
    code: dtype
    for code, dtype in {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "U16": getattr(torch, "uint16", None),
        "I32": torch.int32,
        "U32": getattr(torch, "uint32", None),
        "I64": torch.int64,
        "U64": getattr(torch, "uint64", None),
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "C64": torch.complex64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    }.items()
    if dtype is not None
}
_DTYPE_TO_CODE = {dtype: code for code, dtype in _CODE_TO_DTYPE.items()}


def tensor_nbytes(meta: TensorMeta) -> int:
    return meta.numel * meta.dtype.itemsize


# -- readers ------------------------------------------------------------------------------------------


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
        if code not in _CODE_TO_DTYPE:
            raise MergeInputError(
                f"{path}: tensor '{key}' has dtype {code}, which this torch ({torch.__version__}) cannot hold; "
                "convert the checkpoint to a float or integer dtype torch supports"
            )
        meta = TensorMeta(shape, _CODE_TO_DTYPE[code])
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


# -- writer ---------------------------------------------------------------------------------------------


def plan_shards(
    entries: Sequence[tuple[str, TensorMeta]], max_shard_bytes: int | None
) -> list[list[tuple[str, TensorMeta]]]:
    """Split entries, in order, into shards of at most ``max_shard_bytes`` of tensor data.

    As in transformers: a new shard starts when the next tensor would overflow the current non-empty
    one, so a tensor larger than the limit gets a shard of its own. ``None``: a single shard.
    """
    shards: list[list[tuple[str, TensorMeta]]] = [[]]
    size = 0
    for key, meta in entries:
        nbytes = tensor_nbytes(meta)
        if shards[-1] and max_shard_bytes is not None and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, meta))
        size += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """Hugging Face names: ``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors``."""
    if count == 1:
        return [SINGLE_FILE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(
    entries: Sequence[tuple[str, TensorMeta]], metadata: Mapping[str, str]
) -> tuple[bytes, list[int]]:
    """The header bytes of a safetensors file holding ``entries`` in order, and each entry's data offset.

    The JSON is padded with spaces to a multiple of 8 bytes (as the safetensors library does) so the
    data that follows is 8-byte aligned.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets = []
    position = 0
    for key, meta in entries:
        if meta.dtype not in _DTYPE_TO_CODE:
            raise MergeInputError(
                f"tensor '{key}' has dtype {meta.dtype}, which safetensors cannot store; choose --dtype"
            )
        nbytes = tensor_nbytes(meta)
        header[key] = {
            "dtype": _DTYPE_TO_CODE[meta.dtype],
            "shape": list(meta.shape),
            "data_offsets": [position, position + nbytes],
        }
        offsets.append(position)
        position += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


@dataclass
class _Slot:
    shard: int
    offset: int  # absolute offset in the shard file
    meta: TensorMeta
    written: bool = False


class ShardedSafetensorsWriter:
    """A :class:`~magmax.engine.TensorWriter` streaming into safetensors shards planned up front.

    ``entries`` are the output's (key, shape/dtype), in the order they will mostly arrive; any order
    works (each tensor is written at its planned offset) and each shard file is closed as soon as its
    last tensor is in. :meth:`close` checks that every planned tensor came and writes the index
    (``model.safetensors.index.json``) when there are several shards.
    """

    def __init__(
        self,
        folder: Path | str,
        entries: Sequence[tuple[str, TensorMeta]],
        max_shard_bytes: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        self.folder = Path(folder)
        shards = plan_shards(entries, max_shard_bytes)
        self.file_names = shard_file_names(len(shards))
        self.total_bytes = sum(tensor_nbytes(meta) for _, meta in entries)
        self._headers: list[bytes] = []
        self._slots: dict[str, _Slot] = {}
        self._pending = [len(shard) for shard in shards]
        self._files: dict[int, io.FileIO] = {}
        for index, shard in enumerate(shards):
            header, offsets = safetensors_header(shard, {"format": "pt", **(metadata or {})})
            self._headers.append(header)
            for (key, meta), offset in zip(shard, offsets):
                if key in self._slots:
                    raise ValueError(f"tensor '{key}' planned twice")
                self._slots[key] = _Slot(index, len(header) + offset, meta)
        for index, count in enumerate(self._pending):
            if count == 0:  # an empty model: its one shard is just the header
                self._write_at(index, 0, b"")
                self._close_shard(index)

    def _path(self, shard: int) -> Path:
        return self.folder / self.file_names[shard]

    def _write_at(self, shard: int, offset: int, data: memoryview | bytes) -> None:
        path = self._path(shard)
        try:
            if shard not in self._files:
                self._files[shard] = io.FileIO(path, "w")
                self._write_all(self._files[shard], memoryview(self._headers[shard]))
            handle = self._files[shard]
            handle.seek(offset)
            self._write_all(handle, memoryview(data))
        except OSError as exc:
            raise MergeInputError(
                f"{path}: cannot write ({exc.strerror}); free disk space or choose another output"
            ) from None

    @staticmethod
    def _write_all(handle: io.FileIO, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += handle.write(data[done:]) or 0

    def _close_shard(self, shard: int) -> None:
        handle = self._files.pop(shard, None)
        if handle is not None:
            handle.close()

    @staticmethod
    def _data(key: str, slot: _Slot, tensor: Tensor) -> memoryview:
        if tuple(tensor.shape) != slot.meta.shape or tensor.dtype != slot.meta.dtype:
            raise ValueError(
                f"tensor '{key}' is {tuple(tensor.shape)} {tensor.dtype}, planned {slot.meta.shape} {slot.meta.dtype}"
            )
        return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    def write(self, key: str, tensor: Tensor) -> None:
        slot = self._slots.get(key)
        if slot is None or slot.written:
            raise ValueError(f"tensor '{key}' was not planned for this output, or is written twice")
        self._write_at(slot.shard, slot.offset, self._data(key, slot, tensor))
        slot.written = True
        self._pending[slot.shard] -= 1
        if self._pending[slot.shard] == 0:
            self._close_shard(slot.shard)

    def replace(self, key: str, tensor: Tensor) -> None:
        """Overwrite a tensor written before, in place (its shard may be closed already)."""
        slot = self._slots.get(key)
        if slot is None or not slot.written:
            raise ValueError(f"tensor '{key}' cannot be replaced: it was not written")
        data = self._data(key, slot, tensor)
        if slot.shard in self._files:
            self._write_at(slot.shard, slot.offset, data)
            return
        path = self._path(slot.shard)
        try:
            with io.FileIO(path, "r+") as handle:
                handle.seek(slot.offset)
                self._write_all(handle, data)
        except OSError as exc:
            raise MergeInputError(
                f"{path}: cannot write ({exc.strerror}); free disk space or choose another output"
            ) from None

    def close(self) -> list[Path]:
        """Finish: all planned tensors must have been written. Returns the files written."""
        missing = [key for key, slot in self._slots.items() if not slot.written]
        if missing:
            self.abort()
            raise ValueError(f"tensor '{missing[0]}' was never written ({len(missing)} missing in all)")
        paths = [self._path(i) for i in range(len(self.file_names))]
        if len(paths) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {key: self.file_names[self._slots[key].shard] for key in sorted(self._slots)},
            }
            index_path = self.folder / INDEX_FILE_NAME
            try:
                index_path.write_text(json.dumps(index, indent=2) + "\n")
            except OSError as exc:
                raise MergeInputError(
                    f"{index_path}: cannot write ({exc.strerror}); free disk space or choose another output"
                ) from None
            paths.append(index_path)
        return paths

    def abort(self) -> None:
        """Close any open shard (the files are removed with the temporary folder)."""
        for shard in list(self._files):
            self._close_shard(shard)


# -- output folder ----------------------------------------------------------------------------------


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
