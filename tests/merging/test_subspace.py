"""consensus (TALL masks), tsv (TSV-M), iso_c, iso_cts and opcm against plain oracles from the papers.

The oracles stack everything, loop and (for the SVD methods) run in float64 with the references'
own layouts (zero-padded singular-vector blocks, full SVD bases for OPCM), so they check both the
equations and that the streamed float32 kernels agree with the references' way of computing them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

import magmax
from magmax.errors import ConfigError
from magmax.merging import TaskSlices, create_method
from magmax.merging.backends.cpu import native as _native
from magmax.merging._subspace import thin_svd
from magmax.merging.iso_cts import subspace_split
from magmax.merging.opcm import split_rank
from magmax.taskvector import task_vector

SUBSPACE_METHODS = ["consensus", "tsv", "iso_c", "iso_cts", "opcm"]
FAST = settings(max_examples=30, deadline=None)


# -- tiny models built in code ---------------------------------------------------------------------


def tiny_models(seed: int, tasks: int, dtype: torch.dtype = torch.float32) -> tuple[dict, list[dict]]:
    """A base and ``tasks`` fine-tuned state dicts: tall and wide matrices, an embedding, a conv, 1-D, int."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    base = {
        "blocks.0.fc1.weight": rand(16, 12),
        "blocks.0.fc1.bias": rand(16),
        "blocks.0.fc2.weight": rand(12, 16),
        "embeddings.position_embedding.weight": rand(5, 12),
        "stem.conv.weight": rand(4, 3, 3, 3),
        "norm.weight": rand(12),
        "position_ids": torch.arange(5),
    }
    finetuned = []
    for _ in range(tasks):
        ft = {}
        for key, value in base.items():
            if value.is_floating_point():
                # A low-rank-ish update plus noise, like a real fine-tuning delta.
                delta = 0.05 * rand(*value.shape)
                if value.ndim == 2:
                    delta += 0.3 * rand(value.shape[0], 2) @ rand(2, value.shape[1])
                ft[key] = value + delta
            else:
                ft[key] = value.clone()
        finetuned.append(ft)
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    finetuned = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in ft.items()} for ft in finetuned]
    return base, finetuned


def task_vectors(base: dict, finetuned: list[dict]) -> list[dict[str, Tensor]]:
    return [task_vector(base, ft) for ft in finetuned]


def merged_tau(method: str, base: dict, finetuned: list[dict], **options) -> dict[str, Tensor]:
    """τ* from magmax.merge with scale 1 (θ − θ0 is exactly τ* only up to rounding, so use the Merger)."""
    merger = magmax.Merger(method, base, **options)
    for ft in finetuned:
        merger.add(ft)
    return merger.task_vector()


def slices_of(taus: list[Tensor]) -> TaskSlices:
    return TaskSlices.from_list("w", taus)


def random_matrices(seed: int, tasks: int, rows: int, cols: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, cols, generator=gen) for _ in range(tasks)]


def close(actual: Tensor, expected: Tensor, rtol: float = 2e-4, atol: float = 2e-5) -> None:
    """float32 kernel vs float64 oracle: relative to the oracle's scale."""
    scale = max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


