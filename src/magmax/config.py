"""Validated configuration of a continual-learning run (YAML file → ``RunConfig``).

One pydantic model is the single source of truth: YAML files, ``--set key=value`` overrides on the
command line and the Python API all go through it, so they cannot drift apart. Unknown keys and wrong
types are one-line :class:`~magmax.errors.ConfigError` messages naming the dotted key.
"""

from __future__ import annotations

import difflib
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from magmax.errors import ConfigError
from magmax.models.base import BackboneConfig


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(StrictModel):
    name: str = Field(description="dataset reader: wordnet, fashion_mnist, cifar100, imagefolder, imagenet_r, ...")
    root: str | None = Field(None, description="folder holding the dataset; default: data_root, $MAGMAX_DATA, the reader's own places")
    options: dict[str, Any] = Field(default_factory=dict, description="reader options (e.g. max_train_per_class)")


class ScenarioConfig(StrictModel):
    kind: Literal["class_incremental", "domain_incremental", "multi_dataset"] = "class_incremental"
    n_tasks: int = Field(5, ge=1, description="number of tasks (class-incremental)")
    class_order: str | list[int] = Field("natural", description="natural | random | paper-cifar100 | paper-imagenet-r | paper-cub200 | explicit list")
    domain_order: list[str] | None = Field(None, description="domain-incremental: domains in task order (default: the dataset's)")
    datasets: list[DataConfig] | None = Field(None, description="multi_dataset: one task per dataset, in this order, each with its own head")
    epochs: list[float] | None = Field(None, description="epochs of each task (overrides train.epochs), e.g. the 8-dataset setting's")
    task_aware: bool = Field(False, description="report task-aware accuracy (each task's own classes) as the headline, unweighted mean over tasks")

    @model_validator(mode="after")
    def _datasets_for_multi(self) -> "ScenarioConfig":
        if self.kind == "multi_dataset" and not self.datasets:
            raise ValueError("multi_dataset needs scenario.datasets (a list of data configs)")
        if self.kind != "multi_dataset" and self.datasets:
            raise ValueError("scenario.datasets is only for kind: multi_dataset")
        if self.epochs is not None and any(e <= 0 for e in self.epochs):
            raise ValueError("scenario.epochs must be positive")
        return self


