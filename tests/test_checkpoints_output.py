"""The atomic output folder: OUT complete or absent, stale work folders removed, model files copied."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from magmax.checkpoints import AtomicOutput, copy_model_files
from magmax.errors import MergeInputError


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
    from magmax.checkpoints.output import _HOST

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
