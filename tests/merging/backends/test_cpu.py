"""The CPU backend (numba kernels, bracketed thresholds, fused passes): its paths, fallbacks and edge cases.

Bit-equality of each accelerated fold with its reference kernel is in tests/merging/test_backend_equivalence.py."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from helpers import (
    SHAPES,
    assert_state_dicts_bitwise_equal,
    bitwise_equal,
    make_finetuned,
    make_state_dict,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import magmax
from magmax.merging import create_method
from magmax.merging.backends import brackets, finite, registry
from magmax.merging.backends import fold as _fused
from magmax.merging.backends.cpu import native as _native
from magmax.merging.backends.cpu import threshold as _threshold
from magmax.taskvector import add_scaled

pytestmark = pytest.mark.skipif(not _native.enabled(), reason="numba is not importable here")

FOLDS = ["magmax", "average", "task_arithmetic", "random", "dare"]


@pytest.fixture
def torch_kernels(monkeypatch):
    """Run with the torch group kernels only (the reference for the native ones)."""

    def use(flag: bool) -> None:
        monkeypatch.setenv("MAGMAX_NATIVE", "1" if flag else "0")

    return use


@pytest.fixture
def native_calls(monkeypatch):
    """Count native group calls (to prove the native path ran)."""
    calls: list[str] = []
    for method in FOLDS:
        kernels = registry.fold_kernels("task_arithmetic" if method == "average" else method)
        original = kernels.cpu
        if original is None or getattr(original, "spied", False):
            continue

        def spy(*args, _original=original, **kwargs):
            calls.append(_original.__name__)
            return _original(*args, **kwargs)

        spy.spied = True  # type: ignore[attr-defined]
        monkeypatch.setattr(kernels, "cpu", spy)
    return calls


@pytest.mark.parametrize("count", [1, 2, 7, 8, 9, 17])
@pytest.mark.parametrize("method", FOLDS)
def test_native_merge_equals_torch_kernels(method, count, torch_kernels, native_calls):
    base = make_state_dict(3, SHAPES)
    fts = make_finetuned(base, count, seed=4, quantum=0.25)  # planted ties, zeros and sign flips
    torch_kernels(False)
    want = magmax.merge(method, base, fts)
    assert not native_calls
    torch_kernels(True)
    got = magmax.merge(method, base, fts)
    assert native_calls, "the native kernels did not run"
    assert_state_dicts_bitwise_equal(got, want)


@pytest.mark.parametrize("method", FOLDS)
def test_native_streaming_equals_torch_streaming(method, torch_kernels):
    base = make_state_dict(5, SHAPES)
    fts = make_finetuned(base, 5, seed=6)
    results = []
    for flag in (False, True):
        torch_kernels(flag)
        merger = magmax.Merger(method, base)
        merged = []
        for ft in fts:
            merger.add(ft)
            merged.append(merger.merged())
        results.append(merged)
    for want, got in zip(*results):
        assert_state_dicts_bitwise_equal(got, want)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.5, -2.5, 1e-30, -1e-30, 1e-40, -1e-40]), min_size=1, max_size=60),
    count=st.integers(1, 12),
    with_base=st.booleans(),
)
def test_magmax_native_fold_bits(values, count, with_base):
    """Property: on values full of ties and signed zeros, native == torch kernel bit for bit."""
    n = len(values) // count or 1
    pool = torch.tensor(values * count, dtype=torch.float32)[: n * count].reshape(count, n)
    base = torch.tensor(values[:n] + [0.0] * (n - len(values[:n])), dtype=torch.float32) if with_base else None
    inputs = [pool[t].clone() for t in range(count)]

    from magmax.merging.magmax import magmax_kernel

    def fold(flag: bool) -> torch.Tensor:
        previous = os.environ.get("MAGMAX_NATIVE")
        os.environ["MAGMAX_NATIVE"] = "1" if flag else "0"
        try:
            return _fused.fold_operands(magmax_kernel, lambda t: (inputs[t], base), count)
        finally:
            if previous is None:
                del os.environ["MAGMAX_NATIVE"]
            else:
                os.environ["MAGMAX_NATIVE"] = previous

    assert bitwise_equal(fold(True), fold(False))


def test_a_failing_native_kernel_falls_back_to_torch(monkeypatch, caplog):
    base = make_state_dict(1, SHAPES)
    fts = make_finetuned(base, 3, seed=2)
    want = magmax.merge("magmax", base, fts)

    def broken(*args, **kwargs):
        raise RuntimeError("no LLVM here")

    monkeypatch.setattr(registry.fold_kernels("magmax"), "cpu", broken)
    monkeypatch.setattr(_native, "_disabled_after_error", False)
    with caplog.at_level(logging.WARNING):
        got = magmax.merge("magmax", base, fts)
    assert "numba merge kernel failed" in caplog.text
    assert not _native.enabled()
    assert_state_dicts_bitwise_equal(got, want)


# -- TIES: thresholds and the fused passes ----------------------------------------------------------


def _thresholds_oracle(taus, k):
    """kthvalue of |τ_t| over the concatenation, at the reference's rank d − int(d·K)."""
    out = []
    for tau in taus:
        flat = torch.cat([v.reshape(-1) for v in tau.values()]).abs()
        d = flat.numel()
        out.append(float(torch.kthvalue(flat, d - int(d * k)).values))
    return out