class TrainConfig(StrictModel):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, description="max gradient norm; null disables clipping")
    batch_size: int = Field(128, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per step (batch_size must divide evenly)")
    warmup_steps: int = Field(500, ge=0, description="ABSOLUTE warm-up steps per task (protocol §3 quirk)")
    epochs: float | None = Field(10, gt=0, description="epochs per task (ignored when steps is set)")
    steps: int | None = Field(None, ge=1, description="optimizer steps per task (overrides epochs)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the encoder (CUDA)")
    num_workers: int = Field(0, ge=0, description="data-loading worker threads")
    eval_batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _accum_divides(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.steps is None and self.epochs is None:
            raise ValueError("set either epochs or steps per task")
        return self


class MergeConfig(StrictModel):
    method: str = Field(description="merging method (see `magmax list-methods`)")
    label: str | None = Field(None, description="row name in results (default: the method name)")
    options: dict[str, Any] = Field(default_factory=dict, description="method options, e.g. scale, k, seed")
    population: Literal["trained", "whole_model"] = Field(
        "trained",
        description="ties (global threshold): rank the trained weights only, or the whole model's τ with a "
        "frozen tower's zeros counted (the MagMax reference: ~35% of CLIP's vision weights kept at k = 20%)",
    )
    lambdas: list[float] | None = Field(
        None,
        min_length=1,
        description="after the last task, also evaluate the merged model at each of these scaling coefficients λ "
        "(results.json: lambda_sweep; `magmax report` plots accuracy against λ)",
    )

    @property
    def name(self) -> str:
        return self.label or self.method

    @model_validator(mode="after")
    def _method_exists(self) -> "MergeConfig":
        from magmax.merging import create_method

        try:
            method = create_method(self.method, **self.options)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.lambdas is not None and not all(math.isfinite(v) for v in self.lambdas):
            raise ValueError(f"lambdas must be finite numbers, got {self.lambdas}")
        if self.population == "whole_model":
            if getattr(method.options, "threshold", None) != "global":
                raise ValueError(f"population: whole_model counts a frozen tower into a global top-k ranking; "
                                 f"method '{self.method}' has none (use ties with threshold: global)")
            if self.options.get("zero_entries"):
                raise ValueError("set either population: whole_model or options.zero_entries, not both")
        return self


class LwfConfig(StrictModel):
    weight: float = Field(0.3, ge=0, description="weight of the distillation term (protocol: 0.3)")
    temperature: float = Field(2.0, gt=0)


class EwcConfig(StrictModel):
    strength: float = Field(1e6, ge=0, description="λ of the penalty λ/2·Σ F(θ−θ_old)² (protocol: 1e6)")
    fisher_decay: float = Field(0.5, ge=0, le=1, description="F ← decay·F + (1−decay)·F_new (protocol: 0.5)")
    fisher: Literal["empirical", "reference"] = Field(
        "empirical",
        description="empirical: per-batch gradients, Σ|batch|·g²/N (EWC as defined); reference: the MagMax "
        "reference's loop, gradients never zeroed (they accumulate from the last clipped training step), "
        "divided by (N // batch + 1)·batch, the Fisher λ = 1e6 was set against",
    )
    fisher_targets: Literal["head", "embedding"] = Field(
        "head",
        description="labels of the Fisher's CE: argmax of the head logits (reference, class-incremental) or of "
        "the raw image embedding used as logits (reference, domain-incremental ewc_domain_splitted.py)",
    )
    fisher_batches: int | None = Field(None, ge=1, description="empirical Fisher: batches used (default: the whole task)")

    @model_validator(mode="after")
    def _batches_for_empirical(self) -> "EwcConfig":
        if self.fisher == "reference" and self.fisher_batches is not None:
            raise ValueError("fisher_batches applies to fisher: empirical; the reference loop reads the whole task")
        return self


class StreamConfig(StrictModel):
    """One fine-tuning protocol over the task stream, whose task vectors every merge method consumes."""

    name: str = Field(description="label used in results: seq, ind, lwf, ewc, ...")
    start: Literal["previous", "pretrained"] = Field("previous", description="previous: Seq-FT (θ_{t-1}); pretrained: Ind-FT (θ0)")
    regularizer: Literal["none", "lwf", "ewc"] = "none"
    merges: list[str] | Literal["all"] = Field("all", description="labels of the merges applied to this stream")
    evaluate_finetuned: bool = Field(True, description="evaluate θ_t itself after every task")
    lwf: LwfConfig = Field(default_factory=LwfConfig)
    ewc: EwcConfig = Field(default_factory=EwcConfig)


class AggregateConfig(StrictModel):
    """How a multi-seed run (``seeds``) summarises its seeds."""

    reference: str | None = Field(
        None,
        description="model the paired differences are taken against (default: the first Seq-FT stream's "
        "final model, e.g. seq:finetune)",
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the Student-t intervals over seeds")


class RunConfig(StrictModel):
    name: str = "run"
    seed: int = Field(5, description="seed of everything (the paper: 5)")
    seeds: list[int] | None = Field(
        None,
        description="run once per seed into DIR/seed-<s>/ and aggregate (mean, t-interval); overrides seed",
    )
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig)

    @field_validator("seeds")
    @classmethod
    def _seeds_distinct(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and not seeds:
            raise ValueError("seeds is empty; give at least one seed, e.g. seeds: [5, 6, 7]")
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_root: str | None = Field(None, description="root of all datasets (default: $MAGMAX_DATA)")
    data: DataConfig | None = Field(None, description="the dataset (all kinds but multi_dataset)")
    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)
    backbone: BackboneConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    streams: list[StreamConfig] = Field(default_factory=lambda: [StreamConfig(name="seq")])
    merges: list[MergeConfig] = Field(default_factory=lambda: [MergeConfig(method="magmax")])
    zero_shot: bool = Field(True, description="evaluate the pre-trained model θ0 once")
    joint: bool = Field(False, description="also train one model on all tasks' data at once (upper bound)")
    save_checkpoints: bool = Field(False, description="write θ_t and merged models as safetensors")
    keep_state: bool = Field(False, description="keep the resume state DIR/state/ when the run completes (default: removed)")

    @model_validator(mode="after")
    def _names_unique(self) -> "RunConfig":
        if self.data is None and self.scenario.kind != "multi_dataset":
            raise ValueError("data is required (e.g. data: {name: cifar100})")
        if self.scenario.epochs is not None and self.scenario.kind != "multi_dataset" and len(self.scenario.epochs) != self.scenario.n_tasks:
            raise ValueError(f"scenario.epochs has {len(self.scenario.epochs)} entries for {self.scenario.n_tasks} tasks")
        labels = [m.name for m in self.merges]
        if len(set(labels)) != len(labels):
            raise ValueError(f"merge labels must be unique, got {labels}; set `label` to tell them apart")
        streams = [s.name for s in self.streams]
        if len(set(streams)) != len(streams):
            raise ValueError(f"stream names must be unique, got {streams}")
        for s in self.streams:
            if s.merges != "all":
                unknown = [m for m in s.merges if m not in labels]
                if unknown:
                    raise ValueError(f"stream '{s.name}' names merge '{unknown[0]}' that is not in merges {labels}")
        reference = self.aggregate.reference
        if reference is not None and reference not in self.model_names():
            raise ValueError(f"aggregate.reference '{reference}' is not a model of this run; use one of {self.model_names()}")
        return self

    def model_names(self) -> list[str]:
        """The models this config evaluates, in results order: zero-shot, each stream's θ_t and merges, joint."""
        names = ["zero-shot"] if self.zero_shot else []
        for stream in self.streams:
            if stream.evaluate_finetuned:
                names.append(f"{stream.name}:finetune")
            names += [f"{stream.name}:{m.name}" for m in self.merges_for(stream)]
        return names + (["joint"] if self.joint else [])

    def reference_model(self) -> str:
        """The model paired differences are taken against: ``aggregate.reference``, else the first Seq-FT
        stream's final θ_T (else the first stream's θ_T, else the first model)."""
        if self.aggregate.reference is not None:
            return self.aggregate.reference
        names = self.model_names()
        plain = [s for s in self.streams if s.start == "previous" and s.regularizer == "none"]
        for stream in plain + list(self.streams):
            if f"{stream.name}:finetune" in names:
                return f"{stream.name}:finetune"
        return names[0] if names else "zero-shot"

    def for_seed(self, seed: int) -> "RunConfig":
        """The single-seed config of one seed of a multi-seed run (what ``DIR/seed-<seed>/`` runs)."""
        return self.model_copy(update={"seed": seed, "seeds": None})

    def merges_for(self, stream: StreamConfig) -> list[MergeConfig]:
        if stream.merges == "all":
            return list(self.merges)
        return [m for m in self.merges if m.name in stream.merges]

    def resolved_data_root(self, data: DataConfig | None = None) -> str | None:
        data = data or self.data
        return (data.root if data else None) or self.data_root or os.environ.get("MAGMAX_DATA")


# -- loading ---------------------------------------------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``X``, ``X | None``, ``list[X]``, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _keys_beside(loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the section that holds the key at ``loc`` (list indices skipped)."""
    models: list[type[BaseModel]] = [RunConfig]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = [model.model_fields[part] for model in models if part in model.model_fields]
        models = [m for field in fields for m in _models_in(field.annotation)]
    return [name for model in models for name in model.model_fields]


def _format_error(exc: ValidationError, source: str) -> str:
    errors = exc.errors()
    # An unknown key first: a misspelt required key is reported as missing too, which hides the typo.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][-1]), _keys_beside(tuple(err["loc"])), n=1)
        msg = f"unknown key (did you mean '{close[0]}'?)" if close else "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: config key '{key}': {msg}{more}; see `magmax run --help` and configs/paper/ for valid keys"


def parse_value(text: str) -> Any:
    """A `--set` value is read as a YAML scalar/list: 3 → int, 1e-5 → float, [1,2] → list, else str."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to a raw config dict (creating sub-dicts as needed)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set '{item}': expected key=value, e.g. --set train.steps=100")
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                child = _list_entry(node, part, item)
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"--set '{item}': '{part}' is not a section of the config")
            node = child
        if isinstance(node, list):
            raise ConfigError(f"--set '{item}': '{parts[-2]}' is a list; name one of its entries, e.g. "
                              f"{'.'.join(parts[:-1])}.0.{parts[-1]}")
        node[parts[-1]] = parse_value(value)
    return raw


def _list_entry(entries: list[Any], part: str, item: str) -> Any:
    """A list section's entry by position (``merges.0``) or by its name, label or method (``streams.ewc``,
    ``merges.ties``), so that --set reaches a stream's or a merge's settings."""
    if part.isdigit():
        if int(part) < len(entries):
            entry = entries[int(part)]
            if isinstance(entry, str):  # a merge given by its method name alone: make it a mapping
                entry = entries[int(part)] = {"method": entry}
            return entry
        raise ConfigError(f"--set '{item}': there is no entry {part} (the list has {len(entries)})")

    def names(entry: Any) -> set[str]:
        if isinstance(entry, str):
            return {entry}
        return {str(entry[k]) for k in ("name", "label", "method") if isinstance(entry, dict) and k in entry}

    matches = [i for i, entry in enumerate(entries) if part in names(entry)]
    if len(matches) != 1:
        known = sorted({n for entry in entries for n in names(entry)})
        why = "matches several entries" if matches else "names no entry"
        raise ConfigError(f"--set '{item}': '{part}' {why}; use a position (0..{len(entries) - 1}) or one of {known}")
    return _list_entry(entries, str(matches[0]), item)


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        from magmax.presets import demo_config_path

        raise ConfigError(
            f"config file '{path}' not found; pass a YAML run config, e.g. configs/paper/cifar100-10.yaml "
            f"of the magmax repository or the demo's {demo_config_path('text')} (run it with `magmax demo`)"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return validate_config(apply_overrides(raw, overrides or []), str(path))
