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


def test_a_report_names_the_command_that_reproduces_it_without_its_sitting_budget():
    # a budget splits the work into sittings; the report must name the command, not the last sitting
    assert S.report_command("quality.py", ["--paper500", "--max-minutes", "1", "--lr-grid"]) == \
        "bench/quality.py --paper500 --lr-grid"
    assert S.report_command("quality.py", ["--max-minutes=30", "--quick"]) == "bench/quality.py --quick"
    assert S.report_command("recovery.py", []) == "bench/recovery.py"
    lines = S.setting_lines(S.PRESETS["smoke"], "x", [], "GIFT-SW's tuned rate 0.0003")
    assert "GIFT-SW's tuned rate 0.0003;" in lines[0] and "default learning rate" not in lines[0]


def test_a_far_base_is_named_in_the_legend_instead_of_flattening_the_plot():
    import matplotlib.pyplot as plt  # requirements/ci.txt installs it (the bench reports draw PNGs)
    fig, ax = plt.subplots()
    assert S.base_reference(ax, 44.0, [45.2, 46.1])  # near: a dashed line across the axes
    assert not S.base_reference(ax, 85.6, [10.9, 12.0])  # far: a legend entry without data
    assert [len(line.get_ydata()) for line in ax.lines] == [2, 0]
    assert ax.get_legend_handles_labels()[1] == ["base (no training)", "base (no training): 85.6, off the scale"]
    assert not S.base_reference(ax, None, [1.0]) and len(ax.lines) == 2
    plt.close(fig)


def test_noise_scale_plots_perplexity_on_a_log_axis_with_plain_tick_labels():
    """2-bit noise (ppl 37) beside 11-12 flattens a linear axis; a log one keeps the small gaps visible."""
    import matplotlib.pyplot as plt
    import noise_scale as NS

    def variant(ppls, avgs):
        return {"n_seeds": len(ppls), "heldout_ppl": [sum(ppls) / len(ppls), None], "heldout_ppl_values": ppls,
                "paper_avg": [sum(avgs) / len(avgs), None], "paper_avg_values": avgs}
    labels = ["gift-sw none", "gift-sw 8-bit", "gift-sw 6-bit", "gift-sw 4-bit", "gift-sw 3-bit", "gift-sw 2-bit"]
    r = {"variants": {lab: variant([11.0 + i, 11.5 + i * i], [0.45, 0.46]) for i, lab in enumerate(labels)},
         "base": {"heldout_ppl": 86.0, "paper_avg": 0.44}, "settings": {"model": "m", "max_steps": 100}}
    r["variants"].update({"full none": variant([11.1], [0.46]), "full 4-bit": variant([12.5], [0.45])})
    fig = NS.plot(r)
    ppl_ax, avg_ax = fig.axes
    assert ppl_ax.get_yscale() == "log" and avg_ax.get_yscale() == "linear"
    assert _tick_labels(fig, ppl_ax)
    plt.close(fig)


def test_noise_scale_report_gives_each_seeds_perplexity_change_against_the_same_seed_without_noise():
    import noise_scale as NS

    def variant(ppls):
        return {"n_seeds": len(ppls), "heldout_ppl": [sum(ppls) / len(ppls), None], "heldout_ppl_values": ppls,
                "paper_avg": [0.45, None], "paper_avg_values": [0.45] * len(ppls), "learning_rate": 1e-4}
    r = {"variants": {"full none": variant([11.0, 11.5]), "full 4-bit": variant([12.5, 12.75])},
         "paired_vs_none": {"full 4-bit": {"diff": -0.006, "lo": -0.013, "hi": 0.001, "seeds": 2, "items": 90}},
         "base": None, "learning_rates": None, "command": "bench/noise_scale.py --smoke", "incomplete": []}
    row = next(line for line in NS.markdown(r, S.PRESETS["smoke"]) if line.startswith("| full 4-bit | -0.6"))
    assert row.endswith("| 2 | 90 | +1.50, +1.25 |")  # seed 0: 12.5 - 11.0; seed 1: 12.75 - 11.5