# What a float32 SVD promises, and so what a float32 kernel built on SVDs can be held to.
#
# A backward-stable SVD (LAPACK's xGESDD/xGESVD, or whatever BLAS/LAPACK path the CPU picks: MKL's
# AVX-512 kernels here, OpenBLAS's AVX2 ones on AMD) returns the exact SVD of A + E with
# ‖E‖₂ ≤ p(m, n)·u·‖A‖₂, u = 2⁻²⁴; the LAPACK Users' Guide (§4.9, error bounds for the SVD) takes
# p(m, n) ≈ 1. How far that moves a result is the problem's conditioning, not the kernel's: singular
# values move by ≤ ‖E‖₂ (Weyl), but a singular vector turns by up to ‖E‖₂ / gap_i (Wedin; gap_i is the
# distance from σ_i to the other singular values, SDISNA's), a leading subspace by ‖E‖₂ / (σ_k − σ_k+1),
# and a polar factor by ~2‖E‖₂ / σ_min. OPCM removes the component of τ_t along every single pair
# (u_i, v_i) of the running merge, whose spectrum has gaps of 1e-3·σ₁ on these tiny models: there u·‖S‖/gap
# is ~1e-4, and over a stream each step's error moves the next step's SVD. A fixed tolerance is then
# either loose everywhere or flaky on some CPU (it was: 6.3e-5 against 5.1e-5 allowed on an AMD EPYC).
# Worst-case norm bounds (sums of ‖E‖/gap_i over every direction, compounded over the stream) are
# true but exceed the result itself by the fourth task, so they would test nothing.
#
# So the tolerance is measured on the problem itself: the float64 oracle is run again with every SVD
# it takes fed A + E, ‖E‖₂ = u·‖A‖₂ in a random direction (the backward error the Users' Guide
# assumes), and the kernel may differ from the exact oracle by SVD_SAFETY times the largest such
# spread (per tensor), on top of the fixed floor of `close` for the non-SVD float32 arithmetic. The
# factor covers random directions not being the worst one and p(m, n) up to 4: the kernels' error on
# this machine's float32 LAPACK (MKL) is ≤ 0.2 of the allowance, ≤ 0.3 with their SVDs replaced by
# float64 SVDs of A + E, ‖E‖₂ = u·‖A‖₂ (any backward-stable LAPACK), and ~1 at ‖E‖₂ = 4u·‖A‖₂. A wrong formula (a direction too many
# projected out, a missing polar factor, a wrong rank split) moves results by 1e-2–1 of their scale,
# and the spread must stay far below that for the comparison to mean anything: `close_to_oracle`
# asserts it (SPREAD_CEILING).
SVD_SAFETY = 4.0
SPREAD_CEILING = 1e-2
SPREAD_DRAWS = 6
UNIT_ROUNDOFF = torch.finfo(torch.float32).eps / 2
_svd_backward_error: torch.Generator | None = None
"""When set, every oracle SVD is of A + E, ‖E‖₂ = _svd_backward_size·‖A‖₂, E drawn from this generator."""
_svd_backward_size = UNIT_ROUNDOFF


def svd64(a: Tensor, full_matrices: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The oracles' SVD (float64), with the backward error of a float32 SVD added when asked."""
    a = a.double()
    if _svd_backward_error is not None:
        e = torch.randn(a.shape, generator=_svd_backward_error, dtype=torch.float64)
        size = _svd_backward_size * float(torch.linalg.matrix_norm(a, 2))
        a = a + e * (size / float(torch.linalg.matrix_norm(e, 2)))
    return torch.linalg.svd(a, full_matrices=full_matrices)


def svd_spread(oracle, *args, backward: float = UNIT_ROUNDOFF, **kwargs) -> list:
    """The oracle's result under SPREAD_DRAWS draws of float32 SVD backward errors (same structure),
    each ‖E‖₂ = ``backward``·‖A‖₂ (u by default, the LAPACK Users' Guide's p(m, n) ≈ 1)."""
    global _svd_backward_error, _svd_backward_size
    draws = []
    try:
        _svd_backward_size = backward
        for seed in range(SPREAD_DRAWS):
            _svd_backward_error = torch.Generator().manual_seed(seed)
            draws.append(oracle(*args, **kwargs))
    finally:
        _svd_backward_error, _svd_backward_size = None, UNIT_ROUNDOFF
    return draws


def float32_svd_backward_error(a: Tensor) -> float:
    """η of the kernels' own float32 SVD of ``a`` on this machine (at least u): its U·S·Vᵀ is within η·‖A‖₂
    of A and its U, V within η of orthonormal, so it is the SVD of some A + E, ‖E‖₂ ≲ η·‖A‖₂.

    For the hypothesis tests, whose random draws reach singular-value gaps of 1e-3·σ₁: measured there,
    η is 12u typically and up to 30u (9×6 Gaussian matrices, MKL's AVX-512, AVX2 and SSE2 paths alike), not
    the u that `svd_spread` assumes by default, and a 1e-3 gap turns a singular pair by η·σ₁/gap."""
    u, s, vh = (x.double() for x in thin_svd(a))
    a = a.double()
    eye = torch.eye(s.numel(), dtype=torch.float64)
    norm = lambda m: float(torch.linalg.matrix_norm(m, 2))  # noqa: E731
    reconstruction = norm(u @ torch.diag(s) @ vh - a) / max(norm(a), 1e-300)
    return max(UNIT_ROUNDOFF, reconstruction, norm(u.T @ u - eye), norm(vh @ vh.T - eye))


def close_to_oracle(actual: Tensor, expected: Tensor, perturbed: list[Tensor]) -> None:
    """``close``, widened by SVD_SAFETY × how far the oracle itself moves under float32 SVD errors."""
    scale = max(float(expected.abs().max()), 1e-12)
    spread = max(float((p - expected).abs().max()) for p in perturbed)
    assert spread < SPREAD_CEILING * scale, f"ill-conditioned example: oracle spread {spread / scale:.1e} of scale"
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=2e-4, atol=2e-5 * scale + SVD_SAFETY * spread
    )


