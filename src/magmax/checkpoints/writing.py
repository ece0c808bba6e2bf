"""The sharded safetensors writer.

The output's keys, shapes and dtypes are known before the first tensor is merged (they are the base's),
so :class:`ShardedSafetensorsWriter` plans the shards up front (:func:`plan_shards`), writes each
shard's header when the shard is opened, and streams every tensor to its offset as it arrives: nothing
is buffered beyond the tensor in hand and the shard names (``model-00001-of-0000N``) are final from the
start.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from magmax.checkpoints.format import DTYPE_TO_CODE, INDEX_FILE_NAME, SINGLE_FILE_NAME, tensor_nbytes
from magmax.engine import TensorMeta
from magmax.errors import MergeInputError


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
        if meta.dtype not in DTYPE_TO_CODE:
            raise MergeInputError(
                f"tensor '{key}' has dtype {meta.dtype}, which safetensors cannot store; choose --dtype"
            )
        nbytes = tensor_nbytes(meta)
        header[key] = {
            "dtype": DTYPE_TO_CODE[meta.dtype],
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
