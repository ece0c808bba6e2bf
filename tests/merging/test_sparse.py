"""TIES, DARE (+ DARE-TIES) and Model Breadcrumbs against plain oracles of their reference algorithms.

Each oracle stacks the T task vectors and uses the reference's own tensor operations (kthvalue over the
flattened rows, ``torch.sum(dim=0)``, ``where(sign > 0, x > 0, x < 0)``). Where the package sums in task
order and the oracle uses ``torch.sum(dim=0)`` (whose CPU kernel accumulates in its own vectorised order),
exact comparisons use "dyadic" data, numbers on a coarse power-of-two grid whose sums are exact in any
order, and the continuous-data comparisons use tight tolerances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers import needs_native

import magmax
from magmax.engine import DictReader, DictWriter, MergeRun
from magmax.errors import ConfigError
from magmax.merging import _sparsify, create_method
from magmax.merging._sparsify import global_topk_threshold, kth_smallest_magnitude
from magmax.merging.base import seed_for

SHAPES = {"enc.weight": (6, 7), "enc.bias": (7,), "head.weight": (3, 6), "scale": ()}
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- models built in code ---------------------------------------------------------------------------------


def make_models(seed: int, T: int, dtype: torch.dtype = torch.float32, dyadic: bool = False):
    """A base state dict (several float tensors + an int buffer) and T fine-tuned ones.

    dyadic: base on a 1/64 grid in [-1, 1], deltas on a 1/128 grid in [-0.5, 0.5], so the fine-tuned
    weights are exact in bf16 and float32, every task-vector entry is a multiple of 1/128 and any sum of a
    few of them is exact in float32 (with many duplicate magnitudes: ties at the top-k threshold are common).
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(shape, scale):
        if dyadic:
            return torch.randint(-64, 65, shape, generator=gen).float() / 64 * (1 if scale >= 1 else 0.5)
        return torch.randn(shape, generator=gen) * scale

    base = {k: draw(s, 1.0).to(dtype) for k, s in SHAPES.items()}
    base["step"] = torch.tensor(7, dtype=torch.int64)
    fts = []
    for _ in range(T):
        ft = {k: (v.float() + draw(v.shape, 0.1)).to(dtype) for k, v in base.items() if v.is_floating_point()}
        ft["step"] = base["step"].clone()
        fts.append(ft)
    return base, fts


def float_keys(base):
    return [k for k, v in base.items() if v.is_floating_point()]


def task_vectors(base, fts):
    return [{k: ft[k].float() - base[k].float() for k in float_keys(base)} for ft in fts]


def flatten(tau, keys):
    return torch.cat([tau[k].reshape(-1) for k in keys])


def unflatten(vector, base, keys):
    out, offset = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = vector[offset : offset + n].reshape(base[k].shape)
        offset += n
    return out


# -- oracles: the reference algorithms, written plainly ---------------------------------------------------


def ref_topk_values_mask(M: torch.Tensor, K: float) -> torch.Tensor:
    """TIES reference ``topk_values_mask`` on a [T, d] matrix (its K >= 1 early return included)."""
    if K > 1:
        K /= 100
    if K >= 1:
        return M
    n, d = M.shape
    k = d - int(d * K)
    kth_values, _ = M.abs().kthvalue(k, dim=1, keepdim=True)
    return M * (M.abs() >= kth_values)


def ref_resolve_sign(M: torch.Tensor) -> torch.Tensor:
    sign_to_mult = torch.sign(M.sum(dim=0))
    majority_sign = torch.sign(sign_to_mult.sum())
    sign_to_mult[sign_to_mult == 0] = majority_sign
    return sign_to_mult


def ref_disjoint_mean(M: torch.Tensor, sign_to_mult: torch.Tensor) -> torch.Tensor:
    rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, M > 0, M < 0)
    selected = M * rows_to_keep
    counts = (selected != 0).sum(dim=0).float()
    return selected.sum(dim=0) / torch.clamp(counts, min=1)