def assert_matches_svd_oracle(method: str, oracle, seed: int, tasks: int, fraction: float | None = None) -> None:
    """The method's τ* on a tiny model against ``oracle`` per matrix (within the spread the SVD's rounding
    allows), and the mean of the task vectors on every other tensor."""
    options = {} if fraction is None else {"common_space_fraction": fraction}
    extra = () if fraction is None else (fraction,)
    base, finetuned = tiny_models(seed, tasks)
    taus = task_vectors(base, finetuned)
    for key, value in merged_tau(method, base, finetuned, **options).items():
        stack = [tv[key] for tv in taus]
        if value.ndim == 2:
            close_to_oracle(value, oracle(stack, *extra), svd_spread(oracle, stack, *extra))
        else:
            assert torch.equal(value, sum(stack) / tasks), key


def spread_in(perturbed: list[Tensor], expected: Tensor, measure) -> float:
    """How far float32 SVD backward errors move what a test checks: the largest |measure(p − expected)|
    over the perturbed oracles (``measure`` maps a deviation to the coordinates the test asserts on)."""
    return max(float(measure(p - expected).abs().max()) for p in perturbed)


# -- oracles (written from the papers' equations, everything stacked) ---------------------------


def consensus_oracle(taus: list[Tensor], tall_mask_lambda: float, k: int) -> Tensor:
    multi = sum(taus)  # left-to-right, like the kernel's running sum
    masks = [tau.abs() > tall_mask_lambda * (multi - tau).abs() for tau in taus]
    votes = torch.stack(masks).sum(0)
    return multi * (votes >= k)


def zeros64(*shape: int) -> Tensor:
    return torch.zeros(*shape, dtype=torch.float64)


def polar64(a: Tensor) -> Tensor:
    u, _, vh = svd64(a)
    return u @ vh


def tsv_oracle(taus: list[Tensor]) -> Tensor:
    """The reference layout: blocks of ⌊r/T⌋ triplets in zero-padded m×r, r, r×n buffers, float64."""
    taus = [t.double() for t in taus]
    n_tasks = len(taus)
    rows, cols = taus[0].shape
    r = min(rows, cols)
    k = r // n_tasks
    sum_u, sum_s, sum_vh = zeros64(rows, r), zeros64(r), zeros64(r, cols)
    for i, tau in enumerate(taus):
        u, s, vh = svd64(tau)
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_vh[i * k : (i + 1) * k, :] = vh[:k, :]
    return polar64(sum_u) @ torch.diag(sum_s) @ polar64(sum_vh)


def iso_c_oracle(taus: list[Tensor]) -> Tensor:
    m = sum(t.double() for t in taus)
    u, s, vh = svd64(m)
    return u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh


def iso_cts_oracle(taus: list[Tensor], fraction: float) -> Tensor:
    """The reference's Iso-CTS: common space of the sum, task-specific residual spaces, flat spectrum."""
    taus = [t.double() for t in taus]
    n_tasks = len(taus)
    rows, cols = taus[0].shape
    r = min(rows, cols)
    common = int(r * fraction)
    common = r - round((r - common) / n_tasks) * n_tasks
    per_task = int((r - common) / n_tasks)
    u, s, vh = svd64(sum(taus))
    uc, sc, vhc = u[:, :common], s[:common], vh[:common, :]
    all_u, all_s, all_vh = zeros64(rows, r), zeros64(r), zeros64(r, cols)
    for i, tau in enumerate(taus):
        ut, st_, vht = svd64(tau - uc @ uc.T @ tau)
        all_u[:, i * per_task : (i + 1) * per_task] = ut[:, :per_task]
        all_s[i * per_task : (i + 1) * per_task] = st_[:per_task]
        all_vh[i * per_task : (i + 1) * per_task, :] = vht[:per_task, :]
    all_u[:, n_tasks * per_task :] = uc
    all_s[n_tasks * per_task :] = sc
    all_vh[n_tasks * per_task :, :] = vhc
    return polar64(all_u) @ torch.diag(torch.full_like(all_s, float(all_s.mean()))) @ polar64(all_vh)


