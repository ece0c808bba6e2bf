"""The safetensors format as the readers and the writer of this package share it: file names, dtype
codes, tensor sizes.

safetensors format: 8-byte little-endian header length N, N bytes of JSON
``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` (offsets relative
to the end of the header, tiling the data without gaps), then the raw little-endian tensor data.
"""

from __future__ import annotations

import torch

from magmax.engine import TensorMeta

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

CODE_TO_DTYPE: dict[str, torch.dtype] = {
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
DTYPE_TO_CODE = {dtype: code for code, dtype in CODE_TO_DTYPE.items()}


def tensor_nbytes(meta: TensorMeta) -> int:
    return meta.numel * meta.dtype.itemsize
