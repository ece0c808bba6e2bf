"""Backbone kinds by name: :func:`build_backbone` builds the one a :class:`BackboneConfig` names.

Each kind lives in its own module (clip_hf, open_clip_backbone, minilm, efficientnet), which imports
:mod:`magmax.models.base` for the contract; this module sits above both and imports a kind's module only
when that kind is built (their optional dependencies stay unloaded otherwise), so ``base`` never needs
to know its subclasses.
"""

from __future__ import annotations

from magmax.errors import ConfigError
from magmax.models.base import Backbone, BackboneConfig


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone ``cfg.kind`` names (each kind's module is imported only when used)."""
    if cfg.kind == "clip":
        from magmax.models.clip_hf import CLIPBackbone

        return CLIPBackbone(cfg)
    if cfg.kind == "open_clip":
        from magmax.models.open_clip_backbone import OpenCLIPBackbone

        return OpenCLIPBackbone(cfg)
    if cfg.kind == "minilm":
        from magmax.models.minilm import MiniLMBackbone

        return MiniLMBackbone(cfg)
    if cfg.kind == "efficientnet_lite0":
        from magmax.models.efficientnet import EfficientNetLiteBackbone

        return EfficientNetLiteBackbone(cfg)
    raise ConfigError(f"backbone kind {cfg.kind!r} is unknown; use clip, open_clip, minilm or efficientnet_lite0")
