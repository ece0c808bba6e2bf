"""The core merge methods (magmax, average, task_arithmetic, random) against plain oracles written here,
and the invariants every fold must keep (batch == streaming, bit for bit)."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    SHAPES,
    SMALL_SHAPES,
    assert_state_dicts_bitwise_equal,
    bits,
    bitwise_equal,
    make_finetuned,
    make_state_dict,
    task_vectors,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import magmax
from magmax.engine import DictReader, MergeRun
from magmax.errors import ConfigError
from magmax.merging import TaskSlices, create_method
from magmax.merging.backends import fold as _fused, select
from magmax.merging.base import merge_all

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CORE = ["magmax", "average", "task_arithmetic", "random"]


# -- oracles: the plain way ----------------------------------------------------------------------------


def ref_magmax(taus: list[Tensor]) -> Tensor:
    best = taus[0]
    for cur in taus[1:]:
        best = torch.where(cur.abs() >= best.abs(), cur, best)
    return best


def ref_sum(taus: list[Tensor]) -> Tensor:
    total = taus[0].clone()
    for tau in taus[1:]:
        total = total + tau
    return total


def ref_mean(taus: list[Tensor]) -> Tensor:
    return ref_sum(taus) / len(taus)


def ref_merge(rule, base, finetuned, scale, dtype=None):
    """θ0 + λ·rule(τ_1..τ_T) in float32, cast to the base dtype; non-float tensors from the base."""
    taus = task_vectors(base, finetuned)
    out = {}
    for key, value in base.items():
        if value.dtype.is_floating_point:
            merged = rule([tau[key] for tau in taus])
            out[key] = value.to(torch.float32).add(merged, alpha=scale).to(dtype or value.dtype)
        else:
            out[key] = value.clone()
    return out


def batch_task_vector(name: str, base, finetuned, **options) -> dict[str, Tensor]:
    """τ* from the batch kernel over the engine's slices (τ formed inside the kernel)."""
    method = create_method(name, **options)
    run = MergeRun(method, DictReader(base), [DictReader(ft) for ft in finetuned])
    return {key: method.merge_tensor(key, run.slices(key)) for key in run.float_keys}


def streaming_task_vector(name: str, taus: list[dict[str, Tensor]], **options) -> dict[str, Tensor]:
    merger = magmax.Merger(name, {k: torch.zeros_like(v) for k, v in taus[0].items()}, **options)
    for tau in taus:
        merger.add_task_vector(tau)
    return merger.task_vector()


# -- oracle tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_magmax_is_the_reference_fold_bit_for_bit(dtype):
    # T = 11 spans two kernel groups (GROUP = 8) and "big" spans two eager chunks with a ragged end;
    # quantised deltas plant many ties, zeros and sign flips.
    base = make_state_dict(1, SHAPES, dtype)
    finetuned = make_finetuned(base, 11, seed=2, quantum=0.25)
    assert_state_dicts_bitwise_equal(magmax.merge("magmax", base, finetuned), ref_merge(ref_magmax, base, finetuned, 0.5))
    taus = task_vectors(base, finetuned)
    want = {k: ref_magmax([tau[k] for tau in taus]) for k in taus[0]}
    assert_state_dicts_bitwise_equal(batch_task_vector("magmax", base, finetuned), want)
    assert_state_dicts_bitwise_equal(streaming_task_vector("magmax", taus), want)


def test_magmax_ties_go_to_the_later_task_including_signed_zeros():
    # Per column: the expected winner is the LAST task among those of largest magnitude.
    t1 = [1.0, -2.0, 0.0, -0.0, 3.0, -5.0, 0.0, 7.0]
    t2 = [-1.0, 2.0, -0.0, 0.0, -3.0, 5.0, 0.0, 1.0]
    t3 = [0.5, -2.0, -0.0, 0.0, 2.0, -1.0, -0.0, -7.0]
    want = torch.tensor([-1.0, -2.0, -0.0, 0.0, -3.0, 5.0, -0.0, -7.0])
    taus = [torch.tensor(t) for t in (t1, t2, t3)]
    assert bitwise_equal(ref_magmax(taus), want)  # the oracle agrees with the hand-written answer

    method = create_method("magmax")
    assert bitwise_equal(method.merge_tensor("w", TaskSlices.from_list("w", taus)), want)
    assert bitwise_equal(streaming_task_vector("magmax", [{"w": t} for t in taus])["w"], want)
    # From checkpoints: θ0 = +0.0 and θ_t = τ_t, so that −0.0 survives τ = θ_t − θ0.
    base = {"w": torch.zeros(8)}
    assert bitwise_equal(batch_task_vector("magmax", base, [{"w": t} for t in taus])["w"], want)


