"""Checkpoint readers (safetensors files, model folders and shard indexes, torch files), against the
safetensors / torch libraries as oracles."""

from __future__ import annotations

import json
import sys

import pytest
import safetensors.torch as st
import torch
from hypothesis import HealthCheck, given, settings

from checkpoint_helpers import DTYPES, assert_same, make_tensor, state_dicts, write_checkpoint

from magmax.checkpoints import (
    SafetensorsReader,
    TorchReader,
    find_weights,
    open_checkpoint,
    recycled_read_buffers,
)
from magmax.engine import TensorMeta
from magmax.errors import MergeInputError
from magmax.memory import format_bytes, run_measured


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=state_dicts)
def test_safetensors_reader_equals_the_library(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("st") / "m.safetensors"
    st.save_file(state, path, metadata={"note": "x"})
    with SafetensorsReader(path) as reader:
        assert set(reader.keys()) == set(state)
        assert reader.metadata == {"note": "x"}
        for key, value in state.items():
            assert reader.meta(key) == TensorMeta(tuple(value.shape), value.dtype)
            got = reader.get(key)
            assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value)


def test_reader_keys_come_in_file_order(tmp_path):
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(6)}
    path = tmp_path / "m.safetensors"
    st.save_file(state, path)
    with SafetensorsReader(path) as reader:
        offsets = [reader._spans[k].start for k in reader.keys()]
    assert offsets == sorted(offsets)


def test_reader_returns_tensors_the_caller_owns(tmp_path):
    path = tmp_path / "m.safetensors"
    st.save_file({"w": torch.ones(4)}, path)
    with SafetensorsReader(path) as reader:
        reader.get("w").mul_(5)
        assert torch.equal(reader.get("w"), torch.ones(4))


