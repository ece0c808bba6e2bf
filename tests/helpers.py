"""Tiny state dicts built in code, and bitwise comparison, for the merge tests (import as ``helpers``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

# A linear layer, a conv kernel, a bias, a 0-d scalar, an empty tensor, one tensor of two eager chunks
# (magmax.merging.backends.fold.CHUNK = 32768) with a ragged end, and the two buffer kinds that are
# never merged.
SHAPES: dict[str, tuple[int, ...]] = {
    "layer.weight": (7, 5),
    "conv.weight": (4, 3, 2, 2),
    "layer.bias": (7,),
    "logit_scale": (),
    "empty": (0, 3),
    "big": (40_001,),
}
SMALL_SHAPES: dict[str, tuple[int, ...]] = {k: v for k, v in SHAPES.items() if k != "big"}


def make_state_dict(
    seed: int,
    shapes: Mapping[str, tuple[int, ...]] = SMALL_SHAPES,
    dtype: torch.dtype = torch.float32,
    *,
    std: float = 1.0,
    buffers: bool = True,
) -> dict[str, Tensor]:
    """Random floating-point tensors of ``shapes`` (normal, ``std``), plus an int64 step counter and a
    bool mask buffer when ``buffers`` (their values depend on the seed, so a merge must take the base's)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(s, generator=gen, dtype=torch.float64) * std).to(dtype) for k, s in shapes.items()}
    if buffers:
        state["bn.num_batches_tracked"] = torch.tensor(seed, dtype=torch.int64)
        state["attn.mask"] = torch.randint(0, 2, (3, 3), generator=gen).bool()
    return state


def make_finetuned(
    base: Mapping[str, Tensor], count: int, seed: int, *, std: float = 0.1, quantum: float | None = None
) -> list[dict[str, Tensor]]:
    """``count`` fine-tuned versions of ``base``: θ_t = θ0 + δ_t on float tensors, other tensors changed too.

    With ``quantum``, δ_t takes values in {−3, …, 3}·quantum, so equal magnitudes (ties), exact zeros and
    sign flips between tasks are frequent.
    """
    gen = torch.Generator().manual_seed(seed)
    models = []
    for _ in range(count):
        model = {}
        for key, value in base.items():
            if value.dtype.is_floating_point:
                if quantum is None:
                    delta = torch.randn(value.shape, generator=gen, dtype=torch.float64) * std
                else:
                    delta = torch.randint(-3, 4, value.shape, generator=gen).double() * quantum
                model[key] = (value.double() + delta).to(value.dtype)
            elif value.dtype == torch.bool:
                model[key] = ~value
            else:
                model[key] = value + 1 + torch.randint(0, 5, value.shape, generator=gen)
        models.append(model)
    return models


def task_vectors(base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """τ_t = float32(θ_t) − float32(θ0) on the floating-point tensors, as the engine forms them."""
    return [
        {k: ft[k].to(torch.float32) - v.to(torch.float32) for k, v in base.items() if v.dtype.is_floating_point}
        for ft in finetuned
    ]


def bits(tensor: Tensor) -> Tensor:
    """The raw bit pattern (so −0.0 ≠ +0.0 and NaN = NaN in comparisons)."""
    by_size = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if tensor.dtype == torch.bool:
        return tensor
    return tensor.contiguous().view(by_size[tensor.element_size()])


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(bits(a), bits(b)))


def assert_state_dicts_bitwise_equal(got: Mapping[str, Tensor], want: Mapping[str, Tensor]) -> None:
    assert list(got) == list(want), f"keys differ: {list(got)} vs {list(want)}"
    for key in want:
        assert got[key].dtype == want[key].dtype, f"{key}: dtype {got[key].dtype} vs {want[key].dtype}"
        assert got[key].shape == want[key].shape, f"{key}: shape {tuple(got[key].shape)} vs {tuple(want[key].shape)}"
        if not bitwise_equal(got[key], want[key]):
            diff = (bits(got[key]) != bits(want[key])).sum().item()
            raise AssertionError(f"{key}: {diff} of {want[key].numel()} entries differ bitwise")


def _native_kernels_on() -> bool:
    from magmax.merging.backends.cpu import native

    return native.enabled()


# Tests that assert which code path ran (the numba folds' own NaN/Inf verdicts, their read counts, their
# calls) need those kernels: with MAGMAX_NATIVE=0 (or no numba) they skip; the results are tested anyway.
needs_native = __import__("pytest").mark.skipif(
    not _native_kernels_on(), reason="asserts the numba kernels' path; they are off (MAGMAX_NATIVE=0 or no numba)")
