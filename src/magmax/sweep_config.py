"""The sweep file of `magmax sweep` (YAML → ``SweepConfig``) and its expansion into runs.

A sweep is presets × override sets × seeds: every combination is one ordinary run directory
``OUT/<preset>-<overrides>-seed<s>/`` made by the `magmax run` machinery with ``--set`` overrides. Relative
paths in the file (``presets``, ``out``) are taken from the sweep file's folder, so that the file means the
same wherever it is submitted from.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from magmax.config import load_config
from magmax.errors import ConfigError

SWEEP_DOCS = "docs/guide.md (Sweeps)"
MAX_TAG = 80
"""Longest overrides tag in a run's folder name; a longer one is cut and ends with a hash of the whole."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_time(value: int | str) -> int:
    """A time limit in minutes: 240, "240", "04:00:00", "1-00:00:00" (Slurm's D-HH:MM:SS), "30:00" (MM:SS)."""
    if isinstance(value, int):
        minutes = value
    else:
        text = value.strip()
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if match is None:
            raise ValueError(f"time '{value}' is not minutes nor [D-]HH:MM:SS")
        days, a, b, c = match.groups()
        if b is None:  # "240" or "1-4": minutes, or days-hours
            minutes = int(a) * 60 if days else int(a)
        elif c is None:  # MM:SS, or D-HH:MM
            minutes = int(a) * 60 + int(b) if days else int(a) + (int(b) > 0)
        else:  # HH:MM:SS
            minutes = int(a) * 60 + int(b) + (int(c) > 0)
        minutes += int(days or 0) * 24 * 60
    if minutes < 1:
        raise ValueError(f"time '{value}' must be at least one minute")
    return minutes


class JobOptions(_Strict):
    """What each job asks for. Slurm reads all of it; the local executor the GPUs, time limit and requeues."""

    gpus: int = Field(1, ge=0, description="GPUs per job (local: CUDA_VISIBLE_DEVICES of each parallel slot)")
    cpus: int = Field(8, ge=1, description="CPU cores per job (Slurm --cpus-per-task)")
    mem_gb: float | None = Field(None, gt=0, description="memory per job in GB (Slurm --mem); default: the partition's")
    time: int | str = Field(240, description="time limit: minutes or [D-]HH:MM:SS; the job is requeued when it runs out")
    partition: str | None = Field(None, description="Slurm partition")
    account: str | None = Field(None, description="Slurm account")
    qos: str | None = Field(None, description="Slurm quality of service")
    constraint: str | None = Field(None, description="Slurm node constraint, e.g. a100")
    max_requeues: int = Field(3, ge=0, description="time-outs a job may be requeued after (preemptions do not count)")
    setup: list[str] = Field(default_factory=list, description="shell lines run before each Slurm job (module load, venv)")
    slurm_extra: dict[str, Any] = Field(default_factory=dict, description="further #SBATCH options, e.g. {exclude: node12}")

    @property
    def time_min(self) -> int:
        return parse_time(self.time)

    @field_validator("time")
    @classmethod
    def _time_valid(cls, value: int | str) -> int | str:
        parse_time(value)
        return value


class SweepConfig(_Strict):
    name: str | None = Field(None, description="job name (default: the sweep file's name)")
    out: str | None = Field(None, description="folder of the sweep's runs and sweep.json (default: runs/<file name>)")
    presets: list[str] = Field(min_length=1, description="run configs (YAML files), relative to the sweep file")
    seeds: list[int] | None = Field(None, min_length=1, description="one run per seed (default: each preset's own seed)")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides of every run (not in run names)")
    overrides: list[dict[str, Any]] = Field(default_factory=lambda: [{}], min_length=1, description="override sets; {} = the preset as is")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="key → values, every combination (× overrides)")
    executor: Literal["slurm", "local", "debug"] = Field("local", description="slurm: sbatch; local: processes here; debug: in this process")
    parallel: int = Field(1, ge=1, description="local: runs at once; slurm: most array tasks running at once")
    job: JobOptions = Field(default_factory=JobOptions)

    @model_validator(mode="after")
    def _keys(self) -> "SweepConfig":
        keys = [("set", k) for k in self.set] + [("grid", k) for k in self.grid]
        keys += [("overrides", k) for entry in self.overrides for k in entry]
        for section, key in keys:
            if key == "seed":
                raise ValueError(f"'{section}' sets seed; list the seeds in 'seeds:' instead")
            if not key or "=" in key:
                raise ValueError(f"'{section}' key '{key}' is not a dotted config key such as train.lr")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid key '{key}' has no values")
        return self


