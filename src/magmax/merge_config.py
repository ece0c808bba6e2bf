"""What `magmax merge` does, as one validated model: the YAML keys and the CLI flags are its fields.

``magmax merge --method magmax --base B FT1 FT2 -o OUT --option seed=1`` and a YAML file with
``method: magmax, base: B, models: [FT1, FT2], output: OUT, options: {seed: 1}`` build the same
:class:`MergeConfig`; every invalid value, unknown key, unknown method or option is one line
(:class:`magmax.errors.ConfigError`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from magmax.errors import ConfigError
from magmax.hub import looks_like_repo_id
from magmax.merging.base import MergeMethod, create_method, get_method_class

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_SIZE = 2_000_000_000

# How to give each field on the command line (for error messages; YAML uses the field name).
CLI_FLAGS: dict[str, str] = {
    "method": "--method",
    "base": "--base",
    "models": "FT1 FT2 … (positional)",
    "output": "-o/--output",
    "scale": "--scale",
    "device": "--device",
    "dtype": "--dtype",
    "options": "--option key=value",
    "shard_size": "--shard-size",
    "force": "--force",
    "vocab": "--vocab",
    "keep_extra": "--keep-extra",
    "weights": "--option weights=[w1,w2,…]",
    "output_format": "--output-format",
    "rank": "--rank",
}

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_byte_size(value: int | str) -> int:
    """Bytes from ``2GB`` / ``500MB`` / ``1.5GiB`` / ``1000000``; as in transformers, GB = 10⁹, GiB = 2³⁰."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 2GB or 500MB")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"'{value}' is not a size such as 2GB, 500MB or 1GiB")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value}")
    return size