def oracle_ties(base, fts, k=0.2, threshold="global"):
    keys = float_keys(base)
    taus = task_vectors(base, fts)
    if threshold == "global":
        trimmed = ref_topk_values_mask(torch.stack([flatten(t, keys) for t in taus]), k)
    else:
        trimmed = torch.cat(
            [ref_topk_values_mask(torch.stack([t[key].reshape(-1) for t in taus]), k) for key in keys], dim=1
        )
    merged = ref_disjoint_mean(trimmed, ref_resolve_sign(trimmed))
    return unflatten(merged, base, keys), unflatten(ref_resolve_sign(trimmed), base, keys)


def dare_draws(numel: int, key: int) -> np.ndarray:
    """The documented 32-bit draw h(i; k) for i = 0..numel−1, in plain uint64 arithmetic mod 2^32."""
    m = np.uint64(0xFFFFFFFF)
    h = (np.arange(numel, dtype=np.uint64) * np.uint64(0x61C88647) + np.uint64(key)) & m
    for _ in range(2):
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x45D9F3B)) & m
    return h


def dare_dropped(tau: torch.Tensor, p: float, seed: int, key: str, t: int) -> torch.Tensor:
    """FusionBench's ``where(mask, param / (1 - p), 0)`` with the package's documented per-(seed, key,
    task, index) draw: kept iff h >= min(ceil(p·2^32), 2^32 − 1)."""
    threshold = min(math.ceil(p * 2**32), 2**32 - 1)
    keep = torch.from_numpy(dare_draws(tau.numel(), seed_for(seed, key, t)) >= threshold).reshape(tau.shape)
    return torch.where(keep, tau / (1 - p), 0.0)


def oracle_dare(base, fts, p, seed, combine="sum"):
    keys = float_keys(base)
    taus = task_vectors(base, fts)
    dropped = [{k: dare_dropped(tau[k], p, seed, k, t) for k in keys} for t, tau in enumerate(taus)]
    if combine == "sum":
        out = {}
        for k in keys:
            acc = dropped[0][k]
            for d in dropped[1:]:
                acc = acc + d[k]
            out[k] = acc
        return out
    M = torch.stack([flatten(d, keys) for d in dropped])
    return unflatten(ref_disjoint_mean(M, ref_resolve_sign(M)), base, keys)


def oracle_breadcrumbs(base, fts, bottom, top, ties="exact"):
    """exact: a stable ascending sort of |τ| per tensor, keep ranks n_bot .. n − n_top − 1 (equal
    magnitudes ordered by flat index). keep: every |τ| between the two bounds' values, inclusive."""
    keys = float_keys(base)
    out = {}
    for k in keys:
        acc = None
        for tau in task_vectors(base, fts):
            x = tau[k]
            n = x.numel()
            n_bot, n_top = int(bottom * n), int(top * n)
            ranked = x.abs().reshape(-1).sort(stable=True)
            if ties == "exact":
                keep = torch.zeros(n, dtype=torch.bool)
                keep[ranked.indices[n_bot : n - n_top]] = True
                keep = keep.view(x.shape)
            else:
                keep = torch.ones_like(x, dtype=torch.bool)
                if n_bot:
                    keep &= x.abs() >= ranked.values[n_bot]
                if n_top:
                    keep &= x.abs() <= ranked.values[n - n_top - 1]
            sparse = x * keep
            acc = sparse if acc is None else acc + sparse
        out[k] = acc
    return out


def merged_tau(method, base, fts, **options):
    m = magmax.Merger(method, base, **options)
    for ft in fts:
        m.add(ft)
    return m.task_vector()


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def merge_both_ways(method, base, fts, **options):
    """(engine result, incremental Merger result), both as float32 so no output rounding hides a difference."""
    batch = magmax.merge(method, base, fts, dtype=torch.float32, **options)
    inc = magmax.Merger(method, base, **options)
    for ft in fts:
        inc.add(ft)
    return batch, inc.merged(dtype=torch.float32)


# -- exact k-th magnitude (radix select) ------------------------------------------------------------------


