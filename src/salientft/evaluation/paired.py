"""Paired statistics of two runs scored on the same items: pure functions on per-item 0/1 vectors
(or on integer per-item differences, e.g. summed over seeds).

The paired bootstrap interval is computed **exactly** by default: the distribution of the
resampled difference over *every* possible resample (the limit of infinitely many resamples),
obtained by convolving each task's per-item distribution with itself n times (FFT) and the tasks
with each other. It has no seed, so an interval is the same on every run and its verdict cannot
flip with a bootstrap seed (with 2,000 Monte-Carlo resamples the ends move by 0.1-0.2 point between
seeds, enough to move an end across zero). A single task's ends are exact points of its lattice
(multiples of 1/(n * scale)); an average over tasks with different n is accumulated on a grid of
``GRID`` (0.001 point), so its ends are within 0.001 point of the exact ones. The Monte-Carlo
bootstrap stays available (``resamples=R``, seeded, integer sums, order statistics) to check it.

``verdict`` turns an interval into a word only where it clears zero by more than ``VERDICT_MARGIN``
(0.05 point); an end within that of zero is "borderline". The McNemar p-value is an exact
binomial tail in integers, divided once.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

DEFAULT_RESAMPLES = None  # None: the exact bootstrap distribution; an int: that many Monte-Carlo resamples
DEFAULT_SEED = 0
CONFIDENCE = 0.95
VERDICT_MARGIN = 0.0005  # 0.05 accuracy point: how far an interval must clear zero to carry a verdict
GRID = 1e-5  # step (accuracy units, 0.001 point) of the grid a multi-task average is accumulated on
_TAIL = 1e-15  # probability mass below which a tail of a distribution is dropped


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


def verdict(lo: float, hi: float, margin: float = VERDICT_MARGIN) -> str:
    """The word an interval (accuracy units, B - A) supports: "higher" / "lower" where it clears zero
    by more than ``margin``; "borderline" where an end lies within ``margin`` of zero and the other
    beyond it (a bootstrap seed, or one item, could move it across); else "not resolved"."""
    if lo > margin:
        return "higher"
    if hi < -margin:
        return "lower"
    if (abs(lo) <= margin < hi) or (abs(hi) <= margin < -lo):
        return "borderline"
    return "not resolved"


# --------------------------------------------------------------------------- exact bootstrap

def _sum_distribution(d: np.ndarray) -> tuple[int, np.ndarray]:
    """Distribution of the sum of ``d.size`` draws with replacement from the integers ``d``:
    ``(offset, pmf)`` with ``pmf[k] = P(sum = offset + k)`` (the n-fold convolution power of the
    empirical distribution, through one FFT)."""
    n = d.size
    vmin, vmax = int(d.min()), int(d.max())
    width = vmax - vmin
    if width == 0:
        return n * vmin, np.ones(1)
    p = np.bincount(d - vmin, minlength=width + 1) / n
    size = n * width + 1
    fft_len = 1 << (size - 1).bit_length()
    pmf = np.fft.irfft(np.fft.rfft(p, fft_len) ** n, fft_len)[:size]
    pmf = np.clip(pmf, 0.0, None)
    return n * vmin, pmf / pmf.sum()


def _trim(offset: int, pmf: np.ndarray) -> tuple[int, np.ndarray]:
    """Drop the tails holding less than ``_TAIL`` of the mass (FFT noise and negligible mass)."""
    keep = np.nonzero(pmf > _TAIL)[0]
    return offset + int(keep[0]), pmf[keep[0]:keep[-1] + 1]


def _on_grid(offset: int, pmf: np.ndarray, denom: int) -> tuple[int, np.ndarray]:
    """A distribution on the lattice ``(offset + k) / denom`` moved onto the grid of step ``GRID``,
    each point's mass split between its two grid neighbours in proportion (the mean is kept). The
    positions are exact integer ratios (``1 / GRID`` is an integer)."""
    per = round(1 / GRID)
    num = (offset + np.arange(pmf.size, dtype=np.int64)) * per
    low = num // denom
    frac = (num - low * denom) / denom
    start = int(low[0])
    out = np.zeros(int(low[-1]) - start + 2)
    np.add.at(out, low - start, pmf * (1 - frac))
    np.add.at(out, low - start + 1, pmf * frac)
    return start, out


def _convolve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    size = a.size + b.size - 1
    fft_len = 1 << (size - 1).bit_length()
    out = np.fft.irfft(np.fft.rfft(a, fft_len) * np.fft.rfft(b, fft_len), fft_len)[:size]
    return np.clip(out, 0.0, None)


def _quantiles(pmf: np.ndarray, confidence: float) -> tuple[int, int]:
    """Indices of the percentile interval's ends, the limits of ``_interval``'s order statistics:
    lower the first point whose CDF exceeds alpha, upper the first whose CDF reaches 1 - alpha."""
    cdf = np.cumsum(pmf) / pmf.sum()
    alpha = (1 - confidence) / 2
    lo = int(np.searchsorted(cdf, alpha, side="right"))
    hi = int(np.searchsorted(cdf, 1 - alpha, side="left"))
    return min(lo, pmf.size - 1), min(hi, pmf.size - 1)


def _exact_interval(tasks: list[np.ndarray], scale: int, confidence: float) -> tuple[float, float]:
    """Percentile interval of the exact bootstrap distribution of ``avg_t sum(d_t*) / (n_t * scale)``."""
    dists = [_trim(*_sum_distribution(d)) for d in tasks]
    if len(tasks) == 1:  # one lattice: exact ends
        (offset, pmf), denom = dists[0], tasks[0].size * scale
        lo, hi = _quantiles(pmf, confidence)
        return (offset + lo) / denom, (offset + hi) / denom
    start, total = 0, np.ones(1)
    for d, (offset, pmf) in zip(tasks, dists):
        s, grid = _on_grid(offset, pmf, d.size * scale * len(tasks))
        shift, total = _trim(0, _convolve(total, grid))
        start += s + shift
    lo, hi = _quantiles(total, confidence)
    return (start + lo) * GRID, (start + hi) * GRID


# --------------------------------------------------------------------------- Monte-Carlo bootstrap

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


def _monte_carlo_interval(tasks: list[np.ndarray], scale: int, resamples: int, seed: int,
                          confidence: float) -> tuple[float, float]:
    """``resamples`` seeded resamples (tasks drawn in order from one ``default_rng(seed)``), integer
    sums, elementwise float adds in task order, order statistics."""
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples, dtype=np.float64)
    for d in tasks:
        total = total + _resampled_counts(d, resamples, rng) / (d.size * scale)
    return _interval(np.sort(total / len(tasks)), confidence)


# --------------------------------------------------------------------------- public API

def paired_bootstrap(a, b, *, resamples: int | None = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                     confidence: float = CONFIDENCE) -> dict:
    """Accuracy difference ``mean(b) - mean(a)`` with a paired percentile bootstrap interval (items
    resampled with replacement, the same items for both runs): exact by default, else ``resamples``
    Monte-Carlo resamples with ``numpy.random.default_rng(seed)``.
    Returns ``{"diff", "lo", "hi", "n", "method", "resamples", "seed", "verdict"}``."""
    return paired_bootstrap_tasks({"": (a, b)}, resamples=resamples, seed=seed, confidence=confidence)


def paired_bootstrap_tasks(pairs: Mapping[str, tuple[Sequence[int], Sequence[int]]], *,
                           resamples: int | None = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                           confidence: float = CONFIDENCE) -> dict:
    """Difference of the unweighted average over tasks of accuracy, ``avg_t mean(b_t) - mean(a_t)``,
    with a paired bootstrap that resamples items within each task (each task keeps its n).

    ``pairs``: task -> (a, b) 0/1 vectors of the same items. Returns ``paired_bootstrap``'s dict
    (``n``: items over all tasks).
    """
    if not pairs:
        raise ValueError("no tasks to compare")
    diffs = {}
    for task, (a, b) in pairs.items():
        a, b = _pair(a, b)
        diffs[task] = b - a
    return paired_bootstrap_differences(diffs, resamples=resamples, seed=seed, confidence=confidence)


def _check_differences(diffs: Mapping[str, Sequence[int]], scale, resamples, confidence) -> list[np.ndarray]:
    if not diffs:
        raise ValueError("no tasks to compare")
    if resamples is not None and (int(resamples) != resamples or resamples < 1):
        raise ValueError(f"resamples must be a positive integer (or None for the exact bootstrap), got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    out = []
    for task, d in diffs.items():  # fixed order
        d = np.asarray(d)
        if d.ndim != 1 or d.size == 0:
            raise ValueError(f"{task}: differences must be a non-empty 1-D vector, got shape {d.shape}")
        if not np.issubdtype(d.dtype, np.integer) and not np.array_equal(d, np.round(d)):
            raise ValueError(f"{task}: differences must be integers (scaled by `scale`)")
        out.append(d.astype(np.int64))
    return out


def paired_bootstrap_differences(diffs: Mapping[str, Sequence[int]], *, scale: int = 1,
                                 resamples: int | None = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                                 confidence: float = CONFIDENCE) -> dict:
    """``paired_bootstrap_tasks`` on per-item differences already taken: task -> integer vector
    whose items are ``scale`` times the difference. ``scale`` keeps fractional differences exact,
    e.g. the sum over S seeds of ``b - a`` with ``scale=S`` is the per-item mean over the seeds.
    ``resamples=None`` (default): the exact bootstrap distribution (no seed); an int: that many
    Monte-Carlo resamples drawn with ``seed``."""
    tasks = _check_differences(diffs, scale, resamples, confidence)
    diff = 0.0
    for d in tasks:  # fixed order: one division per task, elementwise adds
        diff = diff + int(d.sum()) / (d.size * int(scale))
    diff = diff / len(tasks)
    if resamples is None:
        lo, hi = _exact_interval(tasks, int(scale), confidence)
        method, seed = "exact", None
    else:
        lo, hi = _monte_carlo_interval(tasks, int(scale), int(resamples), seed, confidence)
        method, seed = "monte-carlo", int(seed)
    return {"diff": diff, "lo": lo, "hi": hi, "n": sum(d.size for d in tasks), "method": method,
            "resamples": None if resamples is None else int(resamples), "seed": seed, "verdict": verdict(lo, hi)}


def paired_summary(a, b, *, resamples: int | None = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict:
    """Bootstrap difference and interval plus the exact McNemar test of one task's items."""
    out = paired_bootstrap(a, b, resamples=resamples, seed=seed)
    n_a_only, n_b_only = discordant(a, b)
    a_, b_ = _pair(a, b)
    out.update(acc_a=int(a_.sum()) / a_.size, acc_b=int(b_.sum()) / b_.size,
               a_only=n_a_only, b_only=n_b_only, p_mcnemar=mcnemar_exact(n_a_only, n_b_only))
    return out


__all__ = ["paired_bootstrap", "paired_bootstrap_tasks", "paired_bootstrap_differences", "mcnemar_exact", "discordant",
           "paired_summary", "verdict", "DEFAULT_RESAMPLES", "DEFAULT_SEED", "VERDICT_MARGIN"]
