"""Checkpoints on disk, one tensor at a time: lazy readers and an atomic, sharded safetensors writer.

One module per job: :mod:`.reading` (the readers), :mod:`.writing` (shard planning and the writer),
:mod:`.output` (the atomic output folder), :mod:`.format` (what they share of the safetensors format).
Every name is importable from ``magmax.checkpoints`` as well.

Readers: a ``.safetensors`` file (positioned reads, no memory map), a Hugging Face model folder or shard
index, a torch state dict (``weights_only=True``, memory-mapped). Writer: safetensors shards planned up
front and streamed tensor by tensor. Output: a hidden folder next to OUT renamed into place at the end,
so OUT is complete or absent.
"""

from magmax.checkpoints.format import INDEX_FILE_NAME, SINGLE_FILE_NAME, tensor_nbytes
from magmax.checkpoints.output import AtomicOutput, copy_model_files, remove_stale_partials
from magmax.checkpoints.reading import (
    TORCH_SUFFIXES,
    CheckpointReader,
    ReadBuffers,
    SafetensorsReader,
    ShardedReader,
    TorchReader,
    find_weights,
    open_checkpoint,
    read_safetensors_header,
    recycled_read_buffers,
)
from magmax.checkpoints.writing import ShardedSafetensorsWriter, plan_shards, safetensors_header, shard_file_names

__all__ = [
    "INDEX_FILE_NAME",
    "SINGLE_FILE_NAME",
    "TORCH_SUFFIXES",
    "AtomicOutput",
    "CheckpointReader",
    "ReadBuffers",
    "SafetensorsReader",
    "ShardedReader",
    "ShardedSafetensorsWriter",
    "TorchReader",
    "copy_model_files",
    "find_weights",
    "open_checkpoint",
    "plan_shards",
    "read_safetensors_header",
    "recycled_read_buffers",
    "remove_stale_partials",
    "safetensors_header",
    "shard_file_names",
    "tensor_nbytes",
]
