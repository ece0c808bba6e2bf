"""`magmax merge` on Hugging Face checkpoints as people have them: buffers, task heads, vocabularies,
self-describing outputs (config.json, model card, recipe) and per-model weights. Tiny BERTs built here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
import yaml
from transformers import AutoModel, AutoModelForSequenceClassification, BertConfig, BertModel, BertTokenizerFast
from transformers import BertForSequenceClassification

import magmax
from magmax.merging.breadcrumbs import breadcrumbs_mask
from magmax.merging.dare import Dare, DareOptions

TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(25)]  # 30 rows


def config(vocab: int = 30) -> BertConfig:
    return BertConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=16, max_position_embeddings=16, type_vocab_size=2)


def tokenizer(folder: Path, extra: int = 0) -> BertTokenizerFast:
    tokens = TOKENS + [f"new{i}" for i in range(extra)]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)})


def perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def save_base(folder: Path, *, position_ids: bool = False) -> Path:
    torch.manual_seed(0)
    model = BertModel(config())
    model.save_pretrained(folder)
    tokenizer(folder).save_pretrained(folder)
    if position_ids:  # as older transformers saved it
        state = st.load_file(folder / "model.safetensors")
        state["embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
        st.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def save_finetune(base: Path, folder: Path, seed: int, *, head: bool = False, extra_vocab: int = 0) -> Path:
    model = (BertForSequenceClassification if head else BertModel).from_pretrained(
        base, **({"num_labels": 3} if head else {}))
    if extra_vocab:
        model.resize_token_embeddings(30 + extra_vocab, mean_resizing=False)
    perturb(model, seed)
    model.save_pretrained(folder)
    tokenizer(folder, extra_vocab).save_pretrained(folder)
    return folder


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return st.load_file(folder / "model.safetensors")


def task_arithmetic(base: dict, fts: list[dict], scale: float, weights=None, rename=lambda k: k) -> dict:
    """Oracle: θ0 + λ·Σ_t w_t·τ_t, float32, the sum left to right; θ0 + λ·τ spelt torch.add(θ0, τ, alpha=λ) as
    magmax spells it (one FMA where ATen uses one)."""
    weights = weights or [1.0] * len(fts)
    out = {}
    for key, value in base.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        total = None
        for w, ft in zip(weights, fts):
            term = (ft[rename(key)].float() - value.float()) * w
            total = term if total is None else total + term
        out[key] = torch.add(value.float(), total, alpha=scale).to(value.dtype)
    return out


# -- 1. buffers ------------------------------------------------------------------------------------------


def test_buffers_missing_in_finetunes_come_from_the_base(cli, tmp_path):
    base = save_base(tmp_path / "base", position_ids=True)
    fts = [save_finetune(base, tmp_path / f"ft{i}", i) for i in (1, 2)]
    assert "embeddings.position_ids" not in weights_of(fts[0])  # today's transformers does not save it
    out = tmp_path / "out"
    code, _, err = cli("--method", "task_arithmetic", "--base", base, *fts, "-o", out, "--scale", "0.5")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("buffers:")]
    assert len(notes) == 1 and "embeddings.position_ids" in notes[0] and "taken from the base" in notes[0]
    got = weights_of(out)
    want = task_arithmetic(weights_of(base), [weights_of(f) for f in fts], 0.5)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    AutoModel.from_pretrained(out, dtype="auto")


def test_a_missing_parameter_is_still_refused(cli, tmp_path):
    base = save_base(tmp_path / "base")
    ft = save_finetune(base, tmp_path / "ft1", 1)
    state = weights_of(ft)
    del state["pooler.dense.bias"]
    st.save_file(state, ft / "model.safetensors")
    code, _, err = cli("--base", base, ft, "-o", tmp_path / "out")
    assert code == 2 and "tensor 'pooler.dense.bias' of the base" in err and "is missing" in err
    assert not (tmp_path / "out").exists()


# -- 2. task heads ------------------------------------------------------------------------------------------


def test_task_head_finetunes_map_by_prefix_and_the_head_is_left_out(cli, tmp_path):
    base = save_base(tmp_path / "base")
    fts = [save_finetune(base, tmp_path / f"ft{i}", i, head=True) for i in (1, 2)]
    assert "bert.embeddings.word_embeddings.weight" in weights_of(fts[0])
    out = tmp_path / "out"
    code, _, err = cli("--method", "task_arithmetic", "--base", base, *fts, "-o", out)
    assert code == 0, err
    assert sum("key names:" in line and "'bert.…'" in line for line in err.splitlines()) == 1
    left = [line for line in err.splitlines() if line.startswith("left out")]
    assert len(left) == 1 and "classifier.weight" in left[0] and "--keep-extra" in left[0]
    got = weights_of(out)
    want = task_arithmetic(weights_of(base), [weights_of(f) for f in fts], 0.3, rename=lambda k: "bert." + k)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    model = AutoModel.from_pretrained(out, dtype="auto")
    assert type(model).__name__ == "BertModel"


def test_keep_extra_copies_the_head_and_takes_the_finetunes_names(cli, tmp_path):
    base = save_base(tmp_path / "base")
    fts = [save_finetune(base, tmp_path / f"ft{i}", i, head=True) for i in (1, 2)]
    out = tmp_path / "out"
    code, _, err = cli("--method", "task_arithmetic", "--base", base, *fts, "-o", out, "--keep-extra")
    assert code == 0, err
    assert sum(line.startswith("kept 2 tensor(s)") for line in err.splitlines()) == 1
    got = weights_of(out)
    ft1 = weights_of(fts[0])
    assert set(got) == set(ft1)
    assert torch.equal(got["classifier.weight"], ft1["classifier.weight"])  # the first model's head
    merged = task_arithmetic(weights_of(base), [weights_of(f) for f in fts], 0.3, rename=lambda k: "bert." + k)
    for key, value in merged.items():
        assert torch.equal(got["bert." + key], value), key
    model, info = AutoModelForSequenceClassification.from_pretrained(out, dtype="auto", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]


def test_an_extra_tensor_without_a_prefix_is_refused_with_the_option(cli, tmp_path):
    base = save_base(tmp_path / "base")
    ft = save_finetune(base, tmp_path / "ft1", 1)
    state = weights_of(ft)
    state["adapter.weight"] = torch.ones(2)
    st.save_file(state, ft / "model.safetensors")
    code, _, err = cli("--base", base, ft, "-o", tmp_path / "out")
    assert code == 2 and "tensor 'adapter.weight' is not in the base" in err and "--keep-extra" in err
    assert len(err.strip().splitlines()) == 1


# -- 3. vocabularies ----------------------------------------------------------------------------------------------


@pytest.fixture
def vocab_models(tmp_path):
    base = save_base(tmp_path / "base")
    fts = [save_finetune(base, tmp_path / "ft1", 1, extra_vocab=4), save_finetune(base, tmp_path / "ft2", 2)]
    return base, fts


def test_differing_vocabularies_need_the_vocab_option(cli, tmp_path, vocab_models):
    base, fts = vocab_models
    code, _, err = cli("--base", base, *fts, "-o", tmp_path / "out")
    assert code == 2 and "--vocab base" in err and "--vocab N" in err and "34 rows" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["1", "base"])
def test_vocabularies_merge_the_shared_rows(cli, tmp_path, vocab_models, source):
    base, fts = vocab_models
    out = tmp_path / "out"
    code, _, err = cli("--method", "task_arithmetic", "--base", base, *fts, "-o", out, "--vocab", source)
    assert code == 0, err
    assert sum(line.startswith("vocabulary:") for line in err.splitlines()) == 1
    key = "embeddings.word_embeddings.weight"
    b, f1, f2 = weights_of(base), weights_of(fts[0]), weights_of(fts[1])
    want_shared = torch.add(b[key], (f1[key][:30] - b[key]) + (f2[key] - b[key]), alpha=0.3)
    got = weights_of(out)[key]
    rows = 34 if source == "1" else 30
    assert got.shape == (rows, 8)
    assert torch.equal(got[:30], want_shared)
    if source == "1":
        assert torch.equal(got[30:], f1[key][30:])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    tok_from = fts[0] if source == "1" else base
    assert (out / "tokenizer.json").read_text() == (tok_from / "tokenizer.json").read_text()
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == rows
    model = AutoModel.from_pretrained(out, dtype="auto")
    assert model.get_input_embeddings().weight.shape == (rows, 8)


# -- 4. self-describing outputs -------------------------------------------------------------------------------------


def test_dtype_reaches_config_json(cli, tmp_path):
    base = save_base(tmp_path / "base")
    fts = [save_finetune(base, tmp_path / f"ft{i}", i) for i in (1, 2)]
    out = tmp_path / "out"
    code, _, err = cli("--base", base, *fts, "-o", out, "--dtype", "bfloat16")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["torch_dtype"] == "bfloat16"
    assert AutoModel.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


def test_model_card_and_recipe_reproduce_bit_for_bit(cli, tmp_path):
    base = save_base(tmp_path / "base")
    (base / "README.md").write_text("# the base model\n")
    fts = [save_finetune(base, tmp_path / f"ft{i}", i) for i in (1, 2, 3)]
    out = tmp_path / "out"
    code, _, err = cli("--method", "ties", "--base", base, *fts, "-o", out, "--option", "weights=[1.0,0.5,2.0]",
                       "--option", "k=0.5", "--dtype", "float16")
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert "the base model" not in card
    import hashlib

    digest = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    for needle in ("A merge of 3 fine-tuned model(s)", "`ties`", "λ (scale): 0.55", "1, 0.5, 2", digest,
                   f"magmax {magmax.__version__}", str(fts[2].absolute()), '"k": 0.5'):
        assert needle in card, needle
    recipe = yaml.safe_load((out / "magmax_recipe.yaml").read_text())
    assert recipe["weights"] == [1.0, 0.5, 2.0] and recipe["method"] == "ties" and recipe["dtype"] == "float16"
    again = tmp_path / "again"
    code, _, err = cli(out / "magmax_recipe.yaml", "-o", again)
    assert code == 0, err
    first, second = weights_of(out), weights_of(again)
    assert set(first) == set(second)
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key


def test_sentence_transformers_folder_keeps_its_files_and_loads(cli, tmp_path):
    from sentence_transformers import SentenceTransformer, models

    bert = save_base(tmp_path / "bert")
    folders = []
    for i in range(3):
        if i:
            save_finetune(bert, tmp_path / f"bert{i}", i)
        transformer = models.Transformer(str(bert if i == 0 else tmp_path / f"bert{i}"), max_seq_length=16)
        pooling = models.Pooling(transformer.get_embedding_dimension())
        folder = tmp_path / f"st{i}"
        SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(folder))
        folders.append(folder)
    out = tmp_path / "out"
    code, _, err = cli("--method", "task_arithmetic", "--base", folders[0], *folders[1:], "-o", out)
    assert code == 0, err
    for name in ("modules.json", "1_Pooling/config.json", "config_sentence_transformers.json"):
        assert (out / name).is_file(), name
    assert "library_name: sentence-transformers" in (out / "README.md").read_text()
    model = SentenceTransformer(str(out), device="cpu")
    embedding = model.encode(["w1 w2 w3"])
    assert embedding.shape == (1, 8)


# -- 5. per-model weights --------------------------------------------------------------------------------------------


def _states(seed: int = 0, count: int = 3):
    g = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(40, 30, generator=g), "b": torch.randn(50, generator=g), "n": torch.tensor(3)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in base.items()} for _ in range(count)]
    return base, fts


WEIGHTS = [1.0, -0.5, 2.0]


def _oracle_disjoint(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """mergekit's ties with normalize (written from its description): sign of Σ w·δ (>= 0: +)."""
    stacked = torch.stack([d * w for d, w in zip(deltas, weights)])
    w = torch.tensor(weights).view(-1, *[1] * deltas[0].dim())
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    mask = stacked.sign() == majority
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    return (stacked * mask).sum(0) / divisor