def opcm_oracle(taus: list[dict[str, Tensor]], alpha: float, is_linear) -> list[dict[str, Tensor]]:
    """FusionBench's OPCM loop, literally (full SVD bases, λ_t bookkeeping), float64; τ̃ after each prefix."""

    def norm(tv: dict[str, Tensor]) -> float:
        return math.sqrt(sum(float((v**2).sum()) for v in tv.values()))

    taus = [{k: v.double() for k, v in tv.items()} for tv in taus]
    merged = {k: v.clone() for k, v in taus[0].items()}
    all_norms = [norm(taus[0])]
    previous_lambda = 1.0
    history = [{k: v.clone() for k, v in merged.items()}]
    for tau in taus[1:]:
        all_norms.append(norm(tau))
        avg = sum(all_norms) / len(all_norms)
        new = {}
        for key, prev in merged.items():
            if is_linear(key, prev):
                u, s, vh = svd64(prev, full_matrices=True)
                v = vh.T
                split = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                projected = u.T @ tau[key] @ v
                projected.diagonal().fill_(0)
                projected[:split, :split] = 0
                cleaned = u @ projected @ v.T
            else:
                cleaned = tau[key]
            new[key] = previous_lambda * prev + cleaned  # the reference's temporary λ_t = 1
        merged_norm = norm(new)
        previous_lambda = merged_norm / avg
        merged = {k: v * (avg / merged_norm) for k, v in new.items()}
        history.append({k: v.clone() for k, v in merged.items()})
    return history


def opcm_step_oracle(first: Tensor, second: Tensor, k: int) -> Tensor:
    """OPCM's τ̃_2 (float64): τ_2 less its diagonal and its leading k×k block in the SVD basis of τ_1."""
    u, _, vh = svd64(first)
    projected = u.T @ second.double() @ vh.T
    removed = torch.diag_embed(projected.diagonal())
    removed[:k, :k] = projected[:k, :k]
    return second.double() - u @ removed @ vh


def linear_but_not_embedding(key: str, tensor: Tensor) -> bool:
    return tensor.ndim == 2 and "embed" not in key


# -- shared contract --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SUBSPACE_METHODS)
def test_registered_with_docs_and_reference(method):
    cls = magmax.registry()[method]
    assert cls.summary and "arXiv" in cls.reference and cls.__module__.endswith(method)
    assert "arXiv" in (__import__(cls.__module__, fromlist=["_"]).__doc__ or "")


@pytest.mark.parametrize("method", SUBSPACE_METHODS)
def test_merge_equals_merger_bit_for_bit_and_keeps_dtypes(method):
    base, finetuned = tiny_models(1, 4)
    batch = magmax.merge(method, base, finetuned)
    merger = magmax.Merger(method, base)
    for ft in finetuned:
        merger.add(ft)
    streamed = merger.merged()
    assert batch.keys() == base.keys()
    for key in base:
        assert torch.equal(batch[key], streamed[key]), key
        assert batch[key].dtype == base[key].dtype
    assert torch.equal(batch["position_ids"], base["position_ids"])


@pytest.mark.parametrize("method", SUBSPACE_METHODS)
def test_bf16_checkpoints_merge_in_float32(method):
    base, finetuned = tiny_models(2, 3, dtype=torch.bfloat16)
    out = magmax.merge(method, base, finetuned)
    assert all(out[k].dtype == base[k].dtype for k in base)
    reference = magmax.merge(method, base, finetuned, dtype=torch.float32)
    for key in base:
        if base[key].is_floating_point():
            assert torch.equal(out[key], reference[key].to(torch.bfloat16)), key


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("consensus", {"k": -1}),
        ("consensus", {"tall_mask_lambda": -0.1}),
        ("iso_cts", {"common_space_fraction": 0.0}),
        ("iso_cts", {"common_space_fraction": 1.5}),
        ("opcm", {"alpha": 1.0}),
        ("tsv", {"exclude": 3}),
        ("iso_c", {"rank": 3}),
    ],
)
def test_invalid_options_are_one_line_config_errors(method, options):
    with pytest.raises(ConfigError) as err:
        create_method(method, **options)
    assert "\n" not in str(err.value) and method in str(err.value)


def test_default_scales_and_options():
    methods = magmax.registry()
    assert methods["consensus"].default_scale == 0.3
    assert methods["tsv"].default_scale == methods["iso_c"].default_scale == methods["iso_cts"].default_scale == 1.0
    assert methods["opcm"].default_scale == 1.0
    assert create_method("consensus").options.tall_mask_lambda == 0.6 and create_method("consensus").options.k == 2
    assert create_method("iso_cts").options.common_space_fraction == 0.8
    assert create_method("opcm").options.alpha == 0.5 and create_method("opcm").options.exclude == ("*embed*",)
    assert methods["opcm"].foldable and methods["iso_c"].foldable


class CountingSlices(TaskSlices):
    def __init__(self, taus: list[Tensor]):
        self.loads = 0

        def load(t: int) -> Tensor:
            self.loads += 1
            return taus[t]

        super().__init__("w", len(taus), load)


