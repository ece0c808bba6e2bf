"""The Triton multi-tensor folds (the GPU path), run in Triton's interpreter on CPU tensors.

Bit for bit against the torch group kernels (which the numba kernels also equal), through
``backends.gpu.triton.fold``, ``backends.fold.fold_many`` (one group and groups of ``GROUP``) and the engine's handing of runs
of tensors. On a machine with CUDA these are skipped: tests/test_cuda.py runs the compiled kernels there.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers import SHAPES, assert_state_dicts_bitwise_equal, make_finetuned, make_state_dict, needs_native

import magmax
from magmax.engine import DictReader, DictWriter, MergeRun
from magmax.errors import MergeInputError
from magmax.merging import create_method
from magmax.merging.backends import brackets
from magmax.merging.backends import fold as _fused
from magmax.merging.backends.gpu import ties as _gpu_ties
from magmax.merging.backends.gpu import triton as _gpu
from magmax.merging.base import TaskSlices
from magmax.merging.magmax import magmax_kernel
from magmax.merging.random import random_kernel
from magmax.merging.task_arithmetic import sum_kernel

pytest.importorskip("triton", reason='triton is not installed: pip install "magmax[test]" (or pip install triton)')
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the compiled kernels are tested on the GPU")

KERNELS = {"magmax": magmax_kernel, "sum": sum_kernel, "random": random_kernel}
NUMELS = [0, 1, _gpu.BLOCK - 1, _gpu.BLOCK + 1, 2 * _gpu.BLOCK + 7]  # segments ending mid-block, empty ones


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    monkeypatch.setenv("MAGMAX_TRITON_INTERPRET", "1")
    monkeypatch.setattr(_gpu, "_disabled_after_error", False)


def segment_inputs(count, dtype, seed=0, quantum=None):
    gen = torch.Generator().manual_seed(seed)
    bases = [torch.randn(n, generator=gen).to(dtype) for n in NUMELS]
    rows = []
    for _ in range(count):
        if quantum is None:  # planted equal magnitudes, zeros and sign flips when quantised
            deltas = [torch.randn(n, generator=gen) * 0.1 for n in NUMELS]
        else:
            deltas = [torch.randint(-3, 4, (n,), generator=gen).float() * quantum for n in NUMELS]
        rows.append([(b.float() + d).to(dtype) for b, d in zip(bases, deltas)])
    return bases, rows


def random_params(keys, first, count, total, seed=5):
    method = create_method("random", seed=seed)
    return torch.stack([method._params(key)(first, count, total) for key in keys], dim=1).numpy()


def flat_states(numels):
    """The layout of segments of these lengths, a flat state buffer (NaN-filled: every entry must be
    written) and its per-segment views."""
    segments = _gpu.layout(numels, torch.device("cpu"))
    state = torch.full((segments.total,), float("nan"))
    return segments, state, segments.views(state)


def torch_fold(op, bases, rows, s, key=None, seed=5):
    params = create_method("random", seed=seed)._params(key) if op == "random" else None
    return _fused.fold_operands(KERNELS[op], lambda t: (rows[t][s], bases[s]), len(rows), params)


def assert_bits(got, want, what):
    assert got.shape == want.shape, what
    assert torch.equal(got.view(torch.int32), want.reshape(got.shape).view(torch.int32)), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["magmax", "sum", "random"])
def test_one_launch_equals_the_torch_kernels(op, dtype):
    bases, rows = segment_inputs(6, dtype, quantum=0.125)
    keys = [f"k{s}" for s in range(len(NUMELS))]
    segments, state, states = flat_states(NUMELS)
    params = random_params(keys, 0, 6, 6) if op == "random" else None
    finite = torch.zeros(1, dtype=torch.int64)
    _gpu.fold(op, segments, state, bases, rows, True, finite, params=params)
    assert finite.item() == (sum(NUMELS) if op != "random" else 0)
    for s, key in enumerate(keys):
        assert_bits(states[s], torch_fold(op, bases, rows, s, key), f"{op} {dtype} segment {s}")


@pytest.mark.parametrize("op", ["magmax", "sum", "random"])
def test_groups_carry_the_state_and_the_mean_divides_at_the_end(op):
    """Three launches (first, middle, last) equal one fold; averaging divides the sum by T, correctly rounded."""
    bases, rows = segment_inputs(7, torch.float32, seed=1)
    keys = [f"k{s}" for s in range(len(NUMELS))]
    segments, state, states = flat_states(NUMELS)
    for start, stop in [(0, 3), (3, 4), (4, 7)]:
        params = random_params(keys, start, stop - start, 7) if op == "random" else None
        divisor = 7 if op == "sum" and stop == 7 else None
        _gpu.fold(op, segments, state, bases, rows[start:stop], start == 0, torch.zeros(1, dtype=torch.int64),
                  divisor, params)
    for s, key in enumerate(keys):
        want = torch_fold(op, bases, rows, s, key)
        if op == "sum":
            want = want / torch.tensor(7.0)
        assert_bits(states[s], want, f"{op} segment {s}")


def test_magmax_ties_go_to_the_later_task():
    """|+0.5| = |−0.5| and +0.0 / −0.0: the reference fold where(|cur| >= |best|, cur, best) keeps the later."""
    x = [torch.tensor([0.5, 0.0, -0.25, 1.0]), torch.tensor([-0.5, -0.0, 0.25, -1.0]), torch.tensor([0.5, 0.0, 0.1, 2.0])]
    segments, state, states = flat_states([4])
    _gpu.fold("magmax", segments, state, None, [[t] for t in x], True, torch.zeros(1, dtype=torch.int64))
    best = x[0]
    for cur in x[1:]:
        best = torch.where(cur.abs() >= best.abs(), cur, best)
    assert_bits(states[0], best, "ties")


def test_the_finite_count_sees_nan_and_inf_in_any_input():
    bases, rows = segment_inputs(3, torch.float32)
    rows[2][3][5] = float("nan")
    rows[1][4][0] = float("-inf")
    bases[2][1] = float("inf")
    for op in ("magmax", "sum"):
        segments, state, _ = flat_states(NUMELS)
        finite = torch.zeros(1, dtype=torch.int64)
        _gpu.fold(op, segments, state, bases, rows, True, finite)
        assert finite.item() == sum(NUMELS) - 3, op


@pytest.mark.parametrize("chunk_numel", [1 << 24, 40])
@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("method", ["magmax", "average", "task_arithmetic", "random"])
def test_merge_tensors_equals_merge_tensor(method, resident, chunk_numel, monkeypatch):
    """All T in one launch (inputs in memory) or groups of GROUP (T = 11: 8 + 3), one launch for all
    tensors or chunks of them, as the per-tensor merge."""
    monkeypatch.setattr(_gpu, "CHUNK_NUMEL", chunk_numel)
    base = make_state_dict(0, SHAPES)
    base["half"] = torch.randn(5, 3).to(torch.bfloat16)  # another dtype: a chunk of its own
    base["tail"] = torch.randn(7)
    fts = make_finetuned(base, 11, seed=2, quantum=0.125)
    keys = [k for k, v in base.items() if v.dtype.is_floating_point]
    m = create_method(method, seed=3) if method == "random" else create_method(method)

    def slices(key):
        return TaskSlices(key, len(fts), lambda t: fts[t][key].float() - base[key].float(), base=base[key],
                          finetuned=lambda t: fts[t][key], resident=resident)

    launches = []
    real_fold = _gpu.fold
    monkeypatch.setattr(_gpu, "fold", lambda *a, **kw: launches.append(a[1]) or real_fold(*a, **kw))
    got = m.merge_tensors(keys, [slices(k) for k in keys])
    assert _gpu.enabled(), "the Triton path failed and was turned off"
    # chunks: f32 up to "half", "half", "tail" (and the large f32 run split in two when chunks are small)
    assert len(launches) == (1 if resident else 2) * (3 if chunk_numel > 1000 else 4)
    for key, value in zip(keys, got):
        assert_bits(value, m.merge_tensor(key, slices(key)), f"{method} {key}")


@needs_native
@pytest.mark.parametrize("method", ["magmax", "average", "task_arithmetic", "random"])
def test_engine_hands_runs_of_tensors_to_the_gpu_folds(method, monkeypatch):
    """Bucketed (as on a GPU), the merge equals the per-tensor CPU merge and the NaN/Inf check rides in
    the folds' own read (no separate pass), except for random, whose fold has no finite count."""
    calls = []
    real_check = magmax.engine.check_finite
    monkeypatch.setattr(magmax.engine, "check_finite", lambda *a: calls.append(a[0]) or real_check(*a))
    base = make_state_dict(0, SHAPES)
    base["half"] = torch.randn(5, 3).to(torch.bfloat16)
    fts = make_finetuned(base, 3, seed=1)
    options = {"seed": 2} if method == "random" else {}
    want = magmax.merge(method, base, fts, **options)
    calls.clear()
    writer = DictWriter()
    run = MergeRun(create_method(method, **options), DictReader(base), [DictReader(f) for f in fts], bucketed=True)
    run.run(writer)
    assert any(len(unit.keys) > 1 for unit in run.plan)
    assert_state_dicts_bitwise_equal(writer.state, want)
    assert _gpu.enabled()
    assert (calls == []) == (method != "random"), calls


