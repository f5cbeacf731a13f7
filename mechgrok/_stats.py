"""Small statistics shared by the analyses: average ranks and the rank-sum AUROC."""

from __future__ import annotations

import numpy as np

__all__ = ["average_ranks", "auroc"]


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D ``x``, ties given their average rank (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    new = np.r_[True, np.diff(x[order]) != 0] if len(x) else np.zeros(0, bool)  # first of each tie group
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(new) - 1]
    return ranks


def auroc(pos, neg) -> float | None:
    """P(a random positive scores above a random negative), ties counted half (Mann-Whitney U);
    None when either side is empty.

    >>> auroc([3, 4], [1, 2]), auroc([1], [1])
    (1.0, 0.5)
    """
    pos, neg = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    if not len(pos) or not len(neg):
        return None
    ranks = average_ranks(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