def _topk_trim(tau: torch.Tensor, k: float) -> torch.Tensor:
    flat = tau.abs().reshape(-1)
    kappa = flat.kthvalue(flat.numel() - int(flat.numel() * k)).values
    return torch.where(tau.abs() >= kappa, tau, 0.0)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs", "consensus"])
def test_weights_against_an_oracle(method):
    base, fts = _states()
    taus = {k: [ft[k] - base[k] for ft in fts] for k in ("a", "b")}
    scale = 0.7
    name, options = method, {}
    if method == "ties":
        options = {"k": 0.3, "threshold": "per_tensor"}
    if method.startswith("dare"):
        name, options = "dare", {"p": 0.4, "seed": 3, "combine": "ties" if method == "dare_ties" else "sum"}
    got = magmax.merge(name, base, fts, scale=scale, weights=WEIGHTS, **options)
    for key, ts in taus.items():
        if method == "task_arithmetic":
            tau = sum((t * w for t, w in zip(ts, WEIGHTS)), torch.zeros(()))
        elif method == "ties":
            tau = _oracle_disjoint([_topk_trim(t, 0.3) for t in ts], WEIGHTS)
        elif method.startswith("dare"):
            dare = Dare(DareOptions(**options))
            dropped = [dare._dropped(t, i, key) for i, t in enumerate(ts)]
            # the drops: each entry is 0 or τ/(1 − p)
            for d, t in zip(dropped, ts):
                assert torch.all((d == 0) | torch.isclose(d, t / 0.6))
            tau = (_oracle_disjoint(dropped, WEIGHTS) if method == "dare_ties"
                   else sum((d * w for d, w in zip(dropped, WEIGHTS)), torch.zeros(())))
        elif method == "breadcrumbs":
            tau = sum((torch.where(breadcrumbs_mask(t, 0.85, 0.007), t, 0.0) * w for t, w in zip(ts, WEIGHTS)),
                      torch.zeros(()))
        else:  # consensus over the weighted task vectors
            wt = [t * w for t, w in zip(ts, WEIGHTS)]
            total = sum(wt, torch.zeros(()))
            votes = sum(((x.abs() > 0.6 * (total - x).abs()).int() for x in wt), torch.zeros((), dtype=torch.int32))
            tau = total * (votes >= 2)
        torch.testing.assert_close(got[key], base[key] + scale * tau, rtol=1e-6, atol=1e-6)
    assert torch.equal(got["n"], base["n"])


