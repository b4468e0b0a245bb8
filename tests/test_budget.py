"""bench/budget.py: every cached run is placed in exactly one part and kind (from the part the cache
records, else from its spec, built here by the parts' own spec builders), an unplaceable one is an
error naming its file, the committed budgets match the committed runs, and docs/RESULTS.md's
machine-time figures turn red when a budget changes under them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

import _suite as S  # noqa: E402
import budget as B  # noqa: E402

FULL, P500 = S.PRESETS["full"], S.PRESETS["paper500"]
QS = S.QUANT["paper500"]


def rec(spec: dict, seconds: float = 60.0, **extra) -> dict:
    return {"spec": spec, "seconds": seconds, "key": S.run_key(P500, spec), "finished": "2026-12-01T00:00:00", **extra}


def specs_of_every_kind() -> list[tuple[dict, object, tuple[str, str]]]:
    """(spec, preset, (part, kind)) for every kind of run each part makes, built as the parts build them."""
    import noise_scale as NS
    import quantize_order as QO

    lrs = {"gift-sw": 3e-4, "full": 1e-4}
    noise = NS.variants(lrs)
    trained = QO.train_spec("gift-sw", 1, lrs)
    return [
        ({"method": "base"}, P500, ("quality", "base")),
        ({**S.quality_spec("lora", 0, 11), "lr": 1e-3, "eval_tasks": ""}, P500, ("quality", "grid")),
        ({**S.quality_spec("gmt", 0, 11), "lr": 1e-4, "eval_tasks": ""}, P500, ("quality", "grid")),
        ({**S.quality_spec("gmt", 2, 11), "lr": 1e-4}, P500, ("quality", "evaluated")),
        ({**S.quality_spec("dora", 1, 11), "lr": 3e-5}, P500, ("quality", "evaluated")),
        ({**noise["gift-sw 2-bit"], "seed": 0}, P500, ("noise_scale", "evaluated")),
        ({**noise["full 4-bit"], "seed": 1}, P500, ("noise_scale", "evaluated")),
        (S.spec_for(QS, "gptq+salient", 3), P500, ("recovery", "quantized")),
        ({**S.spec_for(QS, "gptq+salient", 3), "part": "quantize-trained", "trained": "abc"}, P500,
         ("quantize_order", "quantize_trained")),
        (trained, P500, ("quantize_order", "train_only")),
        (S.recovery_spec(_FakeRuns(P500), QS, 2, "lora", 11,
                         {"gift-sw": 3e-4, "ste": 1e-4, "lora": 1e-3}, seed=0), P500, ("recovery", "recovery")),
        (S.recovery_spec(_FakeRuns(P500), QS, 2, "gift-sw", 11, {"gift-sw": 3e-4, "ste": 1e-4, "lora": 1e-3}, seed=2),
         P500, ("quantize_order", "recovery")),
        (S.recovery_spec(_FakeRuns(P500), QS, 4, "gift-sw", 11, {"gift-sw": 3e-4, "ste": 1e-4, "lora": 1e-3}, seed=1),
         P500, ("quantize_order", "recovery")),
        # the full preset: paper rates (no lr), a quantization part, ablations at seed 0
        (S.quality_spec("gift-sw", 1, 11), FULL, ("quality", "evaluated")),
        (S.quality_spec("gmt", 0, 11), FULL, ("quality", "evaluated")),
        (S.spec_for(S.QUANT["full"], "bf16", 16), FULL, ("quantization", "bf16")),
        (S.spec_for(S.QUANT["full"], "rtn", 4), FULL, ("quantization", "quantized")),
        ({"method": "gift-sw", "metric": "owq", "seed": 0}, FULL, ("ablations", "evaluated")),
        ({"method": "gift-sw", "noise": "output", "seed": 0}, FULL, ("ablations", "evaluated")),
        ({"method": "gmt", "mask_ratio": 0.7, "seed": 0}, FULL, ("ablations", "evaluated")),
        ({"method": "gift-sw", "mask_ratio": 0.5, "seed": 0}, FULL, ("ablations", "evaluated")),
        ({"method": "lora", "lora_r": 11, "lr": 3e-4, "seed": 0}, FULL, ("ablations", "evaluated")),
        ({"method": "gift-sw", "seed": 0, "_start": "gptq+salient-2bit", "_quantize": "x"}, FULL,
         ("recovery", "recovery")),
    ]


class _FakeRuns:
    def __init__(self, preset):
        self.preset = preset


def test_every_kind_of_run_is_placed_in_its_part():
    cases = specs_of_every_kind()
    for spec, preset, want in cases:
        assert B.classify(rec(spec), preset, "x.json") == want, spec
    assert {kind for _, _, (_, kind) in cases} == set(B.KINDS)  # every kind is exercised
    assert {part for _, _, (part, _) in cases} == set(B.PARTS)  # and every part


def test_the_part_a_record_names_wins_over_its_spec():
    grid = {**S.quality_spec("gift-sw", 0, 11), "lr": 1e-3, "eval_tasks": ""}
    assert B.classify(rec(grid, part="noise_scale"), P500) == ("noise_scale", "grid")
    with pytest.raises(B.Unclassified, match=r"r\.json: its part 'speed' is none of"):
        B.classify(rec(grid, part="speed"), P500, "r.json")


@pytest.mark.parametrize("spec", [
    {"method": "gift-sw", "seed": 0, "new_knob": 1},  # a key no kind has: a part nobody taught the budget
    {"part": "distill", "method": "x"},
    {"method": "gift-sw", "seed": 0, "eval_tasks": "hellaswag"},  # evaluated on another task set
    {"seed": 0},
    {"method": "base", "seed": 0},
])
def test_an_unplaceable_record_is_an_error_naming_its_file(tmp_path, spec):
    with pytest.raises(B.Unclassified, match=r"odd\.json: no kind of run matches"):
        B.classify(rec(spec), P500, "runs/odd.json")
    runs = tmp_path / "runs" / "paper500"
    runs.mkdir(parents=True)
    (runs / "good.json").write_text(json.dumps(rec({"method": "base"})))
    (runs / "odd.json").write_text(json.dumps(rec(spec)))
    with pytest.raises(SystemExit, match=r"odd\.json: no kind of run matches"):
        B.main(["--paper500", "--out", str(tmp_path)])
    assert not (tmp_path / "budget.json").exists()  # nothing written: a budget missing a run is no budget


def test_a_broken_record_is_an_error_too(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(B.Unclassified, match=r"a\.json: not JSON"):
        B.read_records(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"spec": {"method": "base"}}))
    with pytest.raises(B.Unclassified, match=r"a\.json: a run record has a number of 'seconds'"):
        B.read_records(tmp_path)


def test_budget_sums_per_part_kind_and_method():
    grid = lambda m, lr: {**S.quality_spec(m, 0, 11), "lr": lr, "eval_tasks": ""}  # noqa: E731
    records = {"a": rec({"method": "base"}, 441.0),
               "b": rec(grid("lora", 1e-3), 120.0), "c": rec(grid("lora", 3e-4), 180.0),
               "d": rec(grid("full", 1e-4), 360.0),
               "e": rec({**S.quality_spec("gift-sw", 1, 11), "lr": 3e-4}, 660.0)}
    r = B.budget(records, P500)
    q = r["parts"]["quality"]
    assert q["runs"] == 5 and q["minutes"] == pytest.approx(1761 / 60, abs=0.01) and q["hours"] == 0.49
    g = q["kinds"]["grid"]
    assert (g["runs"], g["min_minutes"], g["max_minutes"], g["minutes"]) == (3, 2.0, 6.0, 11.0)
    assert g["methods"]["lora"] == {"runs": 2, "minutes": 5.0, "hours": 0.08, "min_minutes": 2.0, "max_minutes": 3.0}
    assert list(q["kinds"]) == ["base", "grid", "evaluated"]  # KINDS' order
    assert r["total"]["runs"] == 5 and r["total"]["max_minutes"] == 11.0 and r["superseded"]["runs"] == 0


def test_a_quantized_model_made_again_supersedes_the_old_record_and_its_recoveries():
    old = {k: v for k, v in S.spec_for(QS, "gptq+salient", 2).items() if k != "quant_code"}  # before quant_code
    new = S.spec_for(QS, "gptq+salient", 2)
    records = {"old": rec(old, 600.0), "new": rec(new, 500.0, finished="2026-11-01T00:00:00"),
               "r_old": rec({"method": "gift-sw", "seed": 0, "_start": "gptq+salient-2bit",
                             "_quantize": S.run_key(P500, old), "lr": 3e-4}, 700.0),
               "r_new": rec({"method": "gift-sw", "seed": 0, "_start": "gptq+salient-2bit",
                             "_quantize": S.run_key(P500, new), "lr": 3e-4}, 720.0)}
    r = B.budget(records, P500)
    assert r["superseded"] == {"runs": 2, "minutes": 21.67, "files": ["old", "r_old"]}
    rec_part = r["parts"]["recovery"]
    assert rec_part["runs"] == 2 and rec_part["kinds"]["quantized"]["max_minutes"] == pytest.approx(500 / 60, abs=0.01)


def test_runs_record_the_part_that_ran_them_outside_the_key(tmp_path):
    spec = {"method": "gift-sw", "seed": 0}
    runs = S.Runs(S.PRESETS["smoke"], tmp_path, part="ablations")
    assert runs.path(spec) == S.Runs(S.PRESETS["smoke"], tmp_path).path(spec)  # the part changes no key
    r = runs.get(spec, lambda: {"value": 1})
    assert r["part"] == "ablations" and r["spec"] == spec
    assert json.loads(runs.path(spec).read_text())["part"] == "ablations"
    assert B.classify(r, S.PRESETS["smoke"]) == ("ablations", "evaluated")  # though the spec reads as quality's
    assert "part" not in S.Runs(S.PRESETS["smoke"], tmp_path / "b").get(spec, lambda: {})  # a caller without one


def test_every_part_script_names_itself_to_its_cache():
    for part in B.PARTS:
        text = (ROOT / "bench" / f"{part}.py").read_text()
        assert f'part="{part}"' in text, f"bench/{part}.py does not record its part in its runs"


def test_the_committed_paper500_runs_classify_as_section_7_5_counts_them():
    records = B.read_records(ROOT / "docs/results/paper500/runs/paper500")
    r = B.budget(records, P500)
    assert {p: e["runs"] for p, e in r["parts"].items()} == {"quality": 45, "noise_scale": 15, "recovery": 12,
                                                               "quantize_order": 30}
    assert r["total"]["runs"] == len(records) == 102 and r["superseded"]["runs"] == 0
    assert {k: e["runs"] for k, e in r["parts"]["quality"]["kinds"].items()} == {"base": 1, "grid": 26, "evaluated": 18}
    assert {k: e["runs"] for k, e in r["parts"]["quantize_order"]["kinds"].items()} == \
        {"recovery": 6, "train_only": 6, "quantize_trained": 18}


@pytest.mark.parametrize("folder, preset", [("docs/results/paper500", P500), ("docs/results", FULL)])
def test_the_committed_budgets_are_those_of_the_committed_runs(folder, preset):
    """A run added or redone without rerunning bench/budget.py leaves its budget (and the figures
    docs/RESULTS.md quotes from it) stale: this fails, naming the command."""
    committed = json.loads((ROOT / folder / "budget.json").read_text())
    fresh = B.budget(B.read_records(ROOT / folder / "runs" / preset.name), preset)
    assert {k: committed[k] for k in fresh} == fresh, f"rerun `.venv/bin/python bench/budget.py{B._flag(preset)}`"
    if preset is FULL:
        assert committed["speed"] == B.speed(ROOT / folder)


def test_main_writes_the_report_through_the_harness(tmp_path):
    runs = tmp_path / "runs" / "smoke"
    runs.mkdir(parents=True)
    for i, spec in enumerate([{"method": "base"}, {"method": "gift-sw", "seed": 0}, {"method": "gift-sw", "seed": 1}]):
        (runs / f"{i}.json").write_text(json.dumps(rec(spec, 60.0 * (i + 1))))
    assert B.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "budget.json").read_text())
    assert data["preset"] == "smoke" and data["command"] == "bench/budget.py --smoke" and "provenance" in data
    assert data["parts"]["quality"]["kinds"]["evaluated"]["max_minutes"] == 3.0 and data["total"]["runs"] == 3
    md = (tmp_path / "budget.md").read_text()
    assert "| quality | `bench/quality.py --smoke` | 3 | 1 base, 2 evaluated | 6.0 min |" in md
    assert "| quality | evaluated | 2 | 2.0-3.0 | 5 | gift-sw 2.0-3.0 |" in md
    assert md.rstrip().splitlines()[-1].startswith("Provenance: commit")



def test_results_md_budget_figures_turn_red_when_a_budget_changes(docs_copy):
    import render_docs as R

    root = docs_copy
    assert R.check(root) == []
    f = root / "docs/results/paper500/budget.json"
    data = json.loads(f.read_text())
    data["total"]["hours"] = 14.2
    data["parts"]["quality"]["kinds"]["grid"]["max_minutes"] = 7.04
    f.write_text(json.dumps(data))
    full = root / "docs/results/budget.json"
    data = json.loads(full.read_text())
    data["parts"]["quality"]["kinds"]["evaluated"]["min_minutes"] = 3.0
    full.write_text(json.dumps(data))
    problems = R.check(root)
    assert any("quotes '15.7' where docs/results/paper500/budget.json:total/hours gives '14.2'" in p for p in problems)
    assert any("parts/quality/kinds/grid/max_minutes gives '7.0'" in p for p in problems), problems
    assert any("docs/results/budget.json:parts/quality/kinds/evaluated/min_minutes gives '3.0'" in p for p in problems)
    # the tables are copied from the reports: a changed report makes the region stale
    md = root / "docs/results/paper500/budget.md"
    md.write_text(md.read_text().replace("| 102 | | 15.7 h |", "| 103 | | 15.9 h |"))
    assert any("docs/RESULTS.md: region(s) table out of date" in p for p in R.check(root))
