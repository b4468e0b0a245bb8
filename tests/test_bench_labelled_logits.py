"""bench/labelled_logits.py's summary: medians per variant, their ratios, the labelled share and the
largest difference between paired runs' losses (the measuring runs themselves need the embedded
model and minutes; the trainer's equivalence is tests/test_labelled_logits.py's)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import labelled_logits as bench  # noqa: E402


def _run(variant, seconds, peak, loss):
    return {"variant": variant, "train_seconds": seconds, "peak_rss_bytes": peak, "last_loss": loss,
            "labelled": 82, "positions": 1000, "threads": 2, "load_average_1min_after": 1.0}


def test_the_summary_compares_the_medians_of_each_variant():
    rows, full = bench.VARIANTS
    runs = [_run(rows, 75.0, 2.0e9, 3.8), _run(full, 90.0, 2.5e9, 3.8000004),
            _run(full, 86.0, 2.4e9, 3.8000001), _run(rows, 77.0, 2.2e9, 3.8), _run(full, 70.0, 2.6e9, 3.8)]
    s = bench.summarize(runs)
    assert s["median"][rows] == {"train_seconds": 76.0, "peak_rss_bytes": 2.1e9}
    assert s["median"][full] == {"train_seconds": 86.0, "peak_rss_bytes": 2.5e9}  # medians, not means
    assert s["time_ratio"] == round(76 / 86, 3) and s["peak_ratio"] == round(2.1 / 2.5, 3)
    assert s["labelled_share"] == 0.082
    assert s["largest_loss_difference"] == pytest.approx(4e-7)
    text = "\n".join(bench.markdown({"command": "c", "steps": 15, "runs": runs, "summary": s}))
    assert "**0.88x**" in text and "8.2 %" in text and "| labelled rows | 2 | 76.0 |" in text


def test_the_runs_go_a_b_b_a():
    a, b = bench.VARIANTS
    assert bench.abba_order(2) == [a, b, b, a, a, b, b, a]
