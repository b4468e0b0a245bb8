"""Medians, quartiles and per-round ratios of timings: one definition for every benchmark."""
from __future__ import annotations

import statistics


def quartiles(xs) -> tuple[float, float, float]:
    """(q1, median, q3) of ``xs`` (``statistics.quantiles``' default "exclusive" method); a single
    value is its own quartiles."""
    xs = list(xs)
    if not xs:
        raise ValueError("quartiles of no values")
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def summarize(values, unit: str = "ms", keep: str | None = "step_ms") -> dict:
    """{"median_<unit>", "q1_<unit>", "q3_<unit>"} and (``keep``) the values themselves."""
    values = list(values)
    q1, med, q3 = quartiles(values)
    out = {f"median_{unit}": med, f"q1_{unit}": q1, f"q3_{unit}": q3}
    if keep:
        out[keep] = values
    return out


def round_ratio(a, b) -> float:
    """The median of the per-round ratios a[r] / b[r]: two keys timed in the same round shared its
    load, so their ratio is steadier than the ratio of medians."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def median(xs) -> float:
    return statistics.median(xs)