@pytest.mark.parametrize(
    ("method", "passes"), [("consensus", 2), ("tsv", 1), ("iso_c", 1), ("iso_cts", 2), ("opcm", 1)]
)
def test_kernels_walk_the_lazy_slices_a_bounded_number_of_times(method, passes):
    taus = random_matrices(3, 5, 16, 12)
    slices = CountingSlices(taus)
    m = create_method(method)
    if method == "opcm":
        m.reduce_states([("w", m.fold("w", TaskSlices.from_list("w", taus)))])
    m.merge_tensor("w", slices)
    if method == "consensus" and _native.enabled():
        passes = 1  # the numba kernel sums and votes block by block: one read of each input
    assert slices.loads == passes * len(taus)
    assert all(torch.equal(a, b) for a, b in zip(taus, random_matrices(3, 5, 16, 12)))  # inputs untouched


# -- consensus ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lam", "k", "tasks"), [(0.6, 2, 4), (0.4, 2, 3), (0.2, 1, 5), (1.0, 3, 5)])
def test_consensus_matches_oracle_bit_for_bit(lam, k, tasks):
    base, finetuned = tiny_models(4, tasks)
    taus = task_vectors(base, finetuned)
    got = merged_tau("consensus", base, finetuned, tall_mask_lambda=lam, k=k)
    for key in got:
        assert torch.equal(got[key], consensus_oracle([tv[key] for tv in taus], lam, k)), key
    merged = magmax.merge("consensus", base, finetuned, tall_mask_lambda=lam, k=k)
    # θ0 + λ·τ* with the default λ = 0.3, as the engine forms it (one fused add).
    key = "blocks.0.fc1.weight"
    expected = base[key].add(consensus_oracle([tv[key] for tv in taus], lam, k), alpha=0.3)
    assert torch.equal(merged["blocks.0.fc1.weight"], expected)


def test_consensus_reference_example():
    # λ_m = 0.6, τ_MTL = [1, 2, 1.5].
    # Task 0: |τ_0| = [1, 1, 1] > 0.6·|τ_MTL − τ_0| = [0, 0.6, 0.3]: [on, on, on].
    # Task 1: |τ_1| = [0, 1, 0.5] > 0.6·[1, 1, 1]: [off, on, off]. Votes [1, 2, 1].
    taus = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.5])]
    expected = {0: [1.0, 2.0, 1.5], 1: [1.0, 2.0, 1.5], 2: [0.0, 2.0, 0.0], 3: [0.0, 0.0, 0.0]}
    for k, values in expected.items():
        got = create_method("consensus", k=k).merge_tensor("v", slices_of(taus))
        assert torch.equal(got, torch.tensor(values)), k


def test_consensus_drops_weights_where_every_task_agrees_too_much():
    # Three equal updates of 1: τ_MTL = 3 is farther from each θ_t (by 2) than θ0 is (by 1): 1 > 0.6·2 fails
    # for every task, so the weight is "catastrophic" for all and dropped even at k = 1.
    taus = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])]
    assert torch.equal(create_method("consensus", k=1).merge_tensor("v", slices_of(taus)), torch.tensor([0.0, 1.0]))
    assert torch.equal(create_method("consensus", k=2).merge_tensor("v", slices_of(taus)), torch.tensor([0.0, 0.0]))


def test_consensus_tall_mask_comparison_is_strict():
    # λ_m = 1, two equal updates: |τ_t| = 1 equals λ_m·|τ_MTL − τ_t| = 1, and the reference keeps only ">".
    taus = [torch.tensor([1.0]), torch.tensor([1.0])]
    got = create_method("consensus", k=1, tall_mask_lambda=1.0).merge_tensor("v", slices_of(taus))
    assert torch.equal(got, torch.tensor([0.0]))


@FAST
@given(seed=st.integers(0, 2**16), tasks=st.integers(1, 5), lam=st.floats(0.0, 2.0))
def test_consensus_threshold_limits(seed, tasks, lam):
    taus = random_matrices(seed, tasks, 6, 5)
    total = sum(taus)
    assert torch.equal(create_method("consensus", k=0, tall_mask_lambda=lam).merge_tensor("w", slices_of(taus)), total)
    assert not create_method("consensus", k=tasks + 1, tall_mask_lambda=lam).merge_tensor("w", slices_of(taus)).any()
    kept = [
        create_method("consensus", k=k, tall_mask_lambda=lam).merge_tensor("w", slices_of(taus)) != 0
        for k in range(tasks + 2)
    ]
    assert all(bool((later <= earlier).all()) for earlier, later in zip(kept, kept[1:]))  # nested supports


@FAST
@given(seed=st.integers(0, 2**16), lam=st.floats(0.0, 5.0))
def test_consensus_single_task_with_k1_is_the_task_vector(seed, lam):
    (tau,) = random_matrices(seed, 1, 7, 3)
    tau[0, 0] = 0.0
    got = create_method("consensus", k=1, tall_mask_lambda=lam).merge_tensor("w", slices_of([tau]))
    assert torch.equal(got, tau)


