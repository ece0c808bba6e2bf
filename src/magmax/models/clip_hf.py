"""CLIP through Hugging Face transformers (protocol §2): the vision tower is trained and merged.

- encoder = ``vision_model`` + ``visual_projection`` (keys as in ``CLIPModel``'s state dict, so a
  fine-tuned encoder loads back into a CLIPModel with ``strict=False``).
- frozen: ``text_model`` + ``text_projection``; the zero-shot head is built from them.
- logit scale = exp(logit_scale) read from the model (100 for the OpenAI weights).
- preprocessing: open_clip's (``magmax.models.preprocess``), CLIP's mean/std.

Weights: a Hugging Face id (default ``openai/clip-vit-base-patch16``) or a local folder. With
``HF_HUB_OFFLINE`` set (or a folder given) only local files are read; nothing is downloaded then.
``tiny: true`` builds a small random-init CLIP in code, with a character-level CLIP tokenizer (its BPE
has the 512 byte-level symbols and no merges) — for tests only: it has never seen text or images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from magmax.errors import ConfigError
from magmax.models.base import BackboneConfig, ImageBackbone
from magmax.models.hf_loading import first_line, hub_offline, quiet_transformers
from magmax.models.preprocess import ImageTransform

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
TINY_PATCH = 8


class CLIPVisionEncoder(torch.nn.Module):
    """Image → CLIP image embedding (pooled CLS token after post-LayerNorm, then the projection)."""

    def __init__(self, vision_model: torch.nn.Module, visual_projection: torch.nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class CLIPTextTower(torch.nn.Module):
    """Tokens → CLIP text embedding (EOS token state after the final LayerNorm, then the projection)."""

    def __init__(self, text_model: torch.nn.Module, text_projection: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = text_model
        self.text_projection = text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.text_projection(pooled)


def tiny_clip_tokenizer() -> Any:
    """TEST-ONLY CLIP tokenizer built in code: byte-level BPE over single characters (no merges).

    Vocabulary: the 256 byte-level symbols, the same with the end-of-word marker ``</w>``, then
    ``<|startoftext|>`` (512) and ``<|endoftext|>`` (513, also padding) — 514 ids in all.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": len(symbols) + i for i, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip_config(image_size: int, tokenizer: Any) -> Any:
    """A small CLIPConfig: both towers 32 wide, 2 layers, 2 heads; patch 8; projection 16."""
    from transformers import CLIPConfig

    if image_size % TINY_PATCH:
        raise ConfigError(f"backbone.image_size {image_size} must be a multiple of {TINY_PATCH} for the tiny CLIP")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(
        tower,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(tower, image_size=image_size, patch_size=TINY_PATCH)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def load_clip(name_or_path: str) -> tuple[Any, Any]:
    """(CLIPModel in float32, CLIPTokenizer) from a Hugging Face id or a local folder."""
    from transformers import CLIPModel, CLIPTokenizer

    local_only = hub_offline() or Path(name_or_path).is_dir()
    try:
        with quiet_transformers():
            model = CLIPModel.from_pretrained(name_or_path, local_files_only=local_only)
            tokenizer = CLIPTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
    except (OSError, ValueError) as err:
        reason = first_line(err)
        where = "local files only (HF_HUB_OFFLINE is set)" if local_only else "the Hugging Face hub"
        raise ConfigError(
            f"CLIP weights {name_or_path!r} could not be loaded from {where}: {reason}; set backbone.name_or_path "
            "to a transformers CLIP folder (config.json, weights, tokenizer files) or use backbone.tiny for tests"
        ) from err
    return model.float(), tokenizer


class CLIPBackbone(ImageBackbone):
    """CLIP (transformers): vision tower trained and merged, text tower frozen, template zero-shot head."""


    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(seed=cfg.seed)
        if cfg.tiny:
            from transformers import CLIPModel

            tokenizer = tiny_clip_tokenizer()
            config = tiny_clip_config(cfg.image_size, tokenizer)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = CLIPModel(config)
        else:
            model, tokenizer = load_clip(cfg.name_or_path or DEFAULT_CLIP)
        native_size = model.config.vision_config.image_size
        if cfg.image_size != native_size:
            raise ConfigError(
                f"backbone.image_size is {cfg.image_size} but the CLIP model was trained at {native_size}; "
                f"set backbone.image_size: {native_size}"
            )
        self.encoder = CLIPVisionEncoder(model.vision_model, model.visual_projection)
        self.text_tower = self.freeze(CLIPTextTower(model.text_model, model.text_projection))
        self.logit_scale = float(cfg.logit_scale or model.logit_scale.detach().exp().item())
        self.tokenizer = tokenizer
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.transform = ImageTransform(size=cfg.image_size)

    def reference_frozen_numel(self) -> int:
        """The text tower, the text projection and ``logit_scale`` (one entry): CLIPModel's state dict
        less the encoder, as the reference's open_clip model holds them (63,428,097 for ViT-B/16)."""
        tower = sum(t.numel() for t in self.text_tower.state_dict().values() if t.is_floating_point())
        return tower + 1

    @torch.no_grad()
    def encode_class_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        device = next(self.text_tower.parameters()).device
        return self.text_tower(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
