"""The Python API (magmax.merge, magmax.Merger): what it returns, and one-line errors for every input a
user can get wrong."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    SMALL_SHAPES,
    assert_state_dicts_bitwise_equal,
    make_finetuned,
    make_state_dict,
    needs_native,
    task_vectors,
)

import magmax
from magmax.engine import DictReader, DictWriter, MergeRun
from magmax.errors import ConfigError, MagmaxError, MergeInputError
from magmax.merging import create_method


@pytest.fixture
def models():
    base = make_state_dict(0)
    return base, make_finetuned(base, 3, seed=1)


def assert_one_line(exc: BaseException, *needles: str) -> None:
    message = str(exc)
    assert isinstance(exc, MagmaxError)
    assert "\n" not in message and message.strip() == message and message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# -- what the API returns --------------------------------------------------------------------------------


def test_merge_returns_every_base_key_in_order_with_base_dtypes(models):
    base, finetuned = models
    merged = magmax.merge("magmax", base, finetuned)
    assert list(merged) == list(base)
    for key, value in base.items():
        assert merged[key].dtype == value.dtype and merged[key].shape == value.shape
        assert merged[key].device.type == "cpu"


def test_merge_leaves_its_inputs_untouched(models):
    base, finetuned = models
    before = [{k: v.clone() for k, v in sd.items()} for sd in [base, *finetuned]]
    for name in ("magmax", "average", "task_arithmetic", "random"):
        merged = magmax.merge(name, base, finetuned)
        for key in base:
            if base[key].numel():
                assert merged[key].data_ptr() != base[key].data_ptr()  # a new tensor, never an alias
    for kept, now in zip(before, [base, *finetuned]):
        assert_state_dicts_bitwise_equal(now, kept)


def test_scale_option_and_default_scale(models):
    base, finetuned = models
    assert create_method("magmax").scale == 0.5
    assert create_method("magmax", scale=2.0).scale == 2.0
    tau = magmax.Merger("magmax", base)
    for ft in finetuned:
        tau.add(ft)
    star = tau.task_vector()
    for scale in (None, 0.0, 1.0, 2.0):
        options = {} if scale is None else {"scale": scale}
        merged = magmax.merge("magmax", base, finetuned, **options)
        lam = 0.5 if scale is None else scale
        for key, value in star.items():
            assert torch.equal(merged[key], base[key].add(value, alpha=lam))
    assert_state_dicts_bitwise_equal(magmax.merge("magmax", base, finetuned, scale=0.0), base)


def test_merger_scale_override_and_task_vector_keys(models):
    base, finetuned = models
    merger = magmax.Merger("average", base)
    assert merger.scale == 1.0
    for ft in finetuned:
        merger.add(ft)
    assert merger.count == 3
    assert set(merger.task_vector()) == {k for k, v in base.items() if v.dtype.is_floating_point}
    assert_state_dicts_bitwise_equal(merger.merged(scale=0.0), base)
    assert_state_dicts_bitwise_equal(merger.merged(), magmax.merge("average", base, finetuned))


def test_merger_add_task_vector_equals_add(models):
    base, finetuned = models
    by_model, by_vector = magmax.Merger("magmax", base), magmax.Merger("magmax", base)
    for ft, tau in zip(finetuned, task_vectors(base, finetuned)):
        by_model.add(ft)
        by_vector.add_task_vector(tau)
    assert_state_dicts_bitwise_equal(by_model.merged(), by_vector.merged())


def test_a_method_instance_can_be_passed_but_not_with_options(models):
    base, finetuned = models
    method = create_method("random", seed=5)
    assert_state_dicts_bitwise_equal(magmax.merge(method, base, finetuned), magmax.merge("random", base, finetuned, seed=5))
    with pytest.raises(TypeError):
        magmax.merge(method, base, finetuned, seed=6)


def test_merge_is_the_engine_over_dict_readers(models):
    base, finetuned = models
    writer = DictWriter()
    stats = MergeRun(create_method("magmax"), DictReader(base), [DictReader(ft) for ft in finetuned]).run(writer)
    assert_state_dicts_bitwise_equal(writer.state, magmax.merge("magmax", base, finetuned))
    float_keys = [k for k, v in base.items() if v.dtype.is_floating_point]
    assert stats.tensors == len(base)
    assert stats.parameters == sum(v.numel() for v in base.values())
    assert stats.merged_parameters == sum(base[k].numel() for k in float_keys)


@pytest.mark.parametrize("bucketed", [False, True])
def test_merged_tensors_go_to_the_output_device_each_with_its_own_storage(models, bucketed):
    """Where the base's tensors are by default (a GPU model gives a GPU model; tests/test_cuda.py), else
    where asked: here the meta device, which only this plumbing can have put them on."""
    base, finetuned = models
    assert all(v.device.type == "cpu" for v in magmax.merge("magmax", base, finetuned).values())
    writer = DictWriter()
    MergeRun(create_method("magmax"), DictReader(base), [DictReader(f) for f in finetuned], bucketed=bucketed,
             output_device="meta").run(writer)
    assert list(writer.state) == list(base)
    assert all(v.device.type == "meta" for v in writer.state.values())
    merged = magmax.merge("magmax", base, finetuned, output_device="meta")
    assert {k: (v.device.type, v.dtype, v.shape) for k, v in merged.items()} == {
        k: ("meta", v.dtype, v.shape) for k, v in base.items()}


def test_output_dtype_argument(models):
    base, finetuned = models
    merged = magmax.merge("magmax", base, finetuned, dtype=torch.bfloat16)
    for key, value in base.items():
        want = torch.bfloat16 if value.dtype.is_floating_point else value.dtype
        assert merged[key].dtype == want


def test_registry_lists_the_core_methods_with_their_references():
    methods = magmax.registry()
    for name in ("magmax", "average", "task_arithmetic", "random"):
        cls = methods[name]
        assert cls.name == name and cls.summary and cls.reference and cls.foldable


# -- errors: one line, naming what is wrong ------------------------------------------------------------


def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


def _with(sd, key, value):
    return {**sd, key: value}


def _poisoned(sd, key, value):
    tensor = sd[key].clone()
    tensor.view(-1)[0] = value
    return _with(sd, key, tensor)


BAD_FINETUNED = {
    "missing tensor": (lambda ft: _without(ft, "layer.bias"), ["fine-tuned model 2", "layer.bias", "missing"]),
    "extra tensor": (lambda ft: _with(ft, "head.weight", torch.zeros(2)), ["fine-tuned model 2", "head.weight"]),
    "shape": (lambda ft: _with(ft, "layer.weight", torch.zeros(5, 7)), ["layer.weight", "[5, 7]", "[7, 5]"]),
    "dtype": (lambda ft: _with(ft, "layer.weight", ft["layer.weight"].double()), ["layer.weight", "torch.float64"]),
    "nan": (lambda ft: _poisoned(ft, "conv.weight", float("nan")), ["fine-tuned model 2", "conv.weight", "NaN"]),
    "inf": (lambda ft: _poisoned(ft, "logit_scale", float("-inf")), ["fine-tuned model 2", "logit_scale", "Inf"]),
}


@pytest.mark.parametrize("problem", list(BAD_FINETUNED))
def test_merge_rejects_a_bad_finetuned_model_in_one_line(models, problem):
    base, finetuned = models
    spoil, needles = BAD_FINETUNED[problem]
    bad = [finetuned[0], spoil(finetuned[1]), finetuned[2]]
    with pytest.raises(MergeInputError) as info:
        magmax.merge("magmax", base, bad)
    assert_one_line(info.value, *needles)


@pytest.mark.parametrize("problem", list(BAD_FINETUNED))
def test_merger_add_rejects_a_bad_finetuned_model_in_one_line(models, problem):
    base, finetuned = models
    spoil, needles = BAD_FINETUNED[problem]
    merger = magmax.Merger("average", base)
    merger.add(finetuned[0])
    with pytest.raises(MergeInputError) as info:
        merger.add(spoil(finetuned[1]))
    assert_one_line(info.value, *needles)
    # the refused model left no trace: the merger goes on as if it had never been offered
    merger.add(finetuned[2])
    assert_state_dicts_bitwise_equal(merger.merged(), magmax.merge("average", base, [finetuned[0], finetuned[2]]))


def test_nan_in_the_base_is_refused(models):
    base, finetuned = models
    with pytest.raises(MergeInputError) as info:
        magmax.merge("average", _poisoned(base, "layer.weight", float("nan")), finetuned)
    assert_one_line(info.value, "base", "layer.weight", "NaN")


def test_half_precision_nan_is_refused_and_large_finite_values_are_not():
    base = make_state_dict(2, SMALL_SHAPES, torch.float16)
    big = {k: (v.abs() * 0 + 60000).to(v.dtype) if v.dtype.is_floating_point else v for k, v in base.items()}
    magmax.merge("magmax", big, [big, big])  # sums past fp16's range must not look like Inf
    with pytest.raises(MergeInputError) as info:
        magmax.merge("magmax", big, [big, _poisoned(big, "conv.weight", float("nan"))])
    assert_one_line(info.value, "conv.weight")


def test_zero_models_is_an_error():
    base = make_state_dict(3)
    with pytest.raises(MergeInputError) as info:
        magmax.merge("magmax", base, [])
    assert_one_line(info.value, "fine-tuned")
    with pytest.raises(MergeInputError) as info:
        magmax.Merger("magmax", base).merged()
    assert_one_line(info.value, "add")


def test_unknown_method_is_a_config_error_listing_the_known_ones(models):
    base, finetuned = models
    with pytest.raises(ConfigError) as info:
        magmax.merge("magmix", base, finetuned)
    assert_one_line(info.value, "magmix", "magmax", "average")
    with pytest.raises(ConfigError):
        magmax.Merger("magmix", base)


@pytest.mark.parametrize(
    ("method", "options", "needles"),
    [
        ("magmax", {"sharpness": 2}, ["sharpness", "scale"]),
        ("random", {"seed": "abc"}, ["seed"]),
        ("magmax", {"scale": "big"}, ["scale"]),
    ],
)
def test_bad_options_are_config_errors_naming_the_option(models, method, options, needles):
    base, finetuned = models
    with pytest.raises(ConfigError) as info:
        magmax.merge(method, base, finetuned, **options)
    assert_one_line(info.value, method, *needles)


@pytest.mark.parametrize("method", ["magmax", "average", "task_arithmetic", "random", "ties"])
@pytest.mark.parametrize("count,bad,value", [(3, 2, float("nan")), (11, 9, float("inf")), (11, 0, float("-inf")),
                                             (2, -1, float("nan"))])
def test_nan_found_in_passing_by_the_native_folds_is_refused_with_its_name(method, count, bad, value):
    """In-memory merges by one-pass methods (and TIES, whose thresholds' pass reads every τ) skip the
    separate NaN/Inf pass when the native kernels vouch for every input: a poisoned entry anywhere (any
    task, past the first group of 8, or θ0) still stops the merge with the model and tensor named."""
    base = make_state_dict(3, SMALL_SHAPES)
    fts = make_finetuned(base, count, seed=4)
    key = "conv.weight"
    if bad < 0:
        base = _poisoned(base, key, value)
        needles = ["base", key]
    else:
        fts[bad] = _poisoned(fts[bad], key, value)
        needles = [f"fine-tuned model {bad + 1}", key]
    with pytest.raises(MergeInputError) as info:
        magmax.merge(method, base, fts)
    assert_one_line(info.value, *needles)


def test_a_task_vector_that_overflows_is_not_mistaken_for_a_nan_input():
    # θ_t − θ0 = 3e38 − (−3e38) overflows to Inf although every input is finite: the folds cannot vouch
    # for the inputs, the explicit check runs and finds nothing wrong, the merge goes on as before.
    base = {"w": torch.full((100,), -3e38)}
    fts = [{"w": torch.full((100,), 3e38)}, {"w": torch.full((100,), -3e38)}]
    merged = magmax.merge("magmax", base, fts)
    assert torch.isinf(merged["w"]).all()


@needs_native
@pytest.mark.parametrize("method", ["magmax", "average", "task_arithmetic", "random"])
@pytest.mark.parametrize("count,explicit", [(3, False), (11, False), (1, True)])
def test_the_separate_nan_pass_is_skipped_only_when_the_folds_vouch_for_every_input(method, count, explicit,
                                                                                   monkeypatch):
    from magmax import engine

    calls = []
    real = engine.check_finite
    monkeypatch.setattr(engine, "check_finite", lambda *a: calls.append(a[0]) or real(*a))
    base = make_state_dict(5, SMALL_SHAPES)
    fts = make_finetuned(base, count, seed=6)
    magmax.merge(method, base, fts)
    # T = 1 is τ_1 itself (formed by torch, not by a fold that checks): the explicit pass runs.
    assert bool(calls) == explicit
    calls.clear()
    magmax.merge("ties", base, fts)  # its thresholds' count-and-gather pass vouches for every input
    assert not calls
    magmax.merge("ties", base, fts, threshold="per_tensor")  # torch's fold: checked on loading, as before
    assert calls