@pytest.fixture(params=[1, 3], ids=["one thread", "three threads"])
def task_threads(request, monkeypatch):
    """Torch's thread count for the native passes; with several, even small tensors are split over
    threads by blocks of tasks (the pool path), which real models take for their large tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    monkeypatch.setattr(_native, "SERIAL_NUMEL", 0)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("k", [0.2, 0.5, 0.01])
@pytest.mark.parametrize("quantum", [None, 0.25])
def test_bracketed_thresholds_equal_kthvalue(k, quantum, monkeypatch, task_threads):
    from magmax.merging._sparsify import population_position
    from magmax.merging.base import TaskSlices

    base = make_state_dict(7, {"a": (300, 70), "b": (4096,), "c": (3,)}, buffers=False)
    fts = make_finetuned(base, 10, seed=8, quantum=quantum)
    taus = [{key: ft[key] - base[key] for key in base} for ft in fts]
    monkeypatch.setattr(brackets, "SAMPLE", 512)  # a real bracket (not the whole model) on a small model

    def stream():
        for key in base:
            yield key, TaskSlices(key, len(fts), lambda t, key=key: taus[t][key], base=base[key],
                                  finetuned=lambda t, key=key: fts[t][key])

    total = sum(v.numel() for v in base.values())
    found, _ = _threshold.bracketed_thresholds(stream, len(fts), total, population_position(total, k))
    want = _thresholds_oracle(taus, k)
    assert all(got is None or got == value for got, value in zip(found, want))
    if quantum is None:  # continuous values: the bracket decides; heavy ties may overflow it (radix then)
        assert None not in found, "the bracket should have decided every task here"
    # Undecided tasks take the exact radix select in the method: the thresholds TIES uses are exact.
    method = create_method("ties", k=k)
    method.observe_tasks(stream, len(fts), total)
    assert [method._thresholds[t] for t in range(len(fts))] == want


def test_bracket_misses_fall_back_to_the_exact_radix_select(monkeypatch):
    base = make_state_dict(9, SHAPES)
    fts = make_finetuned(base, 3, seed=10)
    want = magmax.merge("ties", base, fts)
    monkeypatch.setattr(brackets, "GATHER_CAP", 1)  # every bracket overflows
    assert_state_dicts_bitwise_equal(magmax.merge("ties", base, fts), want)


@pytest.mark.parametrize("count", [1, 3, 8, 11])
@pytest.mark.parametrize("options", [{}, {"k": 0.5}, {"k": 1.0}])
def test_native_ties_equals_torch_ties(count, options, torch_kernels, task_threads):
    base = make_state_dict(11, SHAPES)
    fts = make_finetuned(base, count, seed=12, quantum=0.125)  # exact cancellations: the majority sign matters
    torch_kernels(False)
    want = magmax.merge("ties", base, fts, **options)
    torch_kernels(True)
    got = magmax.merge("ties", base, fts, **options)
    for key, value in want.items():
        assert torch.equal(got[key], value), key  # equal values (a zero's sign may differ)


def test_ties_falls_back_to_torch_when_the_native_kernels_fail(monkeypatch, caplog):
    native = _native
    base = make_state_dict(13, SHAPES)
    fts = make_finetuned(base, 4, seed=14)
    want = magmax.merge("ties", base, fts)

    def broken(*args, **kwargs):
        raise RuntimeError("no LLVM here")

    monkeypatch.setattr(native, "count_and_gather", broken)
    monkeypatch.setattr(native, "ties_group", broken)
    monkeypatch.setattr(native, "_disabled_after_error", False)
    with caplog.at_level(logging.WARNING):
        got = magmax.merge("ties", base, fts)
    assert "numba merge kernel failed" in caplog.text
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("method", [*FOLDS, "ties"])
def test_bfloat16_checkpoints_run_natively_and_exactly(method, torch_kernels, native_calls):
    """bfloat16 entries are read as their exact float32 (bits << 16) inside the loops."""
    base = make_state_dict(15, SHAPES, dtype=torch.bfloat16)
    fts = make_finetuned(base, 10, seed=16)
    torch_kernels(False)
    want = magmax.merge(method, base, fts)
    torch_kernels(True)
    ties_calls = []
    original = _native.ties_group
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_native, "ties_group", lambda *a, **k: ties_calls.append(1) or original(*a, **k))
        got = magmax.merge(method, base, fts)
    if method != "ties":
        assert native_calls, "the native kernels did not run"
        assert_state_dicts_bitwise_equal(got, want)
    else:
        assert ties_calls, "the native TIES passes did not run"
        for key, value in want.items():
            assert torch.equal(got[key], value), key


def test_merges_from_several_threads_at_once_agree():
    from concurrent.futures import ThreadPoolExecutor

    base = make_state_dict(17, SHAPES)
    fts = make_finetuned(base, 9, seed=18)
    want = magmax.merge("magmax", base, fts)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: magmax.merge("magmax", base, fts), range(8)))
    for got in results:
        assert_state_dicts_bitwise_equal(got, want)


class _FromDisk:
    """A reader the engine does not know to be in memory (not a DictReader): it loads groups of 8."""

    def __init__(self, state, name):
        from magmax.engine import DictReader

        self._reader = DictReader(state, name)
        self.name = name

    def keys(self):
        return self._reader.keys()

    def meta(self, key):
        return self._reader.meta(key)

    def get(self, key):
        return self._reader.get(key)


@pytest.mark.parametrize("count", [3, 11, 17])
@pytest.mark.parametrize("method", ["ties", "magmax", "average", "consensus"])
def test_grouped_native_passes_equal_the_single_call(method, count, task_threads):
    """Out-of-core readers are read in groups of 8 inputs (TIES carries its fold state between groups);
    in-memory ones in one call per tensor: the same numbers either way."""
    from magmax.engine import DictWriter, MergeRun
    from magmax.merging import create_method

    base = make_state_dict(17, SHAPES)
    fts = make_finetuned(base, count, seed=18, quantum=0.125)
    want = magmax.merge(method, base, fts)
    writer = DictWriter()
    run = MergeRun(create_method(method), _FromDisk(base, "base"),
                   [_FromDisk(ft, f"ft{i}") for i, ft in enumerate(fts)])
    assert not any(run._resident(unit) for unit in run.plan)
    run.run(writer)
    for key, value in want.items():
        assert torch.equal(writer.state[key], value), key


@pytest.mark.parametrize("scale", [None, 0.55])
@pytest.mark.parametrize("divide", [False, True])
@pytest.mark.parametrize("count", [2, 5])
def test_the_sum_fold_finishes_the_merge_in_its_own_pass(count, divide, scale):
    # The mean's division and θ0 + λ·τ* happen inside the last group (no pass over the result after
    # it), with the same bits as mean_of_sum's division by a 0-d tensor and torch.add(θ0, τ*, alpha=λ).
    gen = torch.Generator().manual_seed(40)
    base = torch.randn(70_001, generator=gen)
    inputs = [base + torch.randn(70_001, generator=gen) * 0.1 for _ in range(count)]
    want = inputs[0] - base
    for x in inputs[1:]:
        want = want + (x - base)
    if divide:
        want = _fused.mean_of_sum(want, count)
    if scale is not None:
        want = add_scaled(base, want, scale)
    state = torch.empty_like(base)
    assert _native.sum_group(state, base, inputs, True, True, None, _fused.GROUP, count if divide else None, scale)
    assert bitwise_equal(state, want)


@pytest.mark.parametrize("method", [*FOLDS, "ties"])
@pytest.mark.parametrize("rounding", ["fused", "separate"])
def test_folds_add_the_base_as_torch_add_rounds_it(method, rounding, monkeypatch):
    # On CPUs whose ATen kernels use FMA, θ0 + λ·τ* is rounded once; on others twice. The folds ask torch
    # which (add_rounding) and match it; here both are forced, against torch.add written out each way.
    kernels = _native._kernels()
    monkeypatch.setattr(_native, "_ADD_ROUNDING", kernels.ADD_FUSED if rounding == "fused" else kernels.ADD_SEPARATE)
    base = make_state_dict(41, SHAPES)
    fts = make_finetuned(base, 3, seed=42)
    method_obj = magmax.create_method(method)
    scale = np.float32(method_obj.scale)
    got = magmax.merge(method, base, fts)
    merger = magmax.Merger(method, base)
    for ft in fts:
        merger.add(ft)
    tau = merger.task_vector()
    for key, value in tau.items():
        b = base[key].float()
        if rounding == "fused":
            fused = np.empty(value.numel(), np.float32)
            kernels.add_scaled_fused(fused, b.reshape(-1).numpy(), value.reshape(-1).numpy(), scale)
            want = torch.from_numpy(fused).view(value.shape)
        else:
            want = b + value * float(scale)
        assert bitwise_equal(got[key], want.to(base[key].dtype)), key


def test_ties_on_inputs_the_native_kernels_refuse_adds_the_base_after_the_torch_fold(monkeypatch):
    # float16 checkpoints: Ties.merge_into_base runs the torch fold and adds θ0 itself, as torch would.
    base = make_state_dict(3, SHAPES, torch.float16)
    fts = make_finetuned(base, 3, seed=4)
    got = magmax.merge("ties", base, fts)
    monkeypatch.setenv("MAGMAX_NATIVE", "0")
    assert_state_dicts_bitwise_equal(got, magmax.merge("ties", base, fts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 2, 5, 11])
@pytest.mark.parametrize("options", [{}, {"k": 1, "tall_mask_lambda": 0.4}, {"k": 0}, {"k": 4}])
def test_native_consensus_equals_the_torch_kernel(options, count, dtype, torch_kernels, monkeypatch):
    """The block kernel (sum, then votes, from cache) and the grouped passes of out-of-core merges make the
    torch kernel's float32 operations: the same bits, θ0 + λ·τ* included."""
    from magmax.engine import DictWriter, MergeRun
    from magmax.merging import consensus as consensus_module
    from magmax.merging import create_method

    base = make_state_dict(43, SHAPES, dtype=dtype)
    fts = make_finetuned(base, count, seed=44, quantum=0.125)  # sums that cancel: votes on ties and zeros
    torch_kernels(False)
    want = magmax.merge("consensus", base, fts, **options)
    torch_kernels(True)
    calls = []
    for name in ("consensus_group", "tall_votes"):
        original = getattr(_native, name)
        monkeypatch.setattr(_native, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    assert_state_dicts_bitwise_equal(magmax.merge("consensus", base, fts, **options), want)
    assert "consensus_group" in calls
    calls.clear()
    writer = DictWriter()
    MergeRun(create_method("consensus", **options), _FromDisk(base, "base"),
             [_FromDisk(ft, f"ft{i}") for i, ft in enumerate(fts)]).run(writer)
    assert_state_dicts_bitwise_equal(writer.state, want)
    assert ("tall_votes" in calls) == (count > _fused.GROUP)
    assert consensus_module.Consensus.folds_natively


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 3, 11])
@pytest.mark.parametrize("options", [{}, {"bottom": 0.5, "top": 0.1}, {"bottom": 0.0, "top": 0.2}, {"bottom": 0.3, "top": 0.0}])
def test_native_breadcrumbs_equals_the_torch_kernel(options, count, dtype, torch_kernels, monkeypatch):
    """Bounds by sample, bracket and gather (tensors above SMALL_TENSOR) or by np.partition (below), then
    the banded sum: kthvalue's bounds and the torch fold's bits, in memory, out of core and streaming."""
    from magmax.engine import DictWriter, MergeRun
    from magmax.merging import create_method

    shapes = {**SHAPES, "huge": (3, 70_001)}
    base = make_state_dict(47, shapes, dtype=dtype)
    fts = make_finetuned(base, count, seed=48, quantum=0.0625)  # many equal magnitudes: ties at both bounds
    torch_kernels(False)
    want = magmax.merge("breadcrumbs", base, fts, **options)
    merger = magmax.Merger("breadcrumbs", base, **options)
    for ft in fts:
        merger.add(ft)
    want_tau = merger.task_vector()
    torch_kernels(True)
    calls = []
    original = _native.band_sum_group
    monkeypatch.setattr(_native, "band_sum_group", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert_state_dicts_bitwise_equal(magmax.merge("breadcrumbs", base, fts, **options), want)
    assert calls
    writer = DictWriter()
    MergeRun(create_method("breadcrumbs", **options), _FromDisk(base, "base"),
             [_FromDisk(ft, f"ft{i}") for i, ft in enumerate(fts)]).run(writer)
    assert_state_dicts_bitwise_equal(writer.state, want)
    merger = magmax.Merger("breadcrumbs", base, **options)
    for ft in fts:
        merger.add(ft)
    assert_state_dicts_bitwise_equal(merger.task_vector(), want_tau)


@pytest.mark.parametrize("count", [2, 9])
def test_breadcrumbs_fold_split_by_entries_over_threads_keeps_the_bits(count, task_threads, torch_kernels):
    """The banded sum runs on the task pool in ranges of entries (64-entry aligned; with SERIAL_NUMEL off
    here, even tensors of a few entries are split, some ranges empty): the torch kernel's bits."""
    base = make_state_dict(51, {"w": (131, 77), "b": (5,), "v": (40,)})
    fts = make_finetuned(base, count, seed=52, quantum=0.0625)
    torch_kernels(False)
    want = magmax.merge("breadcrumbs", base, fts, bottom=0.4, top=0.1)
    torch_kernels(True)
    assert_state_dicts_bitwise_equal(magmax.merge("breadcrumbs", base, fts, bottom=0.4, top=0.1), want)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6000), count=st.integers(1, 4), brackets=st.integers(1, 3), with_base=st.booleans(),
       bf16=st.booleans(), cap=st.sampled_from([1, 37, 10_000]), seed=st.integers(0, 2**16))
