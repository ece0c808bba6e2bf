"""`magmax merge` with PEFT LoRA adapters as inputs and as output, checked against the real ``peft``.

Oracles: an adapter merged by ``peft`` itself (``merge_and_unload``) and saved as a full fine-tune; numpy's
SVD for the rank-R approximation error.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import safetensors.torch as st
import torch
from safetensors import safe_open
from torch import nn


peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)


def tiny_base(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():  # a "pre-trained" norm that is not the identity
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    return model


def randomize_adapter(model: nn.Module, seed: int) -> None:
    """Trained-looking factors (PEFT initialises lora_B, or the embeddings' A, to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=g))


def make_adapter(base: nn.Module, folder, seed: int, **config) -> dict[str, torch.Tensor]:
    """Save a LoRA adapter of ``base`` to ``folder``; return the state dict PEFT's merge_and_unload gives."""
    import copy

    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    randomize_adapter(model, seed)
    model.save_pretrained(folder)
    merged = model.merge_and_unload()
    return {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def load_out(out) -> dict[str, torch.Tensor]:
    return st.load_file(out / "model.safetensors")


def merge_files(cli, tmp_path, name: str, base, inputs, *extra) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    code, stdout, stderr = cli("--base", base, *inputs, "-o", out, *extra)
    assert code == 0, stderr
    return load_out(out)


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


# -- LoRA in --------------------------------------------------------------------------------------------

VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]),
    "rslora-patterns": dict(
        r=4, lora_alpha=6, target_modules=["fc1", "fc2", "head"], use_rslora=True,
        rank_pattern={"fc1": 2}, alpha_pattern={"head": 3},
    ),
    "embedding": dict(r=3, lora_alpha=5, target_modules=["emb", "fc2"]),
    "modules-to-save": dict(r=2, lora_alpha=2, target_modules=["fc1"], modules_to_save=["head"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("method", ["magmax", "ties"])
def test_adapter_merge_equals_merge_of_peft_merged_model(cli, tmp_path, variant, method):
    """ΔW = s·B·A added to θ0 as PEFT's merge does (float32 product, one float32 addition): the adapter
    reads as bit for bit the model merge_and_unload gives, so the two merges agree bit for bit."""
    base = tiny_base()
    base_path = tmp_path / "base.safetensors"
    st.save_file(state_of(base), base_path)
    adapters, fulls = [], []
    for t in range(2):
        merged = make_adapter(base, tmp_path / f"adapter{t}", seed=t, **VARIANTS[variant])
        st.save_file(merged, tmp_path / f"full{t}.safetensors")
        adapters.append(tmp_path / f"adapter{t}")
        fulls.append(tmp_path / f"full{t}.safetensors")
    # A full fine-tune among the adapters, as a third input.
    third = {k: v + 0.01 * torch.randn_like(v) for k, v in state_of(base).items()}
    st.save_file(third, tmp_path / "third.safetensors")
    options = ("--method", method)
    from_adapters = merge_files(cli, tmp_path, "a", base_path, [*adapters, tmp_path / "third.safetensors"], *options)
    from_fulls = merge_files(cli, tmp_path, "f", base_path, [*fulls, tmp_path / "third.safetensors"], *options)
    assert_bit_equal(from_adapters, from_fulls)
    assert not torch.equal(from_adapters["fc1.weight"], state_of(base)["fc1.weight"])


def test_adapter_trained_on_a_wrapper_model_maps_onto_the_bare_base(cli, tmp_path):
    """An adapter of BertForSequenceClassification names bert.encoder…; a BertModel folder names encoder…"""
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    bare = transformers.BertModel(config)
    bare.save_pretrained(tmp_path / "base")
    wrapper = transformers.BertForSequenceClassification(config)
    wrapper.bert.load_state_dict(bare.state_dict())
    model = peft.get_peft_model(wrapper, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    randomize_adapter(model, 1)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().bert
    merged.save_pretrained(tmp_path / "full")
    got = merge_files(cli, tmp_path, "a", tmp_path / "base", [tmp_path / "adapter"], "--method", "task_arithmetic")
    want = merge_files(cli, tmp_path, "f", tmp_path / "base", [tmp_path / "full"], "--method", "task_arithmetic")
    assert_bit_equal(got, want)


def test_fan_in_fan_out_adapter_of_gpt2(cli, tmp_path):
    """GPT-2's Conv1D stores W as (in, out): ΔW = s·(B·A)ᵀ."""
    config = transformers.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2Model(config)
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    randomize_adapter(model, 2)
    model.save_pretrained(tmp_path / "adapter")
    model.merge_and_unload().save_pretrained(tmp_path / "full")
    got = merge_files(cli, tmp_path, "a", tmp_path / "base", [tmp_path / "adapter"], "--method", "task_arithmetic")
    want = merge_files(cli, tmp_path, "f", tmp_path / "base", [tmp_path / "full"], "--method", "task_arithmetic")
    assert_bit_equal(got, want)
    assert not torch.equal(got["h.0.attn.c_attn.weight"], st.load_file(tmp_path / "base" / "model.safetensors")[
        "h.0.attn.c_attn.weight"])


class WithConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(6, 8)


@pytest.mark.parametrize(
    ("model", "config", "feature"),
    [
        (Tiny, dict(r=2, target_modules=["fc1"], use_dora=True), "DoRA"),
        (Tiny, dict(r=2, target_modules=["fc1"], bias="all"), "trained biases"),
        (Tiny, dict(r=2, target_modules=["fc1"], lora_bias=True), "LoRA biases"),
        (WithConv, dict(r=2, target_modules=["conv"]), "convolution LoRA"),
    ],
)
def test_unsupported_adapter_is_one_line_naming_adapter_and_feature(cli, tmp_path, model, config, feature):
    torch.manual_seed(0)
    base = model()
    st.save_file(state_of(base), tmp_path / "base.safetensors")
    adapter = peft.get_peft_model(base, peft.LoraConfig(**config))
    adapter.save_pretrained(tmp_path / "adapter")
    code, stdout, stderr = cli("--base", tmp_path / "base.safetensors", tmp_path / "adapter", "-o", tmp_path / "out")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert str(tmp_path / "adapter") in stderr.replace("\n", "") and feature in stderr
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_model_and_adapter_as_base_are_one_line(cli, tmp_path):
    base = tiny_base()
    make_adapter(base, tmp_path / "adapter", seed=0, r=2, lora_alpha=2, target_modules=["fc1"])
    other = {"enc.weight": torch.zeros(3, 3)}
    st.save_file(other, tmp_path / "other.safetensors")
    code, _, stderr = cli("--base", tmp_path / "other.safetensors", tmp_path / "adapter", "-o", tmp_path / "out")
    assert code == 2 and "fc1.weight" in stderr and "no counterpart in the base" in stderr
    code, _, stderr = cli("--base", tmp_path / "adapter", tmp_path / "adapter", "-o", tmp_path / "out")
    assert code == 2 and "the base is a LoRA adapter" in stderr
    assert not (tmp_path / "out").exists()


# -- LoRA out -------------------------------------------------------------------------------------------


def bert_models(tmp_path, count: int = 2):
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    base = transformers.BertModel(config)
    base.save_pretrained(tmp_path / "base")
    for t in range(count):
        torch.manual_seed(10 + t)
        ft = transformers.BertModel(config)
        ft.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
        ft.save_pretrained(tmp_path / f"ft{t}")
    return config, [tmp_path / f"ft{t}" for t in range(count)]


def peft_merged_state(config, base_folder, adapter_folder) -> dict[str, torch.Tensor]:
    model = transformers.BertModel.from_pretrained(base_folder)
    model = peft.PeftModel.from_pretrained(model, adapter_folder)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def test_lora_output_at_full_rank_reproduces_the_merged_model(cli, tmp_path):
    """At rank ≥ every matrix's rank, B·A = Δ up to the float32 SVD's backward error (a few n·ε·‖Δ‖₂,
    n ≤ 12 here, ε = 2⁻²⁴), so PEFT's merge of the adapter is the merged model to that, plus the
    rounding of θ0 + Δ (half an ulp of θ); tensors the adapter drops (biases, norms) stay θ0."""
    config, fts = bert_models(tmp_path)
    base_state = st.load_file(tmp_path / "base" / "model.safetensors")
    merged = merge_files(cli, tmp_path, "full", tmp_path / "base", fts, "--method", "magmax")
    out = tmp_path / "lora"
    code, stdout, stderr = cli("--base", tmp_path / "base", *fts, "-o", out, "--method", "magmax",
                               "--output-format", "lora", "--rank", 30)
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("LoRA rank 30: relative Frobenius error ")
    got = peft_merged_state(config, tmp_path / "base", out)
    assert set(got) == set(merged)
    eps = 2.0**-24
    written = 0
    for key, want in merged.items():
        delta = want - base_state[key]
        if key.endswith(".weight") and want.dim() == 2:  # Linear and Embedding weights are in the adapter
            norm2 = float(torch.linalg.matrix_norm(delta, ord=2))
            atol = 64 * max(delta.shape) * eps * norm2 + eps * float(want.abs().max())
            torch.testing.assert_close(got[key], want, rtol=0, atol=atol, msg=key)
            written += 1
        else:
            assert torch.equal(got[key], base_state[key]), key
    assert written == 10  # 3 embeddings, q/k/v/out/intermediate/output dense, pooler
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        report = json.loads(f.metadata()["magmax_lora_error"])
    assert report["rank"] == 30 and report["overall"] < 1e-5
    assert set(report["dropped_norms"]) == {k for k in merged if not (k.endswith(".weight") and merged[k].dim() == 2)}


def test_lora_output_error_matches_the_svd_oracle(cli, tmp_path):
    """Rank R < the matrices' rank: the error reported per matrix and overall is the Eckart–Young tail
    √(Σ_{i>R} σ_i² / Σ σ_i²) of numpy's SVD (float64) of the merged Δ, to float32 accuracy."""
    config, fts = bert_models(tmp_path)
    base_state = st.load_file(tmp_path / "base" / "model.safetensors")
    merged = merge_files(cli, tmp_path, "full", tmp_path / "base", fts, "--method", "task_arithmetic")
    out = tmp_path / "lora"
    rank = 3
    code, stdout, stderr = cli("--base", tmp_path / "base", *fts, "-o", out, "--method", "task_arithmetic",
                               "--output-format", "lora", "--rank", rank)
    assert code == 0, stderr
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        report = json.loads(f.metadata()["magmax_lora_error"])
    tail_sq = total_sq = dropped_sq = 0.0
    for key, want in merged.items():
        delta = (want.double() - base_state[key].double()).numpy()
        if key.endswith(".weight") and want.dim() == 2:
            s = np.linalg.svd(delta, compute_uv=False)
            tail, total = float((s[rank:] ** 2).sum()), float((s**2).sum())
            assert report["matrices"][key] == pytest.approx(math.sqrt(tail / total), abs=2e-5), key
            tail_sq, total_sq = tail_sq + tail, total_sq + total
        else:
            dropped_sq += float((delta**2).sum())
            assert report["dropped_norms"][key] == pytest.approx(math.sqrt(float((delta**2).sum())), rel=1e-5)
    assert report["overall"] == pytest.approx(math.sqrt(tail_sq / total_sq), abs=2e-5)
    assert report["overall_with_dropped"] == pytest.approx(
        math.sqrt((tail_sq + dropped_sq) / (total_sq + dropped_sq)), abs=2e-5
    )
    assert report["overall"] > 0.05  # a real truncation, not a vacuous check
    assert f"{report['overall']:.4g}" in stdout and f"{report['overall']:.4g}" in (out / "README.md").read_text()
    # The written factors are what PEFT uses: B·A (transposed for embeddings) has the reported error.
    factors = st.load_file(out / "adapter_model.safetensors")
    a = factors["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"]
    b = factors["base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"]
    key = "encoder.layer.0.attention.self.query.weight"
    delta = merged[key] - base_state[key]
    error = float(torch.linalg.matrix_norm(delta - b @ a) / torch.linalg.matrix_norm(delta))
    assert a.shape == (rank, 8) and error == pytest.approx(report["matrices"][key], abs=1e-6)
    peft_merged_state(config, tmp_path / "base", out)  # loads into PEFT


def test_lora_output_from_a_plain_file_base_and_adapter_inputs_round_trip(cli, tmp_path):
    """No config.json: every 2-D *.weight is a Linear's. Adapters in, adapter out, at a rank holding
    both inputs' ranks: PEFT's merge of the output is the merged model."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    st.save_file(state_of(base), tmp_path / "base.safetensors")
    adapters = []
    for t in range(2):
        make_adapter(base, tmp_path / f"ad{t}", seed=t, r=2, lora_alpha=4, target_modules=["0", "2"])
        adapters.append(tmp_path / f"ad{t}")
    merged = merge_files(cli, tmp_path, "full", tmp_path / "base.safetensors", adapters, "--method", "task_arithmetic")
    out = tmp_path / "lora"
    code, _, stderr = cli("--base", tmp_path / "base.safetensors", *adapters, "-o", out, "--method",
                          "task_arithmetic", "--output-format", "lora", "--rank", 4)
    assert code == 0, stderr
    import copy

    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).merge_and_unload()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, merged[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--output-format", "lora"), "--rank R"),
        (("--rank", "4"), "--output-format lora"),
        (("--output-format", "lora", "--rank", "0"), "rank"),
    ],
)
def test_lora_output_options_are_checked(cli, tmp_path, args, message):
    st.save_file({"w.weight": torch.ones(2, 2)}, tmp_path / "b.safetensors")
    code, _, stderr = cli("--base", tmp_path / "b.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "o", *args)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
