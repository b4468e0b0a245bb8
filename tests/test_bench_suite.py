"""The reproduction suite (bench/suite.py and its parts): a smoke run on the tiny model, the cache, the statistics."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _suite as S  # noqa: E402


def test_mean_std_and_differs():
    assert S.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert S.mean_std([5.0]) == (5.0, None, 1)
    assert S.mean_std([None, float("nan")]) == (None, None, 0)
    diff, se, exceeds = S.differs([10.0, 11.0, 12.0], [1.0, 2.0, 3.0])
    assert diff == 9.0 and se == pytest.approx(math.sqrt(2 / 3)) and exceeds
    diff, se, exceeds = S.differs([1.0, 3.0], [2.0, 2.5])
    assert not exceeds
    assert S.differs([1.0], [2.0, 3.0])[2] is None  # one seed: no standard error, no verdict


def test_run_key_depends_on_spec_and_preset_only():
    full, quick = S.PRESETS["full"], S.PRESETS["quick"]
    a = S.run_key(full, {"method": "gift-sw", "seed": 0})
    assert a == S.run_key(full, {"seed": 0, "method": "gift-sw"})  # order does not matter
    assert a != S.run_key(full, {"method": "gift-sw", "seed": 1})
    assert a != S.run_key(quick, {"method": "gift-sw", "seed": 0})


def test_cache_reuses_finished_runs_and_respects_the_budget(tmp_path):
    runs = S.Runs(S.PRESETS["smoke"], tmp_path)
    calls = []
    rec = runs.get({"x": 1}, lambda: calls.append(1) or {"value": 3})
    assert rec["result"] == {"value": 3} and calls == [1]
    again = S.Runs(S.PRESETS["smoke"], tmp_path).get({"x": 1}, lambda: calls.append(2) or {"value": 4})
    assert again["result"] == {"value": 3} and calls == [1]  # from the cache file, not recomputed
    runs.path({"x": 2}).write_text("{not json")  # a corrupt cache file is redone, not trusted
    assert runs.get({"x": 2}, lambda: {"value": 5})["result"] == {"value": 5}
    late = S.Runs(S.PRESETS["smoke"], tmp_path, max_minutes=0)
    assert late.get({"x": 3}, lambda: calls.append(3) or {}) is None and calls == [1]
    assert late.skipped == ["x=3"]


def _run(args, cwd):
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_suite_smoke_runs_every_part_and_a_rerun_trains_nothing(tmp_path):
    out = tmp_path / "results"
    parts = ["quality", "ablations", "quantization", "recovery"]  # speed: tests/test_bench_scaling.py
    _run([str(BENCH / "suite.py"), "--smoke", "--out", str(out), "--parts", *parts], BENCH.parent)
    suite = json.loads((out / "suite-smoke.json").read_text())
    assert all(p["exit_codes"] == [0] for p in suite["parts"].values()) and set(suite["parts"]) == set(parts)
    for name in ("quality", "ablations", "quantization", "recovery"):
        assert (out / f"{name}.md").read_text().startswith("# ") and (out / f"{name}.png").stat().st_size > 1000

    q = json.loads((out / "quality.json").read_text())
    assert set(q["methods"]) == {"gift-sw", "salient", "gmt", "full", "lora", "dora"}
    for m, row in q["methods"].items():
        assert row["n_seeds"] == 2, m
        assert all(0 <= v <= 1 for v in row["paper_avg_values"]) and all(v > 1 for v in row["heldout_ppl_values"])
        assert row["heldout_ppl"][1] is not None  # a std over the two seeds
    full, gift = q["methods"]["full"], q["methods"]["gift-sw"]
    assert full["trainable_params"] > 10 * gift["trainable_params"]
    assert abs(q["methods"]["lora"]["trainable_params"] - gift["trainable_params"]) < gift["trainable_params"]
    assert {"gift-sw - full", "full - lora"} <= set(q["comparisons"])

    a = json.loads((out / "ablations.json").read_text())
    ran = {(g, row["variant"]) for g, grp in a["groups"].items() for row in grp["rows"] if row["result"]}
    assert {("noise", "output"), ("noise", "weight"), ("noise", "none"), ("gmt_ratio", "0.9"),
            ("gmt_on_gift", "gift-sw + gmt 0.5")} <= ran
    kept = next(r for r in a["groups"]["gmt_ratio"]["rows"] if r["variant"] == "0.9")["result"]["kept_fraction_mean"]
    assert kept == pytest.approx(0.1, abs=0.02)  # the mask really zeroed 90 %

    qz = json.loads((out / "quantization.json").read_text())
    assert {(r["method"], r["bits"]) for r in qz["rows"]} == {(m, 3) for m in ("rtn", "rtn+salient", "gptq", "gptq+salient")}
    assert all(r["model_bytes"] < qz["base"]["model_bytes"] for r in qz["rows"])

    rec = json.loads((out / "recovery.json").read_text())
    row = rec["rows"][0]
    assert set(row["recovered"]) == {"gift-sw", "ste", "lora"} and all(row["recovered"].values())
    assert row["recovered"]["gift-sw"]["trainable_params"] == q["methods"]["gift-sw"]["trainable_params"]

    cache = sorted((out / "runs" / "smoke").glob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    _run([str(BENCH / "quality.py"), "--smoke", "--out", str(out)], BENCH.parent)
    assert sorted((out / "runs" / "smoke").glob("*.json")) == cache
    assert all(p.stat().st_mtime_ns == stamps[p] for p in cache)  # nothing retrained
