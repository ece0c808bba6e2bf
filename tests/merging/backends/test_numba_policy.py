"""The choice between the numba and the torch CPU kernels (magmax.merging.backends.cpu.numba_policy) and the check of
numba's on-disk cache it relies on (magmax.merging.backends.cpu.kernel_cache), on a cache folder of the test's own."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from magmax.merging.backends.cpu import kernel_cache, numba_policy
from magmax.merging.backends.cpu import native as _native

pytestmark = pytest.mark.skipif(kernel_cache.numba_version() is None, reason="numba not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty numba cache (NUMBA_CACHE_DIR), the default choice (MAGMAX_NATIVE unset), a fresh policy."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    monkeypatch.delenv("MAGMAX_NATIVE", raising=False)
    monkeypatch.delenv("MAGMAX_NATIVE_AFTER", raising=False)
    numba_policy.reset()
    yield kernel_cache.cache_dir()
    numba_policy.reset()


def _index(version: str, source: Path) -> bytes:
    # numba's index layout: pickle(numba version), then pickle((SHA-256 of the source, overloads))
    stamp = hashlib.sha256(source.read_bytes()).digest()
    return pickle.dumps(version, protocol=-1) + pickle.dumps((stamp, {"key": "k.1.nbc"}), protocol=-1)


def _fill(folder: Path, version: str | None = None, manifest: bool = True) -> list[str]:
    """Cache files as the warm-up leaves them: an index and a data file per kernel, and the manifest."""
    source = kernel_cache.kernel_source()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for kernel in ("add_scaled_fused-81", "ties_partial-548"):
        index, data = f"{source.stem}.{kernel}.py311.nbi", f"{source.stem}.{kernel}.py311.1.nbc"
        (folder / index).write_bytes(_index(version or kernel_cache.numba_version(), source))
        (folder / data).write_bytes(b"machine code")
        names += [index, data]
    (folder / "unrelated.other-1.py311.nbi").write_bytes(b"not ours")
    if manifest:
        kernel_cache.write_manifest(folder, kernel_cache.cache_files(folder))
    return names


def test_cache_dir_is_where_numba_writes(tmp_path):
    """The folder found without numba is the one numba's own locator picks for the kernels' file."""
    code = ("from magmax.merging.backends.cpu import kernels as k, kernel_cache as c; "
            "print(k.add_scaled_fused._cache.cache_path); print(c.cache_dir())")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    numba_says, we_say = out.split()
    assert numba_says == we_say
    assert Path(we_say).parent == tmp_path / "numba"


def test_empty_cache_chooses_torch_and_says_why(cache):
    assert not kernel_cache.kernels_cached()
    assert not numba_policy.use_numba() and not _native.enabled()
    assert numba_policy.declined()


def test_warmed_cache_chooses_numba(cache):
    names = _fill(cache)
    assert kernel_cache.cache_files(cache) == sorted(names)  # the unrelated file is not ours
    assert kernel_cache.kernels_cached()
    assert numba_policy.use_numba() and _native.enabled()
    assert not numba_policy.declined()


@pytest.mark.parametrize("spoil", ["no manifest", "data file gone", "index gone", "other numba", "other source"])
def test_cache_that_numba_would_miss_counts_as_cold(cache, spoil):
    names = _fill(cache, version="0.0.1" if spoil == "other numba" else None, manifest=spoil != "no manifest")
    if spoil == "data file gone":
        (cache / names[1]).unlink()
    if spoil == "index gone":
        (cache / names[2]).unlink()
    if spoil == "other source":  # the index of an older kernels file: its SHA-256 differs
        (cache / names[0]).write_bytes(pickle.dumps(kernel_cache.numba_version(), protocol=-1)
                                       + pickle.dumps((hashlib.sha256(b"old").digest(), {}), protocol=-1))
    assert not kernel_cache.kernels_cached()
    assert not numba_policy.use_numba()


def test_big_enough_merges_compile(cache, monkeypatch):
    """Cold cache: torch until the merges of the process reach the threshold, then numba for good."""
    monkeypatch.setenv("MAGMAX_NATIVE_AFTER", "1000")
    numba_policy.expect(600)
    assert not numba_policy.use_numba()
    numba_policy.expect(400)  # 1000 entries in all
    assert numba_policy.use_numba()
    numba_policy.expect(1)
    assert numba_policy.use_numba() and not numba_policy.declined()  # chosen: the compile is paid


def test_default_threshold_weighs_a_minilm_merge_below_it(cache):
    numba_policy.expect(22_700_000 * 4)  # MiniLM, θ0 and three fine-tunes
    assert not numba_policy.use_numba()
    numba_policy.expect(numba_policy.COMPILE_REPAYS_AT)
    assert numba_policy.use_numba()


def test_the_engine_tells_the_policy_the_merge_size(cache, monkeypatch):
    import torch

    from magmax.engine import DictReader, MergeRun
    from magmax.merging import create_method

    monkeypatch.setenv("MAGMAX_NATIVE_AFTER", str(3 * 100))
    base = {"w": torch.zeros(100), "steps": torch.zeros(5, dtype=torch.int64)}  # integer tensors are not merged
    readers = [DictReader(base, f"ft{i}") for i in range(2)]
    MergeRun(create_method("magmax"), DictReader(base, "base"), readers[:1])  # 200 entries
    assert not numba_policy.use_numba()
    MergeRun(create_method("magmax"), DictReader(base, "base"), readers[:1])  # 400 in all
    assert numba_policy.use_numba()


def test_explicit_flag_wins(cache, monkeypatch):
    monkeypatch.setenv("MAGMAX_NATIVE", "1")
    assert numba_policy.use_numba() and _native.enabled()
    _fill(cache)
    monkeypatch.setenv("MAGMAX_NATIVE", "0")
    assert not _native.enabled()


@pytest.mark.slow
def test_warm_up_compiles_and_records(tmp_path):
    """One method, one size: the manifest lists real numba cache files, and a new process sees them."""
    code = ("import torch; from magmax.merging.backends.cpu.kernel_warmup import warm_up; "
            "r = warm_up(tasks=(2,), dtypes=(torch.float32,), methods=(('magmax', {}),)); print(r.files)")
    check = "from magmax.merging.backends.cpu import kernel_cache as c; print(c.kernels_cached())"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    env.pop("MAGMAX_NATIVE", None)
    run = lambda c: subprocess.run([sys.executable, "-c", c], env=env, capture_output=True, text=True, check=True)  # noqa: E731
    assert run(check).stdout.strip() == "False"
    assert int(run(code).stdout.strip()) >= 2
    assert run(check).stdout.strip() == "True"


@pytest.mark.parametrize("native", [None, "0"])
def test_merge_cli_hints_at_warmup_only_when_it_skipped_numba(cache, cli, tmp_path, monkeypatch, native):
    """Cold cache, default choice: the torch kernels merge and one stderr line names `magmax warmup`;
    with MAGMAX_NATIVE=0 (torch by the user's choice) no hint."""
    import safetensors.torch as st
    import torch

    if native is not None:
        monkeypatch.setenv("MAGMAX_NATIVE", native)
    gen = torch.Generator().manual_seed(0)
    paths = []
    for name in ("base", "ft1", "ft2"):
        paths.append(tmp_path / f"{name}.safetensors")
        st.save_file({"w": torch.randn(64, 8, generator=gen)}, paths[-1])
    code, out, err = cli(paths[1], paths[2], "-b", paths[0], "-m", "ties", "-o", tmp_path / "out.safetensors")
    assert code == 0 and "merged 1 tensors" in out
    assert ("magmax warmup" in err) == (native is None)
    assert err.count("\n") == (native is None)
