"""GPU backend: Triton kernels (:mod:`.kernels`) over many tensors per launch (:mod:`.triton`), and TIES
with the global threshold on models in GPU memory (:mod:`.ties`)."""

from __future__ import annotations

from magmax.merging.backends.registry import register_fold

register_fold("magmax", gpu="magmax")
register_fold("task_arithmetic", gpu="sum")
register_fold("random", gpu="random")
