"""The sharded safetensors writer, against the safetensors library as oracle."""

from __future__ import annotations

import json
import random

import pytest
import safetensors.torch as st
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from checkpoint_helpers import assert_same, load_output, state_dicts, write_checkpoint

from magmax.checkpoints import SafetensorsReader, ShardedSafetensorsWriter, plan_shards, tensor_nbytes
from magmax.engine import TensorMeta


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=state_dicts, max_bytes=hs.one_of(hs.none(), hs.integers(1, 200)), seed=hs.integers(0, 100))
def test_writer_round_trips_through_the_library_in_any_order(tmp_path_factory, state, max_bytes, seed):
    folder = tmp_path_factory.mktemp("out")
    order = list(state)
    random.Random(seed).shuffle(order)
    files = write_checkpoint(folder, state, max_bytes, order)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in files)
    assert_same(load_output(folder), state)
    shards = [p for p in files if p.suffix == ".safetensors"]
    if len(shards) == 1:
        assert shards[0].name == "model.safetensors"
    else:
        n = len(shards)
        assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    for shard in shards:
        with SafetensorsReader(shard) as reader:
            assert reader.metadata["format"] == "pt"  # transformers checks it


@given(
    sizes=hs.lists(hs.integers(0, 50), max_size=20),
    max_bytes=hs.integers(1, 120),
)
def test_plan_shards_is_greedy_and_bounded(sizes, max_bytes):
    entries = [(f"t{i}", TensorMeta((n,), torch.uint8)) for i, n in enumerate(sizes)]
    shards = plan_shards(entries, max_bytes)
    assert [e for shard in shards for e in shard] == entries
    totals = [sum(tensor_nbytes(m) for _, m in shard) for shard in shards]
    for shard, total in zip(shards, totals):
        assert total <= max_bytes or len(shard) == 1
    # a new shard only starts because the next tensor did not fit in the previous one
    for prev_total, nxt in zip(totals, shards[1:]):
        assert prev_total + tensor_nbytes(nxt[0][1]) > max_bytes
    assert len(plan_shards(entries, None)) == 1


def test_writer_refuses_unplanned_or_mismatched_tensors(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, [("a", TensorMeta((2,), torch.float32))])
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="not planned"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    writer.abort()


def test_writer_streams_without_buffering(tmp_path):
    # Each tensor is on disk as soon as write() returns: the file grows tensor by tensor.
    state = {f"t{i}": torch.full((1000,), float(i)) for i in range(3)}
    writer = ShardedSafetensorsWriter(tmp_path, [(k, TensorMeta((1000,), torch.float32)) for k in state])
    sizes = []
    for key, value in state.items():
        writer.write(key, value)
        sizes.append((tmp_path / "model.safetensors").stat().st_size)
    writer.close()
    assert sizes[0] < sizes[1] < sizes[2]
    assert_same(st.load_file(tmp_path / "model.safetensors"), state)
