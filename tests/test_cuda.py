"""The GPU path against the CPU path (skipped without CUDA; run on a GPU machine by bench/gpu_session.sh)."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    SHAPES,
    assert_state_dicts_bitwise_equal,
    make_finetuned,
    make_state_dict,
)

import magmax
from magmax.merging import _fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

EXACT = ["magmax", "average", "task_arithmetic", "random"]
CLOSE = ["ties", "breadcrumbs", "consensus", "tsv", "iso_c", "iso_cts", "opcm"]


@pytest.fixture(scope="module")
def models():
    base = make_state_dict(0, SHAPES)
    return base, make_finetuned(base, 11, seed=1)  # 11 > GROUP: two groups per fold


@pytest.mark.parametrize("mode", ["never", "always"])
@pytest.mark.parametrize("method", EXACT)
def test_cuda_merge_is_bit_exact_with_cpu(models, method, mode):
    """Same IEEE operations in the same order on both devices, eager or compiled (random: same hash)."""
    base, fts = models
    want = magmax.merge(method, base, fts)
    _fused.set_compile_mode(mode)
    assert_state_dicts_bitwise_equal(magmax.merge(method, base, fts, device="cuda"), want)


@pytest.mark.parametrize("method", CLOSE)
def test_cuda_merge_matches_cpu(models, method):
    """Methods with reductions or SVDs: the same result up to float32 rounding of the device's kernels."""
    base, fts = models
    want = magmax.merge(method, base, fts)
    got = magmax.merge(method, base, fts, device="cuda")
    assert list(got) == list(want)
    for key, value in want.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=f"{method}: {key}")
        else:
            assert torch.equal(got[key], value)


def test_cuda_dare_is_reproducible_and_drops_the_asked_fraction(models):
    """DARE draws its masks from the device's generator (CPU and CUDA streams differ), seeded per tensor."""
    base, fts = models
    first = magmax.merge("dare", base, fts, device="cuda", p=0.9, seed=3)
    assert_state_dicts_bitwise_equal(magmax.merge("dare", base, fts, device="cuda", p=0.9, seed=3), first)
    tau = first["big"] - base["big"]
    kept = (tau != 0).float().mean().item()  # 11 tasks, each keeps 10%: 1 − 0.9^11 ≈ 0.69 of entries move
    assert 0.64 < kept < 0.74