def _format_error(exc: ValidationError, source: str) -> str:
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] = JobOptions if err["loc"][0] == "job" and len(err["loc"]) > 1 else SweepConfig
        close = difflib.get_close_matches(str(err["loc"][-1]), list(model.model_fields), n=1)
        msg = f"unknown key (did you mean '{close[0]}'?)" if close else "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return f"{source}: sweep key '{key}': {msg}; see {SWEEP_DOCS} for the keys"


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' not found; pass a YAML sweep file (keys in {SWEEP_DOCS})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sweep keys (presets, seeds, overrides, ...)")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, str(path))) from None


# -- expansion ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: ``magmax run PRESET --set ... --out DIR``."""

    name: str
    preset: Path
    seed: int
    varied: tuple[tuple[str, Any], ...]  # the overrides that tell it apart from its preset (its name's tag)
    overrides: tuple[str, ...]  # every --set, seed last
    dir: Path


def set_arg(key: str, value: Any) -> str:
    """``key=value`` for --set; the value written as JSON (a YAML subset) reads back as the same value."""
    return f"{key}={json.dumps(value)}"


def tag(varied: tuple[tuple[str, Any], ...]) -> str:
    """The overrides part of a run's name: ``train.lr=3e-05,merges.0.options.k=0.2`` (safe for file names)."""
    parts = [f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}" for k, v in varied]
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))
    if len(text) > MAX_TAG:
        text = text[: MAX_TAG - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return text


def sweep_out(sweep: SweepConfig, path: Path) -> Path:
    folder = path.resolve().parent
    return (folder / sweep.out).resolve() if sweep.out else (folder / "runs" / path.stem).resolve()


def expand(sweep: SweepConfig, path: str | Path) -> list[PlannedRun]:
    """Every run of the sweep, each config validated (a bad one is an error before anything is submitted)."""
    path = Path(path)
    folder = path.resolve().parent
    out = sweep_out(sweep, path)
    common = [set_arg(k, v) for k, v in sweep.set.items()]
    grid = [tuple(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())]
    runs: list[PlannedRun] = []
    for preset_text in sweep.presets:
        preset = (folder / preset_text).resolve()
        if not preset.is_file():
            raise ConfigError(f"{path}: preset '{preset_text}' not found (looked for {preset}); paths are relative to the sweep file")
        for entry, combo in itertools.product(sweep.overrides, grid):
            varied = tuple(entry.items()) + combo
            sets = common + [set_arg(k, v) for k, v in varied]
            seeds = sweep.seeds
            if seeds is None:
                seeds = [_validated(preset, sets, path).seed]
            for seed in seeds:
                overrides = tuple(sets + [f"seed={seed}"])
                _validated(preset, list(overrides), path)
                name = "-".join(p for p in (preset.stem, tag(varied), f"seed{seed}") if p)
                runs.append(PlannedRun(name, preset, seed, varied, overrides, out / name))
    names = [r.name for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: two runs would share the folder '{twice[0]}'; give presets distinct file names "
                          "and list each override set and seed once")
    return runs


def _validated(preset: Path, sets: list[str], source: Path):
    try:
        return load_config(preset, sets)
    except ConfigError as exc:
        raise ConfigError(f"{source}: preset {preset.name} with {' '.join(sets) or 'no overrides'}: {exc}") from None
