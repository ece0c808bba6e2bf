"""A PEFT LoRA adapter folder read as a fine-tuned checkpoint of its base, one tensor at a time.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as ``save_pretrained``
writes it) holds, for each targeted module ``M``, the factors ``base_model.model.M.lora_A.weight``
(r×in) and ``…lora_B.weight`` (out×r). Its task vector is ΔW_M = s·B·A (transposed for
``fan_in_fan_out`` layers such as GPT-2's Conv1D; for embeddings ``lora_embedding_A/B`` give
s·(B·A)ᵀ), with s = lora_alpha/r, or lora_alpha/√r under ``use_rslora`` (``alpha_pattern`` and the
rank of each module's factors respected), and zero on every other tensor. Tensors listed in
``modules_to_save`` are stored whole: they replace the base's.

:class:`LoraAdapterReader` is a :class:`~magmax.engine.TensorReader` over the base's keys whose
``get(k)`` is θ0[k] + ΔW_k (computed as PEFT's ``merge_and_unload`` does: the float32 product added to
θ0 in float32, rounded once to the base's dtype) for a targeted k and θ0[k] otherwise, read from the
base and the factors when asked: memory holds one base tensor and one pair of factors, whatever the
model's size. The merge of an adapter therefore equals the merge of the model PEFT's
``merge_and_unload`` gives (bit for bit in float32).

Adapter features whose update is not s·B·A (DoRA, conv LoRA, LoRA biases, …) are refused in one line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from magmax.checkpoints import CheckpointReader, open_checkpoint
from magmax.engine import TensorMeta
from magmax.errors import MergeInputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

# adapter_config.json keys that change the update away from s·B·A, with the value meaning "not used".
_UNSUPPORTED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}

_HINT = (
    "merge it into its base with peft (PeftModel.from_pretrained(base, adapter).merge_and_unload()"
    ".save_pretrained(folder)) and pass that folder"
)


def is_adapter_folder(path: Path | str) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def _refuse(folder: Path, feature: str) -> MergeInputError:
    return MergeInputError(f"{folder}: this LoRA adapter uses {feature}, which magmax merge does not read; {_HINT}")


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's config, checked to be a plain LoRA magmax can turn into ΔW = s·B·A."""
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise MergeInputError(f"{path}: cannot read ({exc.strerror}); check the adapter folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MergeInputError(f"{path}: not JSON; re-save the adapter with save_pretrained") from None
    if not isinstance(config, dict):
        raise MergeInputError(f"{path}: not a JSON object; re-save the adapter with save_pretrained")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise _refuse(folder, f"PEFT type {config.get('peft_type')!r} (only LORA adapters are read)")
    for field, feature in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise _refuse(folder, feature)
    if config.get("bias", "none") != "none":
        raise _refuse(folder, f"trained biases (bias={config.get('bias')!r})")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool):
            raise MergeInputError(f"{path}: '{field}' is missing or not a number; re-save the adapter")
    return config


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The key of ``rank_pattern``/``alpha_pattern`` that applies to ``module`` (PEFT's get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class _Factors:
    """One targeted base tensor: ΔW = scaling · (B·A) (transposed if ``transpose``)."""

    module: str
    a_key: str
    b_key: str
    scaling: float
    transpose: bool
    embedding: bool


def _strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def _prefix_map(adapter_keys: list[str], base_keys: set[str]) -> tuple[str, str]:
    """(strip, add): the one change of leading prefix that maps every adapter key onto a base key.

    An adapter trained on ``BertForSequenceClassification`` names ``bert.encoder…`` what a ``BertModel``
    checkpoint names ``encoder…`` (strip ``bert.``), and the other way round (add it). Returns None-like
    ("", "") when the names agree already; raises KeyError when no single change fits them all."""
    first = adapter_keys[0]
    candidates: list[tuple[str, str]] = [("", "")]
    for key in base_keys:
        if key != first and first.endswith("." + key):
            candidates.append((first[: -len(key)], ""))
        elif key != first and key.endswith("." + first):
            candidates.append(("", key[: -len(first)]))
    for strip, add in sorted(set(candidates), key=lambda c: len(c[0]) + len(c[1])):
        if all(k.startswith(strip) and add + k[len(strip) :] in base_keys for k in adapter_keys):
            return strip, add
    raise KeyError(first)


class LoraAdapterReader(CheckpointReader):
    """θ_t = θ0 + ΔW of a PEFT LoRA adapter over ``base`` (see the module docstring), tensor by tensor.

    ``base`` is a reader of the base checkpoint that this reader owns (closed with it)."""

    def __init__(self, folder: Path | str, base: CheckpointReader, name: str | None = None):
        self.folder = Path(folder)
        self.name = name or str(self.folder)
        self.base = base
        self.model_folder = None
        self._weights: CheckpointReader | None = None
        try:
            self.config = read_adapter_config(self.folder)
            self._weights = self._open_weights()
            self._factors, self._replaced = self._plan()
        except BaseException:
            self.close()
            raise

    def _open_weights(self) -> CheckpointReader:
        for file_name in ADAPTER_WEIGHTS:
            if (self.folder / file_name).is_file():
                return open_checkpoint(self.folder / file_name)
        raise MergeInputError(
            f"{self.folder}: LoRA adapter without weights ({' or '.join(ADAPTER_WEIGHTS)}); re-save it with "
            "save_pretrained"
        )

    def _plan(self) -> tuple[dict[str, _Factors], dict[str, str]]:
        """Base key → its factors, and base key → the adapter key that replaces it (modules_to_save)."""
        assert self._weights is not None
        config = self.config
        pairs: dict[str, dict[str, str]] = {}
        whole: dict[str, str] = {}  # adapter name (prefix stripped) → adapter key
        for key in self._weights.keys():
            name = _strip_peft_prefix(key)
            match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
            if match:
                module = match.group(1) or match.group(3)
                kind = (match.group(2) or match.group(4))[-1]
                pairs.setdefault(module, {})[kind + ("E" if match.group(3) else "")] = key
            elif ".lora_magnitude_vector" in name:
                raise _refuse(self.folder, "DoRA (lora_magnitude_vector)")
            elif re.search(r"\.lora_[AB]\.bias$", name):
                raise _refuse(self.folder, "LoRA biases (lora_B.bias)")
            elif re.search(r"\.lora_\w+", name):
                raise _refuse(self.folder, f"tensor '{key}' of a LoRA variant")
            else:
                whole[name] = key  # modules_to_save: the module's tensors, stored whole
        if not pairs and not whole:
            raise MergeInputError(f"{self.folder}: the LoRA adapter holds no tensors; re-save it with save_pretrained")
        base_keys = set(self.base.keys())
        targets: dict[str, tuple[str, dict[str, str]]] = {}
        for module, keys in pairs.items():
            if set(keys) not in ({"A", "B"}, {"AE", "BE"}):
                raise MergeInputError(
                    f"{self.folder}: module '{module}' has {sorted(keys)} of the LoRA factors, not both A and B; "
                    "re-save the adapter with save_pretrained"
                )
            targets[module + ".weight"] = (module, keys)
        names = list(targets) + list(whole)
        try:
            strip, add = _prefix_map(names, base_keys)
        except KeyError as exc:
            origin = self.config.get("base_model_name_or_path")
            trained = f" (trained on {origin})" if origin else ""
            raise MergeInputError(
                f"{self.folder}: the adapter's '{exc.args[0]}' has no counterpart in the base ({self.base.name}) "
                f"under any one prefix; give the base the adapter was trained on{trained}"
            ) from None

        def base_key(name: str) -> str:
            return add + name[len(strip) :]

        factors: dict[str, _Factors] = {}
        for name, (module, keys) in targets.items():
            embedding = "AE" in keys
            a_key, b_key = (keys["AE"], keys["BE"]) if embedding else (keys["A"], keys["B"])
            factors[base_key(name)] = self._factors(base_key(name), module, a_key, b_key, embedding)
        replaced = {base_key(name): key for name, key in whole.items()}
        for key, adapter_key in replaced.items():
            if self.base.meta(key).shape != self._weights.meta(adapter_key).shape:
                raise MergeInputError(
                    f"{self.folder}: '{adapter_key}' is {self._weights.meta(adapter_key).shape}, the base's "
                    f"'{key}' {self.base.meta(key).shape}; give the base the adapter was trained on"
                )
        return factors, replaced

    def _factors(self, key: str, module: str, a_key: str, b_key: str, embedding: bool) -> _Factors:
        assert self._weights is not None
        a, b = self._weights.meta(a_key), self._weights.meta(b_key)
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise _refuse(self.folder, f"convolution LoRA (module '{module}', factors of {len(a.shape)} dimensions)")
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise MergeInputError(
                f"{self.folder}: module '{module}' has lora_A {a.shape} and lora_B {b.shape}, whose ranks differ; "
                "re-save the adapter with save_pretrained"
            )
        alpha_pattern = self.config.get("alpha_pattern") or {}
        pattern = _pattern_key(alpha_pattern, module)
        alpha = float(alpha_pattern[pattern] if pattern is not None else self.config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        transpose = embedding or bool(self.config.get("fan_in_fan_out"))
        shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        base_meta = self.base.meta(key)
        if base_meta.shape != shape:
            raise MergeInputError(
                f"{self.folder}: module '{module}' gives ΔW of shape {shape}, the base's '{key}' is "
                f"{base_meta.shape}; give the base the adapter was trained on"
            )
        if not base_meta.dtype.is_floating_point:
            raise MergeInputError(
                f"{self.folder}: module '{module}' targets '{key}' of dtype {base_meta.dtype}, not floating point "
                "(a quantized base?); give the unquantized base"
            )
        return _Factors(module, a_key, b_key, scaling, transpose, embedding)

    @property
    def targeted(self) -> list[str]:
        """The base keys the adapter changes with ΔW = s·B·A."""
        return list(self._factors)

    @property
    def replaced(self) -> list[str]:
        """The base keys the adapter stores whole (modules_to_save)."""
        return list(self._replaced)

    def delta(self, key: str) -> Tensor:
        """ΔW of one targeted key in float32, computed as PEFT's get_delta_weight does."""
        assert self._weights is not None
        f = self._factors[key]
        a = self._weights.get(f.a_key).to(torch.float32)
        b = self._weights.get(f.b_key).to(torch.float32)
        product = b @ a
        return (product.T if f.transpose else product) * f.scaling

    def keys(self) -> list[str]:
        return self.base.keys()

    def meta(self, key: str) -> TensorMeta:
        return self.base.meta(key)

    def get(self, key: str) -> Tensor:
        if self._weights is None:
            raise ValueError(f"{self.name} is closed")
        if key in self._replaced:
            return self._weights.get(self._replaced[key]).to(self.base.meta(key).dtype)
        theta0 = self.base.get(key)
        if key not in self._factors:
            return theta0
        return (theta0.to(torch.float32) + self.delta(key)).to(theta0.dtype)

    def close(self) -> None:
        if self._weights is not None:
            self._weights.close()
            self._weights = None
        self.base.close()


def open_adapter(folder: Path | str, base_path: Path | str, name: str | None = None) -> LoraAdapterReader:
    """A :class:`LoraAdapterReader` of the adapter ``folder`` over the base checkpoint at ``base_path``."""
    base = open_checkpoint(check_base(Path(base_path)))
    try:
        return LoraAdapterReader(folder, base, name)
    except BaseException:
        base.close()
        raise


def check_base(path: Path) -> Path:
    """``path``, unless it is a LoRA adapter folder (a base must be a full model): one line then."""
    if is_adapter_folder(path):
        raise MergeInputError(
            f"{path}: the base is a LoRA adapter; give the full pre-trained model the adapters were trained on "
            "as --base"
        )
    return path


def open_input(path: Path, base_path: Path) -> CheckpointReader:
    """A fine-tuned input: a LoRA adapter folder over the base, or any checkpoint :func:`open_checkpoint` reads."""
    if is_adapter_folder(path):
        return open_adapter(path, base_path)
    return open_checkpoint(path)