@pytest.mark.parametrize("where", [("fts", 2, "big"), ("fts", 0, "layer.bias"), ("base", None, "conv.weight")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_found_in_passing_is_named(where, bad):
    source, index, key = where
    base = make_state_dict(0, SHAPES)
    fts = make_finetuned(base, 3, seed=1)
    target = base if source == "base" else fts[index]
    target[key].view(-1)[min(3, target[key].numel() - 1)] = bad
    run = MergeRun(create_method("magmax"), DictReader(base), [DictReader(f) for f in fts], bucketed=True)
    with pytest.raises(MergeInputError, match=f"'{key}'"):
        run.run(DictWriter())


def test_inputs_the_kernels_do_not_take_go_to_the_torch_kernels_without_turning_them_off():
    """A float64 tensor after float32 ones (a chunk of its own, which the kernels do not read)."""
    base = make_state_dict(0, SHAPES)
    base["double"] = torch.randn(4, 3, dtype=torch.float64)
    fts = make_finetuned(base, 3, seed=1)
    keys = [k for k, v in base.items() if v.dtype.is_floating_point]
    m = create_method("magmax")
    slices = [TaskSlices(k, 3, lambda t, k=k: fts[t][k].float() - base[k].float(), base=base[k],
                         finetuned=lambda t, k=k: fts[t][k], resident=True) for k in keys]
    got = m.merge_tensors(keys, slices)
    assert _gpu.enabled()
    for key, tensor_slices, value in zip(keys, slices, got):
        assert_bits(value, m.merge_tensor(key, tensor_slices), key)


def test_a_failing_kernel_falls_back_to_the_torch_kernels(monkeypatch, caplog):
    base = make_state_dict(0, SHAPES)
    fts = make_finetuned(base, 3, seed=1)
    want = magmax.merge("magmax", base, fts)

    def broken(*args, **kwargs):
        raise RuntimeError("no GPU compiler here")

    monkeypatch.setattr(_gpu, "fold", broken)
    writer = DictWriter()
    MergeRun(create_method("magmax"), DictReader(base), [DictReader(f) for f in fts], bucketed=True).run(writer)
    assert_state_dicts_bitwise_equal(writer.state, want)
    assert not _gpu.enabled()
    assert "Triton merge kernel failed" in caplog.text


# -- TIES ---------------------------------------------------------------------------------------------


def ties_models(count=5, seed=3, quantum=0.125):
    """With ``quantum``: ties at κ and zero elected signs (and brackets too full to decide: the exact
    fallback); without: continuous values, where the brackets decide κ."""
    base = make_state_dict(0, SHAPES)
    return base, make_finetuned(base, count, seed=seed, quantum=quantum)


def ties_merge_all(base, fts, **options):
    """merge_all over in-memory slices (the bench's path): all tensors at once where the GPU path takes them."""
    from magmax.merging.base import merge_all

    keys = [k for k, v in base.items() if v.dtype.is_floating_point]
    method = create_method("ties", **options)

    def slices(key):
        return TaskSlices(key, len(fts), lambda t: fts[t][key].float() - base[key].float(), base=base[key],
                          finetuned=lambda t: fts[t][key], resident=True)

    merged = merge_all(method, keys, slices, len(fts), sum(base[k].numel() for k in keys))
    return merged, method


@pytest.mark.parametrize("quantum", [None, 0.125])
@pytest.mark.parametrize("options", [{}, {"k": 0.5}, {"k": 0.03}])
def test_ties_on_the_gpu_path_equals_the_cpu_path(options, quantum, monkeypatch):
    monkeypatch.setattr(brackets, "SAMPLE", 4096)  # a strided sample, as in large models
    base, fts = ties_models(quantum=quantum)
    fallbacks = []
    real_radix = magmax.merging.ties.global_topk_threshold
    monkeypatch.setattr(magmax.merging.ties, "global_topk_threshold",
                        lambda *a: fallbacks.append(1) or real_radix(*a))
    got, gpu_method = ties_merge_all(base, fts, **options)
    if quantum is None:
        assert not fallbacks, "the GPU brackets should decide every κ on continuous values"
    monkeypatch.setenv("MAGMAX_TRITON_INTERPRET", "0")  # CPU tensors: the numba kernels
    want, cpu_method = ties_merge_all(base, fts, **options)
    assert gpu_method._thresholds == cpu_method._thresholds
    assert gpu_method._guess == cpu_method._guess
    assert _gpu.enabled()
    for key in want:
        assert_bits(got[key], want[key], key)


@pytest.mark.parametrize("wrong", ["guess", "bracket"])
def test_ties_gpu_path_recovers_from_a_wrong_guess_and_a_missed_bracket(wrong, monkeypatch):
    """A wrong majority guess re-merges the tensors whose result depended on it; a bracket that misses
    the k-th magnitude falls back to the exact radix select: the same result either way."""
    base, fts = ties_models(count=4, seed=7)
    monkeypatch.setenv("MAGMAX_TRITON_INTERPRET", "0")
    want, cpu_method = ties_merge_all(base, fts)
    monkeypatch.setenv("MAGMAX_TRITON_INTERPRET", "1")
    if wrong == "guess":
        monkeypatch.setattr(magmax.merging.ties, "sampled_majority", lambda sample, kappas: -cpu_method._guess)
    else:
        monkeypatch.setattr(_gpu_ties, "bracket_ranks", lambda taken, total, position: (0, 1))
    got, method = ties_merge_all(base, fts)
    if wrong == "guess":
        assert method._guess != cpu_method._guess and method._majority == cpu_method._majority
    assert method._thresholds == cpu_method._thresholds
    for key in want:
        assert_bits(got[key], want[key], key)


@pytest.mark.parametrize("guess", ["right", "wrong"])
def test_engine_merges_ties_of_models_in_gpu_memory_all_at_once(guess, monkeypatch):
    """Models already on the (here: interpreted) device: the engine hands TIES every tensor at once, for
    its statistics and its merge; a wrong majority guess re-merges the provisional tensors by key."""
    base, fts = ties_models(count=4, seed=7)
    base["half"] = torch.zeros(5, 3, dtype=torch.bfloat16)  # its own bucket (dtype), with elected signs of 0:
    for i, ft in enumerate(fts):  # τ = +2 and −2 survive the trim and cancel, so the majority decides
        ft["half"] = torch.full((5, 3), [2.0, -2.0, 0.0, 0.0][i], dtype=torch.bfloat16)
    monkeypatch.setenv("MAGMAX_TRITON_INTERPRET", "0")
    cpu = MergeRun(create_method("ties"), DictReader(base), [DictReader(f) for f in fts])
    cpu.run(expected := DictWriter())
    want, majority = expected.state, cpu.method._majority
    monkeypatch.setenv("MAGMAX_TRITON_INTERPRET", "1")
    merges = []
    real_merge = _gpu_ties.merge
    monkeypatch.setattr(_gpu_ties, "merge", lambda model, *a: merges.append(len(model.shapes)) or real_merge(model, *a))
    monkeypatch.setattr(magmax.merging.ties, "sampled_majority",
                        lambda sample, kappas: majority * (1 if guess == "right" else -1))
    writer = DictWriter()
    run = MergeRun(create_method("ties"), DictReader(base), [DictReader(f) for f in fts], bucketed=True)
    run.run(writer)
    assert_state_dicts_bitwise_equal(writer.state, want)
    assert merges[0] > 1, "the tensors of a bucket went one by one"
    assert (len(merges) > 2) == (guess == "wrong"), merges  # two buckets (dtypes), then the re-merges


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    numels=st.lists(st.integers(0, 2 * _gpu.BLOCK + 3), min_size=1, max_size=4),
    count=st.integers(1, 10),
    method=st.sampled_from(["magmax", "average", "task_arithmetic", "random"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    resident=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_tensors_and_models_merge_on_the_gpu_path_as_tensor_by_tensor(numels, count, method, dtype, resident, seed):
    """Property: for any tensor lengths (empty, within one block, across blocks), model count (one group
    or groups of GROUP) and dtype, merging all tensors at once equals merging them one by one, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    bases = [torch.randn(n, generator=gen).to(dtype) for n in numels]
    models = [[(b.float() + torch.randint(-3, 4, (n,), generator=gen) * 0.25).to(dtype) for b, n in zip(bases, numels)]
              for _ in range(count)]
    keys = [f"t{s}" for s in range(len(numels))]
    m = create_method(method, seed=seed) if method == "random" else create_method(method)

    def slices(s):
        return TaskSlices(keys[s], count, lambda t: models[t][s].float() - bases[s].float(), base=bases[s],
                          finetuned=lambda t: models[t][s], resident=resident)

    got = m.merge_tensors(keys, [slices(s) for s in range(len(numels))])
    assert _gpu.enabled()
    for s, key in enumerate(keys):
        assert_bits(got[s], m.merge_tensor(key, slices(s)), key)
