"""`magmax merge` end to end: files in, files out, equal to ``magmax.merge`` on the state dicts."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch as st
from safetensors import safe_open
import torch
import yaml

from checkpoint_helpers import load_output
import magmax
from magmax.cli import main
from magmax.memory import format_bytes, run_measured
from magmax.merge_config import parse_byte_size, parse_option
from magmax.merging import registry

# -- building checkpoints -----------------------------------------------------------------------------


def tiny_base(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(6, 5, generator=g),
        "enc.bias": torch.randn(5, generator=g),
        "temperature": torch.randn((), generator=g),
        "head.weight": torch.randn(4, 6, generator=g).bfloat16(),
        "emb.weight": torch.randn(8, 3, generator=g).half(),
        "steps": torch.tensor(7),
        "mask": torch.tensor([True, False, True]),
    }


def finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in base.items()
    }


def save_hand_sharded(state: dict[str, torch.Tensor], folder: Path) -> Path:
    """A Hugging Face sharded folder written with the safetensors library and a hand-made index."""
    folder.mkdir(parents=True)
    keys = list(state)
    groups = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        st.save_file({k: state[k] for k in group}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"hidden": 6}')
    return folder


def save(state: dict[str, torch.Tensor], path: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "safetensors":
        st.save_file(state, path)
    elif kind == "torch":
        torch.save(state, path)
    elif kind == "folder":
        path.mkdir()
        st.save_file(state, path / "model.safetensors")
    elif kind == "sharded":
        save_hand_sharded(state, path)
    return path


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) and set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.fixture
def models(tmp_path):
    """A base (sharded HF folder) and three fine-tuned models in three other formats."""
    base = tiny_base()
    fts = [finetune(base, t) for t in range(3)]
    inputs = tmp_path / "in"
    paths = [
        save(base, inputs / "base", "sharded"),
        save(fts[0], inputs / "ft1.safetensors", "safetensors"),
        save(fts[1], inputs / "ft2.pt", "torch"),
        save(fts[2], inputs / "ft3", "folder"),
    ]
    return base, fts, paths


# -- out of core == in memory -------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(registry()))
def test_cli_merge_equals_in_memory_merge(cli, tmp_path, models, method):
    base, fts, (base_path, *ft_paths) = models
    out = tmp_path / "out"
    code, stdout, stderr = cli("--method", method, "--base", base_path, *ft_paths, "-o", out, "--shard-size", "150B")
    assert code == 0, stderr
    assert_bit_equal(load_output(out), magmax.merge(method, base, fts))
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text()) == {"hidden": 6}  # copied from the HF base
    assert re.fullmatch(
        rf"merged 7 tensors \(88 parameters, 84 merged\) of 3 fine-tuned model\(s\) with {method} .*→ {out}\n", stdout
    )
    assert stderr == ""  # no progress bar when stderr is not a terminal


def test_options_scale_and_dtype_reach_the_method(cli, tmp_path, models):
    base, fts, (base_path, *ft_paths) = models
    out = tmp_path / "out.safetensors"
    args = [
        "--method",
        "random",
        "--base",
        base_path,
        *ft_paths,
        "-o",
        out,
        "--scale",
        "0.7",
        "--option",
        "seed=3",
        "--dtype",
        "bfloat16",
    ]
    code, _, stderr = cli(*args)
    assert code == 0, stderr
    want = magmax.merge("random", base, fts, scale=0.7, seed=3, dtype=torch.bfloat16)
    assert want["enc.weight"].dtype == torch.bfloat16 and want["steps"].dtype == torch.int64
    assert_bit_equal(load_output(out), want)
    assert not torch.equal(
        want["enc.weight"], magmax.merge("random", base, fts, scale=0.7, seed=4, dtype=torch.bfloat16)["enc.weight"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.safetensors"]


def test_yaml_config_equals_the_flags(cli, tmp_path, models):
    base, fts, (base_path, *ft_paths) = models
    config = {
        "method": "ties",
        "base": "in/base",  # relative to the config file
        "models": [str(p.relative_to(tmp_path)) for p in ft_paths],
        "output": "from_yaml",
        "options": {"k": 0.5},
        "scale": 0.9,
        "shard_size": "1kB",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    code, _, stderr = cli(tmp_path / "merge.yaml")
    assert code == 0, stderr
    code, _, stderr = cli(
        "--method",
        "ties",
        "--base",
        base_path,
        *ft_paths,
        "-o",
        tmp_path / "from_flags",
        "--option",
        "k=0.5",
        "--scale",
        "0.9",
        "--shard-size",
        "1kB",
    )
    assert code == 0, stderr
    from_yaml, from_flags = load_output(tmp_path / "from_yaml"), load_output(tmp_path / "from_flags")
    assert_bit_equal(from_yaml, from_flags)
    assert_bit_equal(from_yaml, magmax.merge("ties", base, fts, k=0.5, scale=0.9))
    # flags override the file
    code, _, stderr = cli(tmp_path / "merge.yaml", "-o", tmp_path / "overridden", "--option", "k=0.2")
    assert code == 0, stderr
    assert_bit_equal(load_output(tmp_path / "overridden"), magmax.merge("ties", base, fts, k=0.2, scale=0.9))


def test_provenance_is_in_the_metadata(cli, tmp_path, models):
    _, _, (base_path, *ft_paths) = models
    out = tmp_path / "out.safetensors"
    assert cli("--method", "dare", "--base", base_path, *ft_paths, "-o", out, "--option", "p=0.3")[0] == 0
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    record = json.loads(meta["magmax_merge"])
    assert record["method"] == "dare" and record["options"]["p"] == 0.3
    assert record["models"] == [str(p) for p in ft_paths] and record["magmax_version"] == magmax.__version__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["magmax", "average", "random", "task_arithmetic"])
def test_cuda_merge_equals_in_memory_cuda_merge(cli, tmp_path, models, method):
    base, fts, (base_path, *ft_paths) = models
    code, _, stderr = cli(
        "--method", method, "--base", base_path, *ft_paths, "-o", tmp_path / "out", "--device", "cuda"
    )
    assert code == 0, stderr
    assert_bit_equal(load_output(tmp_path / "out"), magmax.merge(method, base, fts, device="cuda"))


def test_force_replaces_an_existing_output(cli, tmp_path, models):
    base, fts, (base_path, *ft_paths) = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, stderr = cli("--base", base_path, *ft_paths, "-o", out, "--force")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "magmax_recipe.yaml", "model.safetensors"]
    assert_bit_equal(load_output(out), magmax.merge("magmax", base, fts))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_checkpoints_merge_in_float32(cli, tmp_path, dtype):
    """τ of float8 weights is formed in float32 like any other dtype; θ is written back in the base's
    float8 dtype, or in --dtype."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(9, 4, generator=g).to(dtype), "b": torch.randn(5, generator=g).to(dtype),
            "steps": torch.tensor(3)}
    fts = [{k: (v.float() + 0.25 * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v
            for k, v in base.items()} for _ in range(2)]
    paths = [save(state, tmp_path / "in" / f"{name}.safetensors", "safetensors")
             for name, state in (("base", base), ("ft1", fts[0]), ("ft2", fts[1]))]
    for out_dtype, flag in ((dtype, []), (torch.float32, ["--dtype", "float32"])):
        out = tmp_path / f"out-{out_dtype}.safetensors".replace("torch.", "")
        code, _, stderr = cli("--method", "task_arithmetic", "--scale", "0.5", "--base", paths[0], *paths[1:],
                              "-o", out, *flag)
        assert code == 0, stderr
        got = load_output(out)
        for key in ("w", "b"):
            theta0 = base[key].float()
            tau = sum(ft[key].float() - theta0 for ft in fts)
            assert got[key].dtype == out_dtype
            assert torch.equal(got[key].float(), torch.add(theta0, tau, alpha=0.5).to(out_dtype).float()), key
        assert torch.equal(got["steps"], base["steps"])
    fts[1]["w"][2, 1] = float("nan")  # checked like any input: upcast, as torch cannot sum float8
    save(fts[1], paths[2], "safetensors")
    code, _, stderr = cli("--base", paths[0], *paths[1:], "-o", tmp_path / "nan")
    assert code == 2 and re.search(r"ft2\.safetensors: tensor 'w' contains 1 NaN/Inf value\(s\)", stderr), stderr


def test_merged_folder_mode_follows_the_umask(cli, tmp_path, models):
    _, _, (base_path, *ft_paths) = models
    for umask in (0o022, 0o027):
        previous = os.umask(umask)
        try:
            out = tmp_path / f"out-{umask:o}"
            assert cli("--base", base_path, *ft_paths, "-o", out)[0] == 0
        finally:
            os.umask(previous)
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
        assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask


# -- killed merges leave nothing behind ----------------------------------------------------------------

# The merge command in a child whose writer sleeps before each tensor, so it is surely mid-write when
# signalled (200 tensors: 10 s in all, far longer than the tests wait).
_SLOW_MERGE = (
    "import sys, time\n"
    "import magmax.checkpoints as c\n"
    "write = c.ShardedSafetensorsWriter.write\n"
    "c.ShardedSafetensorsWriter.write = lambda self, key, tensor: (time.sleep(0.05), write(self, key, tensor))[1]\n"
    "from magmax.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".partial"))


def _kill_mid_write(tmp_path: Path, sig: signal.Signals) -> tuple[subprocess.Popen, list[Path], Path]:
    state = {f"layer{i}.weight": torch.full((4,), float(i)) for i in range(200)}
    paths = [save(s, tmp_path / "in" / f"{name}.safetensors", "safetensors")
             for name, s in (("base", state), ("ft1", {k: v + 1 for k, v in state.items()}))]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_MERGE, "merge", "--base", str(paths[0]), str(paths[1]),
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        # Mid-write: the work folder holds the shard being written.
        while not any((p / "model.safetensors").exists() for p in _partials(tmp_path)):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the merge never started writing"
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, paths, out


def test_sigterm_mid_write_removes_the_partial_output(tmp_path):
    proc, _, out = _kill_mid_write(tmp_path, signal.SIGTERM)
    assert proc.returncode == -signal.SIGTERM  # still ends as terminated by SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], _partials(tmp_path)
    assert not out.exists()


def test_sigkill_leftovers_are_removed_by_the_next_merge_of_that_output(cli, tmp_path):
    proc, paths, out = _kill_mid_write(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    (left,) = _partials(tmp_path)
    assert f".{proc.pid}@" in left.name  # its owner, dead now
    code, _, stderr = cli("--method", "average", "--base", paths[0], paths[1], "-o", out)
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    assert_bit_equal(load_output(out), magmax.merge("average", st.load_file(paths[0]), [st.load_file(paths[1])]))


# -- a real transformers model -----------------------------------------------------------------------


def test_transformers_model_round_trip(cli, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, max_shard_size="40KB", safe_serialization=True)
    (base_dir / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    assert (base_dir / "model.safetensors.index.json").exists()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ft_dirs, ft_states = [], []
    for t in range(3):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(base_state[name] + 0.02 * torch.randn_like(param))
        ft_dirs.append(tmp_path / f"ft{t}")
        model.save_pretrained(ft_dirs[-1], max_shard_size="40KB", safe_serialization=True)
        ft_states.append({k: v.clone() for k, v in model.state_dict().items()})
    out = tmp_path / "merged"
    code, _, stderr = cli("--method", "magmax", "--base", base_dir, *ft_dirs, "-o", out, "--shard-size", "60KB")
    assert code == 0, stderr
    assert (out / "model.safetensors.index.json").exists() and (out / "vocab.txt").exists()
    merged, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(merged) is transformers.BertModel
    want = magmax.merge("magmax", base_state, ft_states)
    assert_bit_equal({k: v for k, v in merged.state_dict().items()}, want)


# -- every input error: one line, exit code 2, nothing at OUT --------------------------------------------


def _bad_inputs(tmp_path: Path, case: str) -> tuple[list[object], str]:
    base = tiny_base()
    fts = [finetune(base, 1), finetune(base, 2)]
    ft1_kind = "safetensors"
    ft1_name = "ft1.safetensors"
    extra: list[object] = []
    if case == "missing tensor":
        del fts[1]["enc.bias"]
        want = r"ft2\.safetensors: tensor 'enc\.bias' of the base \(.*base\.safetensors\) is missing"
    elif case == "extra tensor":
        fts[0]["new.weight"] = torch.ones(2)
        want = r"ft1\.safetensors: tensor 'new\.weight' is not in the base"
    elif case == "shape mismatch":
        fts[0]["enc.weight"] = torch.ones(6, 4)
        want = r"ft1\.safetensors: tensor 'enc\.weight' has shape \[6, 4\] but the base .* has \[6, 5\]"
    elif case == "dtype mismatch":
        fts[1]["enc.weight"] = fts[1]["enc.weight"].half()
        want = r"ft2\.safetensors: tensor 'enc\.weight' has dtype torch\.float16 but the base .* has torch\.float32"
    elif case == "nan":
        fts[1]["head.weight"][2, 3] = float("nan")
        want = r"ft2\.safetensors: tensor 'head\.weight' contains 1 NaN/Inf value\(s\)"
    elif case == "inf in base":
        base["enc.bias"][0] = float("inf")
        want = r"base\.safetensors: tensor 'enc\.bias' contains 1 NaN/Inf"
    elif case == "no fine-tuned model":
        fts = []
        want = r"no fine-tuned model given"
    elif case == "unknown method":
        extra = ["--method", "nope"]
        want = r"unknown merge method 'nope'; choose one of: .*magmax"
    elif case == "unknown option":
        extra = ["--option", "bogus=1"]
        want = r"merge method 'magmax': option 'bogus'"
    elif case == "bad option value":
        extra = ["--method", "random", "--option", "seed=abc"]
        want = r"merge method 'random': option 'seed'"
    elif case == "option without value":
        extra = ["--option", "seed"]
        want = r"--option 'seed': expected key=value"
    elif case == "scale twice":
        extra = ["--scale", "0.3", "--option", "scale=0.4"]
        want = r"scale given twice"
    elif case in ("scale nan", "scale inf"):
        extra = ["--scale", case.split()[1]]
        want = r"'scale': Input should be a finite number"
    elif case == "option scale nan":
        extra = ["--option", "scale=.nan"]
        want = r"merge method 'magmax': option 'scale': Input should be a finite number"
    elif case == "float16 overflow":
        # λ·τ ≈ 1e6 × 0.1 on the float16 emb.weight: beyond float16's 65504 (the other tensors hold it)
        extra = ["--method", "task_arithmetic", "--scale", "1e6"]
        want = (r"merged tensor 'emb\.weight' has \d+ NaN/Inf value\(s\) in torch\.float16: θ0 \+ λ·τ\* overflows "
                r"\(λ=1e\+06\); choose a smaller --scale or --dtype float32$")
    elif case == "--dtype float16 overflow":  # float32 inputs, which hold the sum; their float16 output cannot
        extra = ["--method", "task_arithmetic", "--scale", "1e6", "--dtype", "float16"]
        want = r"merged tensor 'enc\.bias' has \d+ NaN/Inf value\(s\) in torch\.float16: .*--dtype float32$"
    elif case == "bad dtype":
        extra = ["--dtype", "float8"]
        want = r"'dtype': Input should be 'float32', 'bfloat16' or 'float16'"
    elif case == "bad shard size":
        extra = ["--shard-size", "2XB"]
        want = r"'shard_size': '2XB' is not a size"
    elif case == "cuda missing":
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        extra = ["--device", "cuda"]
        want = r"--device cuda: CUDA is not available .*; use --device cpu"
    elif case == "garbage file":
        ft1_kind = "garbage"
        want = r"ft1\.safetensors: truncated or not a safetensors file"
    elif case == "truncated safetensors":
        ft1_kind = "truncated"
        want = r"ft1\.safetensors: truncated: the header describes \d+ bytes, the file has \d+"
    elif case == "truncated torch file":
        ft1_kind, ft1_name = "truncated torch", "ft1.pt"
        want = r"ft1\.pt: unreadable or truncated torch checkpoint"
    elif case == "pickled module":
        ft1_kind, ft1_name = "module", "ft1.pt"
        want = r"ft1\.pt: torch\.load\(weights_only=True\) refuses it .*torch\.save\(model\.state_dict\(\)"
    elif case == "missing file":
        ft1_kind = "absent"
        want = r"ft1\.safetensors: no such file or folder"
    else:
        raise AssertionError(case)
    inputs = tmp_path / "in"
    base_path = save(base, inputs / "base.safetensors", "safetensors")
    paths = [inputs / ft1_name] + [
        save(ft, inputs / f"ft{i}.safetensors", "safetensors") for i, ft in enumerate(fts[1:], 2)
    ]
    if fts:
        if ft1_kind == "safetensors":
            save(fts[0], paths[0], "safetensors")
        elif ft1_kind in ("garbage", "truncated"):
            st.save_file(fts[0], paths[0])
            data = paths[0].read_bytes()
            # garbage: a header length far beyond the file; truncated: the last tensor cut short
            paths[0].write_bytes((10**9).to_bytes(8, "little") + data[8:] if ft1_kind == "garbage" else data[:-10])
        elif ft1_kind == "truncated torch":
            torch.save(fts[0], paths[0])
            paths[0].write_bytes(paths[0].read_bytes()[:300])
        elif ft1_kind == "module":
            torch.save(torch.nn.Linear(2, 2), paths[0])
    else:
        paths = []
    return ["--base", base_path, *paths, "-o", tmp_path / "out", "--shard-size", "100B", *extra], want


BAD_CASES = [
    "missing tensor",
    "extra tensor",
    "shape mismatch",
    "dtype mismatch",
    "nan",
    "inf in base",
    "no fine-tuned model",
    "unknown method",
    "unknown option",
    "bad option value",
    "option without value",
    "scale twice",
    "scale nan",
    "scale inf",
    "option scale nan",
    "float16 overflow",
    "--dtype float16 overflow",
    "bad dtype",
    "bad shard size",
    "cuda missing",
    "garbage file",
    "truncated safetensors",
    "truncated torch file",
    "pickled module",
    "missing file",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_leaves_nothing(cli, tmp_path, case):
    args, want = _bad_inputs(tmp_path, case)
    code, stdout, stderr = cli(*args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and re.search(want, lines[0]), lines[0]
    assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no OUT, no temporary folder


def test_existing_output_is_kept_and_refused(cli, tmp_path, models):
    _, _, (base_path, *ft_paths) = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = cli("--base", base_path, *ft_paths, "-o", out)
    assert code == 2
    assert stderr.count("\n") == 1 and f"output {out} already exists; pass --force" in stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_yaml_errors_name_the_file_and_key(cli, tmp_path, models):
    _, _, (base_path, *ft_paths) = models
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump({"base": str(base_path), "models": [str(p) for p in ft_paths], "output": "o", "bogus": 1})
    )
    code, _, stderr = cli(config)
    assert code == 2 and stderr.count("\n") == 1
    assert f"{config}: unknown key 'bogus'; the keys are: method, base, models" in stderr
    config.write_text(yaml.safe_dump({"base": str(base_path), "models": [str(p) for p in ft_paths]}))
    code, _, stderr = cli(config)
    assert code == 2 and "'output' is required (-o/--output on the command line, `output:` in YAML)" in stderr
    config.write_text("base: [unclosed\n")
    code, _, stderr = cli(config)
    assert code == 2 and f"{config}: invalid YAML at line" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "merge.yaml"]


@pytest.mark.parametrize("typo, meant", [("modles", "models"), ("outptu", "output"), ("bsae", "base")])
def test_yaml_typo_of_a_required_key_is_named_with_the_key_meant(cli, tmp_path, models, typo, meant):
    _, _, (base_path, *ft_paths) = models
    config = {"base": str(base_path), "models": [str(p) for p in ft_paths], "output": str(tmp_path / "o")}
    config[typo] = config.pop(meant)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, stderr = cli(path)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"{path}: unknown key '{typo}' (did you mean '{meant}'?); the keys are: method, base, models" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "merge.yaml"]


def test_output_inside_an_input_is_refused(cli, tmp_path, models):
    _, _, (base_path, *ft_paths) = models
    code, _, stderr = cli("--base", base_path, *ft_paths, "-o", ft_paths[2], "--force")
    assert code == 2 and "is or contains the input" in stderr
    assert (ft_paths[2] / "model.safetensors").exists()


# -- config parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size",
    [
        ("2GB", 2 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5GiB", 3 * 2**29),
        ("64kB", 64_000),
        ("1000", 1000),
        (" 3 gb ", 3 * 10**9),
    ],
)
def test_parse_byte_size(text, size):
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "2XB", "-1GB", "0", "1.2.3MB"])
def test_parse_byte_size_refuses(text):
    with pytest.raises(ValueError):
        parse_byte_size(text)


@pytest.mark.parametrize(
    "text, pair",
    [
        ("k=0.2", ("k", 0.2)),
        ("seed=3", ("seed", 3)),
        ("flag=true", ("flag", True)),
        ("name=abc", ("name", "abc")),
        ("exclude=[a, b]", ("exclude", ["a", "b"])),
        ("x=", ("x", None)),
        ("expr=a=b", ("expr", "a=b")),
    ],
)
def test_parse_option_reads_yaml_values(text, pair):
    assert parse_option(text) == pair


# -- memory ------------------------------------------------------------------------------------------


def _synthetic_model(folder: Path, name: str, tensors: int, numel: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    path = folder / name
    st.save_file({f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(tensors)}, path)
    return path


def _peak_of_merge(tmp_path: Path, base: Path, fts: list[Path], tag: str) -> int:
    code = "import sys; from magmax.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / f"out_{tag}"
    result = run_measured(
        [sys.executable, "-c", code, "merge", "--base", str(base), *map(str, fts), "-o", str(out)], timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.peak_rss_bytes


def test_peak_memory_does_not_grow_with_the_number_of_models(tmp_path):
    """T=2 vs T=6 fine-tuned models of 48 MB (24 tensors of 2 MB): the peak may not follow T.

    Holding one more task vector would add 48 MB per model (≥ 190 MB from T=2 to T=6); streaming adds
    at most the engine's group of raw input tensors (4 × 2 MB more at T=6) and allocator noise. The margin
    (24 MB) is half a model. Two child processes: about 10 s on 2 cores.
    """
    base = _synthetic_model(tmp_path, "base.safetensors", 24, 500_000, 0)
    fts = [_synthetic_model(tmp_path, f"ft{t}.safetensors", 24, 500_000, t + 1) for t in range(6)]
    # Compile the numba folds both children use (numba's disk cache): a child that compiles holds tens
    # of MB of LLVM, which would be measured for one T and not the other.
    for count in (2, 6):
        magmax.merge("magmax", {"w": torch.zeros(64)}, [{"w": torch.ones(64)}] * count)
    peak2 = _peak_of_merge(tmp_path, base, fts[:2], "t2")
    peak6 = _peak_of_merge(tmp_path, base, fts, "t6")
    assert peak6 - peak2 < 24e6, f"peak RSS {format_bytes(peak2)} for T=2, {format_bytes(peak6)} for T=6"


def test_ties_redo_of_provisional_tensors_rewrites_closed_shards(cli, tmp_path, monkeypatch):
    """TIES merges before it knows the majority sign (on the guess m > 0) and merges again the tensors
    whose entries cancel exactly (elected sign 0) when the model's majority turns out negative: the
    out-of-core writer replaces them in shards it has closed already."""
    base = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(6), "c.bias": torch.zeros(5)}
    ft1 = {"a.weight": torch.full((4, 3), 1.0), "b.weight": -torch.ones(6), "c.bias": -torch.ones(5)}
    ft2 = {"a.weight": torch.full((4, 3), -1.0), "b.weight": -torch.ones(6), "c.bias": -torch.ones(5)}
    ft1["a.weight"][0, 0] = 3.0  # one entry of "a" keeps a positive elected sign
    paths = [save(state, tmp_path / "in" / f"{name}.safetensors", "safetensors")
             for name, state in (("base", base), ("ft1", ft1), ("ft2", ft2))]
    from magmax.merging.ties import Ties

    redone: list[list[str]] = []
    original = Ties.provisional_units
    monkeypatch.setattr(Ties, "provisional_units", lambda self: redone.append(original(self)) or redone[-1])
    out = tmp_path / "out"
    code, _, stderr = cli("--method", "ties", "--option", "k=1.0", "--base", paths[0], *paths[1:], "-o", out,
                          "--shard-size", "40B")
    assert code == 0, stderr
    assert redone == [["a.weight"]]
    want = magmax.merge("ties", base, [ft1, ft2], k=1.0)
    assert float(want["a.weight"][1, 1]) == pytest.approx(-0.55)  # 1 and −1 cancel: the negative majority decides
    assert_bit_equal(load_output(out), want)
    assert len(list(out.glob("model-*-of-*.safetensors"))) == 3