def test_magmax_reverse_order_picks_the_other_tied_sign():
    taus = [torch.tensor([2.0, -0.0, 4.0]), torch.tensor([-2.0, 0.0, 4.0])]
    method = create_method("magmax")
    forward = method.merge_tensor("w", TaskSlices.from_list("w", taus))
    backward = method.merge_tensor("w", TaskSlices.from_list("w", taus[::-1]))
    assert bitwise_equal(forward, torch.tensor([-2.0, 0.0, 4.0]))
    assert bitwise_equal(backward, torch.tensor([2.0, -0.0, 4.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_average_is_the_left_to_right_mean(dtype):
    base = make_state_dict(3, SHAPES, dtype)
    finetuned = make_finetuned(base, 10, seed=4)
    got = magmax.merge("average", base, finetuned)
    assert_state_dicts_bitwise_equal(got, ref_merge(ref_mean, base, finetuned, 1.0))
    taus = task_vectors(base, finetuned)
    batch = batch_task_vector("average", base, finetuned)
    for key in taus[0]:
        stacked = torch.stack([tau[key] for tau in taus]).double().mean(0)
        torch.testing.assert_close(batch[key].double(), stacked, rtol=1e-6, atol=1e-7)
    # λ = 1 gives the mean of the fine-tuned weights
    mean_weights = {k: torch.stack([ft[k].double() for ft in finetuned]).mean(0) for k in taus[0]}
    for key in taus[0]:
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[key].double(), mean_weights[key], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_task_arithmetic_is_the_left_to_right_sum_times_lambda(dtype):
    base = make_state_dict(5, SHAPES, dtype)
    finetuned = make_finetuned(base, 9, seed=6)
    assert_state_dicts_bitwise_equal(magmax.merge("task_arithmetic", base, finetuned), ref_merge(ref_sum, base, finetuned, 0.3))
    assert_state_dicts_bitwise_equal(
        magmax.merge("task_arithmetic", base, finetuned, scale=1.5), ref_merge(ref_sum, base, finetuned, 1.5)
    )


def _distinct_tasks(count: int, n: int, seed: int) -> list[Tensor]:
    # τ_t = t + u with u in [0.25, 0.75): every entry identifies its task
    gen = torch.Generator().manual_seed(seed)
    return [t + 0.25 + 0.5 * torch.rand(n, generator=gen) for t in range(count)]


def _chosen_task(merged: Tensor) -> Tensor:
    return merged.floor().long()


def test_random_is_exact_for_a_seed_and_changes_with_it():
    base = make_state_dict(7, SHAPES)
    finetuned = make_finetuned(base, 6, seed=8)
    first = magmax.merge("random", base, finetuned, seed=3)
    again = magmax.merge("random", base, finetuned, seed=3)
    other = magmax.merge("random", base, finetuned, seed=4)
    assert_state_dicts_bitwise_equal(first, again)
    assert not bitwise_equal(first["big"], other["big"])
    assert not bitwise_equal(first["layer.weight"], other["layer.weight"])


def test_random_entries_are_inputs_and_do_not_depend_on_tensor_order():
    taus = _distinct_tasks(7, 50_000, seed=9)
    merged = create_method("random", seed=11).merge_tensor("w", TaskSlices.from_list("w", taus))
    chosen = _chosen_task(merged)
    stacked = torch.stack(taus)
    picked = stacked.gather(0, chosen.unsqueeze(0)).squeeze(0)
    assert bitwise_equal(merged, picked)  # every entry is exactly τ_k for its chosen k

    base = make_state_dict(12, SMALL_SHAPES)
    finetuned = make_finetuned(base, 5, seed=13)
    forward = magmax.merge("random", base, finetuned)
    reversed_keys = [dict(reversed(list(ft.items()))) for ft in finetuned]
    backward = magmax.merge("random", dict(reversed(list(base.items()))), reversed_keys)
    for key in base:
        assert bitwise_equal(forward[key], backward[key])


# Upper 0.1% points of the chi-square distribution (scipy.stats.chi2.ppf(0.999, df)).
CHI2_999 = {4: 18.467, 11: 31.264}


@pytest.mark.parametrize(("count", "n", "seed"), [(5, 100_000, 0), (12, 120_000, 1)])
def test_random_is_uniform_over_tasks(count, n, seed):
    # Fixed seeds: the counts are the same on every run, so this cannot flake; a biased choice (e.g.
    # the reservoir's 1/(t+1) off, or a group boundary at t = 8 mishandled) lands far above the bound.
    taus = _distinct_tasks(count, n, seed=100 + seed)
    merged = create_method("random", seed=seed).merge_tensor("w", TaskSlices.from_list("w", taus))
    counts = torch.bincount(_chosen_task(merged), minlength=count).double()
    expected = n / count
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[count - 1], f"counts {counts.tolist()}, chi2 {chi2:.1f}"


@pytest.mark.parametrize("name", CORE)
def test_integer_and_bool_buffers_come_from_the_base(name):
    base = make_state_dict(14, SMALL_SHAPES)
    finetuned = make_finetuned(base, 3, seed=15)
    assert not torch.equal(finetuned[0]["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
    merged = magmax.merge(name, base, finetuned)
    for key in ("bn.num_batches_tracked", "attn.mask"):
        assert merged[key].dtype == base[key].dtype
        assert torch.equal(merged[key], base[key])
    merger = magmax.Merger(name, base)
    for ft in finetuned:
        merger.add(ft)
    assert torch.equal(merger.merged()["bn.num_batches_tracked"], base["bn.num_batches_tracked"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "rule", "scale"), [("magmax", ref_magmax, 0.5), ("average", ref_mean, 1.0)])
def test_half_precision_is_computed_in_float32_and_cast_to_the_base_dtype(dtype, name, rule, scale):
    base = make_state_dict(16, SHAPES, dtype)
    finetuned = make_finetuned(base, 4, seed=17, std=0.01)
    got = magmax.merge(name, base, finetuned)
    assert all(got[k].dtype == base[k].dtype for k in base)
    assert_state_dicts_bitwise_equal(got, ref_merge(rule, base, finetuned, scale))
    # an explicit dtype: the float32 result itself, uncast (buffers keep theirs)
    wide = magmax.merge(name, base, finetuned, dtype=torch.float32)
    assert_state_dicts_bitwise_equal(wide, ref_merge(rule, base, finetuned, scale, torch.float32))
    assert wide["bn.num_batches_tracked"].dtype == torch.int64


def test_a_single_model_merges_to_itself_through_its_task_vector():
    base = make_state_dict(18, SHAPES)
    (only,) = make_finetuned(base, 1, seed=19)
    for name in CORE:
        taus = task_vectors(base, [only])
        assert_state_dicts_bitwise_equal(batch_task_vector(name, base, [only]), taus[0])


# -- properties ------------------------------------------------------------------------------------------

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), count=st.integers(1, 10), size=st.integers(1, 24))
def test_magmax_output_is_a_largest_magnitude_input_the_last_one(data, count, size):
    # Arbitrary finite floats: subnormals, ±0.0, ±max — the bit-pattern comparison must order them all.
    pool = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 3.4e38, -3.4e38]) | finite32
    rows = [data.draw(st.lists(pool, min_size=size, max_size=size)) for _ in range(count)]
    taus = [torch.tensor(r, dtype=torch.float32) for r in rows]
    merged = create_method("magmax").merge_tensor("w", TaskSlices.from_list("w", taus))
    streamed = streaming_task_vector("magmax", [{"w": t} for t in taus])["w"]
    assert bitwise_equal(merged, streamed)
    stacked = torch.stack(taus)
    largest = stacked.abs().amax(0)
    for p in range(size):
        winners = [t for t in range(count) if stacked[t, p].abs() == largest[p]]
        assert bits(merged[p]) == bits(stacked[winners[-1], p]), (p, rows)


def _constructible_methods() -> list[str]:
    names = []
    for name in magmax.registry():
        try:
            create_method(name)
        except ConfigError:
            continue  # needs options without defaults
        names.append(name)
    return names


CONSTRUCTIBLE = _constructible_methods()
FOLDABLE = [name for name in CONSTRUCTIBLE if magmax.registry()[name].foldable]


def test_the_core_methods_are_foldable():
    assert set(CORE) <= set(FOLDABLE)


@pytest.mark.parametrize("name", FOLDABLE)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), count=st.integers(1, 5), ties=st.booleans())
def test_batch_equals_streaming_after_every_prefix(name, seed, count, ties):
    base = make_state_dict(seed, SMALL_SHAPES)
    finetuned = make_finetuned(base, count, seed + 1, quantum=0.5 if ties else None)
    merger = magmax.Merger(name, base)
    for k, ft in enumerate(finetuned, start=1):
        merger.add(ft)
        assert_state_dicts_bitwise_equal(merger.merged(), magmax.merge(name, base, finetuned[:k]))


