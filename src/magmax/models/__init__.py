"""Backbones (trained + merged encoders) and their frozen zero-shot heads.

``build_backbone(BackboneConfig(kind=...))`` gives a :class:`Backbone`; each kind lives in its own module
(clip_hf, open_clip_backbone, minilm, efficientnet) and is imported only when built.
"""

from magmax.models.base import Backbone, BackboneConfig, Modality
from magmax.models.heads import template_head
from magmax.models.preprocess import ImageTransform, preprocess_images
from magmax.models.registry import build_backbone

__all__ = [
    "Backbone",
    "BackboneConfig",
    "ImageTransform",
    "Modality",
    "build_backbone",
    "preprocess_images",
    "template_head",
]
