"""Paired statistics of two runs (salientft.evaluation.paired), per-item samples (eval --log-samples)
and the paired comparison of runs (compare).

The Monte-Carlo path works on 0/1 vectors with a seeded numpy generator and integer sums (one
division per value, elementwise adds, order statistics), so its numbers are the same on every CPU
and asserted exactly. The exact path (the default) is checked against a full enumeration of the
resamples, and against many Monte-Carlo resamples with a tolerance justified by their error.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from salientft.evaluation.compare import compare_runs
from salientft.evaluation.paired import (VERDICT_MARGIN, discordant, mcnemar_exact, paired_bootstrap,
                                         paired_bootstrap_differences, paired_bootstrap_tasks, paired_summary,
                                         verdict)


# --------------------------------------------------------------------------- McNemar

@pytest.mark.parametrize("b, c, want", [
    (10, 2, 2 * (1 + 12 + 66) / 2**12),   # 2 * P(X <= 2), X ~ Bin(12, 1/2) = 158 / 4096 = 0.0386
    (2, 10, 2 * 79 / 4096),               # symmetric
    (0, 5, 2 / 32),                       # 2 * (1/2)^5 = 0.0625
    (1, 9, 2 * (1 + 10) / 1024),          # 0.0215
    (0, 0, 1.0),                          # no discordant pair
    (5, 5, 1.0),                          # 2 * P(X <= 5) > 1, capped
    (3, 4, 1.0),                          # 2 * P(X <= 3 | n = 7) = 2 * 64/128 = 1
])
def test_mcnemar_exact_matches_hand_computed_binomial(b, c, want):
    assert mcnemar_exact(b, c) == want


def test_mcnemar_hand_values_and_large_counts():
    assert round(mcnemar_exact(10, 2), 4) == 0.0386
    assert round(mcnemar_exact(1, 9), 4) == 0.0215
    # large n stays exact (integer tail, one division) and tiny
    p = mcnemar_exact(400, 600)
    assert 0 < p < 1e-9
    assert mcnemar_exact(600, 400) == p
    with pytest.raises(ValueError, match="non-negative integers"):
        mcnemar_exact(-1, 3)


def test_discordant_counts():
    a = [1, 1, 0, 0, 1, 0]
    b = [1, 0, 1, 1, 1, 0]
    assert discordant(a, b) == (1, 2)
    with pytest.raises(ValueError, match="equal length"):
        discordant([1, 0], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        discordant([1, 2], [1, 0])


# --------------------------------------------------------------------------- bootstrap

def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n items (n a multiple of 10): both right 50%, only A 10%, only B 20%, both wrong 20%, in a
    seeded random order; so B - A = +0.10 exactly."""
    a = np.array([1] * (5 * n // 10) + [1] * (n // 10) + [0] * (2 * n // 10) + [0] * (2 * n // 10))
    b = np.array([1] * (5 * n // 10) + [0] * (n // 10) + [1] * (2 * n // 10) + [0] * (2 * n // 10))
    order = np.random.default_rng(seed).permutation(n)
    return a[order], b[order]


def test_bootstrap_covers_the_known_difference_and_shrinks_with_n():
    widths = []
    for n in (100, 400, 1600):
        a, b = synthetic(n)
        r = paired_bootstrap(a, b)
        assert r["diff"] == 0.1  # (20% - 10%) of n, divided once by n
        assert r["lo"] < 0.1 < r["hi"], (n, r)
        assert r["n"] == n and r["method"] == "exact" and r["resamples"] is None and r["seed"] is None
        widths.append(r["hi"] - r["lo"])
    # the width goes as 1/sqrt(n): quadrupling n about halves it
    assert widths[1] < 0.7 * widths[0] and widths[2] < 0.7 * widths[1], widths
    # with 1600 items the interval excludes 0 (the difference is significant); with 100 it does not
    a, b = synthetic(1600)
    assert paired_bootstrap(a, b)["lo"] > 0
    a, b = synthetic(100)
    assert paired_bootstrap(a, b)["lo"] <= 0


def test_bootstrap_is_seeded():
    a, b = synthetic(200, seed=3)
    r1 = paired_bootstrap(a, b, resamples=500, seed=7)
    r2 = paired_bootstrap(list(a), list(b), resamples=500, seed=7)
    assert r1 == r2
    # the bounds are resampled accuracies: multiples of 1/n
    assert round(r1["lo"] * 200) / 200 == r1["lo"] and round(r1["hi"] * 200) / 200 == r1["hi"]


def test_identical_runs_give_a_zero_width_interval_at_zero_and_p_one():
    a, _ = synthetic(300)
    s = paired_summary(a, a.copy())
    assert s["diff"] == 0.0 and s["lo"] == 0.0 and s["hi"] == 0.0
    assert s["p_mcnemar"] == 1.0 and s["a_only"] == s["b_only"] == 0
    avg = paired_bootstrap_tasks({"x": (a, a), "y": (a[:50], a[:50])})
    assert avg["diff"] == avg["lo"] == avg["hi"] == 0.0 and avg["n"] == 350


def test_task_average_resamples_within_each_task():
    a1, b1 = synthetic(100)               # +0.10
    a2 = np.ones(40, dtype=int)           # identical: contributes exactly 0 to every resample
    r = paired_bootstrap_tasks({"t1": (a1, b1), "t2": (a2, a2.copy())}, resamples=1000, seed=1)
    assert r["diff"] == 0.1 / 2 and r["n"] == 140
    # each task keeps its own items and n: the average's interval is the first task's, halved
    alone = paired_bootstrap_tasks({"t1": (a1, b1)}, resamples=1000, seed=1)
    assert (r["lo"], r["hi"]) == (alone["lo"] / 2, alone["hi"] / 2)
    # the same exactly: t1's lattice ends (multiples of 1/100) halved, on the 0.001-point grid
    ex = paired_bootstrap_tasks({"t1": (a1, b1), "t2": (a2, a2.copy())})
    ex1 = paired_bootstrap_tasks({"t1": (a1, b1)})
    assert round(ex["lo"], 9) == round(ex1["lo"] / 2, 9) and round(ex["hi"], 9) == round(ex1["hi"] / 2, 9)
    with pytest.raises(ValueError, match="no tasks"):
        paired_bootstrap_tasks({})


def test_differences_summed_over_seeds_are_the_seed_mean_with_the_same_resamples():
    a1, b1 = synthetic(100)               # seed 1: +0.10
    a2, b2 = synthetic(100, seed=1)       # a second training seed, same items: +0.10 again
    one = paired_bootstrap_tasks({"t": (a1, b1)}, resamples=500, seed=3)
    same = paired_bootstrap_differences({"t": b1 - a1}, resamples=500, seed=3)
    assert same == one                     # the 0/1 path is the scale-1 case, draw for draw
    two = paired_bootstrap_differences({"t": (b1 - a1) + (b2 - a2)}, scale=2, resamples=500, seed=3)
    assert two["diff"] == 20 / 200        # mean over seeds of +0.10 and +0.10
    assert two["lo"] <= two["diff"] <= two["hi"] and two["n"] == 100
    with pytest.raises(ValueError, match="integers"):
        paired_bootstrap_differences({"t": np.array([0.5, 1.0])})
    with pytest.raises(ValueError, match="scale"):
        paired_bootstrap_differences({"t": b1 - a1}, scale=0)


def realistic_tasks(seed: int = 1) -> dict[str, np.ndarray]:
    """Per-item differences B - A of six tasks of the paper500 subset's sizes (2,869 items): about 12 %
    discordant items and a small lead of B, like two fine-tuning methods on the same items."""
    rng = np.random.default_rng(seed)
    out = {}
    for task, n in zip(("hellaswag", "arc_easy", "arc_challenge", "piqa", "boolq", "winogrande"),
                       (500, 570, 299, 500, 500, 500)):
        a = rng.random(n) < 0.5
        b = np.where(rng.random(n) < 0.12, ~a, a)
        b[: n // 50] = True
        out[task] = b.astype(np.int64) - a.astype(np.int64)
    return out


def test_exact_bootstrap_is_the_limit_of_every_resample():
    """On 6 items the exact distribution is checked against all 6**6 equally likely resamples."""
    import itertools

    d = np.array([1, 0, -1, 1, 0, 1])
    sums = np.sort([sum(c) for c in itertools.product(d.tolist(), repeat=d.size)]) / d.size
    r = paired_bootstrap_differences({"t": d})
    # _interval's order statistics over the complete set of resamples
    assert (r["lo"], r["hi"]) == (sums[int(np.floor(0.025 * sums.size))], sums[int(np.ceil(0.975 * sums.size)) - 1])
    # scaled differences (a sum over 2 seeds): the same lattice at half the step
    r2 = paired_bootstrap_differences({"t": 2 * d}, scale=2)
    assert (r2["lo"], r2["hi"], r2["diff"]) == (r["lo"], r["hi"], r["diff"])


@pytest.mark.numerics
def test_interval_ends_do_not_move_with_the_bootstrap_seed():
    """The criterion: over 20 bootstrap seeds an interval's ends move by less than 0.05 point.
    2,000 Monte-Carlo resamples fail it on a realistic 500-item task and on the six-task average; the
    default (exact) interval has no seed at all, and is what the Monte-Carlo ends scatter around:
    the mean of 20 seeds' ends is within 0.15 point of it (their standard error is about 0.05 point).
    """
    tasks = realistic_tasks()
    for sample in ({"piqa": tasks["piqa"]}, tasks):
        exact = paired_bootstrap_differences(sample)
        runs = [paired_bootstrap_differences(sample, resamples=2000, seed=s) for s in range(20)]
        for end in ("lo", "hi"):
            ends = np.array([r[end] for r in runs])
            assert ends.max() - ends.min() > VERDICT_MARGIN, (end, ends)   # the old way moves
            assert abs(ends.mean() - exact[end]) < 0.0015, (end, ends.mean(), exact[end])
        again = [paired_bootstrap_differences(sample, seed=s) for s in range(20)]  # the seed is not used
        assert all((r["lo"], r["hi"]) == (exact["lo"], exact["hi"]) for r in again)
        assert exact["method"] == "exact" and exact["seed"] is None


def test_verdict_needs_the_interval_to_clear_zero_by_the_margin():
    m = VERDICT_MARGIN
    assert verdict(0.006, 0.019) == "higher" and verdict(-0.02, -0.001) == "lower"
    assert verdict(-0.0001, 0.016) == "borderline"      # "[-0.0, +1.6]": could be either side
    assert verdict(-0.016, m / 2) == "borderline"
    assert verdict(m / 2, 0.01) == "borderline"          # clears zero, but by less than the margin
    assert verdict(-0.007, 0.006) == "not resolved" and verdict(0.0, 0.0) == "not resolved"
    r = paired_bootstrap(*synthetic(1600))
    assert r["verdict"] == "higher"


# --------------------------------------------------------------------------- compare on samples files

def fake_run(folder: Path, name: str, outcomes: dict[str, list[int]], subset=None, limit=None) -> Path:
    """A results.json and its samples file: per task the 0/1 outcome of items 0..n-1 (acc = acc_norm)."""
    d = folder / name
    d.mkdir()
    results, lines = {}, []
    for task, out in outcomes.items():
        results[task] = {"acc": sum(out) / len(out), "acc_norm": sum(out) / len(out), "n": len(out)}
        for i, o in enumerate(out):
            lines.append({"task": task, "id": (subset or {}).get("offset", 0) + i, "lls": [-1.0, -2.0],
                          "gold": 0 if o else 1, "pred": 0, "pred_norm": 0, "acc": o, "acc_norm": o})
    report = {"results": results, "paper_avg": None, "limit": limit}
    if subset:
        report["subset"] = {k: v for k, v in subset.items() if k != "offset"}
    (d / "results.json").write_text(json.dumps(report))
    (d / "results.samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def test_compare_pairs_runs_from_their_samples(tmp_path):
    a1, b1 = synthetic(100)
    a = fake_run(tmp_path, "base", {"piqa": a1.tolist(), "boolq": [1, 0, 1, 0]})
    b = fake_run(tmp_path, "tuned", {"piqa": b1.tolist(), "boolq": [1, 0, 1, 0]})
    out = compare_runs([a, b / "results.json"], output=tmp_path / "cmp.json", resamples=500)
    rows = {(r["task"], r["metric"]): r for r in out["pairs"]}
    assert set(rows) == {("piqa", "acc"), ("piqa", "acc_norm"), ("boolq", "acc")}  # lm-eval's boolq: acc only
    piqa = rows[("piqa", "acc")]
    assert piqa["a"] == "base" and piqa["b"] == "tuned" and piqa["diff"] == 0.1
    assert (piqa["a_only"], piqa["b_only"]) == (10, 20) and piqa["p_mcnemar"] == mcnemar_exact(10, 20)
    assert rows[("boolq", "acc")]["p_mcnemar"] == 1.0 and rows[("boolq", "acc")]["hi"] == 0.0
    assert "| tuned vs base | piqa | acc | 100 | 60.00 | 70.00 | +10.00 |" in out["pairs_table"]
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["pairs"] == out["pairs"] and saved["resamples"] == 500


def test_compare_refuses_runs_on_different_items(tmp_path):
    sub = {"name": "paper500", "seed": 1, "n": {"piqa": 4}}
    a = fake_run(tmp_path, "a", {"piqa": [1, 0, 1, 1]}, subset=sub)
    b = fake_run(tmp_path, "b", {"piqa": [1, 0, 1, 1]}, limit=4)
    with pytest.raises(ValueError, match=r"runs a and b were evaluated on different items \(subset paper500 "
                                         r"\(seed 1\) vs the first 4 items\)"):
        compare_runs([a, b])
    c = fake_run(tmp_path, "c", {"piqa": [1, 0, 1, 1]}, subset={**sub, "offset": 2})  # same name, other ids
    with pytest.raises(ValueError, match=r"different piqa items \(2 only in a, 2 only in c"):
        compare_runs([a, c])
    # without samples for every run: the table only, with a note; --plot-diffs is refused up front
    (b / "results.samples.jsonl").unlink()
    out = compare_runs([a, b])
    assert out["pairs"] == [] and "b has no samples file" in out["notes"][0]
    with pytest.raises(ValueError, match="--plot-diffs needs two runs or more, each with its samples file; b has"):
        compare_runs([a, b], plot_diffs=tmp_path / "d.png")
    assert not (tmp_path / "d.png").exists()


def test_compare_refuses_samples_of_another_evaluation(tmp_path):
    a = fake_run(tmp_path, "a", {"piqa": [1, 0, 1, 1]})
    b = fake_run(tmp_path, "b", {"piqa": [1, 0, 0, 0]})
    report = json.loads((b / "results.json").read_text())
    report["results"]["piqa"]["acc"] = 0.5
    (b / "results.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"b/results.samples.jsonl does not match .*b/results.json \(piqa acc\)"):
        compare_runs([a, b])


# --------------------------------------------------------------------------- end to end on the tiny model

def _samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_eval_log_samples_then_compare(tmp_path, capsys):
    from salientft.cli import main
    from salientft.evaluation.scorer import choose
    from salientft.evaluation.tasks import load_items

    runs = []
    for name, dtype in (("fp32", "fp32"), ("bf16", "bf16")):
        out = tmp_path / name / "results.json"
        rc = main(["eval", "--model", "tiny-random-llama", "--tasks", "paper", "--limit", "5", "--batch-size", "4",
                   "--dtype", dtype, "--no-progress", "--output", str(out), "--log-samples"])
        assert rc == 0
        rep = json.loads(out.read_text())
        recs = _samples(tmp_path / name / "results.samples.jsonl")
        assert rep["samples"] == "results.samples.jsonl"
        assert all("items" not in r for r in rep["results"].values())
        for task, res in rep["results"].items():
            mine = [r for r in recs if r["task"] == task]
            assert [r["id"] for r in mine] == list(range(5))
            items = load_items(task, 5)
            for r, it in zip(mine, items):
                assert r["gold"] == it.gold and len(r["lls"]) == len(it.requests)
                assert (r["pred"], r["pred_norm"]) == choose(r["lls"], it.norm_chars)
                assert r["acc"] == int(r["pred"] == r["gold"]) and r["acc_norm"] == int(r["pred_norm"] == r["gold"])
            # the per-item predictions reproduce results.json's accuracies exactly
            assert sum(r["acc"] for r in mine) / len(mine) == res["acc"]
            assert sum(r["acc_norm"] for r in mine) / len(mine) == res["acc_norm"]
        runs.append(tmp_path / name)
    capsys.readouterr()
    rc = main(["compare", *map(str, runs), "--output", str(tmp_path / "cmp.json"),
               "--plot-diffs", str(tmp_path / "diffs.png"), "--resamples", "300"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| | fp32 | bf16 |" in stdout and "| B vs A | task | metric |" in stdout
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert len(cmp["pairs"]) == 11  # 4 tasks x (acc, acc_norm) + boolq, winogrande acc + paper avg
    s = [{(r["task"], r["id"]): r for r in _samples(run / "results.samples.jsonl")} for run in runs]
    for row in cmp["pairs"]:
        # (the bf16 run's answers may differ between CPUs: only relations true for any answers are checked)
        assert row["a"] == "fp32" and row["b"] == "bf16" and row["lo"] <= row["hi"]
        if row["task"] != "paper avg":
            va = [s[0][(row["task"], i)][row["metric"]] for i in range(5)]
            vb = [s[1][(row["task"], i)][row["metric"]] for i in range(5)]
            assert row["diff"] == (sum(vb) - sum(va)) / 5
            assert (row["a_only"], row["b_only"]) == discordant(va, vb)
    assert (tmp_path / "diffs.png").read_bytes()[:4] == b"\x89PNG"