def test_radix_select_matches_kthvalue_with_signed_zeros_and_duplicates():
    gen = torch.Generator().manual_seed(0)
    parts = [
        torch.tensor([0.0, -0.0, -0.0, 0.0, 1.5, -1.5, 1.5]),
        torch.randint(-3, 4, (200,), generator=gen).float() * 0.25,  # heavy duplicates incl. ±0
        torch.randn(1000, generator=gen) * 1e-3,
        torch.tensor([1e-40, -1e-42, 3.4e38, -3.4e38]),  # subnormals and the largest finite floats
        torch.empty(0),
    ]
    flat = torch.cat(parts).abs()
    for position in [1, 2, 5, 100, 600, flat.numel() // 2, flat.numel() - 1, flat.numel()]:
        expected = torch.kthvalue(flat, position).values
        got = kth_smallest_magnitude(lambda: iter(parts), position)
        assert got == float(expected), position


@FAST
@given(
    chunks=st.lists(
        st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=0, max_size=40),
        min_size=1,
        max_size=5,
    ).filter(lambda c: sum(map(len, c)) > 0),
    data=st.data(),
)
def test_radix_select_property(chunks, data):
    parts = [torch.tensor(c, dtype=torch.float32) for c in chunks]
    flat = torch.cat(parts).abs()
    position = data.draw(st.integers(1, flat.numel()))
    assert kth_smallest_magnitude(lambda: iter(parts), position) == float(torch.kthvalue(flat, position).values)


def test_radix_select_across_chunk_boundaries(monkeypatch):
    # Large tensors are read in chunks; a 7-entry chunk makes every tensor here span several.
    monkeypatch.setattr(_sparsify, "_CHUNK", 7)
    gen = torch.Generator().manual_seed(2)
    parts = [torch.randn(s, generator=gen) for s in [(5, 9), (23,), (1,), (0,)]]
    flat = torch.cat([p.reshape(-1) for p in parts]).abs()
    for position in range(1, flat.numel() + 1, 5):
        assert kth_smallest_magnitude(lambda: iter(parts), position) == float(torch.kthvalue(flat, position).values)


@pytest.mark.parametrize("k", [0.2, 20, 0.5, 0.001, 0.999, 1.0, 100])
def test_global_threshold_is_reference_kthvalue_of_concatenation(k):
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(s, generator=gen) for s in [(5, 4), (17,), (1,)]]
    row = torch.cat([p.reshape(-1) for p in parts]).unsqueeze(0)
    threshold = global_topk_threshold(lambda: iter(parts), k)
    expected_kept = ref_topk_values_mask(row, k) != 0
    kept = row.abs() >= threshold if threshold is not None else torch.ones_like(row, dtype=torch.bool)
    assert torch.equal(kept, expected_kept)