# -- tsv ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [2, 3, 5])
def test_tsv_matches_oracle(tasks):
    assert_matches_svd_oracle("tsv", tsv_oracle, seed=5, tasks=tasks)


@FAST
@given(seed=st.integers(0, 2**16), rows=st.integers(2, 9), cols=st.integers(2, 9))
def test_tsv_single_task_reproduces_the_task_vector(seed, rows, cols):
    (tau,) = random_matrices(seed, 1, rows, cols)
    close(create_method("tsv").merge_tensor("w", slices_of([tau])), tau.double(), rtol=1e-4, atol=1e-5)


@FAST
@given(seed=st.integers(0, 2**16), tasks=st.integers(2, 4), rank=st.integers(1, 3))
def test_tsv_of_mutually_orthogonal_low_rank_tasks_is_their_sum(seed, tasks, rank):
    # Tasks living in orthogonal row and column subspaces do not interfere: nothing to decorrelate.
    gen = torch.Generator().manual_seed(seed)
    # r = cols = T·rank, so each task's budget ⌊r/T⌋ is exactly its rank.
    rows, cols = 2 * tasks * rank, tasks * rank
    q_left = torch.linalg.qr(torch.randn(rows, rows, generator=gen))[0]
    q_right = torch.linalg.qr(torch.randn(cols, cols, generator=gen))[0]
    taus = []
    for t in range(tasks):
        cols_t = slice(t * rank, (t + 1) * rank)
        sigma = torch.rand(rank, generator=gen) + 0.5
        taus.append((q_left[:, cols_t] * sigma) @ q_right[:, cols_t].T)
    close(create_method("tsv").merge_tensor("w", slices_of(taus)), sum(taus).double(), rtol=1e-4, atol=1e-5)


def test_tsv_rank_budget_below_one_gives_zero_and_exclude_gives_mean():
    taus = random_matrices(6, 5, 3, 8)  # r = 3 < T = 5: the reference's k = 0
    assert not create_method("tsv").merge_tensor("w", slices_of(taus)).any()
    excluded = create_method("tsv", exclude=("w*",)).merge_tensor("w", slices_of(taus))
    assert torch.equal(excluded, sum(taus) / 5)


# -- iso_c --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [1, 2, 4])
def test_iso_c_matches_oracle(tasks):
    assert_matches_svd_oracle("iso_c", iso_c_oracle, seed=7, tasks=tasks)


@FAST
@given(seed=st.integers(0, 2**16), tasks=st.integers(1, 4), rows=st.integers(2, 10), cols=st.integers(2, 10))
def test_iso_c_spectrum_is_flat_with_the_mean_singular_value(seed, tasks, rows, cols):
    taus = random_matrices(seed, tasks, rows, cols)
    merged = create_method("iso_c").merge_tensor("w", slices_of(taus)).double()
    total = sum(taus).double()
    sigma = torch.linalg.svdvals(merged)
    mean_sigma = float(torch.linalg.svdvals(total).mean())
    torch.testing.assert_close(sigma, torch.full_like(sigma, mean_sigma), rtol=1e-4, atol=1e-5)
    # Same column space as the sum: projecting onto it changes nothing. The kernel's float32 SVD of the
    # sum has its own column space, turned from the exact one by ~η·σ₁/σ_r (η: that SVD's backward error;
    # a tall, nearly rank-deficient sum turns it far): allowed as SVD_SAFETY × what backward errors of
    # that size do to the float64 oracle, on top of a float32 floor relative to the result's scale.
    u = torch.linalg.svd(total, full_matrices=False)[0]
    outside = lambda m: m - u @ (u.T @ m)  # noqa: E731 - the part of m outside the sum's column space
    eta = float32_svd_backward_error(sum(taus))  # the SVD the kernel takes: of the float32 sum
    spread = spread_in(svd_spread(iso_c_oracle, taus, backward=eta), iso_c_oracle(taus), outside)
    scale = float(merged.abs().max())
    assume(spread < SPREAD_CEILING * scale)  # so ill-conditioned that the check would test nothing
    torch.testing.assert_close(u @ (u.T @ merged), merged, rtol=1e-4, atol=1e-5 * scale + SVD_SAFETY * spread)