def _tick_labels(fig, ax) -> list[str]:
    """The y tick labels a reader sees (major and minor, non-empty), after checking none is in Python's
    "1e+08" form and none under 10,000 is in 10^x form."""
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    ticks = [(t.get_text(), t.get_position()[1]) for t in ax.get_yticklabels(minor=True) + ax.get_yticklabels()
             if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert all("e+" not in t and (v >= 1e4 or ("10^" not in t and "times" not in t)) for t, v in ticks), ticks
    return [t for t, _ in ticks]


def test_log_axis_names_every_minor_tick_within_a_decade_and_only_2_and_5_over_several():
    import matplotlib.pyplot as plt
    fig, (narrow, wide) = plt.subplots(1, 2)
    narrow.plot([0, 1], [11.0, 37.0])
    wide.plot([0, 1], [30.0, 7000.0])
    for ax in (narrow, wide):
        S.log_axis(ax)
    assert {"20", "30"} <= set(_tick_labels(fig, narrow))
    wide_labels = set(_tick_labels(fig, wide))
    assert {"50", "100", "200", "500", "1000"} <= wide_labels and not {"300", "400", "700"} & wide_labels
    plt.close(fig)


def test_log_axis_writes_perplexities_from_10000_as_powers_of_ten_not_1e_plus_08():
    """A 2-bit quantized model's chat perplexity (5.6e7) beside recovered ones (12-90): the labels a
    reader sees are "10", "100", ..., then 10^4 to 10^8 in mathtext, and none in Python's e+ form."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1], [12.0, 5.6e7])
    S.log_axis(ax)
    labels = _tick_labels(fig, ax)
    assert {"100", "1000", "$10^{4}$", "$10^{7}$"} <= set(labels), labels
    assert S.tick_text(2e5) == "$2\\times10^{5}$" and S.tick_text(2.5) == "2.5"
    plt.close(fig)


def test_recovery_plot_draws_each_measure_and_the_paired_interval_around_the_quantized_value():
    import matplotlib.pyplot as plt
    import recovery as R

    def res(loss, text, avg):
        return {"heldout_loss_after": loss, "text_ppl": text, "paper_avg": avg}
    rows = []
    for bits, q_avg in ((4, 0.50), (3, 0.45), (2, 0.40)):
        recovered = {m: res(3.0 + i, 30.0 * (5 - bits), q_avg + 0.01 * i) for i, m in enumerate(R.METHODS)}
        seeds = {m: S.seed_summary([r]) for m, r in recovered.items()}
        # GIFT-SW with a second seed 0.02 higher on the average, and worse on both perplexities: its
        # point is the mean of the two, and on the perplexity panels a bar spans the two seeds
        seeds["gift-sw"] = S.seed_summary([recovered["gift-sw"], res(4.0, 30.0 * (5 - bits) + 10, q_avg + 0.02)])
        paired = {m: {"diff": 0.01 * i, "lo": 0.01 * i - 0.004, "hi": 0.01 * i + 0.006, "items": 100}
                  for i, m in enumerate(R.METHODS)}
        rows.append({"bits": bits, "quantized": res(5.0, 40.0 * (5 - bits), q_avg), "recovered": recovered,
                     "seeds": seeds, "paired_vs_quantized": paired})
    fig = R.plot({"rows": rows, "settings": {"model": "m"}})
    chat, text, avg = fig.axes
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "linear"]
    assert "paired 95 %" in fig._suptitle.get_text()
    bars = [c for c in avg.collections if len(c.get_segments()) == 1]  # one vertical segment per (bits, method)
    assert len(bars) == 3 * len(R.METHODS)
    spans = sorted((round(float(s[0][1]), 3), round(float(s[1][1]), 3)) for c in bars for s in c.get_segments())
    # the 4-bit model at 50 %: method i's bar spans 50 + i - 0.4 to 50 + i + 0.6 points
    assert {(50 + i - 0.4, 50 + i + 0.6) for i in range(len(R.METHODS))} <= {tuple(round(v, 3) for v in s) for s in spans}
    assert text.get_lines()[0].get_ydata().tolist() == [40.0, 80.0, 120.0]  # the quantized model's text perplexity
    assert chat.get_lines()[0].get_ydata().tolist() == pytest.approx([math.exp(5.0)] * 3)  # its chat perplexity
    assert avg.get_lines()[1].get_ydata().tolist() == pytest.approx([51.0, 46.0, 41.0])  # GIFT-SW's seed mean
    # the seed range on the perplexities, for GIFT-SW only (the one method with two seeds)
    chat_bars = [tuple(round(float(y), 3) for _, y in seg) for c in chat.collections for seg in c.get_segments()]
    assert sorted(chat_bars) == [(round(math.exp(3.0), 3), round(math.exp(4.0), 3))] * 3
    text_bars = sorted(tuple(float(y) for _, y in seg) for c in text.collections for seg in c.get_segments())
    assert text_bars == [(30.0, 40.0), (60.0, 70.0), (90.0, 100.0)]
    plt.close(fig)


def test_quantize_order_plot_labels_its_log_axes_plainly_and_sets_the_orders_side_by_side():
    """2-bit perplexities (170-420) beside 4-bit ones (15-23) need a log axis; its ticks read "20",
    "200", not "2x10^2", and the three orders' bars sit apart at each width."""
    import matplotlib.pyplot as plt
    import quantize_order as O

    def model(text, chat, avg):
        return S.seed_summary([{"text_ppl": text - 0.5, "heldout_loss_after": math.log(chat - 0.5), "paper_avg": avg - 0.01},
                               {"text_ppl": text + 0.5, "heldout_loss_after": math.log(chat + 0.5), "paper_avg": avg + 0.01}])
    labels = [*O.TRAINED, O.RECOVERED]
    rows = [{"bits": b, "models": {lab: model(t, c + 5 * i, a) for i, lab in enumerate(labels)}}
            for b, t, c, a in ((4, 23.0, 15.0, 0.45), (3, 37.0, 23.0, 0.44), (2, 416.0, 170.0, 0.36))]
    fig = O.plot({"rows": rows, "settings": {"model": "m"}})
    text, chat, avg = fig.axes
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "linear"]
    assert {"20", "50", "100", "200"} <= set(_tick_labels(fig, text))
    xs = {round(float(x), 2) for line in avg.get_lines() for x in line.get_xdata()}
    assert {3.95, 4.0, 4.05, 1.95, 2.0, 2.05} <= xs
    plt.close(fig)


