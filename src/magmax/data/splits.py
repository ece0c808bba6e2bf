"""Seeded train/test splits for datasets that ship without an official one (WordNet, ImageNet-R)."""

from __future__ import annotations

import numpy as np


def random_split(n: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly random split of ``range(n)``: the first ``int(train_fraction·n)`` positions of a
    seeded permutation train, the rest test (the shape of torch's ``random_split`` in the MagMax
    reference, which left its generator unseeded). Both index arrays are returned sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(train_fraction * n)
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class c with n_c samples, ``round(test_fraction·n_c)`` of them (at least one when n_c ≥ 2,
    never all) go to test, chosen by a generator seeded with (seed, c): a class's split does not
    depend on which other classes are present. Returns sorted train and test indices."""
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        perm = np.random.default_rng([seed, int(c)]).permutation(idx)
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(train)) if train else empty,
        np.sort(np.concatenate(test)) if test else empty,
    )