@pytest.mark.parametrize("cut", [0, 4, 8, 30, -1, -12])
def test_truncated_safetensors_names_the_file(tmp_path, cut):
    good = tmp_path / "good.safetensors"
    st.save_file({"a": torch.ones(3), "b": torch.zeros(2, 2)}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(MergeInputError, match=r"bad\.safetensors: .*re-download or re-save"):
        SafetensorsReader(bad)
    # the oracle agrees that it is broken
    with pytest.raises(Exception):
        st.load_file(bad)


@pytest.mark.parametrize(
    "content, why",
    [
        (b"not a safetensors file at all, just text", "truncated or not a safetensors"),
        ((10).to_bytes(8, "little") + b"{not json}", "not JSON"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
        ((40).to_bytes(8, "little") + b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}'[:40], "not JSON"),
    ],
)
def test_garbage_files_are_refused(tmp_path, content, why):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(MergeInputError, match=why):
        SafetensorsReader(path)


def _raw_safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize(
    "header, data, why",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "do not fit its shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap or overlap"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 6, "trailing bytes"),
        ({"a": {"dtype": "XYZ", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype XYZ"),
        ({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "tensor 'a' has a malformed header entry"),
    ],
)
def test_inconsistent_headers_are_refused(tmp_path, header, data, why):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_raw_safetensors(header, data))
    with pytest.raises(MergeInputError, match=why):
        SafetensorsReader(path)


# -- folders and shards ----------------------------------------------------------------------------------


def test_sharded_folder_reads_like_the_state_dict(tmp_path):
    state = {f"layer{i}.w": make_tensor((4, 3), torch.float32, i) for i in range(7)}
    state["mask"] = make_tensor((5,), torch.bool, 99)
    write_checkpoint(tmp_path, state, max_shard_bytes=100)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    with open_checkpoint(tmp_path) as reader:
        assert reader.model_folder == tmp_path
        assert set(reader.keys()) == set(state)
        assert_same({k: reader.get(k) for k in reader.keys()}, state)


def test_sharded_torch_bins_read_like_the_state_dict(tmp_path):
    # older Hugging Face folders: pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json
    state = {f"w{i}": make_tensor((3, i + 1), torch.float32, i) for i in range(4)}
    weight_map = {}
    for part, keys in enumerate([["w0", "w1"], ["w2", "w3"]], 1):
        name = f"pytorch_model-0000{part}-of-00002.bin"
        torch.save({k: state[k] for k in keys}, tmp_path / name)
        weight_map.update({k: name for k in keys})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(tmp_path) as reader:
        assert_same({k: reader.get(k) for k in reader.keys()}, state)


def test_missing_shard_is_named(tmp_path):
    state = {f"w{i}": torch.ones(10) for i in range(4)}
    write_checkpoint(tmp_path, state, max_shard_bytes=50)
    (tmp_path / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(MergeInputError, match="shard 'model-00002-of-00004.safetensors'.*missing"):
        open_checkpoint(tmp_path)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    write_checkpoint(tmp_path, {"a": torch.ones(10), "b": torch.ones(10)}, max_shard_bytes=50)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(MergeInputError, match="tensor 'ghost' listed in model.safetensors.index.json"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_shards_outside_the_model_folder_are_refused(tmp_path, where):
    """A weight_map naming a file outside its folder (``../``, an absolute path) is never read, even
    when that file is a valid shard."""
    model = tmp_path / "hub" / "model"
    model.mkdir(parents=True)
    st.save_file({"a": torch.ones(3)}, model / "model-00001-of-00002.safetensors")
    st.save_file({"b": torch.full((3,), 7.0)}, tmp_path / "elsewhere.safetensors")
    outside = "../../elsewhere.safetensors" if where == "parent" else str(tmp_path / "elsewhere.safetensors")
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": outside}}))
    with pytest.raises(MergeInputError) as info:
        open_checkpoint(model)
    assert str(info.value) == (
        f"{index}: weight_map entry 'b' → '{outside}' points outside the model folder; "
        "shards must be files in that folder (fix the index or re-download the model)"
    )


def test_index_shards_in_a_subfolder_are_read(tmp_path):
    (tmp_path / "shards").mkdir()
    st.save_file({"a": torch.ones(3)}, tmp_path / "shards" / "one.safetensors")
    st.save_file({"b": torch.full((3,), 7.0)}, tmp_path / "shards" / "two.safetensors")
    weight_map = {"a": "shards/one.safetensors", "b": "./shards/two.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(tmp_path) as reader:
        assert_same({k: reader.get(k) for k in reader.keys()}, {"a": torch.ones(3), "b": torch.full((3,), 7.0)})


def test_find_weights_prefers_safetensors_and_refuses_ambiguity(tmp_path):
    st.save_file({"a": torch.ones(1)}, tmp_path / "model.safetensors")
    torch.save({"a": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    assert find_weights(tmp_path).name == "model.safetensors"
    (tmp_path / "model.safetensors").unlink()
    assert find_weights(tmp_path).name == "pytorch_model.bin"
    other = tmp_path / "two"
    other.mkdir()
    st.save_file({"a": torch.ones(1)}, other / "a.safetensors")
    st.save_file({"a": torch.ones(1)}, other / "b.safetensors")
    with pytest.raises(MergeInputError, match="several weight files"):
        find_weights(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MergeInputError, match="no weights found"):
        find_weights(empty)


def test_unknown_path_and_format(tmp_path):
    with pytest.raises(MergeInputError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nope.safetensors")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(MergeInputError, match="unknown checkpoint format '.npz'"):
        open_checkpoint(odd)


# -- torch files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_reader_equals_torch_load(tmp_path, zip_format):
    state = {f"t{i}": make_tensor((3, 2), dtype, i) for i, dtype in enumerate(DTYPES)}
    state["view"] = state["t0"].t()  # non-contiguous, shares storage
    path = tmp_path / "m.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    with open_checkpoint(path) as reader:
        assert isinstance(reader, TorchReader) and reader.mapped == zip_format
        for key, value in state.items():
            assert reader.meta(key) == TensorMeta(tuple(value.shape), value.dtype)
            got = reader.get(key)
            assert torch.equal(got, value)
            # a second read after the pages were released gives the same values
            assert torch.equal(reader.get(key), value)


def test_pickled_module_is_refused_with_how_to_convert(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(
        MergeInputError, match=r"model\.pt: torch\.load\(weights_only=True\) refuses it.*state_dict\(\)"
    ):
        open_checkpoint(path)


def test_nested_checkpoint_is_refused_with_how_to_unwrap(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    with pytest.raises(MergeInputError, match=r"entry 'state_dict' is a dict.*torch\.save\(checkpoint\['state_dict'\]"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    "content, why",
    [
        ("half", "unreadable or truncated torch checkpoint"),
        (b"", "unreadable or truncated torch checkpoint"),
        # parses as a pickle stream the weights-only unpickler refuses
        (b"garbage bytes" * 10, r"torch\.load\(weights_only=True\) refuses it.*or not a torch file"),
    ],
)
def test_broken_torch_files_are_named(tmp_path, content, why):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(100)}, good)
    data = good.read_bytes()[: good.stat().st_size // 2] if content == "half" else content
    path = tmp_path / "broken.bin"
    path.write_bytes(data)
    with pytest.raises(MergeInputError, match=r"broken\.bin: " + why):
        open_checkpoint(path)


def test_mapped_torch_reads_release_their_pages(tmp_path):
    """Reading a memory-mapped torch file tensor by tensor does not leave it resident (child process)."""
    path = tmp_path / "big.pt"
    torch.save({f"t{i}": torch.randn(1_000_000) for i in range(40)}, path)  # 160 MB
    code = (
        "import sys, psutil; from magmax.checkpoints import TorchReader\n"
        "r = TorchReader(sys.argv[1]); before = psutil.Process().memory_info().rss\n"
        "for k in r.keys(): r.get(k)\n"
        "print(psutil.Process().memory_info().rss - before)"
    )
    result = run_measured([sys.executable, "-c", code, str(path)])
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.strip())
    assert growth < 40e6, f"resident memory grew by {format_bytes(growth)} reading a 160 MB file"


# -- recycled read buffers --------------------------------------------------------------------------


def test_recycled_read_buffers_are_never_shared_by_live_tensors(tmp_path):
    """A read reuses a buffer only once no tensor (nor view of one) read into it is alive."""
    state = {"a": torch.arange(12.0), "b": -torch.arange(12.0), "c": torch.arange(6, dtype=torch.int64)}
    path = tmp_path / "m.safetensors"
    st.save_file(state, path)
    reader = SafetensorsReader(path)
    with recycled_read_buffers(nbytes=48, count=2) as pool:
        a = reader.get("a")
        view = a[3:]  # a view keeps a's buffer busy after a itself is gone
        del a
        b = reader.get("b")
        assert b.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()
        c = reader.get("c")  # both pool buffers busy: fresh memory
        assert len(pool._buffers) == 2
        for got, key in ((view, "a"), (b, "b"), (c, "c")):
            want = state[key][3:] if key == "a" else state[key]
            assert torch.equal(got, want), key
        del view
        again = reader.get("a")  # a's buffer is free again: reused, and holds the right values
        assert torch.equal(again, state["a"]) and len(pool._buffers) == 2
        assert again.untyped_storage().data_ptr() == pool._buffers[0].untyped_storage().data_ptr()
        assert torch.equal(b, state["b"])
    reader.close()
