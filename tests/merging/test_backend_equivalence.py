"""Every accelerated form a backend registers against its method's reference kernel, bit for bit.

The reference kernels are the plain-torch folds in the method files (tagged with
``magmax.merging.fold.reference``); the registry (``magmax.merging.backends.registry``) says what each
backend accelerates. Whole-merge equivalence of the hooks (TIES, Consensus, Breadcrumbs) with their
reference code: the native-off vs native-on merges below.
"""

from __future__ import annotations

import pytest
import torch
from helpers import SHAPES, assert_state_dicts_bitwise_equal, bitwise_equal, make_finetuned, make_state_dict
from hypothesis import given, settings
from hypothesis import strategies as st

import magmax
from magmax.merging import fold
from magmax.merging.backends import registry
from magmax.merging.backends.cpu import native
from magmax.merging.dare import Dare
from magmax.merging.magmax import magmax_kernel
from magmax.merging.random import RandomMix, random_kernel
from magmax.merging.task_arithmetic import sum_kernel

REFERENCES = {"magmax": magmax_kernel, "task_arithmetic": sum_kernel, "random": random_kernel,
              "dare": __import__("magmax.merging.dare", fromlist=["dare_kernel"]).dare_kernel}
VALUES = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.5, -2.5, 1e-30, -1e-30, 1e-40, -1e-40, 3.0e38, -3.0e38]


def _params(method: str):
    if method == "random":
        return RandomMix(RandomMix.Options(seed=5))._params("w")
    if method == "dare":
        return Dare(Dare.Options(p=0.3, seed=5))._params("w")
    return None


def _run_reference(kernel, inputs, base, params):
    """The reference kernel itself, over the whole tensor at once (no backend in the way)."""
    count = len(inputs)
    state = torch.empty(inputs[0].numel(), dtype=torch.float32)
    for start in range(0, count, fold.GROUP):
        stop = min(start + fold.GROUP, count)
        rows = params(start, stop - start, count) if params is not None else None
        kernel(state, base, inputs[start:stop], fold.Step(start == 0, stop == count, rows, 0), fold.Workspace(state))
    return state


def test_every_fold_method_has_a_tagged_reference_kernel():
    for method, kernel in REFERENCES.items():
        assert kernel.method == method
    assert set(registry.registered()) >= set(REFERENCES) | {"ties", "consensus", "breadcrumbs"}


@settings(max_examples=25, deadline=None)
@given(values=st.lists(st.sampled_from(VALUES), min_size=1, max_size=80), count=st.integers(1, 11),
       with_base=st.booleans(), method=st.sampled_from(sorted(REFERENCES)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_accelerated_folds_equal_the_reference_kernel(values, count, with_base, method, dtype):
    """Property: on values full of ties, signed zeros and subnormals, each registered form (numba CPU
    group, eager torch form) gives exactly the reference kernel's bits."""
    n = max(1, len(values) // count)
    pool = torch.tensor((values * count)[: n * count] + [0.0] * max(0, n * count - len(values) * count))
    inputs = [pool[t * n:(t + 1) * n].to(dtype) for t in range(count)]
    base = torch.tensor((values[::-1] * n)[:n]).to(dtype) if with_base else None
    if base is None and dtype != torch.float32:
        inputs = [x.float() for x in inputs]
    params = _params(method)
    want = _run_reference(REFERENCES[method], inputs, base, params)
    forms = registry.fold_kernels(method)
    if forms.eager is not None:
        got = _run_reference(forms.eager, inputs, base, params)
        assert bitwise_equal(got, want), "eager form"
    if forms.cpu is not None and native.enabled() and native.accepts(want, base, inputs, fold.GROUP):
        got = torch.empty_like(want)
        for start in range(0, count, fold.GROUP):
            stop = min(start + fold.GROUP, count)
            rows = params(start, stop - start, count).to(got.device) if params is not None else None
            done = forms.cpu(got, base, inputs[start:stop], start == 0, stop == count, rows, fold.GROUP)
            assert done
        assert bitwise_equal(got, want), "numba form"


@pytest.mark.skipif(not native.enabled(), reason="numba kernels are off here (MAGMAX_NATIVE=0 or no numba)")
@pytest.mark.parametrize("method", ["magmax", "average", "task_arithmetic", "random", "dare", "consensus",
                                    "breadcrumbs", "ties"])
@pytest.mark.parametrize("count", [2, 9])
def test_merge_with_backends_equals_merge_with_reference_code(method, count, monkeypatch):
    """Whole merges, every backend on against every backend off (the method files' reference code)."""
    base = make_state_dict(21, SHAPES)
    fts = make_finetuned(base, count, seed=22)
    monkeypatch.setenv("MAGMAX_NATIVE", "0")
    want = magmax.merge(method, base, fts)
    monkeypatch.setenv("MAGMAX_NATIVE", "1")
    got = magmax.merge(method, base, fts)
    if method == "ties":  # sums in task order vs the reference's: equal values (a zero's sign may differ)
        for key, value in want.items():
            assert torch.equal(got[key], value), key
    else:
        assert_state_dicts_bitwise_equal(got, want)