def _bar_ends(ax) -> list[float]:
    """The y ends of every error bar drawn on ``ax``."""
    from matplotlib.collections import LineCollection

    return [float(y) for c in ax.collections if isinstance(c, LineCollection)
            for seg in c.get_segments() for _, y in seg]


def test_quantize_order_bars_span_the_seeds_so_a_wild_seed_stays_on_the_log_axis():
    """Seeds at chat ppl 89 and 9,876 (2-bit recovery): mean 4,982, std 6,921. A mean ± std bar
    would end below zero, off a log axis; the bar is the seeds' range, 89 to 9,876."""
    import matplotlib.pyplot as plt
    import quantize_order as O

    def res(chat):
        return {"text_ppl": None, "heldout_loss_after": math.log(chat), "paper_avg": 0.4}
    summary = S.seed_summary([res(89.0), res(9876.0)])
    assert summary["heldout_ppl"][1] > summary["heldout_ppl"][0]  # the std exceeds the mean
    assert summary["range"]["heldout_ppl"] == [pytest.approx(89.0), pytest.approx(9876.0)]
    assert summary["range"]["text_ppl"] == [None, None]
    steady = S.seed_summary([res(20.0), res(22.0)])
    rows = [{"bits": b, "models": {lab: (summary if b == 2 and lab == O.RECOVERED else steady)
                                   for lab in (*O.TRAINED, O.RECOVERED)}} for b in (4, 2)]
    fig = O.plot({"rows": rows, "settings": {"model": "m"}})
    chat = fig.axes[1]
    assert chat.get_yscale() == "log"
    ends = _bar_ends(chat)
    assert min(ends) == pytest.approx(20.0) and max(ends) == pytest.approx(9876.0)
    assert any(y == pytest.approx(89.0) for y in ends)
    plt.close(fig)