class MergeConfig(BaseModel):
    """One merge of fine-tuned checkpoints onto their base: θ = θ0 + λ·merge(τ_1..τ_T), written to disk."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field("magmax", description="merging method (see `magmax list-methods`)")
    base: Path = Field(
        description="pre-trained checkpoint θ0: .safetensors file, Hugging Face model folder, torch state dict, "
        "or a Hugging Face Hub id org/name"
    )
    models: list[Path] = Field(
        default_factory=list,
        validate_default=True,
        description="fine-tuned checkpoints of the base, same formats, or PEFT LoRA adapter folders of it",
    )
    output: Path = Field(
        description="output folder (sharded safetensors + index; an HF base's config and tokenizer files are copied), "
        "or a file ending in .safetensors"
    )
    scale: float | None = Field(
        None, allow_inf_nan=False, description="λ in θ = θ0 + λ·τ* (default: the method's own); a finite number"
    )
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="where to compute: cpu, cuda or cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the merged floating-point tensors (default: each base tensor's)"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="the method's options (see `magmax list-methods`)"
    )
    shard_size: int = Field(DEFAULT_SHARD_SIZE, description="largest output shard, e.g. 2GB, 500MB, 1GiB")
    force: bool = Field(False, description="replace OUT if it exists")
    vocab: str | None = Field(
        None,
        pattern=r"^(base|[1-9][0-9]*)$",
        description="vocabularies of different sizes: the output's rows and tokenizer from the base ('base') or "
        "from fine-tuned model N (1-based); the rows all inputs have are merged",
    )
    keep_extra: bool = Field(
        False,
        description="copy tensors the base lacks (a task head) unmerged from the first model that has them; the "
        "output takes that model's key names and config.json",
    )
    weights: list[float] | None = Field(
        None, description="per-model weights w_1..w_T (task_arithmetic, ties, dare, breadcrumbs, consensus)"
    )

    @field_validator("weights")
    @classmethod
    def _finite_weights(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and not all(math.isfinite(w) for w in weights):
            raise ValueError("weights must be finite numbers")
        return weights
    output_format: Literal["safetensors", "lora"] = Field(
        "safetensors", description="safetensors: the merged model; lora: the merged update as a PEFT LoRA adapter"
    )
    rank: int | None = Field(None, ge=1, description="rank of the LoRA factors (with --output-format lora)")

    @field_validator("models")
    @classmethod
    def _at_least_one_model(cls, models: list[Path]) -> list[Path]:
        if not models:
            raise ValueError(
                "no fine-tuned model given; pass at least one fine-tuned checkpoint (FT1 FT2 … after the flags, "
                "or models: in YAML)"
            )
        return models

    @field_validator("shard_size", mode="before")
    @classmethod
    def _parse_shard_size(cls, value: Any) -> int:
        return parse_byte_size(value)

    @model_validator(mode="after")
    def _method_and_options_exist(self) -> MergeConfig:
        method = self.create_method()  # raises ConfigError (one line) for an unknown method or option
        weights = getattr(method.options, "weights", None)
        if weights is not None and len(weights) != len(self.models):
            raise ConfigError(
                f"weights: {len(weights)} given for {len(self.models)} fine-tuned model(s); give one per model, "
                "in the order of the models"
            )
        if self.vocab not in (None, "base") and int(self.vocab) > len(self.models):
            raise ConfigError(
                f"--vocab {self.vocab}: there are {len(self.models)} fine-tuned models; give base or "
                f"1..{len(self.models)}"
            )
        return self

    @model_validator(mode="after")
    def _lora_output(self) -> MergeConfig:
        if self.output_format == "lora":
            if self.rank is None:
                raise ConfigError("--output-format lora needs the adapter's rank: --rank R (rank: in YAML)")
            if self.single_file:
                raise ConfigError("--output-format lora writes an adapter folder; give an output path not ending in "
                                 ".safetensors")
        elif self.rank is not None:
            raise ConfigError("--rank is the rank of a LoRA output; add --output-format lora, or drop --rank")
        return self

    def create_method(self) -> MergeMethod:
        """A fresh instance of the configured method (methods keep per-merge statistics)."""
        options = dict(self.options)
        if self.scale is not None:
            if "scale" in options:
                raise ConfigError("scale given twice (as scale and as options.scale / --option scale=); keep one")
            options["scale"] = self.scale
        if self.weights is not None:
            if "weights" in options:
                raise ConfigError("weights given twice (as weights and as options.weights / --option weights=); keep one")
            options["weights"] = self.weights
        if options.get("weights") is not None:
            from magmax.merging._weights import WeightedOptions

            if not issubclass(get_method_class(self.method).Options, WeightedOptions):
                raise ConfigError(
                    f"weights: method '{self.method}' takes no per-model weights; the methods that do: "
                    "task_arithmetic, ties, dare, breadcrumbs, consensus"
                )
        return create_method(self.method, **options)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else DTYPES[self.dtype]

    @property
    def single_file(self) -> bool:
        return self.output.suffix == ".safetensors"


def _describe(error: Mapping[str, Any], source: str) -> str:
    where = ".".join(str(part) for part in error["loc"])
    field = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "missing":
        return (
            f"{source}: '{where}' is required ({CLI_FLAGS.get(field, field)} on the command line, `{field}:` in YAML)"
        )
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(where, list(MergeConfig.model_fields), n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{source}: unknown key '{where}'{guess}; the keys are: {', '.join(MergeConfig.model_fields)}"
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    return f"{source}: '{where}': {message} (got {error.get('input')!r})"


def build_merge_config(values: Mapping[str, Any], source: str = "magmax merge") -> MergeConfig:
    """Validate ``values`` (YAML keys or CLI flags mapped to fields) into a :class:`MergeConfig`."""
    try:
        return MergeConfig.model_validate(dict(values))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # An unknown key first: a misspelt required key is reported as missing too, which hides the typo.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        raise ConfigError(_describe(first, source)) from None


def read_merge_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML merge config; relative paths in it are relative to the file's folder."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror}); check the path") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys ({', '.join(MergeConfig.model_fields)})")
    folder = path.parent

    def anchor(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if looks_like_repo_id(value) and not (folder / value).exists():
            return value  # a Hugging Face Hub id, not a path
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else folder / path)

    for key in ("base", "output"):
        if key in data:
            data[key] = anchor(data[key])
    if isinstance(data.get("models"), list):
        data["models"] = [anchor(item) for item in data["models"]]
    return data


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` from ``--option``; the value is read as a YAML scalar (0.2, 3, true, name)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--option '{text}': expected key=value, e.g. --option seed=1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--option '{text}': the value is not a YAML scalar; quote it or fix it") from None
    return key.strip(), value
