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
from magmax.errors import MergeInputError
from magmax.merging.backends import select
from magmax.merging.backends.gpu import triton as _gpu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

EXACT = ["magmax", "average", "task_arithmetic", "random", "dare"]
CLOSE = ["ties", "breadcrumbs", "consensus", "tsv", "iso_c", "iso_cts", "opcm"]


@pytest.fixture(scope="module")
def models():
    base = make_state_dict(0, SHAPES)
    return base, make_finetuned(base, 11, seed=1)  # 11 > GROUP: two groups per fold


@pytest.mark.parametrize("kernels", ["triton", "torch eager", "torch compiled"])
@pytest.mark.parametrize("method", EXACT)
def test_cuda_merge_is_bit_exact_with_cpu(models, method, kernels, monkeypatch):
    """Same IEEE operations in the same order on both devices: the Triton multi-tensor folds, or the torch
    group kernels eager or compiled (random and DARE: same hash)."""
    base, fts = models
    want = magmax.merge(method, base, fts)
    monkeypatch.setenv("MAGMAX_TRITON", "1" if kernels == "triton" else "0")
    select.set_compile_mode("always" if kernels == "torch compiled" else "never")
    assert_state_dicts_bitwise_equal(magmax.merge(method, base, fts, device="cuda"), want)
    if kernels == "triton":
        assert _gpu.enabled(), "a Triton kernel failed and was turned off (see the log)"


@pytest.mark.parametrize("method", [*EXACT, "ties"])
def test_cuda_merge_of_models_on_the_gpu(models, method):
    """Inputs already on the device: every task in one launch per run of tensors (TIES too: its Triton
    kernels do the CPU kernels' float32 operations); NaN/Inf still named."""
    base, fts = models
    want = magmax.merge(method, base, fts)
    on_gpu = [{k: v.cuda() for k, v in sd.items()} for sd in [base, *fts]]
    got = magmax.merge(method, on_gpu[0], on_gpu[1:], device="cuda")
    assert all(v.is_cuda for v in got.values()), "models on the GPU give a model on the GPU"
    assert_state_dicts_bitwise_equal({k: v.cpu() for k, v in got.items()}, want)
    assert _gpu.enabled()
    on_gpu[3]["big"][7] = float("nan")
    with pytest.raises(MergeInputError, match="'big'"):
        magmax.merge(method, on_gpu[0], on_gpu[1:], device="cuda")


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
    """DARE's drops are a hash of (seed, tensor, task, index): reproducible, and about p of each τ_t."""
    base, fts = models
    first = magmax.merge("dare", base, fts, device="cuda", p=0.9, seed=3)
    assert_state_dicts_bitwise_equal(magmax.merge("dare", base, fts, device="cuda", p=0.9, seed=3), first)
    tau = first["big"] - base["big"]
    kept = (tau != 0).float().mean().item()  # 11 tasks, each keeps 10%: 1 − 0.9^11 ≈ 0.69 of entries move
    assert 0.64 < kept < 0.74