def test_recovery_pairs_every_cached_seed_of_a_method_up_to_the_first_missing_one(tmp_path):
    """recovery.py trains seed 0; quantize_order.py recovers GIFT-SW with the other seeds, and those
    cached runs join GIFT-SW's row and its paired intervals. A gap stops the list, so the seeds of two
    methods still pair seed by seed."""
    import quantization as Q
    import recovery as R

    preset = S.PRESETS["paper500"]  # seeds 0, 1, 2
    runs, qs = S.Runs(preset, tmp_path, max_minutes=0), Q.QUANT["paper500"]
    lrs = {"gift-sw": 3e-4, "ste": 1e-4, "lora": 1e-3}

    def cache(method, seed, avg):
        spec = R.recovery_spec(runs, qs, 3, method, 8, lrs, seed)
        S.write_json(runs.path(spec), {"spec": spec, "result": {"heldout_loss_after": 2.0, "paper_avg": avg}})

    def seeds_of(method):
        return runs.cached_seeds(lambda seed: R.recovery_spec(runs, qs, 3, method, 8, lrs, seed))
    cache("gift-sw", 0, 0.40)
    cache("gift-sw", 1, 0.44)
    cache("gift-sw", 2, 0.45)
    cache("ste", 0, 0.41)
    cache("ste", 2, 0.50)  # seed 2 without seed 1: not used
    cache("lora", 1, 0.39)  # no seed 0: nothing
    gift = seeds_of("gift-sw")
    assert [r["paper_avg"] for r in gift] == [0.40, 0.44, 0.45]
    assert S.seed_summary(gift)["n_seeds"] == 3 and S.seed_summary(gift)["paper_avg"][0] == pytest.approx(0.43)
    assert [r["paper_avg"] for r in seeds_of("ste")] == [0.41]
    assert seeds_of("lora") == []
    assert runs.skipped == []  # nothing trained or attempted


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
    parts = ["quality", "ablations", "quantization", "recovery", "noise_scale", "quantize_order"]  # speed: test_bench_scaling
    _run([str(BENCH / "suite.py"), "--smoke", "--out", str(out), "--parts", *parts], BENCH.parent)
    suite = json.loads((out / "suite-smoke.json").read_text())
    assert all(p["exit_codes"] == [0] for p in suite["parts"].values()) and set(suite["parts"]) == set(parts)
    for name in parts:
        assert (out / f"{name}.md").read_text().startswith("# ") and (out / f"{name}.png").stat().st_size > 1000
    for name in [*parts, "suite-smoke"]:  # bench/lib's provenance block in every results file
        prov = json.loads((out / f"{name}.json").read_text())["provenance"]
        assert prov["dtype"] == "fp32" and prov["seed"] == [0, 1] and prov["threads"] >= 1, name
        assert {"commit", "dirty", "cpu_model", "omp_wait_policy", "torch"} <= set(prov), name
    for path in (out / "runs" / "smoke").glob("*.json"):  # and in every cached run
        rec = json.loads(path.read_text())
        assert rec["provenance"]["seed"] == rec["spec"].get("seed") and rec["provenance"]["dtype"] == "fp32", path

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
    assert set(q["paired_vs_gift_sw"]) == {"salient", "gmt", "full", "lora", "dora"}  # per-item records kept
    assert set(q["paired_claims"]) == {"gmt - full"} and q["paired_claims"]["gmt - full"]["seeds"] == 2

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
    assert set(row["paired_vs_quantized"]) == {"gift-sw", "ste", "lora"}
    assert set(row["paired_vs_gift_sw"]) == {"ste", "lora"}  # the paper's claim, item-paired
    assert "| 3 | lora | " in (out / "recovery.md").read_text().split("minus GIFT-SW's")[1]

    ns = json.loads((out / "noise_scale.json").read_text())
    assert list(ns["variants"]) == ["gift-sw none", "gift-sw 8-bit", "gift-sw 6-bit", "gift-sw 4-bit", "gift-sw 3-bit",
                                    "gift-sw 2-bit", "full none", "full 4-bit"]
    assert all(v["n_seeds"] == 2 for v in ns["variants"].values())
    # shared with quality's cache: GIFT-SW at the paper's 4 bits and full fine-tuning are the same runs
    assert ns["variants"]["gift-sw 4-bit"]["paper_avg_values"] == q["methods"]["gift-sw"]["paper_avg_values"]
    assert ns["variants"]["full none"]["paper_avg_values"] == q["methods"]["full"]["paper_avg_values"]
    # a different noise scale is a different training run: at the paper's width it is not the 2-bit one
    assert ns["variants"]["gift-sw 2-bit"]["heldout_ppl_values"] != ns["variants"]["gift-sw 4-bit"]["heldout_ppl_values"]

    order = json.loads((out / "quantize_order.json").read_text())
    (row,) = order["rows"]
    assert row["bits"] == 3 and all(m["n_seeds"] == 2 for m in row["models"].values())
    assert set(row["models"]) == {"noise, then quantize", "no noise, then quantize", "quantize, then train"}
    # the same trainings evaluated unquantized by quality: what quantizing costs each, and the claim
    assert set(order["unquantized"]) == {"noise, then quantize", "no noise, then quantize"}
    assert set(row["quantization_cost"]) == {"noise: quantized - unquantized", "no noise: quantized - unquantized",
                                             "noise's cost - no noise's cost"}
    assert all(c["seeds"] == 2 for c in row["quantization_cost"].values())

    cache = sorted((out / "runs" / "smoke").glob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    _run([str(BENCH / "quality.py"), "--smoke", "--out", str(out)], BENCH.parent)
    _run([str(BENCH / "noise_scale.py"), "--smoke", "--out", str(out)], BENCH.parent)
    # quantize_order recovered GIFT-SW with seed 1 too: a rerun of recovery pairs both seeds
    _run([str(BENCH / "recovery.py"), "--smoke", "--out", str(out)], BENCH.parent)
    rec = json.loads((out / "recovery.json").read_text())
    assert [rec["rows"][0]["seeds"][m]["n_seeds"] for m in ("gift-sw", "ste", "lora")] == [2, 1, 1]
    assert rec["rows"][0]["paired_vs_quantized"]["gift-sw"]["seeds"] == 2
    assert rec["rows"][0]["paired_vs_gift_sw"]["ste"]["seeds"] == 1
    assert sorted((out / "runs" / "smoke").glob("*.json")) == cache
    assert all(p.stat().st_mtime_ns == stamps[p] for p in cache)  # nothing retrained


def test_cached_runs_keep_their_keys_and_the_refresh_preset_has_its_own():
    """Adding eval_subset to the presets must not invalidate the committed cache of the full preset."""
    cached = sorted((BENCH.parent / "docs" / "results" / "runs" / "full").glob("*.json"))
    assert cached, "the committed full-preset cache is missing"
    for path in cached[:20]:
        spec = json.loads(path.read_text())["spec"]
        assert S.run_key(S.PRESETS["full"], spec) == path.stem
    refresh = S.PRESETS["paper500"]
    assert refresh.eval_subset == "paper500" and refresh.eval_limit is None and refresh.max_steps >= 100
    assert refresh.train_fields()["eval_subset"] == "paper500" and "eval_subset" not in S.PRESETS["full"].train_fields()
    assert S.run_key(refresh, {"method": "gift-sw", "seed": 0}) != S.run_key(S.PRESETS["full"], {"method": "gift-sw", "seed": 0})


def _record(loss, outcomes=None):
    """A quality record: held-out loss and, optionally, per-item outcomes {task: "0101"} (paper metric)."""
    import quality as Q

    rec = {"heldout_loss_after": loss}
    if outcomes is not None:
        rec["items"] = {t: {"ids": list(range(len(o))), Q.TASK_METRIC[t]: o} for t, o in outcomes.items()}
    return rec


class FakeRuns:
    def __init__(self, losses):
        self.losses, self.seen = losses, []

    def train(self, spec):
        self.seen.append(spec)
        loss = self.losses.get((spec["method"], spec.get("lr")))
        return None if loss is None else {"result": _record(loss)}


def test_lr_grid_chooses_the_lowest_heldout_loss_and_waits_for_a_complete_grid():
    import quality as Q

    losses = {("lora", lr): loss for lr, loss in zip(Q.LR_GRID["lora"], (3.0, 2.5, 2.2, 2.9))}
    losses.update({("full", Q.LR_GRID["full"][0]): 2.0})  # one rate of three done: no choice yet
    runs = FakeRuns(losses)
    grid = Q.choose_lrs(runs, ["lora", "full"], seed=0, rank=8)
    assert all(spec["eval_tasks"] == "" and spec["seed"] == 0 for spec in runs.seen)  # held-out loss only
    assert grid["lora"]["chosen"] == Q.LR_GRID["lora"][2]
    assert grid["lora"]["heldout_loss"] == {str(lr): v for (m, lr), v in losses.items() if m == "lora"}
    assert grid["full"]["chosen"] is None


def test_lr_grid_grows_past_an_edge_until_the_best_rate_is_inside():
    import quality as Q

    assert [Q.half_decade_step(x, up=True) for x in (1e-4, 3e-4, 1e-3)] == [3e-4, 1e-3, 3e-3]
    assert [Q.half_decade_step(x, up=False) for x in (1e-4, 3e-5, 1e-5)] == [3e-5, 1e-5, 3e-6]
    top = max(Q.LR_GRID["lora"])
    # held-out loss falls with the rate up to 3x the grid's top, then diverges (nan): chosen 3x top
    losses = {("lora", lr): 3.0 - 1000 * lr for lr in Q.LR_GRID["lora"]}
    losses[("lora", Q.half_decade_step(top, up=True))] = 1.0
    losses[("lora", Q.half_decade_step(Q.half_decade_step(top, up=True), up=True))] = float("nan")
    low = min(Q.LR_GRID["full"])  # the lowest rate is best every time: stops after the allowed extensions
    losses.update({("full", lr): 2.0 + lr for lr in Q.LR_GRID["full"]})
    losses[("full", Q.half_decade_step(low, up=False))] = 1.5
    losses[("full", Q.half_decade_step(Q.half_decade_step(low, up=False), up=False))] = 1.4
    grid = Q.choose_lrs(FakeRuns(losses), ["lora", "full"], seed=0, rank=8)
    assert grid["lora"]["chosen"] == Q.half_decade_step(top, up=True)
    assert grid["lora"]["extended"] == 2 and not grid["lora"]["at_edge"]
    assert grid["full"]["extended"] == Q.MAX_GRID_EXTENSIONS and grid["full"]["at_edge"]
    assert grid["full"]["chosen"] == min(grid["full"]["grid"])
    assert grid["full"]["grid"] == sorted(grid["full"]["grid"])


def test_paired_differences_average_seeds_per_item_and_cover_the_truth():
    import quality as Q

    tasks = list(Q.TASK_METRIC)
    # b is right on every item a is right on, plus the first quarter of the rest: a known difference
    n = 200
    a = "".join("1" if i % 2 else "0" for i in range(n))
    b = "".join("1" if i % 2 or i < n // 2 else "0" for i in range(n))
    records = {"gift-sw": [_record(2.0, {t: a for t in tasks})] * 2,
               "lora": [_record(2.0, {t: b for t in tasks})] * 2}
    d, n_seeds = S.item_differences(records["gift-sw"], records["lora"])
    assert n_seeds == 2 and all(v.shape == (n,) and set(v.tolist()) <= {0, 2} for v in d.values())
    out = Q.paired_vs(records, "gift-sw", resamples=500)["lora"]
    assert out["diff"] == pytest.approx(0.25) and out["lo"] <= 0.25 <= out["hi"] and out["hi"] - out["lo"] < 0.1
    assert out["seeds"] == 2 and out["items"] == n * len(tasks)
    same = Q.paired_vs({"gift-sw": records["gift-sw"], "salient": records["gift-sw"]}, "gift-sw", resamples=200)
    assert same["salient"]["diff"] == same["salient"]["lo"] == same["salient"]["hi"] == 0
    other = [_record(2.0, {t: a[:-1] for t in tasks})]
    other[0]["items"]["boolq"]["ids"] = list(range(1, n))
    with pytest.raises(ValueError, match="different items"):
        S.item_differences(records["gift-sw"][:1], other)
    assert Q.paired_vs({"gift-sw": [_record(2.0)], "lora": [_record(2.0)]}, "gift-sw") == {}
    # GMT's own claim is against full fine-tuning: first minus second, the sign kept
    claim = Q.paired_claims({"full": records["gift-sw"], "gmt": records["lora"]}, resamples=500)["gmt - full"]
    assert claim["diff"] == pytest.approx(0.25) and claim["lo"] <= 0.25 <= claim["hi"] and "GMT" in claim["claim"]
    assert Q.paired_claims({"gmt": records["lora"]}) == {}  # full fine-tuning not run: nothing to compare


def test_difference_in_differences_measures_how_much_less_one_model_loses_than_another():
    """quantize_order's claim: a loses 1/2 of its items to quantization, b 1/4, so b loses 0.25 less;
    each against its own unquantized self (b starts lower, so comparing the quantized models alone would
    say something else). Seeds beyond the shortest list are left out, as in paired_difference."""
    tasks = list(S.TASK_METRIC)
    n = 40

    def rec(first_right):  # items [0, first_right) right, the rest wrong
        return _record(2.0, {t: "1" * first_right + "0" * (n - first_right) for t in tasks})
    before_a, after_a = [rec(40)] * 2, [rec(20)] * 2  # a: 100 % -> 50 %
    before_b, after_b = [rec(30)] * 2, [rec(20), rec(20), rec(0)]  # b: 75 % -> 50 %; a third seed unmatched
    out = S.paired_difference_in_differences(before_a, after_a, before_b, after_b, resamples=200)
    assert out["diff"] == pytest.approx(0.25) and out["seeds"] == 2 and out["items"] == n * len(tasks)
    assert out["lo"] <= 0.25 <= out["hi"] and out["without_boolq"]["diff"] == pytest.approx(0.25)
    flipped = S.paired_difference_in_differences(before_b, after_b, before_a, after_a, resamples=200)
    assert flipped["diff"] == pytest.approx(-0.25)
    assert S.paired_difference_in_differences([_record(2.0)], after_a, before_b, after_b) is None  # no items


def test_paired_table_keeps_only_pairs_whose_runs_carry_items():
    tasks = list(S.TASK_METRIC)
    right, wrong = ({t: c * 40 for t in tasks} for c in ("1", "0"))
    with_items, without = [_record(2.0, right)], [_record(2.0)]
    table = S.paired_table([("gain", [_record(2.0, wrong)], with_items), ("old run", without, with_items),
                            ("both old", without, without)], resamples=100)
    assert list(table) == ["gain"] and table["gain"]["diff"] == pytest.approx(1.0)
    assert S.paired_table([]) == {}


def test_paired_difference_also_reports_the_five_tasks_without_boolq():
    """A yes/no bias flip on BoolQ alone (here: every BoolQ item lost) must not hide the other five."""
    tasks = list(S.TASK_METRIC)
    a = {t: "0" * 40 for t in tasks}
    b = {t: ("0" if t == "boolq" else "1") * 20 + "0" * 20 for t in tasks}
    a["boolq"] = "1" * 40
    out = S.paired_difference([_record(2.0, a)], [_record(2.0, b)], resamples=200)
    assert out["per_task"]["boolq"] == pytest.approx(-1.0)
    assert out["diff"] == pytest.approx((5 * 0.5 - 1.0) / 6)  # the six-task average: +0.25
    five = out["without_boolq"]
    assert five["diff"] == pytest.approx(0.5) and five["lo"] <= 0.5 <= five["hi"] and five["lo"] > out["hi"]
    cells = S.paired_cells(out).split(" | ")
    assert cells[0] == "+25.0" and cells[2].startswith("+50.0 [") and len(cells) == len(S.PAIRED_HEAD.split(" | "))
    assert S.paired_cells({"diff": 0.01, "lo": 0.0, "hi": 0.02}).endswith("| -")  # a record from before


def test_item_outcomes_are_the_same_from_records_and_from_their_samples_file(tmp_path):
    from salientft.evaluation.cli_api import write_samples

    recs = [{"task": "boolq", "id": i, "lls": [-1.0, -2.0], "gold": 0, "pred": p, "pred_norm": None,
             "acc": int(p == 0), "acc_norm": None} for i, p in [(3, 1), (0, 0), (7, 0)]]
    recs += [{"task": "piqa", "id": 5, "lls": [-1.0, -0.5], "gold": 1, "pred": 1, "pred_norm": 0,
              "acc": 1, "acc_norm": 0}]
    want = {"boolq": {"ids": [0, 3, 7], "acc": "101"}, "piqa": {"ids": [5], "acc": "1", "acc_norm": "0"}}
    assert S.item_outcomes(recs) == want  # item order, and no acc_norm where the task has none
    assert S.samples_file_outcomes(write_samples(tmp_path / "s.jsonl", recs)) == want


def test_recovery_reads_quality_s_chosen_rates_from_the_cache_and_trains_nothing(tmp_path):
    import quality as Q
    import recovery as R

    preset = S.PRESETS["paper500"]
    runs = S.Runs(preset, tmp_path, max_minutes=0)  # over budget at once: a train() would be skipped
    with pytest.raises(SystemExit, match="quality.py --paper500 --lr-grid --methods full gift-sw lora"):
        R.tuned_lrs(runs, rank=8)
    best = {"gift-sw": 3e-4, "full": 3e-5, "lora": 1e-3}  # lora's best at 1e-3 is inside its grid once extended
    for m in best:
        rates = list(Q.LR_GRID[m]) + ([Q.half_decade_step(max(Q.LR_GRID[m]), up=True)] if m == "lora" else [])
        for lr in rates:
            spec = {**Q.specs(m, preset.seeds[0], 8), "lr": lr, "eval_tasks": ""}
            S.write_json(runs.path(spec), {"spec": spec, "result": _record(2.0 + abs(math.log(lr / best[m])))})
    assert R.tuned_lrs(runs, rank=8) == {"gift-sw": 3e-4, "ste": 3e-5, "lora": 1e-3}
    assert runs.skipped == []  # everything came from the cache
    assert R.tuned_lrs(S.Runs(S.PRESETS["smoke"], tmp_path), rank=8) is None  # untuned presets keep defaults


def test_train_then_quantize_keeps_the_trained_columns_in_16_bits(tmp_path):
    """bench/quantize_order.py: the columns GIFT-SW trained are the ones GPTQ leaves in 16 bits, whatever
    the salience metric would have chosen, and they start from the trained values (GPTQ then moves
    them by its error feedback, docs/methods.md#quantization-recovery, so they are near the trained values, not equal)."""
    import torch

    import quantization as Q
    import quantize_order as O
    from salientft.gift import GiftConfig, apply_gift, gift_layers, save_adapter
    from salientft.models import load_model
    from salientft.quant.layer import QuantizedSalientLinear

    preset = S.PRESETS["smoke"]
    model, _ = load_model(preset.model, dtype="fp32")
    apply_gift(model, GiftConfig(salient_fraction=Q.SALIENT_FRACTION, metric="random", noise="none"))
    trained = {}
    with torch.no_grad():
        for name, layer in gift_layers(model).items():
            layer.salient_weight.add_(0.25)  # "training": a change far above bf16's spacing
            trained[name] = (layer.salient_idx.clone(), layer.salient_weight.detach().clone())
    save_adapter(model, tmp_path / "adapter", base_model=preset.model)
    qmodel, _, _ = O.quantized_trained_model(preset, Q.QUANT["smoke"], tmp_path / "adapter", bits=3)
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantizedSalientLinear)}
    assert set(layers) == set(trained)
    for name, (idx, weight) in trained.items():
        assert torch.equal(layers[name].salient_idx.cpu(), idx.cpu()), name
        kept = layers[name].salient_weight.float()
        # trained = base + 0.25: the merged columns sit far nearer the trained values than the base's
        assert (kept - weight).abs().mean() < 0.25 * (kept - (weight - 0.25)).abs().mean(), name
