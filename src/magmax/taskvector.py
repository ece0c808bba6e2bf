"""Task vectors: τ = θ_ft − θ0 over the floating-point tensors of a state dict.

Integer and bool tensors (step counters, position ids, BatchNorm's ``num_batches_tracked``) are not
merged: the merged model takes them from the base. All arithmetic is in float32 whatever the storage
dtype, because bf16/fp16 differences of nearby weights lose most of their bits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from magmax.errors import MergeInputError

COMPUTE_DTYPE = torch.float32


def is_mergeable(dtype: torch.dtype) -> bool:
    """Only floating-point tensors carry task vectors."""
    return dtype.is_floating_point


def task_vector_tensor(base: Tensor, finetuned: Tensor) -> Tensor:
    """τ = θ_ft − θ0 for one tensor, in float32."""
    return finetuned.to(COMPUTE_DTYPE) - base.to(COMPUTE_DTYPE)


def task_vector(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """τ = θ_ft − θ0 for every floating-point tensor (float32), after checking the two state dicts agree."""
    check_compatible(base, finetuned, "base", "fine-tuned model")
    return {k: task_vector_tensor(v, finetuned[k]) for k, v in base.items() if is_mergeable(v.dtype)}


def apply_task_vector(
    base: Mapping[str, Tensor],
    tau: Mapping[str, Tensor],
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """θ = θ0 + λ·τ; keys absent from τ (non-float buffers) are copied from θ0."""
    out: dict[str, Tensor] = {}
    for key, value in base.items():
        if key in tau:
            out[key] = combine(value, tau[key], scale, dtype)
        else:
            out[key] = value.clone()
    return out


def combine(
    base: Tensor, tau: Tensor, scale: float, dtype: torch.dtype | None = None, *, reuse_tau: bool = False
) -> Tensor:
    """θ0 + λ·τ in float32, cast to ``dtype`` (default: the base tensor's dtype).

    ``reuse_tau``: the caller owns ``tau`` and will not read it again, so θ is written into its memory
    (the same operation, so the same bits) when ``tau`` is all of its storage (merged tensors must not
    share storage: safetensors refuses them). A fresh output costs more than the addition itself: the
    first touch of each new page faults, about 60 ms per 345 MB on the CPU, against about 40 ms for the add.
    """
    reuse = reuse_tau and tau.dtype == COMPUTE_DTYPE and tau.shape == base.shape and _owns_storage(tau)
    return add_scaled(base, tau, scale, out=tau if reuse else None).to(dtype or base.dtype)


def add_scaled(base: Tensor, tau: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """θ0 + λ·τ in float32 by ``torch.add(θ0, τ, alpha=λ)``: the one spelling of it, which the numba folds
    match when they add θ0 themselves (:func:`magmax.merging.backends.cpu.native.add_rounding`: one FMA on CPUs
    whose ATen kernels use it, two roundings on others). ``out`` may be ``tau``."""
    return torch.add(base.to(device=tau.device, dtype=COMPUTE_DTYPE), tau, alpha=scale, out=out)


def _owns_storage(tensor: Tensor) -> bool:
    """Contiguous and the whole of its storage: not a view into a larger buffer."""
    return (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )


def check_compatible(
    base: Mapping[str, Tensor], other: Mapping[str, Tensor], base_name: str, other_name: str
) -> None:
    """Raise one clear line if two state dicts differ in keys, shapes or dtypes."""
    missing = [k for k in base if k not in other]
    if missing:
        raise MergeInputError(
            f"{other_name}: tensor '{missing[0]}' of {base_name} is missing ({len(missing)} missing in all); "
            "merge only checkpoints of the same architecture"
        )
    extra = [k for k in other if k not in base]
    if extra:
        raise MergeInputError(
            f"{other_name}: tensor '{extra[0]}' is not in {base_name} ({len(extra)} extra in all); "
            "merge only checkpoints of the same architecture"
        )
    for key, value in base.items():
        check_tensor_pair(key, tuple(value.shape), value.dtype, tuple(other[key].shape), other[key].dtype, base_name, other_name)


def check_tensor_pair(
    key: str,
    base_shape: tuple[int, ...],
    base_dtype: torch.dtype,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    base_name: str,
    other_name: str,
) -> None:
    if base_shape != shape:
        raise MergeInputError(
            f"{other_name}: tensor '{key}' has shape {list(shape)} but {base_name} has {list(base_shape)}; "
            "merge only checkpoints of the same architecture"
        )
    if base_dtype != dtype:
        raise MergeInputError(
            f"{other_name}: tensor '{key}' has dtype {dtype} but {base_name} has {base_dtype}; "
            "convert the checkpoint so both use the same dtype"
        )


def check_finite(key: str, tensor: Tensor, source: str) -> None:
    """NaN/Inf in a weight poisons every merge rule; refuse it with the tensor's name."""
    # A finite sum proves every entry finite (Inf/NaN propagate through any order of additions); the
    # sum is one vectorised pass, while isfinite() is not vectorised on CPU (about 17x slower).
    if not tensor.dtype.is_floating_point:
        return
    if tensor.dtype.itemsize == 1:  # float8: torch has neither sum nor isfinite for it; check it upcast
        tensor = tensor.to(COMPUTE_DTYPE)
    half = tensor.dtype in (torch.float16, torch.bfloat16)  # sum in float32: fp16 sums overflow at 65504
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32) if half else tensor.sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MergeInputError(
            f"{source}: tensor '{key}' contains {bad} NaN/Inf value(s); repair or drop this checkpoint"
        )