@pytest.mark.parametrize("name", FOLDABLE)
def test_merged_after_every_add_does_not_disturb_later_results(name):
    base = make_state_dict(20, SMALL_SHAPES)
    finetuned = make_finetuned(base, 10, seed=21, quantum=0.25)
    watched, quiet = magmax.Merger(name, base), magmax.Merger(name, base)
    for ft in finetuned:
        watched.add(ft)
        watched.merged()
        watched.task_vector()
        quiet.add(ft)
    assert_state_dicts_bitwise_equal(watched.merged(), quiet.merged())
    assert_state_dicts_bitwise_equal(watched.task_vector(), quiet.task_vector())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    count=st.integers(1, 6),
    a=st.floats(-4, 4, allow_nan=False),
    b=st.floats(-4, 4, allow_nan=False),
)
def test_average_is_linear(seed, count, a, b):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(64, generator=gen) for _ in range(count)]
    ys = [torch.randn(64, generator=gen) for _ in range(count)]
    mixed = [a * x + b * y for x, y in zip(xs, ys)]
    method = create_method("average")

    def avg(taus: list[Tensor]) -> Tensor:
        return method.merge_tensor("w", TaskSlices.from_list("w", taus))

    torch.testing.assert_close(avg(mixed), a * avg(xs) + b * avg(ys), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**16), count=st.integers(2, 7))
