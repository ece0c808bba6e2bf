"""Save and load nested run state (dicts/lists/tuples of tensors and scalars) without pickle.

Tensors go to one safetensors file under generated names; the structure and scalars go to JSON
beside it. Used for resumable runs (merger states, method statistics), never for user checkpoints.
Writes are atomic: temporary files renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"


def flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj``; tensors are moved into ``tensors`` under generated names."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {_TENSOR: name}
    if isinstance(obj, tuple):
        return {_TUPLE: [flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [flatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, int) for k in obj) and obj:
            return {_INTKEYS: {str(k): flatten(v, tensors) for k, v in obj.items()}}
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("state dicts must have string (or all-int) keys")
        return {k: flatten(v, tensors) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save object of type {type(obj).__name__} in run state")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if _TUPLE in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton[_TUPLE])
        if _INTKEYS in skeleton:
            return {int(k): unflatten(v, tensors) for k, v in skeleton[_INTKEYS].items()}
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def save_state(obj: Any, path: str | Path) -> None:
    """Write ``path``.json and ``path``.safetensors atomically (JSON last: it marks the pair complete)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(obj, tensors)
    tmp_st = path.with_name(path.name + ".safetensors.tmp")
    save_file(tensors, str(tmp_st))
    os.replace(tmp_st, path.with_name(path.name + ".safetensors"))
    tmp_js = path.with_name(path.name + ".json.tmp")
    tmp_js.write_text(json.dumps(skeleton))
    os.replace(tmp_js, path.with_name(path.name + ".json"))


def load_state(path: str | Path) -> Any:
    path = Path(path)
    skeleton = json.loads(path.with_name(path.name + ".json").read_text())
    tensors = load_file(str(path.with_name(path.name + ".safetensors")))
    return unflatten(skeleton, tensors)