# -- iso_cts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tasks", "fraction"), [(2, 0.8), (3, 0.8), (4, 0.5), (5, 0.8)])
def test_iso_cts_matches_oracle(tasks, fraction):
    assert_matches_svd_oracle("iso_cts", iso_cts_oracle, seed=8, tasks=tasks, fraction=fraction)


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "expected"),
    [
        (12, 2, 0.8, (8, 2)),  # ⌊9.6⌋ = 9 common; round(3/2) = 2 per task (banker's rounding); 12 − 4 = 8
        (12, 5, 0.8, (7, 1)),
        (768, 8, 0.8, (616, 19)),  # ViT-B: 614 → round(154/8) = 19 per task
        (12, 3, 1.0, (12, 0)),
        (12, 8, 0.1, (4, 1)),
        (12, 8, 0.01, (4, 1)),  # round(12/8) = 2 per task would need 16 > 12 dims: ⌊12/8⌋ = 1
    ],
)
def test_iso_cts_subspace_split(rank, tasks, fraction, expected):
    assert subspace_split(rank, tasks, fraction) == expected
    common, per_task = expected
    assert common + tasks * per_task == rank and common >= 0


@FAST
@given(seed=st.integers(0, 2**16), tasks=st.integers(1, 4), rows=st.integers(2, 9), cols=st.integers(2, 9))
def test_iso_cts_without_task_dims_is_iso_c_and_always_isotropic(seed, tasks, rows, cols):
    taus = random_matrices(seed, tasks, rows, cols)
    iso_c = create_method("iso_c").merge_tensor("w", slices_of(taus))
    full_common = create_method("iso_cts", common_space_fraction=1.0).merge_tensor("w", slices_of(taus))
    close(full_common, iso_c.double(), rtol=1e-4, atol=1e-5)
    merged = create_method("iso_cts").merge_tensor("w", slices_of(taus)).double()
    sigma = torch.linalg.svdvals(merged)
    torch.testing.assert_close(sigma, torch.full_like(sigma, float(sigma.mean())), rtol=1e-4, atol=1e-5)


# -- opcm ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.2, 0.9])
def test_opcm_every_prefix_matches_the_reference_loop(alpha):
    base, finetuned = tiny_models(9, 5)
    taus = task_vectors(base, finetuned)
    expected = opcm_oracle(taus, alpha, linear_but_not_embedding)
    perturbed = svd_spread(opcm_oracle, taus, alpha, linear_but_not_embedding)
    merger = magmax.Merger("opcm", base, alpha=alpha)
    for t, ft in enumerate(finetuned):
        merger.add(ft)
        got = merger.task_vector()
        for key in got:
            close_to_oracle(got[key], expected[t][key], [p[t][key] for p in perturbed])


def test_opcm_streaming_equals_batch_on_every_prefix_bit_for_bit():
    base, finetuned = tiny_models(10, 5)
    merger = magmax.Merger("opcm", base)
    for t, ft in enumerate(finetuned, start=1):
        merger.add(ft)
        batch = magmax.merge("opcm", base, finetuned[:t])
        streamed = merger.merged()
        assert all(torch.equal(batch[k], streamed[k]) for k in base), t


def test_opcm_single_task_is_the_task_vector():
    base, finetuned = tiny_models(11, 1)
    (tau,) = task_vectors(base, finetuned)
    got = merged_tau("opcm", base, finetuned)
    assert all(torch.equal(got[k], tau[k]) for k in tau)


@FAST
@given(seed=st.integers(0, 2**16), tasks=st.integers(1, 5))
def test_opcm_merged_norm_is_the_mean_task_norm(seed, tasks):
    base, finetuned = tiny_models(seed, tasks)
    taus = task_vectors(base, finetuned)
    got = merged_tau("opcm", base, finetuned)

    def norm(tv: dict[str, Tensor]) -> float:
        return math.sqrt(sum(float(v.double().square().sum()) for v in tv.values()))

    assert norm(got) == pytest.approx(sum(norm(tv) for tv in taus) / tasks, rel=1e-5)


