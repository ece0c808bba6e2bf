"""Linear algebra shared by the subspace methods (TSV-M, Iso-C, Iso-CTS, OPCM) and their common option.

Which tensors count as matrices: ``ndim == 2`` with no empty dimension, and a name that matches none
of the method's ``exclude`` glob patterns (``fnmatch``, case-sensitive). So linear weights and 2-D
embedding tables are matrices (the TSV and Iso references SVD every 2-D tensor, embeddings included);
biases, norm scales, class tokens (1-D) and convolution kernels (4-D: no reference reshapes them)
are not, and each method merges those with its own non-matrix rule.

Every SVD is thin (``full_matrices=False``) and in float32, whatever the storage dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import Tensor

from magmax.merging.base import MethodOptions


class SubspaceOptions(MethodOptions):
    """Options of the methods that treat 2-D tensors as matrices."""

    exclude: tuple[str, ...] = ()
    """Glob patterns (e.g. ``"*embed*"``) of 2-D tensor names to merge with the non-matrix rule."""


def matches_any(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in patterns)


def is_matrix(key: str, tensor: Tensor, exclude: Sequence[str] = ()) -> bool:
    """True for a non-empty 2-D tensor whose name matches none of ``exclude``."""
    return tensor.ndim == 2 and min(tensor.shape) > 0 and not matches_any(key, exclude)


def thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A = U·diag(S)·Vh with U: m×r, S: r, Vh: r×n, r = min(m, n), in float32.

    Where LAPACK's float32 SVD does not converge (it happens on nearly rank-deficient inputs with many
    repeated singular values, such as the concatenated singular vectors of repeated task vectors: seen on
    a 768×768 block of Iso-CTS with ten tasks, four distinct), the float64 SVD, rounded to float32.
    """
    a = matrix.to(torch.float32)
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
        return u.to(torch.float32), s.to(torch.float32), vh.to(torch.float32)


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthonormal factor of A = U·diag(S)·Vh, namely U·Vh.

    It is the matrix with orthonormal columns (or rows, for a wide A) nearest to A in Frobenius norm
    (orthogonal Procrustes). TSV-M and Iso-CTS call this step "orthogonalisation" or "whitening" of
    concatenated singular vectors.
    """
    u, _, vh = thin_svd(matrix)
    return u @ vh


def sum_slices(slices: Sequence[Tensor], first: Tensor | None = None) -> Tensor:
    """Σ_t τ_t, walked in order so only one slice is loaded at a time (slices are never modified).

    ``first``: τ_1 if the caller has already loaded it (each load may be a read from disk).
    """
    total = (slices[0] if first is None else first).to(torch.float32).clone()
    for t in range(1, len(slices)):
        total.add_(slices[t])
    return total


def mean_slices(slices: Sequence[Tensor], first: Tensor | None = None) -> Tensor:
    """(1/T)·Σ_t τ_t."""
    return sum_slices(slices, first).div_(len(slices))
