"""What the checkpoint tests share: tensors of every dtype, hypothesis state dicts, the written
checkpoint read back through the safetensors library alone (import as ``checkpoint_helpers``)."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch as st
import torch
from hypothesis import strategies as hs

from magmax.checkpoints import ShardedSafetensorsWriter
from magmax.engine import TensorMeta


DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


shapes = hs.lists(hs.integers(0, 5), min_size=0, max_size=3).map(tuple)
state_dicts = hs.dictionaries(
    hs.text("abcdefgh._", min_size=1, max_size=8),
    hs.tuples(shapes, hs.sampled_from(DTYPES)),
    min_size=0,
    max_size=8,
).map(lambda spec: {k: make_tensor(shape, dtype, i) for i, (k, (shape, dtype)) in enumerate(spec.items())})


def load_output(out: Path) -> dict[str, torch.Tensor]:
    """The written checkpoint through the safetensors library alone (the index read by hand)."""
    if out.is_file():
        return st.load_file(out)
    index = out / "model.safetensors.index.json"
    if not index.exists():
        return st.load_file(out / "model.safetensors")
    weight_map = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        shard = st.load_file(out / name)
        assert {k for k, v in weight_map.items() if v == name} == set(shard)
        state.update(shard)
    return state


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def write_checkpoint(
    folder: Path, state: dict[str, torch.Tensor], max_shard_bytes: int | None, order=None
) -> list[Path]:
    entries = [(k, TensorMeta(tuple(v.shape), v.dtype)) for k, v in state.items()]
    writer = ShardedSafetensorsWriter(folder, entries, max_shard_bytes)
    for key in order or state:
        writer.write(key, state[key])
    return writer.close()
