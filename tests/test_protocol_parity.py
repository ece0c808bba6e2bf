"""The runner against the MagMax reference (danielm1405/magmax at 4f49f18), point by point.

Each test captures what the runner actually does on a tiny CLIP (the optimiser it builds, the learning
rates it sets, the Fisher it computes, the models it evaluates, the texts its head reads) and compares
it with a value or a loop written out plainly here, not with the helpers the runner uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

import magmax.continual as continual_mod
import magmax.training.loop as loop_mod
from magmax.config import load_config, validate_config
from magmax.continual import ContinualRun, merge_options
from magmax.models.clip_hf import tiny_clip_config, tiny_clip_tokenizer
from magmax.training import baselines
from test_continual import image_root, raw_config  # noqa: F401  (the module fixture)

PRESETS = Path(__file__).parent.parent / "configs" / "paper"


class Recorder:
    """What the runner evaluated (encoder state per model name) and the θ_t each task ended with."""

    def __init__(self, monkeypatch):
        self.evaluated: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.finetuned: list[dict[str, torch.Tensor]] = []
        real_eval = ContinualRun.eval_current
        real_finetune = continual_mod.finetune
        recorder = self

        def eval_spy(run, name, *args, **kwargs):
            state = {k: v.detach().clone() for k, v in run.backbone.encoder.state_dict().items()}
            recorder.evaluated.setdefault(name, []).append(state)
            return real_eval(run, name, *args, **kwargs)

        def finetune_spy(backbone, *args, **kwargs):
            steps = real_finetune(backbone, *args, **kwargs)
            recorder.finetuned.append({k: v.detach().clone() for k, v in backbone.encoder.state_dict().items()})
            return steps

        monkeypatch.setattr(ContinualRun, "eval_current", eval_spy)
        monkeypatch.setattr(continual_mod, "finetune", finetune_spy)


# -- optimiser, clipping, steps, schedule ----------------------------------------------------------------


def reference_lr(step: int, base: float, warmup: int, total: int) -> float:
    """src/utils.py cosine_lr of the reference: base·(step+1)/warmup, then a half cosine to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * base