def test_permuting_tasks_changes_magmax_only_at_ties(data, seed, count):
    gen = torch.Generator().manual_seed(seed)
    # values in {−2..2}·0.5: ties between tasks (equal |τ|, possibly opposite signs) are common
    taus = [torch.randint(-2, 3, (200,), generator=gen).float() * 0.5 for _ in range(count)]
    order = data.draw(st.permutations(range(count)))
    method = create_method("magmax")
    merged = method.merge_tensor("w", TaskSlices.from_list("w", taus))
    permuted = method.merge_tensor("w", TaskSlices.from_list("w", [taus[t] for t in order]))
    stacked = torch.stack(taus)
    at_max = stacked.abs() == stacked.abs().amax(0)
    # a tie that matters: two tasks at the largest magnitude with different values (+x and −x)
    distinct_winners = (torch.where(at_max, stacked, float("inf")).amin(0) != torch.where(at_max, stacked, -float("inf")).amax(0))
    assert torch.equal(bits(merged)[~distinct_winners], bits(permuted)[~distinct_winners])
    assert torch.equal(merged.abs(), permuted.abs())  # at ties only the sign can change


# -- fused kernel plumbing ---------------------------------------------------------------------------------


def test_batch_kernel_reads_each_slice_once_in_order():
    # Out-of-core readers load τ_t on request: a second pass, or a stack of all T, would show here.
    requested: list[int] = []
    taus = _distinct_tasks(20, 1000, seed=22)

    def load(t: int) -> Tensor:
        requested.append(t)
        return taus[t]

    create_method("magmax").merge_tensor("w", TaskSlices("w", len(taus), load))
    assert requested == list(range(20))


