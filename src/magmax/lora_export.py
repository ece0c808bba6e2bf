"""The merged update written as a PEFT LoRA adapter (``magmax merge --output-format lora --rank R``).

The merge yields θ = θ0 + λ·τ*; the adapter stores Δ = θ − θ0 (computed in float32: the engine's output
is float32 in this mode) of each targeted 2-D matrix as rank-R factors from its truncated SVD
Δ ≈ U_R·S_R·V_Rᵀ: lora_B = U_R·√S_R, lora_A = √S_R·V_Rᵀ, with lora_alpha = r = R, so PEFT's scaling is 1
and B·A is the best rank-R approximation of Δ in Frobenius norm (Eckart–Young). A matrix of rank below
R gets zero-padded factors (exact).

Targets: the weights of ``nn.Linear`` and ``nn.Embedding`` modules (embeddings as ``lora_embedding_A/B``,
whose product PEFT transposes). Where the base is a Hugging Face folder with a ``config.json``, the module
types come from the transformers model built on the meta device (no memory, no weights); otherwise every
2-D floating-point ``*.weight`` is taken for a Linear's. Everything else with a non-zero Δ — biases,
norms, 1-D and N-D tensors, modules of other types (GPT-2's Conv1D) — is **dropped** (the adapter cannot
carry it without ``modules_to_save`` copies of whole modules): the report says how much of ‖Δ‖² that is.

Reported: the relative Frobenius error ‖Δ − B·A‖/‖Δ‖ of each matrix (with the factors as stored, in
their dtype) and overall, √(Σ‖Δ − B·A‖²/Σ‖Δ‖²), also counting the dropped tensors; printed in one line
and kept in the adapter's safetensors metadata (``magmax_lora_error``) and its README.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from magmax.checkpoints import CheckpointReader
from magmax.errors import MergeInputError

COMPUTE = torch.float32
LINEAR, EMBEDDING = "linear", "embedding"


def _module_kinds(folder: Path) -> dict[str, str] | None:
    """``<module>.weight`` → "linear"/"embedding"/other type name, from the model a config.json describes,
    built on the meta device; None where there is no config or transformers cannot build it."""
    if not (folder / "config.json").is_file():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        classes = [getattr(transformers, name, None) for name in (config.architectures or [])]
        with torch.device("meta"):
            if classes and classes[0] is not None:
                model = classes[0](config)
            else:
                model = transformers.AutoModel.from_config(config)
    except Exception:  # an unknown architecture, custom code, ...: fall back to the shape rule
        return None
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            kind = EMBEDDING
        elif isinstance(module, nn.Linear):
            kind = LINEAR
        else:
            kind = type(module).__name__
        kinds[f"{name}.weight" if name else "weight"] = kind
    return kinds


def plan_targets(base: CheckpointReader, keys: Iterable[str]) -> tuple[dict[str, str], str]:
    """The base keys written as LoRA factors (key → linear/embedding), and how they were chosen."""
    kinds = _module_kinds(base.model_folder) if base.model_folder is not None else None
    targets: dict[str, str] = {}
    for key in keys:
        meta = base.meta(key)
        if len(meta.shape) != 2 or not meta.dtype.is_floating_point or not key.endswith(".weight"):
            continue
        if kinds is None:
            targets[key] = LINEAR
        elif kinds.get(key) in (LINEAR, EMBEDDING):
            targets[key] = kinds[key]
    how = "module types from config.json" if kinds is not None else "every 2-D *.weight taken as nn.Linear"
    return targets, how


@dataclass
class LoraExportReport:
    """The approximation error of the written adapter."""

    rank: int
    matrices: dict[str, float] = field(default_factory=dict)  # key → ‖Δ − B·A‖/‖Δ‖
    residual_sq: float = 0.0
    delta_sq: float = 0.0
    dropped: dict[str, float] = field(default_factory=dict)  # key → ‖Δ‖ of a tensor not in the adapter

    @property
    def overall(self) -> float:
        """√(Σ‖Δ − B·A‖²/Σ‖Δ‖²) over the written matrices (0 where Δ = 0)."""
        return math.sqrt(self.residual_sq / self.delta_sq) if self.delta_sq > 0 else 0.0

    @property
    def dropped_sq(self) -> float:
        return sum(v * v for v in self.dropped.values())

    @property
    def overall_with_dropped(self) -> float:
        """The same over every floating-point tensor, the dropped ones counting as wholly missed."""
        total = self.delta_sq + self.dropped_sq
        return math.sqrt((self.residual_sq + self.dropped_sq) / total) if total > 0 else 0.0

    def line(self) -> str:
        worst = max(self.matrices.items(), key=lambda kv: kv[1], default=("-", 0.0))
        dropped = sum(1 for v in self.dropped.values() if v > 0)
        return (
            f"LoRA rank {self.rank}: relative Frobenius error {self.overall:.4g} over {len(self.matrices)} matrices "
            f"(worst {worst[1]:.4g} at {worst[0]}); {self.overall_with_dropped:.4g} counting the {dropped} "
            "non-matrix tensor(s) with a non-zero update, which the adapter drops"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "overall": self.overall,
            "overall_with_dropped": self.overall_with_dropped,
            "matrices": self.matrices,
            "dropped_norms": {k: v for k, v in self.dropped.items() if v > 0},
        }


def low_rank_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(B, A) of shapes (m, rank) and (rank, n) with B·A the best rank-``rank`` approximation of ``delta``
    (m×n), the singular values split evenly (√S on each side); zero-padded past the matrix's rank."""
    m, n = delta.shape
    u, s, vh = torch.linalg.svd(delta.to(COMPUTE), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(m, rank, dtype=COMPUTE)
    a = torch.zeros(rank, n, dtype=COMPUTE)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a


class LoraExportWriter:
    """A :class:`~magmax.engine.TensorWriter` taking merged tensors θ (float32) and keeping, per target,
    the factors of Δ = θ − θ0; :meth:`save` writes the adapter folder."""

    def __init__(self, base: CheckpointReader, targets: dict[str, str], rank: int, dtype: torch.dtype | None):
        self.base = base
        self.targets = targets
        self.rank = rank
        self.dtype = dtype
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.report = LoraExportReport(rank)
        self._sums: dict[str, tuple[float, float]] = {}  # key → (‖Δ − B·A‖², ‖Δ‖²)

    def write(self, key: str, tensor: Tensor) -> None:
        if not tensor.dtype.is_floating_point:
            return
        theta0 = self.base.get(key)
        delta = tensor.to(COMPUTE) - theta0.to(COMPUTE)
        dtype = self.dtype or theta0.dtype
        del theta0
        if key not in self.targets:
            self.report.dropped[key] = float(torch.linalg.vector_norm(delta))
            return
        embedding = self.targets[key] == EMBEDDING
        if embedding:  # PEFT's embedding update is (B·A)ᵀ
            delta = delta.T
        b, a = low_rank_factors(delta, self.rank)
        b, a = b.to(dtype), a.to(dtype)
        residual = float(torch.linalg.matrix_norm(delta - b.to(COMPUTE) @ a.to(COMPUTE))) ** 2
        norm = float(torch.linalg.matrix_norm(delta)) ** 2
        self.factors[key] = (b, a)
        old = self._sums.get(key, (0.0, 0.0))  # replace(): a provisional result rewritten
        self._sums[key] = (residual, norm)
        self.report.residual_sq += residual - old[0]
        self.report.delta_sq += norm - old[1]
        self.report.matrices[key] = math.sqrt(residual / norm) if norm > 0 else 0.0

    def replace(self, key: str, tensor: Tensor) -> None:
        self.write(key, tensor)

    def tensors(self) -> dict[str, Tensor]:
        """The adapter's tensors under PEFT's names (``base_model.model.<module>.lora_A.weight``, ...)."""
        out = {}
        for key, (b, a) in self.factors.items():
            module = key[: -len(".weight")]
            if self.targets[key] == EMBEDDING:
                out[f"base_model.model.{module}.lora_embedding_A"] = a.contiguous()
                out[f"base_model.model.{module}.lora_embedding_B"] = b.contiguous()
            else:
                out[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
                out[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
        return out

    def adapter_config(self, base_name: str) -> dict[str, Any]:
        modules = [key[: -len(".weight")] for key in self.factors]
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_name,
            "r": self.rank,
            "lora_alpha": self.rank,
            # A regular expression PEFT matches against whole module names: exactly these modules.
            "target_modules": "(" + "|".join(re.escape(m) for m in modules) + ")",
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    def save(self, folder: Path, base_name: str, provenance: str) -> None:
        """adapter_model.safetensors (with the provenance and the error in its metadata), adapter_config.json,
        README.md."""
        from safetensors.torch import save_file

        if not self.factors:
            raise MergeInputError(
                "--output-format lora: the base has no 2-D weight of a Linear or Embedding module to write as LoRA "
                "factors; write a full checkpoint instead (--output-format safetensors)"
            )
        report = json.dumps(self.report.as_dict())
        try:
            save_file(
                self.tensors(),
                str(folder / "adapter_model.safetensors"),
                metadata={"format": "pt", "magmax_merge": provenance, "magmax_lora_error": report},
            )
            (folder / "adapter_config.json").write_text(json.dumps(self.adapter_config(base_name), indent=2) + "\n")
            (folder / "README.md").write_text(self.readme(base_name))
        except OSError as exc:
            raise MergeInputError(
                f"{folder}: cannot write ({exc.strerror}); free disk space or choose another output"
            ) from None

    def readme(self, base_name: str) -> str:
        r = self.report
        rows = "\n".join(f"| `{key}` | {error:.6g} |" for key, error in r.matrices.items())
        dropped = "\n".join(f"- `{key}` (‖Δ‖ = {norm:.6g})" for key, norm in r.as_dict()["dropped_norms"].items())
        return (
            "---\nlibrary_name: peft\n"
            f"base_model: {base_name}\n---\n\n"
            f"# Merged update as a rank-{r.rank} LoRA adapter (magmax merge)\n\n"
            f"Load with `PeftModel.from_pretrained(base_model, this_folder)` on the base `{base_name}`.\n\n"
            f"{r.line()}.\n\n"
            f"Relative Frobenius error ‖Δ − B·A‖/‖Δ‖ over all matrices: {r.overall:.6g}; "
            f"counting the dropped tensors: {r.overall_with_dropped:.6g}.\n\n"
            "| matrix | relative error |\n|---|---|\n"
            f"{rows}\n\n"
            "Tensors with a non-zero update that a LoRA adapter does not carry (dropped):\n\n"
            f"{dropped or '- none'}\n"
        )
