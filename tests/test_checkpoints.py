"""Checkpoint readers and the sharded writer, against the safetensors / torch libraries as oracles."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from magmax.checkpoints import (
    AtomicOutput,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    TorchReader,
    copy_model_files,
    find_weights,
    open_checkpoint,
    plan_shards,
    tensor_nbytes,
)
from magmax.engine import TensorMeta
from magmax.errors import MergeInputError
from magmax.memory import format_bytes, peak_rss_bytes, release_pages, run_measured

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


# -- reading safetensors ----------------------------------------------------------------------------


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


# -- writing -------------------------------------------------------------------------------------------


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


# -- output folder ------------------------------------------------------------------------------------


def test_atomic_output_appears_only_on_commit(tmp_path):
    out = tmp_path / "merged"
    with AtomicOutput(out) as output:
        (output.folder / "model.safetensors").write_bytes(b"x")
        assert not out.exists()
        output.commit()
    assert (out / "model.safetensors").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError):
        with AtomicOutput(out) as output:
            (output.folder / "model.safetensors").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_removes_the_folders_it_made_on_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(RuntimeError):
        with AtomicOutput(tmp_path / "a" / "b" / "c" / "merged"):
            assert (tmp_path / "a" / "b" / "c").is_dir()
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.rglob("*")] == ["a"]


def test_atomic_output_existing_needs_force(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(MergeInputError, match="already exists; pass --force"):
        AtomicOutput(out)
    with AtomicOutput(out, force=True) as output:
        (output.folder / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # replaced only at commit
        output.commit()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_atomic_single_file(tmp_path):
    out = tmp_path / "merged.safetensors"
    with AtomicOutput(out) as output:
        assert output.single_file
        (output.folder / "model.safetensors").write_bytes(b"abc")
        output.commit()
    assert out.read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_output_folder_mode_follows_the_umask(tmp_path, umask):
    """As ``mkdir`` makes it (0777 & ~umask), not a private temporary folder's 0700."""
    previous = os.umask(umask)
    try:
        with AtomicOutput(tmp_path / "merged") as output:
            (output.folder / "model.safetensors").write_bytes(b"x")
            output.commit()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o777 & ~umask


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    return child.pid


def test_stale_partial_folders_of_dead_merges_are_removed(tmp_path):
    """A merge killed by SIGKILL leaves its work folder; the next merge of the same output removes it,
    and only it: a live process's folder (a concurrent merge), another host's, another output's stay."""
    from magmax.checkpoints import _HOST

    dead, alive = _dead_pid(), os.getppid()
    names = {
        "stale": f".merged.{dead}@{_HOST}.0123abcd.partial",
        "concurrent": f".merged.{alive}@{_HOST}.4567abcd.partial",
        "other host": f".merged.{dead}@{_HOST}x.89abcdef.partial",
        "other output": f".merged2.{dead}@{_HOST}.01234567.partial",
        "not ours": ".merged.k3j_x9.partial",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"part")
    with AtomicOutput(tmp_path / "merged") as output:
        assert output.folder.name.startswith(f".merged.{os.getpid()}@{_HOST}.")
        output.commit()
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted(["merged", *(names[k] for k in ("concurrent", "other host", "other output", "not ours"))])


def test_output_may_not_be_or_contain_an_input(tmp_path):
    (tmp_path / "base").mkdir()
    with pytest.raises(MergeInputError, match="is or contains the input"):
        AtomicOutput(tmp_path / "base", force=True, inputs=[tmp_path / "base"])
    with pytest.raises(MergeInputError, match="is or contains the input"):
        AtomicOutput(tmp_path, force=True, inputs=[tmp_path / "base" / "model.safetensors"])


def test_copy_model_files_skips_weights(tmp_path):
    src = tmp_path / "src"
    (src / "1_Pooling").mkdir(parents=True)
    (src / ".cache").mkdir()
    for name in [
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "generation_config.json",
        "1_Pooling/config.json",
        ".cache/x",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "model.onnx",
    ]:
        (src / name).write_text(name)
    dst = tmp_path / "dst"
    dst.mkdir()
    copy_model_files(src, dst)
    found = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert found == ["1_Pooling/config.json", "config.json", "generation_config.json", "tokenizer.json", "vocab.txt"]
    assert (dst / "vocab.txt").read_text() == "vocab.txt"


# -- memory helpers ---------------------------------------------------------------------------------


def test_run_measured_sees_a_childs_peak(tmp_path):
    code = "x = b'1' * 200_000_000"
    result = run_measured([sys.executable, "-c", code])
    assert result.returncode == 0
    # its own peak, not the resident size of this (torch-importing) test process that spawned it
    assert 200e6 <= result.peak_rss_bytes < 260e6
    assert peak_rss_bytes() > 0


def test_run_measured_applies_the_address_space_limit():
    code = "x = bytearray(500_000_000)"
    result = run_measured([sys.executable, "-c", code], address_space_limit=300_000_000)
    assert result.returncode != 0 and "MemoryError" in result.stderr


def test_release_pages_keeps_the_data_of_a_mapping(tmp_path):
    path = tmp_path / "t.pt"
    value = torch.randn(100_000)
    torch.save({"v": value}, path)
    mapped = torch.load(path, mmap=True, weights_only=True)["v"]
    assert torch.equal(mapped, value)
    release_pages(mapped)
    assert torch.equal(mapped, value)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1_500_000) == "1.5 MB"
    assert format_bytes(2_000_000_000) == "2.0 GB"
    assert format_bytes(3e12) == "3000.0 GB"


def test_recycled_read_buffers_are_never_shared_by_live_tensors(tmp_path):
    """A read reuses a buffer only once no tensor (nor view of one) read into it is alive."""
    from magmax.checkpoints import SafetensorsReader, recycled_read_buffers

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
