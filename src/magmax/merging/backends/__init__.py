"""The fast paths of the merging methods, behind one interface.

* :mod:`.registry`: what each backend accelerates, registered by method name;
* :mod:`.select`: the one place that picks a backend by device, dtype and size (and the compile policy);
* :mod:`.fold`: runs a method's group kernel (numba, Triton, torch compiled or eager);
* :mod:`.cpu` (numba), :mod:`.gpu` (Triton), :mod:`.torch_kernels` (eager torch with the same bits);
* :mod:`.finite`: the NaN/Inf verdicts the fast folds compute in passing.

A method file never imports this package: it tags its reference kernel with its name
(:func:`magmax.merging.fold.reference`) or asks :func:`magmax.merging.fold.accelerated` for a hook.
Importing this package registers every backend.
"""

from __future__ import annotations

from magmax.merging.backends import cpu, gpu, registry, torch_kernels
from magmax.merging.backends.cpu import breadcrumbs, consensus, ties  # noqa: F401  (register their hooks)
from magmax.merging.backends.gpu import ties as gpu_ties  # noqa: F401  (registers its hooks)
from magmax.merging.backends.registry import register_fold

register_fold("magmax", eager=torch_kernels.magmax_bits)

__all__ = ["cpu", "gpu", "registry"]
