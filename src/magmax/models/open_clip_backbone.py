"""CLIP through open_clip (optional extra: ``pip install "magmax[openclip]"``), as the reference code loads it.

Same contract as the transformers CLIP backbone: encoder = ``model.visual`` (the vision tower with its
projection ``proj``), trained and merged; the text side (token embedding, transformer, final LayerNorm,
text projection) frozen; head from templates; logit scale exp(logit_scale) read from the model.
Default model ``ViT-B-16`` with ``pretrained='openai'`` (protocol §2). open_clip fetches named
pretrained weights from the network unless they are in its cache; give ``backbone.pretrained`` a
checkpoint file path to load local weights.
"""

from __future__ import annotations

from typing import Any

import torch

from magmax.errors import ConfigError
from magmax.models.base import BackboneConfig, ImageBackbone
from magmax.models.hf_loading import first_line
from magmax.models.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"


def import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:  # torchvision inside open_clip fails on some torch builds as well
        raise ConfigError(
            f"backbone kind 'open_clip' needs open_clip ({first_line(err)}): pip install \"magmax[openclip]\" "
            "(open_clip_torch and torchvision), or use kind: clip (transformers)"
        ) from err
    return open_clip


class OpenCLIPBackbone(ImageBackbone):
    """open_clip CLIP: ``model.visual`` trained and merged, text side frozen, template zero-shot head."""


    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(seed=cfg.seed)
        open_clip = import_open_clip()
        name = cfg.name_or_path or DEFAULT_MODEL
        pretrained = cfg.pretrained or DEFAULT_PRETRAINED
        try:
            model = open_clip.create_model(name, pretrained=pretrained)
            tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, OSError, ValueError) as err:
            raise ConfigError(
                f"open_clip model {name!r} with pretrained {pretrained!r} could not be created: {first_line(err)}; "
                "check the names (open_clip.list_pretrained()) or give backbone.pretrained a local checkpoint file"
            ) from err
        model = model.float()
        native = model.visual.image_size
        native = native[0] if isinstance(native, (tuple, list)) else native
        if cfg.image_size != native:
            raise ConfigError(
                f"backbone.image_size is {cfg.image_size} but open_clip {name!r} takes {native}; "
                f"set backbone.image_size: {native}"
            )
        self.encoder = model.visual
        self.clip = model  # holds the frozen text side; ``visual`` inside it is the same module as encoder
        for key, parameter in model.named_parameters():
            if not key.startswith("visual."):
                parameter.requires_grad_(False)
        self.text_parts = [module for key, module in model.named_children() if key != "visual"]
        self._frozen_parts.extend(self.text_parts)
        self.tokenizer = tokenizer
        self.logit_scale = float(cfg.logit_scale or model.logit_scale.detach().exp().item())
        mean = tuple(getattr(model.visual, "image_mean", None) or CLIP_MEAN)
        std = tuple(getattr(model.visual, "image_std", None) or CLIP_STD)
        self.transform = ImageTransform(size=cfg.image_size, mean=mean, std=std)

    def reference_frozen_numel(self) -> int:
        """Every floating-point entry of the open_clip model's state dict outside ``visual``."""
        return sum(t.numel() for k, t in self.clip.state_dict().items()
                   if t.is_floating_point() and not k.startswith("visual."))

    @torch.no_grad()
    def encode_class_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.clip.logit_scale.device)
        return self.clip.encode_text(tokens)
