"""Random mix (RandMix): per parameter, the entry of a task chosen uniformly at random.

    τ*[p] = τ_{k_p}[p],  k_p ~ Uniform{1..T} independently per parameter,   θ = θ0 + λ·τ*,  λ = 1

Streamed as reservoir sampling: after task t (1-based) each entry is replaced by τ_t with probability
1/t, which leaves every task equally likely after any prefix. The draws are a counter-based hash of
(seed, tensor name, task, parameter index), so the result is exact for a given seed, independent of
tensor order, the same in the batch and the streaming fold, and the same on CPU and CUDA.

How it computes (:func:`random_kernel`), for task t (0-based) and parameter index i, in 32-bit unsigned
arithmetic (the torch kernel holds the values in int64 and reduces mod 2^32 after every step; the numba
kernel uses uint32 lanes, twice as many per vector):

    x = (i·0x61C88647 + k_t) mod 2^32,       k_t = crc32(seed, tensor name, t) < 2^31  (``seed_for``)
    h = (·0x45D9F3B mod 2^32) ∘ xorshift16 ∘ (·0x45D9F3B mod 2^32) ∘ xorshift16 (x),   xorshift16(y) = y ^ (y >> 16)
    replace iff h < ⌈2^32/(t+1)⌉                (probability 1/(t+1) up to 2^-32; always at t = 0)
    choice = where(h <= ⌈2^32/(t+1)⌉ − 1, τ_t, choice)

h is two multiply–xorshift rounds of the well-known 0x45D9F3B integer hash; its final xorshift is left
out because the threshold test reads the high bits, which the last multiplication has already mixed.
The backends run the same draws in one pass (numba, Triton), and an eager torch form that selects on
the bit patterns; all bit for bit the same as :func:`random_kernel`.
Marczak et al., MagMax, ECCV 2024 (the "Random" baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from magmax.merging import fold
from magmax.merging.base import MethodOptions, register, seed_for

_LOW32 = 0xFFFFFFFF
_SPREAD = 0x61C88647  # 2^32/φ, odd: i ↦ i·_SPREAD mod 2^32 is a bijection
_MIX = 0x45D9F3B


class RandomOptions(MethodOptions):
    seed: int = 0
    """Seed of the per-parameter task choice."""


def _xorshift16(x: Tensor, tmp: Tensor) -> None:
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))


def spread_indices(offset: int, ws: fold.Workspace) -> Tensor:
    """(i·0x61C88647) mod 2^32 for the flat indices i of a chunk starting at ``offset`` (int64)."""
    spread = torch.arange(offset, offset + ws.numel, out=ws.buffer(torch.int64))
    return spread.bitwise_and_(_LOW32).mul_(_SPREAD).bitwise_and_(_LOW32)


def hash_draws(spread: Tensor, key: Tensor, out: Tensor, tmp: Tensor) -> Tensor:
    """h(i; k) of the module docstring, for every index of ``spread`` (:func:`spread_indices`), into
    ``out`` (int64 holding uint32 values; ``tmp``: int64 scratch). Shared with DARE's drops."""
    torch.add(spread, key, out=out).bitwise_and_(_LOW32)
    for _ in range(2):
        _xorshift16(out, tmp)
        out.mul_(_MIX).bitwise_and_(_LOW32)
    return out


@fold.reference("random")
def random_kernel(choice: Tensor, base: Tensor | None, inputs: Sequence[Tensor], step: fold.Step, ws: fold.Workspace) -> None:
    """Fold ``inputs`` into ``choice`` in place: take τ_t where h(i; k_t) <= thr_t − 1 (see module).

    ``step.params`` holds one row (k_t, ⌈2^32/(t+1)⌉ − 1) per input.
    """
    assert step.params is not None
    base32 = fold.base_f32(base, ws)
    start = 0
    if step.first:  # t = 0 is always taken
        fold.tau_into(choice, inputs[0], base32)
        start = 1
    spread = spread_indices(step.offset, ws)
    h = ws.buffer(torch.int64)
    tmp = ws.buffer(torch.int64)
    scratch = ws.buffer(torch.float32)
    for j in range(start, len(inputs)):
        tau = fold.tau_of(scratch, inputs[j], base32)
        hash_draws(spread, step.params[j, 0], h, tmp)
        choice.copy_(torch.where(h <= step.params[j, 1], tau, choice))  # τ_t replaces it where h <= thr − 1


@register
class RandomMix(fold.KernelFold):
    name = "random"
    summary = "per parameter, the entry of a uniformly random task"
    reference = "Marczak et al., MagMax, ECCV 2024 (Random baseline)"
    Options = RandomOptions
    kernel = staticmethod(random_kernel)
    default_scale = 1.0

    def _params(self, key: str) -> fold.ParamsFn:
        seed = self.options.seed

        def params(first_t: int, count: int, total: int) -> Tensor:
            rows = [[seed_for(seed, key, t), -(-(1 << 32) // (t + 1)) - 1] for t in range(first_t, first_t + count)]
            return torch.tensor(rows, dtype=torch.int64)

        return params
