"""Paired statistics of two runs scored on the same items: pure functions on per-item 0/1 vectors
(or on integer per-item differences, e.g. summed over seeds).

Everything here is exact or seeded integer arithmetic, so the numbers are the same on every CPU:
resampled accuracies are integer counts (exact sums) divided once by n (one correctly rounded
division), averages over tasks are elementwise additions in a fixed task order (no vectorised
reduction over floats), and percentiles are order statistics of the sorted resamples (no
interpolation). The McNemar p-value is an exact binomial tail in integers, divided once.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
CONFIDENCE = 0.95


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired vectors must be 1-D and of equal length, got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired vectors are empty")
    for v in (a, b):
        if not np.isin(v, (0, 1)).all():
            raise ValueError("per-item outcomes must be 0 or 1")
    return a.astype(np.int64), b.astype(np.int64)


def discordant(a, b) -> tuple[int, int]:
    """(b, c) of McNemar's table: items only ``a`` got right, items only ``b`` got right."""
    a, b = _pair(a, b)
    return int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())


def mcnemar_exact(n_a_only: int, n_b_only: int) -> float:
    """Two-sided exact McNemar p-value: the binomial(b + c, 1/2) test on the discordant pairs,
    ``min(1, 2 * P(X <= min(b, c)))``. No discordant pair gives 1."""
    if n_a_only < 0 or n_b_only < 0 or int(n_a_only) != n_a_only or int(n_b_only) != n_b_only:
        raise ValueError(f"discordant counts must be non-negative integers, got {n_a_only}, {n_b_only}")
    n = int(n_a_only) + int(n_b_only)
    k = min(int(n_a_only), int(n_b_only))
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int: one correctly rounded division


def _interval(sorted_diffs: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval as order statistics (no interpolation)."""
    r = sorted_diffs.size
    alpha = (1 - confidence) / 2
    lo = int(math.floor(alpha * r))
    hi = min(r - 1, int(math.ceil((1 - alpha) * r)) - 1)
    return float(sorted_diffs[lo]), float(sorted_diffs[hi])


def _resampled_counts(d: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Per resample, the sum of ``d`` over n items drawn with replacement (exact integers)."""
    n = d.size
    out = np.empty(resamples, dtype=np.int64)
    step = max(1, 2_000_000 // n)  # bounded memory: at most ~2M indices at once
    for start in range(0, resamples, step):
        m = min(step, resamples - start)
        idx = rng.integers(0, n, size=(m, n))
        out[start:start + m] = d[idx].sum(axis=1)
    return out


def paired_bootstrap(a, b, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                     confidence: float = CONFIDENCE) -> dict:
    """Accuracy difference ``mean(b) - mean(a)`` with a paired percentile bootstrap interval.

    Items are resampled with replacement (the same items for both runs), ``resamples`` times with
    ``numpy.random.default_rng(seed)``. Returns ``{"diff", "lo", "hi", "n", "resamples", "seed"}``.
    """
    return paired_bootstrap_tasks({"": (a, b)}, resamples=resamples, seed=seed, confidence=confidence)


def paired_bootstrap_tasks(pairs: Mapping[str, tuple[Sequence[int], Sequence[int]]], *,
                           resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                           confidence: float = CONFIDENCE) -> dict:
    """Difference of the unweighted average over tasks of accuracy, ``avg_t mean(b_t) - mean(a_t)``,
    with a paired bootstrap that resamples items within each task (each task keeps its n).

    ``pairs``: task -> (a, b) 0/1 vectors of the same items. Tasks are drawn in the given order
    from one ``default_rng(seed)``. Returns ``{"diff", "lo", "hi", "n", "resamples", "seed"}``
    (``n``: items over all tasks).
    """
    if not pairs:
        raise ValueError("no tasks to compare")
    diffs = {}
    for task, (a, b) in pairs.items():
        a, b = _pair(a, b)
        diffs[task] = b - a
    return paired_bootstrap_differences(diffs, resamples=resamples, seed=seed, confidence=confidence)


def paired_bootstrap_differences(diffs: Mapping[str, Sequence[int]], *, scale: int = 1,
                                 resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                                 confidence: float = CONFIDENCE) -> dict:
    """``paired_bootstrap_tasks`` on per-item differences already taken: task -> integer vector
    whose items are ``scale`` times the difference. ``scale`` keeps fractional differences exact,
    e.g. the sum over S seeds of ``b - a`` with ``scale=S`` is the per-item mean over the seeds."""
    if not diffs:
        raise ValueError("no tasks to compare")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples, dtype=np.float64)
    diff = 0.0
    n_items = 0
    for task, d in diffs.items():  # fixed order: elementwise float adds only
        d = np.asarray(d)
        if d.ndim != 1 or d.size == 0:
            raise ValueError(f"{task}: differences must be a non-empty 1-D vector, got shape {d.shape}")
        if not np.issubdtype(d.dtype, np.integer) and not np.array_equal(d, np.round(d)):
            raise ValueError(f"{task}: differences must be integers (scaled by `scale`)")
        d = d.astype(np.int64)
        denom = d.size * int(scale)
        diff = diff + int(d.sum()) / denom
        total = total + _resampled_counts(d, resamples, rng) / denom
        n_items += d.size
    t = len(diffs)
    diff = diff / t
    total = np.sort(total / t)
    lo, hi = _interval(total, confidence)
    return {"diff": diff, "lo": lo, "hi": hi, "n": n_items, "resamples": int(resamples), "seed": int(seed)}


def paired_summary(a, b, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict:
    """Bootstrap difference and interval plus the exact McNemar test of one task's items."""
    out = paired_bootstrap(a, b, resamples=resamples, seed=seed)
    n_a_only, n_b_only = discordant(a, b)
    a_, b_ = _pair(a, b)
    out.update(acc_a=int(a_.sum()) / a_.size, acc_b=int(b_.sum()) / b_.size,
               a_only=n_a_only, b_only=n_b_only, p_mcnemar=mcnemar_exact(n_a_only, n_b_only))
    return out


__all__ = ["paired_bootstrap", "paired_bootstrap_tasks", "paired_bootstrap_differences", "mcnemar_exact", "discordant", "paired_summary",
           "DEFAULT_RESAMPLES", "DEFAULT_SEED"]
