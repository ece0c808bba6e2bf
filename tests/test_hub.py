"""Hugging Face Hub ids as `magmax merge` inputs, from a cache folder built here (never the network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch as st
import torch
import yaml

import magmax
from magmax import hub

REVISION = "0123456789abcdef0123456789abcdef01234567"


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g), "n": torch.tensor(3)}


def cache_model(cache: Path, repo_id: str, tensors: dict[str, torch.Tensor]) -> Path:
    """A model in the huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<rev>/…}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    st.save_file(tensors, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text('{"model_type": "tiny"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no org/name folder here
    states = {name: state(i) for i, name in enumerate(["org/base", "org/ft-a", "org/ft-b"])}
    for name, tensors in states.items():
        cache_model(cache, name, tensors)
    return states


def test_hub_ids_offline_come_from_the_cache(cli, tmp_path, offline_cache):
    out = tmp_path / "out"
    code, stdout, stderr = cli("--method", "magmax", "--base", "org/base", "org/ft-a", "org/ft-b", "-o", out)
    assert code == 0, stderr
    want = magmax.merge("magmax", offline_cache["org/base"], [offline_cache["org/ft-a"], offline_cache["org/ft-b"]])
    got = st.load_file(out / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert (out / "config.json").read_text() == '{"model_type": "tiny"}'  # the snapshot's files copied


def test_hub_ids_in_yaml_are_not_made_paths(cli, tmp_path, offline_cache):
    config = tmp_path / "conf" / "merge.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"base": "org/base", "models": ["org/ft-a", "org/ft-b"], "output": "out"}))
    code, _, stderr = cli(config)
    assert code == 0, stderr
    assert (tmp_path / "conf" / "out" / "model.safetensors").is_file()


def test_missing_id_offline_is_one_line_naming_it_and_how_to_fetch(cli, tmp_path, offline_cache):
    code, _, stderr = cli("--base", "org/base", "org/absent", "-o", tmp_path / "out")
    assert code == 2
    line = " ".join(stderr.split())
    assert "org/absent" in line and "HF_HUB_OFFLINE=1" in line and "hf download org/absent" in line
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()


def test_an_existing_path_wins_over_an_id(cli, tmp_path, offline_cache):
    local = tmp_path / "org" / "ft-a"
    local.mkdir(parents=True)
    st.save_file(state(7), local / "model.safetensors")
    code, _, stderr = cli("--method", "task_arithmetic", "--base", "org/base", "org/ft-a", "-o", tmp_path / "out")
    assert code == 0, stderr
    want = magmax.merge("task_arithmetic", offline_cache["org/base"], [state(7)])
    got = st.load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_online_download_asks_for_safetensors_then_torch_weights(tmp_path, monkeypatch):
    """snapshot_download stubbed: safetensors weights are asked for first; .bin only when there are none."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    calls = []
    folder = tmp_path / "snap"
    folder.mkdir()

    def fake(repo_id, *, cache_dir, local_files_only, allow_patterns):
        calls.append((repo_id, cache_dir, local_files_only, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub.resolve("org/old") == folder
    assert [c[3][-1] for c in calls] == ["*.safetensors", "*.pth"]  # none found: torch weights asked for
    assert calls[0][1:3] == (str(tmp_path / "cache"), False) and "*.bin" not in calls[0][3]
    calls.clear()
    st.save_file(state(0), folder / "model.safetensors")
    assert hub.resolve("org/new") == folder and len(calls) == 1


@pytest.mark.parametrize(
    ("text", "is_id"),
    [("org/name", True), ("org/name-v1.5", True), ("a/b/c", False), ("../x", False), ("name", False),
     ("./org", False), ("org/x.yaml", False), ("/abs/path", False)],
)
def test_repo_id_shape(text, is_id):
    assert hub.looks_like_repo_id(text) is is_id
