"""Merging runs of tensors as one flat tensor (the engine's GPU path) equals merging tensor by tensor."""

from __future__ import annotations

import pytest
import torch

from helpers import SHAPES, assert_state_dicts_bitwise_equal, make_finetuned, make_state_dict
from magmax.engine import DictReader, DictWriter, MergeRun
from magmax.errors import MergeInputError
from magmax.merging import create_method


def run(method, base, fts, *, bucketed, **options):
    writer = DictWriter()
    merge = MergeRun(create_method(method, **options), DictReader(base), [DictReader(f) for f in fts], bucketed=bucketed)
    merge.run(writer)
    return writer.state, merge


def mixed_model(seed):
    """Float32 and bf16 tensors and integer buffers interleaved (buckets break at dtype and buffer changes)."""
    state = make_state_dict(seed, SHAPES)
    state["half.weight"] = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    state["tail.weight"] = torch.randn(9, generator=torch.Generator().manual_seed(seed + 1))
    return state


@pytest.mark.parametrize("bucket_numel", [1 << 26, 64])
@pytest.mark.parametrize(
    "method,options",
    [("magmax", {}), ("average", {}), ("task_arithmetic", {}), ("random", {"seed": 4}), ("ties", {}), ("ties", {"k": 0.5})],
)
def test_bucketed_merge_equals_per_tensor_merge(method, options, bucket_numel, monkeypatch):
    monkeypatch.setattr("magmax.engine.BUCKET_NUMEL", bucket_numel)
    base = mixed_model(0)
    fts = make_finetuned(base, 10, seed=1, quantum=0.125)
    want, _ = run(method, base, fts, bucketed=False, **options)
    got, merge = run(method, base, fts, bucketed=True, **options)
    assert any(len(unit.keys) > 1 for unit in merge.plan), "no bucket was formed"
    assert_state_dicts_bitwise_equal(got, want)
    assert all(a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
               for a in got.values() for b in got.values() if a is not b and a.numel() and b.numel())


def test_buckets_hold_consecutive_float_tensors_of_one_dtype():
    base = mixed_model(0)
    _, merge = run("magmax", base, make_finetuned(base, 2, seed=1), bucketed=True)
    keys = [k for unit in merge.plan for k in unit.keys]
    assert keys == list(base)
    for unit in merge.plan:
        assert len({base[k].dtype for k in unit.keys}) == 1
        assert unit.merged == base[unit.keys[0]].dtype.is_floating_point


def test_methods_that_depend_on_the_tensor_are_never_bucketed():
    # random depends on the tensor (its name seeds the draws) but merges runs tensor by tensor
    # (merge_tensors), so it is bucketed: covered above.
    base = mixed_model(0)
    for method, options in [("ties", {"threshold": "per_tensor"}), ("tsv", {}), ("dare", {})]:
        _, merge = run(method, base, make_finetuned(base, 2, seed=1), bucketed=True, **options)
        assert all(len(unit.keys) == 1 for unit in merge.plan), method


def test_nan_in_a_bucket_names_the_tensor():
    base = mixed_model(0)
    fts = make_finetuned(base, 2, seed=1)
    fts[1]["layer.bias"][3] = float("nan")
    with pytest.raises(MergeInputError, match="'layer.bias'"):
        run("magmax", base, fts, bucketed=True)