@FAST
@given(seed=st.integers(0, 2**16), alpha=st.floats(0.0, 0.95))
def test_opcm_second_task_is_orthogonal_to_the_protected_directions(seed, alpha):
    first, second = random_matrices(seed, 2, 9, 6)
    method = create_method("opcm", alpha=alpha)
    state = method.fold("w", slices_of([first, second]))
    cleaned = (state[0] - first).double()  # S_2 − S_1 = τ̃_2
    u, _, vh = torch.linalg.svd(first.double(), full_matrices=False)
    k = split_rank(torch.linalg.svdvals(first), alpha)  # same float32 threshold test as the kernel
    projected = u.T @ cleaned @ vh.T
    scale = float(second.abs().max())
    # The kernel projects in the basis of its float32 SVD of τ_1, which a pair of close singular values
    # turns from the exact basis by ~η·σ₁/gap (η: that SVD's backward error; a draw with gap 1e-3·σ₁, 1 in
    # 3000, gave 1.3 × the old fixed 1e-4·scale). What backward errors of that size do to these
    # coordinates is measured on the float64 oracle (SVD_SAFETY × its spread, as in `close_to_oracle`), on
    # top of the float32 floor of 1e-4·scale.
    in_basis = lambda m: u.T @ m @ vh.T  # noqa: E731 - coordinates in τ_1's exact singular basis
    eta = float32_svd_backward_error(first)  # the SVD the kernel takes: of S_1 = τ_1
    spread = spread_in(svd_spread(opcm_step_oracle, first, second, k, backward=eta),
                       opcm_step_oracle(first, second, k), in_basis)
    assume(spread < SPREAD_CEILING * scale)  # so ill-conditioned that the check would test nothing
    allowed = 1e-4 * scale + SVD_SAFETY * spread
    assert float(projected.diagonal().abs().max()) < allowed
    if k:
        assert float(projected[:k, :k].abs().max()) < allowed
    # Everything else of τ_2 is kept.
    off = torch.ones_like(projected, dtype=torch.bool)
    off[:k, :k] = False
    off.fill_diagonal_(False)
    original = u.T @ second.double() @ vh.T
    torch.testing.assert_close(projected[off], original[off], rtol=1e-4, atol=allowed)


def test_opcm_embeddings_and_non_matrices_are_added_without_projection():
    base, finetuned = tiny_models(12, 3)
    taus = task_vectors(base, finetuned)
    method = create_method("opcm")
    for key in ("embeddings.position_embedding.weight", "stem.conv.weight", "blocks.0.fc1.bias"):
        state = method.fold(key, TaskSlices.from_list(key, [tv[key] for tv in taus]))
        assert torch.equal(state[0], sum(tv[key] for tv in taus)), key
    projected = create_method("opcm", exclude=()).fold(
        "embeddings.position_embedding.weight",
        TaskSlices.from_list("e", [tv["embeddings.position_embedding.weight"] for tv in taus]),
    )
    assert not torch.equal(projected[0], sum(tv["embeddings.position_embedding.weight"] for tv in taus))


def test_opcm_batch_merge_of_models_in_memory_folds_each_tensor_once(monkeypatch):
    """In memory, the statistics pass keeps each tensor's S for merge_tensor (T − 1 SVDs per matrix, not
    2(T − 1)); out of core the fold runs again. The same bits either way."""
    from magmax.engine import DictReader, DictWriter, MergeRun
    from magmax.merging import opcm as opcm_module

    base, finetuned = tiny_models(6, 4)
    folds: list[str] = []
    original = opcm_module.OPCM.fold
    monkeypatch.setattr(opcm_module.OPCM, "fold", lambda self, key, slices: folds.append(key) or original(self, key, slices))
    in_memory = magmax.merge("opcm", base, finetuned)
    keys = [k for k, v in base.items() if v.is_floating_point()]
    assert sorted(folds) == sorted(keys)

    class FromDisk:  # a reader the engine does not know to be in memory: its slices are not resident
        def __init__(self, state, name):
            self._reader = DictReader(state, name)
            self.name = name
            self.keys, self.meta, self.get = self._reader.keys, self._reader.meta, self._reader.get

    folds.clear()
    writer = DictWriter()
    run = MergeRun(create_method("opcm"), FromDisk(base, "base"), [FromDisk(ft, f"ft{i}") for i, ft in enumerate(finetuned)])
    run.run(writer)
    assert sorted(folds) == sorted(keys + keys)
    for key, value in in_memory.items():
        assert torch.equal(writer.state[key], value), key


def test_an_svd_that_does_not_converge_in_float32_is_taken_in_float64(monkeypatch):
    """LAPACK's float32 SVD can fail on nearly rank-deficient inputs (seen on Iso-CTS with repeated task
    vectors); the subspace methods then use the float64 SVD instead of stopping the merge."""
    from magmax.merging import _subspace

    real_svd = torch.linalg.svd
    failed: list[torch.dtype] = []

    def float32_fails(a, full_matrices=True):
        if a.dtype == torch.float32:
            failed.append(a.dtype)
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(a, full_matrices=full_matrices)

    matrix = random_matrices(7, 1, 9, 6)[0]
    u64, s64, vh64 = real_svd(matrix.double(), full_matrices=False)
    monkeypatch.setattr(torch.linalg, "svd", float32_fails)
    u, s, vh = _subspace.thin_svd(matrix)
    assert failed and u.dtype == s.dtype == vh.dtype == torch.float32
    assert torch.equal(u, u64.float()) and torch.equal(s, s64.float()) and torch.equal(vh, vh64.float())
    base, finetuned = tiny_models(8, 3)
    merged = magmax.merge("iso_cts", base, finetuned)
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
