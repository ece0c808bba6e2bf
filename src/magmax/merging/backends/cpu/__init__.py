"""CPU backend: numba kernels (:mod:`.kernels`, driven by :mod:`.native`), the sample-and-bracket
thresholds (:mod:`.threshold`), and the whole-tensor fast paths of TIES, Consensus and Breadcrumbs."""

from __future__ import annotations

from magmax.merging.backends.cpu import native
from magmax.merging.backends.registry import register_fold

register_fold("magmax", cpu=native.magmax_group)
register_fold("task_arithmetic", cpu=native.sum_group)
register_fold("random", cpu=native.random_group)
register_fold("dare", cpu=native.dare_group)