@pytest.mark.parametrize("chunk", [777, 1 << 20])
def test_results_do_not_depend_on_the_eager_chunk_size(monkeypatch, chunk):
    # 1 << 20 exceeds every tensor: one chunk per tensor, as on CUDA; 777 splits even the small ones.
    # (Tensors stay under ATen's 32768-element grain: whole-tensor ops then need no OpenMP hand-off.)
    base = make_state_dict(25, {**SMALL_SHAPES, "mid": (3001,)}, torch.bfloat16)
    finetuned = make_finetuned(base, 10, seed=26, quantum=0.25)
    want = {name: magmax.merge(name, base, finetuned) for name in CORE}
    monkeypatch.setattr(_fused, "CHUNK", chunk)
    for name in CORE:
        assert_state_dicts_bitwise_equal(magmax.merge(name, base, finetuned), want[name])


def test_compile_mode_is_validated():
    with pytest.raises(ConfigError, match="compile mode 'sometimes'"):
        select.set_compile_mode("sometimes")  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_equal_eager_kernels_bit_for_bit(dtype, monkeypatch):
    # torch.compile of every core kernel (10–60 s cold): group shapes first/middle/last, with and without
    # a base operand, against the eager chunks. The numba folds take every CPU group where numba imports,
    # so they are turned off: else nothing is compiled. (Inductor's C++ is built with -ffp-contract=off;
    # checked equal under ATEN_CPU_CAPABILITY=avx512, avx2 and default.)
    monkeypatch.setenv("MAGMAX_NATIVE", "0")
    base = {"big": make_state_dict(23, {"big": (70_001,)}, dtype, buffers=False)["big"]}  # > MIN_COMPILE_NUMEL
    finetuned = make_finetuned(base, 11, seed=24, quantum=0.25)
    taus = task_vectors(base, finetuned)
    results = {}
    for mode in ("never", "always"):
        select.set_compile_mode(mode)
        for name in CORE:
            results[mode, name, "merge"] = magmax.merge(name, base, finetuned)
            results[mode, name, "taus"] = streaming_task_vector(name, taus)
            results[mode, name, "list"] = {
                "big": create_method(name).merge_tensor("big", TaskSlices.from_list("big", [t["big"] for t in taus]))
            }
    assert not select._compile_failed
    assert select._compiled_cache, "nothing was compiled"
    for name in CORE:
        for kind in ("merge", "taus", "list"):
            assert_state_dicts_bitwise_equal(results["always", name, kind], results["never", name, kind])


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("name", CONSTRUCTIBLE)
def test_merge_tensors_hand_back_tensors_the_caller_may_overwrite(name, count):
    # The engine writes θ0 + λ·τ* into τ*'s memory: a method must never return an input, a view of one,
    # or a tensor it reads again (a second merge by the same method must not see the overwrite).
    base = make_state_dict(31, SHAPES, buffers=False)
    taus = task_vectors(base, make_finetuned(base, count, seed=32))
    kept = [{k: v.clone() for k, v in tau.items()} for tau in taus]
    keys = list(taus[0])
    total = sum(taus[0][k].numel() for k in keys)
    method = create_method(name)

    def merge_every_key() -> dict[str, Tensor]:
        return merge_all(method, keys, lambda key: TaskSlices.from_list(key, [tau[key] for tau in taus]), count, total)

    first = merge_every_key()
    want = {k: v.clone() for k, v in first.items()}
    inputs = {tau[k].untyped_storage().data_ptr() for tau in taus for k in keys if tau[k].numel()}
    outputs = [v.untyped_storage().data_ptr() for v in first.values() if v.numel()]
    assert not inputs & set(outputs), "a merged tensor shares memory with an input"
    assert len(set(outputs)) == len(outputs), "two merged tensors share memory"
    for value in first.values():
        value.fill_(float("nan"))
    assert_state_dicts_bitwise_equal(merge_every_key(), want)
    for tau, copy in zip(taus, kept):
        assert_state_dicts_bitwise_equal(tau, copy)