@pytest.mark.parametrize("method", ["task_arithmetic", "breadcrumbs", "consensus", "dare"])
def test_unit_weights_equal_the_unweighted_merge(method):
    base, fts = _states(1)
    plain = magmax.merge(method, base, fts)
    ones = magmax.merge(method, base, fts, weights=[1.0] * len(fts))
    for key in plain:
        torch.testing.assert_close(ones[key], plain[key], rtol=1e-6, atol=1e-6)


def test_weights_change_the_result_and_streaming_merger_agrees():
    base, fts = _states(2)
    merger = magmax.Merger("task_arithmetic", base, weights=WEIGHTS)
    for ft in fts:
        merger.add(ft)
    batch = magmax.merge("task_arithmetic", base, fts, weights=WEIGHTS)
    plain = magmax.merge("task_arithmetic", base, fts)
    assert not torch.allclose(batch["a"], plain["a"])
    for key in batch:
        assert torch.equal(merger.merged()[key], batch[key])


def test_weights_on_the_cli_and_in_yaml(cli, tmp_path):
    base, fts = _states(3, count=2)
    paths = [tmp_path / "base.safetensors"] + [tmp_path / f"ft{i}.safetensors" for i in (1, 2)]
    for state, path in zip([base, *fts], paths):
        st.save_file(state, path)
    out = tmp_path / "out"
    code, _, err = cli("--method", "task_arithmetic", "--base", paths[0], *paths[1:], "-o", out,
                       "--option", "weights=[2.0,0.25]")
    assert code == 0, err
    want = task_arithmetic(base, fts, 0.3, [2.0, 0.25])
    got = weights_of(out)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(paths[0]),
                                      "models": [str(p) for p in paths[1:]], "weights": [2.0, 0.25]}))
    code, _, err = cli(recipe, "-o", tmp_path / "out2")
    assert code == 0, err
    for key, value in weights_of(tmp_path / "out2").items():
        assert torch.equal(value, got[key])
    code, _, err = cli("--method", "task_arithmetic", "--base", paths[0], *paths[1:], "-o", tmp_path / "x",
                       "--option", "weights=[1.0]")
    assert code == 2 and re.search(r"weights: 1 given for 2 fine-tuned model\(s\)", err)
    code, _, err = cli("--method", "magmax", "--base", paths[0], *paths[1:], "-o", tmp_path / "x",
                       "--option", "weights=[1.0,1.0]")
    assert code == 2 and "takes no per-model weights" in err and len(err.strip().splitlines()) == 1
