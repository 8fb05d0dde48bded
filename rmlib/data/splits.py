"""Seeded, disjoint train / held-out splits of a pair dataset."""

from __future__ import annotations

import numpy as np


def train_eval_split(dataset, n_train: int | None, n_eval: int | None, seed: int = 0):
    """Shuffle with ``seed`` and take ``n_eval`` held-out pairs, then ``n_train`` training pairs.

    ``None`` means "all that is left". The two parts never share a row. Raises ValueError
    naming both numbers when the dataset is too small.
    Not ``Dataset.train_test_split``: same indices, but it refuses ``n_eval=0`` (``--n_eval 0``, notebook 04).
    """
    n = len(dataset)
    n_eval = n_eval if n_eval is not None else 0
    if n_eval < 0 or (n_train is not None and n_train < 1):
        raise ValueError(f"n_train={n_train} must be >= 1 and n_eval={n_eval} >= 0")
    n_train = n_train if n_train is not None else n - n_eval
    if n_train + n_eval > n:
        raise ValueError(f"n_train={n_train} + n_eval={n_eval} exceeds the {n} pairs available")
    order = np.random.default_rng(seed).permutation(n)
    return dataset.select(order[n_eval : n_eval + n_train].tolist()), dataset.select(order[:n_eval].tolist())
