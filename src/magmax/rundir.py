"""The run directory: resolved config, progress, results, log and provenance, written atomically.

Layout::

    DIR/config.yaml        the resolved config (every default filled in)
    DIR/status.json        {"status": "running" | "failed" | "interrupted" | "complete", ...}
    DIR/provenance.json    package versions, git commit, seed, checksums of the base weights, data info
    DIR/log.txt            the log: progress lines, and the error or interruption that ended the run
    DIR/state/             resume state after the last completed task (θ_t, merger states, progress);
                           removed when the run completes unless keep_state (--keep-state) is set
    DIR/results.json       all accuracy matrices and metrics — written only when the run completes
    DIR/results.csv        one row per model (its label, metrics and final per-task accuracies, 2 decimals)
    DIR/results.md         the results table in Markdown (2 decimals)
    DIR/checkpoints/       optional safetensors of θ0, θ_t and merged models

A directory without ``status: complete`` is never presented as a finished run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from magmax.errors import ConfigError


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# What a run writes in its directory (see the layout above), and its write probe.
_RUN_ENTRIES = frozenset(
    {"config.yaml", "status.json", "provenance.json", "log.txt", "state", "results.json", "results.csv", "results.md",
     "accuracy.png", "checkpoints", ".write-test"}
)


class RunDir:
    """``writer`` False (ranks other than 0 of a data-parallel run): status, config and log writes are
    skipped, so the directory is written once."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer

    @property
    def state(self) -> Path:
        return self.path / "state"

    def status(self) -> str | None:
        f = self.path / "status.json"
        return read_json(f)["status"] if f.exists() else None

    def _holds_only_an_unstarted_run(self) -> bool:
        """A run directory with nothing to resume: only this layout's files, and no state/progress.json
        (set-up failed, or the run was killed before its first resume point)."""
        if not self.path.is_dir() or (self.state / "progress.json").exists():
            return False
        if self.status() == "complete":  # a finished run drops state/ too: it is not a restartable one
            return False
        entries = [entry.name for entry in self.path.iterdir()]
        return bool(entries) and all(name in _RUN_ENTRIES or name.endswith(".tmp") for name in entries)

    def create(self, resume: bool) -> str | None:
        """Make the folder (or reopen it for --resume); refuse to overwrite another run.

        A run that stopped before leaving anything to resume starts again in its folder, with or without
        --resume: the line returned says so (``None`` otherwise)."""
        restart = None
        if self._holds_only_an_unstarted_run():
            restart = (
                f"'{self.path}' holds a run that stopped before its first resume point "
                "(no state/progress.json): starting it again there"
            )
        elif self.path.exists() and not resume and any(self.path.iterdir()):
            raise ConfigError(
                f"output folder '{self.path}' already holds a run; pass --resume to continue it or choose another --out"
            )
        elif resume and self.status() == "complete":
            raise ConfigError(
                f"--resume: the run in '{self.path}' is already complete, nothing to resume; "
                f"its results are in {self.path / 'results.json'}"
            )
        elif resume and not (self.state / "progress.json").exists():
            raise ConfigError(f"--resume: '{self.path}' has no resumable state (state/progress.json); start a new run")
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory '{self.path}' ({exc.strerror}); choose a writable --out") from None
        return restart

    def set_status(self, status: str, **extra: Any) -> None:
        if not self.writer:
            return
        write_json(self.path / "status.json", {"status": status, **extra})

    def write_config(self, resolved: dict[str, Any]) -> None:
        if not self.writer:
            return
        tmp = self.path / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        os.replace(tmp, self.path / "config.yaml")

    def logger(self) -> logging.Logger:
        log = logging.getLogger(f"magmax.run.{self.path}" + ("" if self.writer else ".silent"))
        log.setLevel(logging.INFO)
        log.propagate = False
        if not self.writer:
            if not log.handlers:
                log.addHandler(logging.NullHandler())
            return log
        if not log.handlers:
            handler = logging.FileHandler(self.path / "log.txt")
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(handler)
        return log


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> dict[str, Any]:
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}
    if commit.returncode != 0:
        return {"commit": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def provenance(seed: int, base_state: dict[str, torch.Tensor], data_info: dict[str, Any], backbone_info: dict[str, Any]) -> dict[str, Any]:
    packages = {p: _version(p) for p in ("magmax", "torch", "transformers", "safetensors", "numpy", "pydantic")}
    return {
        "seed": seed,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": packages,
        "git": git_commit(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "base_weights_sha256": state_checksum(base_state),
        "backbone": backbone_info,
        "data": data_info,
    }