# -- TIES against the reference --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", ["global", "per_tensor"])
@pytest.mark.parametrize("k,T", [(0.2, 5), (20, 3), (0.5, 2), (0.01, 4), (1.0, 3), (0.2, 1)])
def test_ties_bit_exact_with_reference_on_dyadic_data(dtype, threshold, k, T):
    # Dyadic data: every sum is exact in any order, so the only rounding is the final mean's one division,
    # identical in both; the comparison can be bit for bit.
    base, fts = make_models(seed=T, T=T, dtype=dtype, dyadic=True)
    expected, _ = oracle_ties(base, fts, k=k, threshold=threshold)
    assert_same(merged_tau("ties", base, fts, k=k, threshold=threshold), expected)
    batch, incremental = merge_both_ways("ties", base, fts, k=k, threshold=threshold)
    assert_same(batch, incremental)
    # With a zero base θ = 0 + 1·τ* exactly, so the engine's own τ* is checked against the oracle too.
    zero_base = {key: torch.zeros_like(v) for key, v in base.items()}
    shifted = [{key: ft[key] - base[key] if ft[key].is_floating_point() else ft[key] for key in ft} for ft in fts]
    if dtype == torch.float32:
        engine = magmax.merge("ties", zero_base, shifted, k=k, threshold=threshold, scale=1.0)
        assert_same({key: engine[key] for key in expected}, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", ["global", "per_tensor"])
def test_ties_matches_reference_on_continuous_data(dtype, threshold):
    base, fts = make_models(seed=11, T=6, dtype=dtype)
    expected, signs = oracle_ties(base, fts, threshold=threshold)
    got = merged_tau("ties", base, fts, threshold=threshold)
    for key in expected:
        # Which entries survive and with which sign is decided exactly ...
        assert torch.equal(got[key] != 0, expected[key] != 0), key
        assert torch.equal(torch.sign(got[key]), torch.sign(expected[key])), key
        # ... while the sums run in task order here and in torch.sum's vectorised order in the oracle:
        # a few float32 ulps of the largest summand at most.
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


def test_ties_keeps_every_entry_tied_at_the_threshold():
    # d = 10, K = 0.2: int(2) = 2, rank 8 of |x| ascending = 3, so the four 3s, the 4 and the 5 are all kept.
    tau = torch.tensor([5.0, -4.0, 3.0, -3.0, 3.0, 3.0, 1.0, 0.0, -0.5, 2.0])
    base = {"w": torch.zeros(10)}
    for threshold in ["global", "per_tensor"]:
        got = merged_tau("ties", base, [{"w": tau}], k=0.2, threshold=threshold)["w"]
        assert torch.equal(got, torch.tensor([5.0, -4.0, 3.0, -3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0]))


def test_ties_global_threshold_spans_tensors_per_tensor_does_not():
    # One tensor 100x larger: a global top-20% takes only its entries; per tensor each keeps its own 20%.
    # The reference keeps ranks d - int(d*K) .. d, i.e. int(d*K) + 1 entries (21 of 100, 11 of 50).
    base = {"big": torch.zeros(50), "small": torch.zeros(50)}
    gen = torch.Generator().manual_seed(3)
    tau = {"big": 100 * (torch.rand(50, generator=gen) + 1), "small": torch.rand(50, generator=gen) + 1}
    glob = merged_tau("ties", base, [tau], k=0.2, threshold="global")
    per = merged_tau("ties", base, [tau], k=0.2, threshold="per_tensor")
    assert int((glob["big"] != 0).sum()) == 21 and int((glob["small"] != 0).sum()) == 0
    assert int((per["big"] != 0).sum()) == 11 and int((per["small"] != 0).sum()) == 11


def test_ties_global_threshold_counts_frozen_zero_tensors_like_the_reference():
    # protocol.md §1 quirk: a frozen tower (all-zero task vector) is part of d, so 40% of the trained half
    # survives a "top-20%" trim instead of 20% (int(200 * 0.2) + 1 = 41 entries, see above).
    base = {"text": torch.zeros(100), "vision": torch.zeros(100)}
    gen = torch.Generator().manual_seed(4)
    tau = {"text": torch.zeros(100), "vision": torch.randn(100, generator=gen)}
    got = merged_tau("ties", base, [tau], k=0.2)
    assert int((got["vision"] != 0).sum()) == 41


def test_ties_zero_elected_sign_takes_the_global_majority_sign():
    # Entry 0 of "x": +1 and -1 cancel, so its elected sign is 0 and it takes the model's majority sign.
    def run(other):
        base = {"x": torch.zeros(3), "y": torch.zeros(4)}
        fts = [{"x": torch.tensor([1.0, -2.0, -2.0]), "y": other}, {"x": torch.tensor([-1.0, -2.0, -2.0]), "y": other}]
        got = merged_tau("ties", base, fts, k=1.0)
        expected, _ = oracle_ties(base, fts, k=1.0)
        assert_same(got, expected)
        return float(got["x"][0])

    # "x" alone leans negative, but the model's majority is positive: the majority is global, not per tensor.
    assert run(torch.ones(4)) == 1.0
    assert run(-torch.ones(4)) == -1.0
    # A perfectly balanced model (majority sign 0): the reference's where(sign > 0, ...) keeps the negatives.
    assert run(torch.tensor([1.0, 1.0, 0.0, 0.0])) == -1.0


def test_ties_zero_elected_sign_in_per_tensor_mode_still_uses_the_global_majority():
    base = {"x": torch.zeros(2), "y": torch.zeros(5)}
    fts = [
        {"x": torch.tensor([1.0, -3.0]), "y": torch.full((5,), 2.0)},
        {"x": torch.tensor([-1.0, -3.0]), "y": torch.full((5,), 2.0)},
    ]
    got = merged_tau("ties", base, fts, k=1.0, threshold="per_tensor")
    assert float(got["x"][0]) == 1.0


@FAST
@given(seed=st.integers(0, 10_000), T=st.integers(1, 5), k=st.sampled_from([0.1, 0.2, 0.5, 30, 1.0]),
       threshold=st.sampled_from(["global", "per_tensor"]))
def test_ties_entries_are_zero_or_agree_with_the_elected_sign(seed, T, k, threshold):
    base, fts = make_models(seed, T, dyadic=seed % 2 == 0)
    _, elected = oracle_ties(base, fts, k=k, threshold=threshold)
    got = merged_tau("ties", base, fts, k=k, threshold=threshold)
    taus = task_vectors(base, fts)
    for key in got:
        s = torch.sign(got[key])
        # An elected sign left at 0 (the model's signs exactly balanced) selects the negatives, as in the
        # reference's where(sign > 0, x > 0, x < 0).
        side = torch.where(elected[key] > 0, 1.0, -1.0)
        assert bool(((s == 0) | (s == side)).all())
        # A mean of agreeing entries never exceeds the largest of them.
        bound = torch.stack([t[key].abs() for t in taus]).amax(dim=0)
        assert bool((got[key].abs() <= bound).all())


@FAST
@given(seed=st.integers(0, 10_000), T=st.integers(1, 5), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       method=st.sampled_from([("ties", {}), ("ties", {"threshold": "per_tensor", "k": 0.3}), ("dare", {}),
                               ("dare", {"combine": "ties", "p": 0.3}), ("breadcrumbs", {"bottom": 0.5, "top": 0.1})]))
def test_streaming_equals_batch_bit_for_bit_after_every_prefix(seed, T, dtype, method):
    name, options = method
    base, fts = make_models(seed, T, dtype=dtype)
    inc = magmax.Merger(name, base, **options)
    for t, ft in enumerate(fts, start=1):
        inc.add(ft)
        batch = magmax.merge(name, base, fts[:t], dtype=torch.float32, **options)
        assert_same(batch, inc.merged(dtype=torch.float32))


@pytest.mark.parametrize(
    "name,options",
    [("ties", {}), ("ties", {"threshold": "per_tensor"}), ("dare", {"seed": 3}), ("dare", {"combine": "ties"}),
     ("breadcrumbs", {})],
)
def test_results_do_not_depend_on_tensor_order(name, options):
    base, fts = make_models(seed=5, T=4)
    order = list(reversed(list(base)))
    base_r = {k: base[k] for k in order}
    fts_r = [{k: ft[k] for k in order} for ft in fts]
    assert_same(magmax.merge(name, base, fts, **options), magmax.merge(name, base_r, fts_r, **options))


class CountingReader(DictReader):
    def __init__(self, state, name):
        super().__init__(state, name)
        self.reads: dict[str, int] = {}

    def get(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().get(key)


@pytest.mark.parametrize(
    "name,options,reads",
    [
        pytest.param("ties", {}, 3, marks=needs_native),  # sample + count-and-gather (thresholds) + merge pass (the majority sign deferred)
        ("ties", {"threshold": "per_tensor"}, 1),  # no statistics pass: thresholds are found in the fold
        ("dare", {}, 1),
        ("dare", {"combine": "ties"}, 2),
        pytest.param("breadcrumbs", {}, 1, marks=needs_native),  # the numba pass reads each input once
    ],
)
def test_engine_reads_each_task_vector_only_as_often_as_the_method_needs(name, options, reads):
    """θ0 included: a pass that only asks how the inputs are held (TIES's thresholds) reads none of it."""
    base, fts = make_models(seed=1, T=3)
    base_reader = CountingReader(base, "base")
    readers = [CountingReader(ft, f"ft{i}") for i, ft in enumerate(fts)]
    MergeRun(create_method(name, **options), base_reader, readers).run(DictWriter())
    for reader in [base_reader, *readers]:
        assert {key: reader.reads[key] for key in float_keys(base)} == {key: reads for key in float_keys(base)}


def test_ties_default_scale_and_int_buffers():
    base, fts = make_models(seed=2, T=3)
    assert create_method("ties").scale == 0.55
    out = magmax.merge("ties", base, fts)
    assert torch.equal(out["step"], base["step"])
    expected, _ = oracle_ties(base, fts)
    torch.testing.assert_close(out["enc.weight"], base["enc.weight"] + 0.55 * expected["enc.weight"])


@pytest.mark.parametrize(
    "name,options",
    [("ties", {"k": 0}), ("ties", {"k": 101}), ("ties", {"threshold": "layer"}), ("dare", {"p": 1.0}),
     ("dare", {"p": -0.1}), ("dare", {"combine": "mean"}), ("breadcrumbs", {"bottom": 0.9, "top": 0.1}),
     ("breadcrumbs", {"top": 1.0})],
)
def test_invalid_options_are_one_line_config_errors(name, options):
    with pytest.raises(ConfigError) as info:
        create_method(name, **options)
    assert "\n" not in str(info.value) and name in str(info.value)


# -- DARE --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,seed", [(0.5, 0), (0.9, 1), (0.3, 7)])
def test_dare_sum_matches_oracle_bit_for_bit(dtype, p, seed):
    # Same draws, same order of additions (task order): exact.
    base, fts = make_models(seed=seed, T=4, dtype=dtype)
    assert_same(merged_tau("dare", base, fts, p=p, seed=seed), oracle_dare(base, fts, p, seed))
    batch, inc = merge_both_ways("dare", base, fts, p=p, seed=seed)
    assert_same(batch, inc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_ties_matches_oracle(dtype):
    # p = 0.5 rescales by exactly 2, so dyadic data keeps every sum exact: bit for bit.
    base, fts = make_models(seed=8, T=5, dtype=dtype, dyadic=True)
    assert_same(merged_tau("dare", base, fts, p=0.5, seed=2, combine="ties"),
                oracle_dare(base, fts, 0.5, 2, combine="ties"))
    # Continuous data: summation order differs from torch.sum(dim=0) (see module docstring).
    base, fts = make_models(seed=9, T=5, dtype=dtype)
    got = merged_tau("dare", base, fts, p=0.7, seed=2, combine="ties")
    expected = oracle_dare(base, fts, 0.7, 2, combine="ties")
    for key in got:
        assert torch.equal(torch.sign(got[key]), torch.sign(expected[key])), key
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


@FAST
@given(seed=st.integers(0, 10_000), T=st.integers(1, 5), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_dare_with_p_zero_is_task_arithmetic(seed, T, dtype):
    base, fts = make_models(seed, T, dtype=dtype)
    assert_same(magmax.merge("dare", base, fts, p=0.0, seed=seed), magmax.merge("task_arithmetic", base, fts))
    # And DARE-TIES with nothing dropped is TIES with nothing trimmed (same default λ 0.55).
    assert_same(magmax.merge("dare", base, fts, p=0.0, combine="ties"), magmax.merge("ties", base, fts, k=1.0))


def test_dare_drops_about_p_and_rescales_survivors():
    base = {"w": torch.zeros(200_000)}
    tau = torch.full((200_000,), 0.5)
    got = merged_tau("dare", base, [{"w": tau}], p=0.9, seed=4)["w"]
    kept = got != 0
    fraction = float(kept.float().mean())
    assert abs(fraction - 0.1) < 5 * math.sqrt(0.1 * 0.9 / 200_000)  # within 5 sigma of Binomial(n, 0.1)
    assert torch.equal(got[kept], torch.full((int(kept.sum()),), 0.5 / (1 - 0.9)))


def test_dare_seed_controls_the_draws_per_task_and_tensor():
    base, fts = make_models(seed=6, T=3)
    a = merged_tau("dare", base, fts, seed=1)
    assert_same(a, merged_tau("dare", base, fts, seed=1))
    b = merged_tau("dare", base, fts, seed=2)
    assert not torch.equal(a["enc.weight"], b["enc.weight"])
    # Two identical task vectors get different masks (the draw depends on the task index).
    twins = merged_tau("dare", base, [fts[0], fts[0]], p=0.5, seed=1)
    single = oracle_dare(base, [fts[0]], 0.5, 1)
    assert not torch.equal(twins["enc.weight"], 2 * single["enc.weight"])


def test_dare_default_scales():
    assert create_method("dare").scale == 0.3
    assert create_method("dare", combine="ties").scale == 0.55
    assert create_method("dare", combine="ties", scale=0.8).scale == 0.8


# -- Breadcrumbs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("native", ["1", "0"])  # the numba band (where it applies) and the torch kernel
@pytest.mark.parametrize("ties", ["exact", "keep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bottom,top", [(0.85, 0.007), (0.5, 0.1), (0.0, 0.2), (0.3, 0.0), (0.9, 0.05)])
def test_breadcrumbs_matches_oracle_bit_for_bit(dtype, bottom, top, ties, native, monkeypatch):
    monkeypatch.setenv("MAGMAX_NATIVE", native)
    for dyadic in (False, True):  # dyadic data plants many ties at both bounds
        base, fts = make_models(seed=12, T=4, dtype=dtype, dyadic=dyadic)
        expected = oracle_breadcrumbs(base, fts, bottom, top, ties)
        assert_same(merged_tau("breadcrumbs", base, fts, bottom=bottom, top=top, ties=ties), expected)
        batch, inc = merge_both_ways("breadcrumbs", base, fts, bottom=bottom, top=top, ties=ties)
        assert_same(batch, inc)


TIED = torch.tensor([0.5, -1.0, 1.0, 2.0, -3.0, 3.0, 3.0, 9.0, 0.0, 2.0])
# Stable ascending order by |τ| (index in brackets): 0(8) 0.5(0) 1(1) 1(2) 2(3) 2(9) 3(4) 3(5) 3(6) 9(7).


def test_breadcrumbs_with_ties_keep_keeps_ties_at_both_bounds():
    # n = 10, bottom 0.3 -> n_bot = 3, lo = rank 4 = 1; top 0.2 -> n_top = 2, hi = rank 8 = 3: 8 kept.
    got = merged_tau("breadcrumbs", {"w": torch.zeros(10)}, [{"w": TIED}], bottom=0.3, top=0.2, ties="keep")["w"]
    assert torch.equal(got, torch.tensor([0.0, -1.0, 1.0, 2.0, -3.0, 3.0, 3.0, 0.0, 0.0, 2.0]))


def test_breadcrumbs_masks_exact_counts_breaking_ties_by_index():
    # Masked: the 3 first in the order above (indices 8, 0, 1: the 1 at index 2 ranks above the one at
    # index 1) and the 2 last (indices 7, 6: of the three 3s, the highest index ranks highest). 5 kept.
    got = merged_tau("breadcrumbs", {"w": torch.zeros(10)}, [{"w": TIED}], bottom=0.3, top=0.2)["w"]
    assert torch.equal(got, torch.tensor([0.0, 0.0, 1.0, 2.0, -3.0, 3.0, 0.0, 0.0, 0.0, 2.0]))


def test_breadcrumbs_keeps_exactly_the_papers_fraction_of_a_bf16_task_vector():
    """bfloat16 fine-tuning deltas take few distinct values: most magnitudes are tied. At the defaults
    (β = 0.85, γ = 0.993) exactly n − int(0.85·n) − int(0.007·n) entries survive per tensor, ≈ 14.3%."""
    gen = torch.Generator().manual_seed(21)
    base = {"w": torch.randn(96, 80, generator=gen).bfloat16(), "b": torch.randn(300, generator=gen).bfloat16()}
    ft = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).bfloat16() for k, v in base.items()}
    tau = task_vectors(base, [ft])[0]
    assert tau["w"].abs().unique().numel() < tau["w"].numel() / 20  # heavily tied
    got = merged_tau("breadcrumbs", base, [ft])
    for key, value in got.items():
        n = value.numel()
        kept = int((value != 0).sum())
        assert kept == n - int(0.85 * n) - int(0.007 * n), key
        assert torch.equal(value[value != 0], tau[key][value != 0])
    loose = merged_tau("breadcrumbs", base, [ft], ties="keep")["w"]
    assert int((loose != 0).sum()) > int((got["w"] != 0).sum())  # the inclusive band keeps the edge ties too


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 300), bottom=st.floats(0, 0.95), top=st.floats(0, 0.5))
def test_breadcrumbs_keeps_exactly_the_band_for_distinct_magnitudes(seed, n, bottom, top):
    if bottom + top >= 1:
        return
    gen = torch.Generator().manual_seed(seed)
    # Distinct non-zero magnitudes with random signs: the kept set is exactly ranks n_bot+1 .. n-n_top.
    magnitudes = (torch.randperm(n, generator=gen).float() + 1) / 8
    tau = magnitudes * (torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1)
    got = merged_tau("breadcrumbs", {"w": torch.zeros(n)}, [{"w": tau}], bottom=bottom, top=top)["w"]
    n_bot, n_top = int(bottom * n), int(top * n)
    kept = got != 0
    assert int(kept.sum()) == n - n_bot - n_top
    ranks = magnitudes.argsort().argsort()  # 0-based ascending rank of each entry
    assert torch.equal(kept, (ranks >= n_bot) & (ranks < n - n_top))
    assert torch.equal(got[kept], tau[kept])


def test_breadcrumbs_does_not_alias_its_inputs():
    # A tensor too small to mask anything is kept whole; the fold must still copy it, not add into it.
    base = {"s": torch.zeros(1)}
    tau1, tau2 = torch.tensor([1.0]), torch.tensor([2.0])
    m = magmax.Merger("breadcrumbs", base)
    m.add_task_vector({"s": tau1})
    m.add_task_vector({"s": tau2})
    assert float(m.task_vector()["s"]) == 3.0 and float(tau1) == 1.0


@needs_native
@pytest.mark.parametrize("guess", ["sampled", "wrong"])
@pytest.mark.parametrize("lean", [1, -1])
def test_ties_batch_merge_defers_the_majority_sign_exactly(guess, lean, monkeypatch):
    """The batch merge runs before the majority sign is known, on a guess (from the thresholds' sample),
    and merges again the tensors whose elected sign cancels to 0: right or wrong guess, the oracle's τ*."""
    from magmax.merging import ties as ties_module

    gen = torch.Generator().manual_seed(21 + lean)
    base = {"a": torch.zeros(64, 32), "b": torch.zeros(500), "c": torch.zeros(7)}
    # Quarter steps (exact cancellations everywhere) leaning to one side: the majority sign is `lean`.
    fts = [{k: (torch.randint(-3, 4, v.shape, generator=gen) + lean).float() * 0.25 for k, v in base.items()}
           for _ in range(5)]
    real = ties_module.sampled_majority
    guesses: list[int] = []

    def spy(sample, kappas):
        guesses.append(real(sample, kappas) if guess == "sampled" else -lean)
        return guesses[-1]

    monkeypatch.setattr(ties_module, "sampled_majority", spy)
    redone: list[list[str]] = []
    provisional = ties_module.Ties.provisional_units
    monkeypatch.setattr(ties_module.Ties, "provisional_units", lambda self: redone.append(provisional(self)) or redone[-1])
    got = magmax.merge("ties", base, fts, k=0.5, scale=1.0)  # θ0 = 0: the merged model is τ*
    expected, _ = oracle_ties(base, fts, k=0.5)
    for key in base:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=0)
    assert guesses == [lean if guess == "sampled" else -lean]
    assert (redone == [[]]) == (guess == "sampled")  # a wrong guess re-merges the tensors with cancellations