def test_optimiser_clip_steps_and_schedule_as_the_reference(image_root, tmp_path, monkeypatch):  # noqa: F811
    optimisers, clips, lrs = [], [], []
    real_make = loop_mod.make_optimizer
    real_clip = torch.nn.utils.clip_grad_norm_

    def make_spy(params, cfg, device):
        optimiser = real_make(params, cfg, device)
        optimisers.append((optimiser, [p for p in params]))
        lrs.append([])
        return optimiser

    def clip_spy(params, max_norm, *args, **kwargs):
        clips.append(max_norm)
        lrs[-1].append(optimisers[-1][0].param_groups[0]["lr"])
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(loop_mod, "make_optimizer", make_spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    # Two tasks of 3 classes: 24 training images each, batch 7 → ceil(24 / 7) = 4 batches per epoch (the
    # last one partial, kept); 126 epochs = 504 steps per task, past the ABSOLUTE 500-step warm-up.
    cfg = raw_config(
        image_root,
        scenario={"kind": "class_incremental", "n_tasks": 2, "class_order": "natural"},
        train={"lr": 1e-5, "weight_decay": 0.1, "batch_size": 7, "warmup_steps": 500, "epochs": 126,
               "grad_clip": 1.0, "precision": "fp32", "eval_batch_size": 64},
        streams=[{"name": "seq"}], merges=[{"method": "magmax"}], zero_shot=False,
    )
    ContinualRun(validate_config(cfg), tmp_path / "run").run()

    assert len(optimisers) == 2  # a fresh optimiser per task
    assert optimisers[0][0] is not optimisers[1][0]
    for optimiser, params in optimisers:
        assert type(optimiser) is torch.optim.AdamW
        group = optimiser.param_groups[0]
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0.1
        assert group["amsgrad"] is False
    assert set(clips) == {1.0}
    total = 126 * math.ceil(24 / 7)  # 3 classes × 8 images per task, batch 7: epochs × ceil(N / batch)
    assert total == 504
    assert [len(task_lrs) for task_lrs in lrs] == [total, total]
    for task_lrs in lrs:
        for step in (0, 499, 500, total - 1):
            assert task_lrs[step] == pytest.approx(reference_lr(step, 1e-5, 500, total), rel=1e-12), step
    assert lrs[0][0] == pytest.approx(2e-8) and lrs[0][499] == pytest.approx(1e-5) and lrs[0][500] == pytest.approx(1e-5)


# -- precision ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_of_training_fisher_and_evaluation(image_root, tmp_path, monkeypatch, precision, dtype):  # noqa: F811
    seen: dict[str, set] = {"train": set(), "fisher": set(), "eval": set()}
    phase = {"now": "train"}
    real_build = continual_mod.build_backbone
    real_fisher = baselines.reference_fisher_diagonal
    real_eval = ContinualRun.eval_current

    def build_spy(cfg):
        backbone = real_build(cfg)
        backbone.encoder.register_forward_hook(lambda m, i, out: seen[phase["now"]].add(out.dtype))
        return backbone

    def fisher_spy(ctx, targets="head"):
        phase["now"] = "fisher"
        try:
            return real_fisher(ctx, targets)
        finally:
            phase["now"] = "train"

    def eval_spy(run, name, *args, **kwargs):
        phase["now"] = "eval"
        try:
            return real_eval(run, name, *args, **kwargs)
        finally:
            phase["now"] = "train"

    monkeypatch.setattr(continual_mod, "build_backbone", build_spy)
    monkeypatch.setattr(baselines, "reference_fisher_diagonal", fisher_spy)
    monkeypatch.setattr(ContinualRun, "eval_current", eval_spy)
    cfg = raw_config(image_root, train={"lr": 1e-3, "batch_size": 8, "warmup_steps": 2, "steps": 2, "precision": precision},
                     streams=[{"name": "ewc", "regularizer": "ewc", "ewc": {"fisher": "reference"}}],
                     merges=[{"method": "magmax"}], zero_shot=False)
    ContinualRun(validate_config(cfg), tmp_path / "run").run()
    assert seen == {"train": {dtype}, "fisher": {dtype}, "eval": {dtype}}


def test_paper_presets_run_fp32_as_the_reference():
    for path in sorted(PRESETS.glob("*.yaml")):
        assert load_config(path).train.precision == "fp32", path.stem


# -- TIES over the whole model ---------------------------------------------------------------------------


def tiny_clip_counts() -> tuple[int, int]:
    """(vision tower + projection, everything else) floating entries of the tiny CLIPModel's state dict."""
    model = CLIPModel(tiny_clip_config(32, tiny_clip_tokenizer()))
    trained = frozen = 0
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            if key.startswith(("vision_model.", "visual_projection.")):
                trained += value.numel()
            else:
                frozen += value.numel()
    return trained, frozen


@pytest.mark.parametrize("population", ["whole_model", "trained"])
def test_ties_ranks_the_whole_model_with_the_frozen_tower_counted(image_root, tmp_path, monkeypatch, population):  # noqa: F811
    recorder = Recorder(monkeypatch)
    cfg = raw_config(image_root, streams=[{"name": "seq"}], merges=[{"method": "ties", "population": population}],
                     zero_shot=False)
    run = ContinualRun(validate_config(cfg), tmp_path / "run")
    run.run()
    trained, frozen = tiny_clip_counts()
    keys = [k for k, v in run.theta0.items() if v.is_floating_point()]
    assert sum(run.theta0[k].numel() for k in keys) == trained
    # After task 1, TIES of one task vector is its trim: the top-20% of |τ_1| ranked among
    # trained (+ frozen zeros) entries, kthvalue at d − int(0.2·d), ties kept.
    tau = torch.cat([(recorder.finetuned[0][k] - run.theta0[k]).reshape(-1) for k in keys])
    zeros = frozen if population == "whole_model" else 0
    d = tau.numel() + zeros
    kappa = torch.kthvalue(torch.cat([tau.abs(), torch.zeros(zeros)]), d - int(d * 0.2)).values
    expected_kept = int((tau.abs() >= kappa).sum())
    merged = recorder.evaluated["seq:ties"][0]
    kept = sum(int((merged[k] != run.theta0[k]).sum()) for k in keys)
    assert kept == expected_kept
    fraction = kept / trained
    if population == "whole_model":
        assert fraction == pytest.approx((int(d * 0.2) + 1) / trained, abs=1e-4) and fraction > 0.3
    else:
        assert fraction == pytest.approx(0.2, abs=1e-4)


def test_paper_presets_rank_ties_over_the_whole_model():
    for path in sorted(PRESETS.glob("*.yaml")):
        ties = [m for m in load_config(path).merges if m.method == "ties"]
        assert [m.population for m in ties] == ["whole_model"], path.stem


# -- EWC's Fisher ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", ["head", "embedding"])
def test_ewc_reference_fisher_is_the_reference_loop(image_root, tmp_path, monkeypatch, targets):  # noqa: F811
    """The reference's compute_fisher_matrix_diag, written out: .grad never zeroed (it starts from the last
    clipped training gradient), every batch adds len·grad², the sum is divided by (N // B + 1)·B."""
    checked = []
    real_fisher = baselines.reference_fisher_diagonal

    def fisher_spy(ctx, targets_arg="head"):
        backbone = ctx.backbone
        params = {n: p for n, p in backbone.encoder.named_parameters() if p.requires_grad}
        start_grads = {n: p.grad.detach().clone() for n, p in params.items()}
        batches = []
        real_prepare = backbone.prepare

        def prepare_spy(items, train, generator=None):
            batch = real_prepare(items, train, generator)
            batches.append(batch.clone())
            return batch

        backbone.prepare = prepare_spy
        try:
            got = real_fisher(ctx, targets_arg)
        finally:
            del backbone.prepare
        # The oracle: the same batches, from the gradient training left.
        for n, p in params.items():
            p.grad = start_grads[n].clone()
        oracle = {n: torch.zeros_like(p) for n, p in params.items()}
        backbone.train()
        for batch in batches:
            embedding = backbone.encoder(batch)
            if targets_arg == "embedding":
                outputs = embedding
            else:
                outputs = backbone.logit_scale * F.normalize(embedding, dim=-1) @ ctx.head.T
            F.cross_entropy(outputs, outputs.argmax(1)).backward()
            for n, p in params.items():
                oracle[n] += p.grad.pow(2) * len(batch)
        backbone.encoder.zero_grad(set_to_none=True)
        backbone.eval()
        n, b = len(ctx.task.train), ctx.cfg.batch_size
        assert len(batches) == math.ceil(n / b)
        assert sum(len(x) for x in batches) == n
        grad_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in start_grads.values()))
        assert 0 < grad_norm <= 1.0 + 1e-5  # the last training step's gradient, clipped at 1.0
        for name in oracle:
            torch.testing.assert_close(got[name], oracle[name] / ((n // b + 1) * b), rtol=1e-5, atol=1e-12)
        checked.append(ctx.task.index)
        return got

    monkeypatch.setattr(baselines, "reference_fisher_diagonal", fisher_spy)
    # 16 training images per task, batch 6: 3 batches (6, 6, 4), divisor (16 // 6 + 1)·6 = 18.
    cfg = raw_config(image_root, train={"lr": 1e-3, "batch_size": 6, "warmup_steps": 2, "steps": 3},
                     streams=[{"name": "ewc", "regularizer": "ewc", "ewc": {"fisher": "reference", "fisher_targets": targets}}],
                     merges=[{"method": "magmax"}], zero_shot=False)
    ContinualRun(validate_config(cfg), tmp_path / "run").run()
    assert checked == [0, 1, 2]


def test_paper_presets_use_the_reference_fisher():
    for path in sorted(PRESETS.glob("*.yaml")):
        cfg = load_config(path)
        (ewc,) = [s for s in cfg.streams if s.regularizer == "ewc"]
        targets = "embedding" if cfg.scenario.kind == "domain_incremental" else "head"
        assert (ewc.ewc.fisher, ewc.ewc.fisher_targets, ewc.ewc.strength) == ("reference", targets, 1e6), path.stem


# -- LwF's teacher and heads -----------------------------------------------------------------------------


def test_lwf_teacher_is_the_previous_model_and_heads_are_the_previous_tasks(image_root, tmp_path, monkeypatch):  # noqa: F811
    recorder = Recorder(monkeypatch)
    seen = []
    real_before = baselines.LwF.before_task

    def before_spy(self, ctx):
        real_before(self, ctx)
        teacher = None if self.old_encoder is None else {k: v.clone() for k, v in self.old_encoder.state_dict().items()}
        trainable = None if self.old_encoder is None else any(p.requires_grad for p in self.old_encoder.parameters())
        seen.append((ctx.task.index, teacher, None if self.old_head is None else self.old_head.clone(),
                     ctx.head.clone(), trainable, None if self.old_encoder is None else self.old_encoder.training))

    monkeypatch.setattr(baselines.LwF, "before_task", before_spy)
    cfg = raw_config(image_root, streams=[{"name": "lwf", "regularizer": "lwf"}], merges=[{"method": "magmax"}], zero_shot=False)
    run = ContinualRun(validate_config(cfg), tmp_path / "run")
    run.run()
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1] is None and seen[0][2] is None  # no teacher on the first task
    for t in (1, 2):
        _, teacher, old_head, head, trainable, training = seen[t]
        assert all(torch.equal(teacher[k], recorder.finetuned[t - 1][k]) for k in teacher)
        expected_heads = torch.cat([run.head_all[[run.row_of[c] for c in task.classes]] for task in run.tasks[:t]])
        assert torch.equal(old_head, expected_heads)
        assert torch.equal(head, run.head_all[[run.row_of[c] for c in run.tasks[t].classes]])
        assert trainable is False and training is False
    assert run.cfg.streams[0].lwf.weight == 0.3 and run.cfg.streams[0].lwf.temperature == 2.0


# -- merged models: τ against θ0, coefficients ---------------------------------------------------------------


def test_evaluated_merges_take_tau_against_theta0(image_root, tmp_path, monkeypatch):  # noqa: F811
    recorder = Recorder(monkeypatch)
    cfg = raw_config(image_root, streams=[{"name": "seq"}], merges=[{"method": "magmax"}, {"method": "average"}], zero_shot=False)
    run = ContinualRun(validate_config(cfg), tmp_path / "run")
    run.run()
    keys = [k for k, v in run.theta0.items() if v.is_floating_point()]
    for t in range(3):
        taus = [{k: recorder.finetuned[i][k] - run.theta0[k] for k in keys} for i in range(t + 1)]
        for k in keys:
            best = taus[0][k]
            for tau in taus[1:]:
                best = torch.where(tau[k].abs() >= best.abs(), tau[k], best)  # later task wins ties
            torch.testing.assert_close(recorder.evaluated["seq:magmax"][t][k], run.theta0[k] + 0.5 * best, rtol=0, atol=1e-7)
            mean = torch.stack([tau[k] for tau in taus]).mean(0)
            torch.testing.assert_close(recorder.evaluated["seq:average"][t][k], run.theta0[k] + mean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("preset, coefficient", [("imagenet_r-domains", "half_sum"), ("domainnet", "half_sum"),
                                                 ("cifar100-10", "mean"), ("imagenet_r-10", "mean")])
def test_average_is_half_the_sum_in_domain_incremental_presets(preset, coefficient):
    """merge_domain_splitted.py: sum(τ)·1/n_splits with n_splits left at 2; class-incremental: 1/T."""
    from magmax import Merger

    cfg = load_config(PRESETS / f"{preset}.yaml")
    (average,) = [m for m in cfg.merges if m.name == "average"]
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(7, 5, generator=generator)}
    finetuned = [{"w": base["w"] + torch.randn(7, 5, generator=generator)} for _ in range(4)]
    merger = Merger(average.method, base, **merge_options(average, None))
    for ft in finetuned:
        merger.add(ft)
    total = sum(ft["w"] - base["w"] for ft in finetuned)
    factor = 0.5 if coefficient == "half_sum" else 1 / 4
    torch.testing.assert_close(merger.merged()["w"], base["w"] + factor * total, rtol=1e-6, atol=1e-6)


# -- class names in the head's prompts -------------------------------------------------------------------


@pytest.mark.parametrize("natural, shown", [(False, "aquarium_fish"), (True, "aquarium fish")])
def test_cifar100_head_prompts_use_the_reference_names(tmp_path, monkeypatch, natural, shown):
    rng = np.random.default_rng(0)
    labels = np.arange(100, dtype=np.int64)
    images = rng.integers(0, 255, (100, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar100.npz", x_train=images, y_train=labels, x_test=images, y_test=labels)
    texts = []
    real_build = continual_mod.build_backbone

    def build_spy(cfg):
        backbone = real_build(cfg)
        real_encode = backbone.encode_class_texts

        def encode_spy(batch):
            texts.extend(batch)
            return real_encode(batch)

        backbone.encode_class_texts = encode_spy
        return backbone

    monkeypatch.setattr(continual_mod, "build_backbone", build_spy)
    preset = load_config(PRESETS / "cifar100-10.yaml")
    assert preset.data.options == {"natural_names": False}
    cfg = validate_config({
        "data": {"name": "cifar100", "root": str(tmp_path), "options": {"natural_names": natural}},
        "scenario": {"kind": "class_incremental", "n_tasks": 10, "class_order": "paper-cifar100"},
        "backbone": {"kind": "clip", "tiny": True, "image_size": 32}, "device": "cpu",
    })
    run = ContinualRun(cfg, tmp_path / "run")
    run.setup()
    assert len(texts) == 100 * 18  # the 18 CIFAR-100 templates of the CLIP paper, for every class
    assert "a photo of a " + shown + "." in texts
    underscored = [t for t in texts if "_" in t]
    assert bool(underscored) is (not natural)
    if not natural:
        assert len({t for t in underscored if "maple_tree" in t}) == 18
