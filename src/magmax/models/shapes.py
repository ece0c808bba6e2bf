"""Parameter counts of a backbone from its architecture alone (no weights read), for `magmax run --dry-run`.

The plan states how many entries TIES ranks with ``population: whole_model`` and which fraction of the
trained weights that keeps. Both follow from the shapes: the model is built on PyTorch's ``meta`` device,
which allocates nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from magmax.models.base import BackboneConfig

# openai/clip-vit-base-patch16's architecture (its config.json), for planning on a machine without it.
CLIP_VIT_B16 = {
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "max_position_embeddings": 77},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
    "projection_dim": 512,
}


def _clip_config(cfg: BackboneConfig):
    from transformers import CLIPConfig

    from magmax.models.clip_hf import DEFAULT_CLIP, tiny_clip_config, tiny_clip_tokenizer

    if cfg.tiny:
        return tiny_clip_config(cfg.image_size, tiny_clip_tokenizer())
    name = cfg.name_or_path or DEFAULT_CLIP
    if Path(name).is_dir() and (Path(name) / "config.json").is_file():
        return CLIPConfig.from_pretrained(name)
    try:
        return CLIPConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return CLIPConfig(**CLIP_VIT_B16) if name == DEFAULT_CLIP else None


def trained_and_frozen_numel(cfg: BackboneConfig) -> tuple[int, int] | None:
    """(floating-point entries of the trained encoder, of the rest of the model's state dict), or None
    where the architecture is not known without loading the model."""
    if cfg.kind != "clip":
        return None
    config = _clip_config(cfg)
    if config is None:
        return None
    from transformers import CLIPModel

    with torch.device("meta"):
        model = CLIPModel(config)
    trained = frozen = 0
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        if key.startswith(("vision_model.", "visual_projection.")):
            trained += tensor.numel()
        else:
            frozen += tensor.numel()
    return trained, frozen