def test_count_and_gather_counts_below_and_gathers_inside_each_bracket(n, count, brackets, with_base, bf16, cap, seed):
    """The kernel against numpy: per input and bracket, below = #{|τ| < low} exactly, and the |τ| in
    [low, high] gathered in order (filled counts them) where they fit; where they do not, filled is left
    above the capacity. Lengths that are no multiple of the 16-entry steps or the 2,048-entry blocks,
    bfloat16 inputs, and brackets that hold nothing, everything or a few values."""
    rng = np.random.default_rng(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    base = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype) if with_base else None
    inputs = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype) for _ in range(count)]
    taus = [x.float() - (base.float() if with_base else 0.0) for x in inputs]
    mags = [tau.abs().numpy() for tau in taus]
    low = np.empty((count, brackets), np.float32)
    high = np.empty((count, brackets), np.float32)
    for j in range(count):
        for r in range(brackets):
            a, b = sorted(rng.choice(mags[j], 2))
            low[j, r], high[j, r] = [(a, b), (0.0, np.inf), (b, a)][(j + r) % 3]  # some, all, none
    below = np.full((count, brackets), 5, np.int64)  # the kernel adds to what is there
    filled = np.zeros((count, brackets), np.int64)
    room = np.full(count * brackets * cap + 16, -1.0, np.float32)  # 16 more: a write past the end shows
    gathered = room[: count * brackets * cap].reshape(count, brackets, cap)
    _native.count_and_gather(base, inputs, low, high, below, gathered, filled, report_finite=False)
    assert (room[-16:] == -1.0).all()
    for j in range(count):
        for r in range(brackets):
            assert below[j, r] == 5 + int((mags[j] < low[j, r]).sum())
            inside = mags[j][(mags[j] >= low[j, r]) & (mags[j] <= high[j, r])]
            if inside.size <= cap - 16 or (inside.size <= cap and filled[j, r] <= cap):
                assert filled[j, r] == inside.size
                np.testing.assert_array_equal(gathered[j, r, : inside.size], inside)
            if inside.size > cap:
                assert filled[j, r] > cap


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("where", [None, 0, 2047, 2048, 4095, 5000, 5016])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_count_and_gather_reports_whether_every_tau_was_finite(bad, where, bf16):
    """With θ0, the counting pass vouches for finiteness (the engine then skips its own NaN/Inf check):
    one NaN or ±Inf anywhere (first or last entry of a 2,048-entry block, in the tail after the last
    whole 16-entry step) in θ0 or in one input, and it does not."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    n = 5017
    gen = torch.Generator().manual_seed(53)
    base = torch.randn(n, generator=gen).to(dtype)
    inputs = [(base.float() + 0.1 * torch.randn(n, generator=gen)).to(dtype) for _ in range(3)]
    for poisoned in ([base, *inputs] if where is not None else [base]):
        bad_base, bad_inputs = base.clone(), [x.clone() for x in inputs]
        if where is not None:
            target = bad_base if poisoned is base else bad_inputs[[id(x) for x in inputs].index(id(poisoned))]
            target[where] = bad
        low, high = np.zeros((3, 1), np.float32), np.full((3, 1), 0.05, np.float32)
        below, filled = np.zeros((3, 1), np.int64), np.zeros((3, 1), np.int64)
        with finite.finite_watch() as watch:
            _native.count_and_gather(bad_base, bad_inputs, low, high, below, np.empty((3, 1, n), np.float32), filled)
        assert watch.proves_finite(3) == (where is None)


def test_count_and_gather_never_writes_past_the_room_it_is_given():
    """Every capacity from 1 to 48 with every magnitude inside the bracket: the 16-entry compress-stores
    stop before the end of the room (a guard after it stays untouched) and leave filled above it."""
    x = torch.arange(1, 101, dtype=torch.float32)
    for cap in range(1, 49):
        room = np.full(cap + 16, -1.0, np.float32)
        filled = np.zeros((1, 1), np.int64)
        below = np.zeros((1, 1), np.int64)
        low, high = np.zeros((1, 1), np.float32), np.full((1, 1), np.inf, np.float32)
        _native.count_and_gather(None, [x], low, high, below, room[:cap].reshape(1, 1, cap), filled)
        assert (room[cap:] == -1.0).all(), cap
        assert filled[0, 0] > cap and below[0, 0] == 0
        written = room[: min(cap, 16 * (cap // 16))]
        np.testing.assert_array_equal(written, np.arange(1, written.size + 1, dtype=np.float32))


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(-5, 5), min_size=1, max_size=300), data=st.data())
def test_order_statistics_are_the_sorted_values_at_those_indices(values, data):
    """Any indices (repeated, unsorted) of arrays full of ties: the entries of the sorted array there."""
    from magmax.merging.backends.cpu.threshold import order_statistics

    array = np.asarray(values, dtype=np.float32) / 4
    indices = data.draw(st.lists(st.integers(0, array.size - 1), max_size=6))
    kept = array.copy()
    np.testing.assert_array_equal(order_statistics(array, indices), np.sort(array)[indices])
    np.testing.assert_array_equal(array, kept)


@pytest.mark.parametrize("failure", ["bracket misses", "gather overflows"])
def test_breadcrumbs_bounds_are_exact_when_a_bracket_fails(failure, monkeypatch):
    """A bracket that misses its rank, or holds more magnitudes than the room for them (both forced here),
    falls back to selecting from every magnitude."""
    from magmax.merging.breadcrumbs import breadcrumbs_mask

    gen = torch.Generator().manual_seed(49)
    taus = [torch.randn(100_003, generator=gen) * (t + 1) for t in range(3)]
    if failure == "bracket misses":
        monkeypatch.setattr(_threshold, "bracket_ranks", lambda taken, total, position: (0, 1))
    else:
        monkeypatch.setattr(_threshold, "gather_capacity", lambda *args: 40)
    from magmax.merging.backends.cpu.breadcrumbs import band_bounds

    low, high, surplus_low, surplus_high = band_bounds(0.6, 0.05, None, taus)
    assert not surplus_low.any() and not surplus_high.any()  # continuous magnitudes: no tie at a bound
    for t, tau in enumerate(taus):
        n = tau.numel()
        assert low[t] == float(torch.kthvalue(tau.abs(), int(0.6 * n) + 1).values)
        assert high[t] == float(torch.kthvalue(tau.abs(), n - int(0.05 * n)).values)
        keep = breadcrumbs_mask(tau, 0.6, 0.05)
        assert torch.equal(keep, (tau.abs() >= float(low[t])) & (tau.abs() <= float(high[t])))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["consensus", "breadcrumbs", "dare"])
def test_native_kernels_of_the_sparse_methods_name_a_non_finite_input(method, bad):
    """Their kernels count finite sums in passing (the engine skips its own check): a NaN or Inf in an
    input must still be named, not merged."""
    from magmax.errors import MergeInputError

    base = make_state_dict(50, SHAPES)
    fts = make_finetuned(base, 3, seed=51)
    fts[2]["big"][77] = bad
    with pytest.raises(MergeInputError, match="big"):
        magmax.merge(method, base, fts)


class _CountingDisk(_FromDisk):
    """A reader that hands out a fresh tensor per read and counts how many of them are alive at once."""

    alive = 0
    most = 0

    def get(self, key):
        import weakref

        tensor = super().get(key).clone()
        cls = _CountingDisk
        cls.alive += 1
        cls.most = max(cls.most, cls.alive)

        def gone():
            cls.alive -= 1

        weakref.finalize(tensor, gone)
        return tensor


@pytest.mark.parametrize("method", ["consensus", "breadcrumbs", "dare", "magmax", "ties", "average"])
def test_out_of_core_merges_hold_at_most_a_group_of_raw_tensors(method):
    """Out of core, a merge of T = 20 models holds at most GROUP fine-tuned tensors at a time, whatever
    passes the method makes (a loop that kept its last group while reading the next held two)."""
    from magmax.engine import DictWriter, MergeRun
    from magmax.merging import create_method

    base = make_state_dict(52, SHAPES)
    fts = make_finetuned(base, 20, seed=53)
    _CountingDisk.alive = _CountingDisk.most = 0
    MergeRun(create_method(method), _FromDisk(base, "base"),
             [_CountingDisk(ft, f"ft{i}") for i, ft in enumerate(fts)]).run(DictWriter())
    assert 0 < _CountingDisk.most <= _fused.GROUP


def _stable_sort_breadcrumbs(base, fts, bottom, top):
    """τ* by the authors' rule, plainly: per tensor and task, a stable ascending sort of |τ| (equal
    magnitudes by flat index) and ranks int(bottom·n) .. n − int(top·n) − 1 kept; summed in task order."""
    out = {}
    for key, value in base.items():
        if not value.is_floating_point():
            continue
        total = None
        for ft in fts:
            tau = (ft[key].float() - value.float()).reshape(-1)
            n = tau.numel()
            keep = torch.zeros(n, dtype=torch.bool)
            keep[tau.abs().sort(stable=True).indices[int(bottom * n) : n - int(top * n)]] = True
            kept = torch.where(keep, tau, 0.0)
            total = kept if total is None else total + kept
        out[key] = total.view(value.shape)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bottom", "top"), [(0.85, 0.007), (0.5, 0.1)])
def test_native_breadcrumbs_exact_counts_match_a_stable_sort_oracle(dtype, bottom, top, monkeypatch):
    """Ties straddling a band edge (quantised deltas: 7 distinct values) and continuous float32 deltas
    (no tie at an edge) both take the native band; where ties straddle an edge, the tied entries the rule
    masks are zeroed in a copy of the input first. The bits of the plain oracle either way, and exactly
    n − int(bottom·n) − int(top·n) entries kept per task."""
    shapes = {"tied": (3, 70_001), "tied_small": (40, 30), "plain": (2, 50_001), "plain_small": (33, 17)}
    base = make_state_dict(61, shapes, dtype=dtype, buffers=False)
    tied = make_finetuned({k: v for k, v in base.items() if k.startswith("tied")}, 3, seed=62, quantum=0.0625)
    plain = make_finetuned({k: v for k, v in base.items() if k.startswith("plain")}, 3, seed=63, std=1.0)
    fts = [{**a, **b} for a, b in zip(tied, plain)]
    banded: list[int] = []
    original = _native.band_sum_group
    monkeypatch.setattr(_native, "band_sum_group", lambda s, *a, **k: banded.append(s.numel()) or original(s, *a, **k))
    merger = magmax.Merger("breadcrumbs", base, bottom=bottom, top=top)
    for ft in fts:
        merger.add(ft)
    got = merger.task_vector()
    assert_state_dicts_bitwise_equal(got, _stable_sort_breadcrumbs(base, fts, bottom, top))
    assert 210_003 in banded and 1_200 in banded  # the tied tensors took the native band too
    if dtype == torch.float32:  # continuous float32 deltas: no tie at a band edge, the native band
        assert 100_002 in banded and 561 in banded
    for key, value in base.items():
        n = value.numel()
        one = magmax.Merger("breadcrumbs", base, bottom=bottom, top=top)
        one.add(fts[0])
        assert int((one.task_vector()[key] != 0).sum()) == n - int(bottom * n) - int(top * n), key


@settings(max_examples=30, deadline=None)
@given(n=st.integers(20, 3_000), levels=st.integers(1, 6), count=st.integers(1, 3),
       bottom=st.sampled_from([0.0, 0.1, 0.5, 0.85]), top=st.sampled_from([0.0, 0.007, 0.1, 0.3]),
       with_base=st.booleans(), seed=st.integers(0, 10_000))
def test_native_breadcrumbs_on_heavy_ties_equals_the_stable_sort_oracle(n, levels, count, bottom, top, with_base, seed):
    """τ with a handful of distinct magnitudes (ties at both band edges, lo = hi when levels is small): the
    native band, with the tied entries the rule masks zeroed first, gives the oracle's bits, whether the
    inputs are θ_t beside θ0 or task vectors themselves."""
    assume(bottom + top < 1)
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(n, generator=gen)} if with_base else {"w": torch.zeros(n)}
    fts = [{"w": base["w"] + torch.randint(-levels, levels + 1, (n,), generator=gen).float() / 4} for _ in range(count)]
    want = _stable_sort_breadcrumbs(base, fts, bottom, top)["w"]
    calls = []
    original = _native.band_sum_group
    try:
        _native.band_sum_group = lambda *a, **k: calls.append(1) or original(*a, **k)
        merger = magmax.Merger("breadcrumbs", base, bottom=bottom, top=top)
        for ft in fts:
            merger.add(ft)
        got = merger.task_vector()["w"]
    finally:
        _native.band_sum_group = original
    assert bitwise_equal(got, want)
    if int(bottom * n) or int(top * n):
        assert calls


@pytest.mark.parametrize("failure", [None, "bracket misses", "gather overflows"])
def test_tensor_magnitude_ranks_counts_below_and_at_most_each_value(failure, monkeypatch):
    """The counts that decide whether a tie straddles a band edge: from the counting pass's bracket, or
    from every magnitude where the bracket failed; numpy's counts on heavily tied magnitudes either way."""

    if failure == "bracket misses":
        monkeypatch.setattr(_threshold, "bracket_ranks", lambda taken, total, position: (0, 1))
    elif failure == "gather overflows":
        monkeypatch.setattr(_threshold, "gather_capacity", lambda *args: 40)
    gen = torch.Generator().manual_seed(64)
    taus = [torch.randint(-9, 10, (100_003,), generator=gen).float() / 8 for _ in range(3)]
    positions = [1, 60_002, 99_000, 100_003]
    values, below, at_most = _threshold.tensor_magnitude_ranks(None, taus, positions)
    for j, tau in enumerate(taus):
        magnitude = tau.abs()
        for r, position in enumerate(positions):
            v = torch.kthvalue(magnitude, position).values
            assert values[j, r] == float(v)
            assert below[j, r] == int((magnitude < v).sum()) and at_most[j, r] == int((magnitude <= v).sum())
            assert below[j, r] < position <= at_most[j, r]
