"""Every figure README.md and docs/*.md quote comes from a results file (scripts/render_docs.py):
rendered regions are up to date, inline references name an existing file and value and quote it
as written there; a changed results file, a missing one or a stale region turns the check red."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import render_docs as R  # noqa: E402


def test_every_quoted_figure_matches_its_results_file():
    problems = R.check(ROOT)
    assert not problems, "\n".join(problems)


def test_the_documents_use_both_mechanisms():
    text = "".join(p.read_text() for p in R.documents(ROOT))
    names = set(m["name"] for m in R.REGION.finditer(text))
    assert names == set(R.RENDERERS), names  # every renderer is used, no region is unknown
    assert len(list(R.REFERENCE.finditer(text))) >= 20



def test_changing_a_results_file_under_a_quoted_figure_turns_the_check_red(docs_copy):
    root = docs_copy
    assert R.check(root) == []
    # a value inside a rendered region (and quoted inline): 4-bit GIFT-SW recovery's lower end
    f = root / R.PAIRED
    data = json.loads(f.read_text())
    data["recovery"]["rows"][0]["paired_vs_quantized"]["gift-sw"]["lo"] = -0.01
    f.write_text(json.dumps(data))
    problems = R.check(root)
    assert any("paired-recovery-vs-quantized out of date" in p for p in problems), problems
    assert any("gives '+1.8 [-1.0, +3.0]'" in p for p in problems), problems
    # rendering again fixes the region, not the sentence that quotes the old interval
    R.render(root)
    problems = R.check(root)
    assert problems and all("out of date" not in p for p in problems) and all("quotes" in p for p in problems)


def test_a_benchmark_report_changed_under_a_copied_table_turns_the_check_red(docs_copy):
    root = docs_copy
    report = root / "docs" / "results" / "quantization.md"
    text = report.read_text()
    assert "| 3 | gptq+salient | 35.11 |" in text
    report.write_text(text.replace("| 3 | gptq+salient | 35.11 |", "| 3 | gptq+salient | 34.50 |"))
    problems = R.check(root)
    assert any("docs/RESULTS.md: region(s) table out of date" in p for p in problems), problems
    assert any("docs/quantization.md: region(s) table out of date" in p for p in problems), problems
    # a table inserted before it: the region would copy another table; refused, not swapped silently
    report.write_text("| provenance | commit |\n|---|---|\n| x | y |\n\n" + text)
    problems = R.check(root)
    assert any("its first line would change" in p for p in problems), problems
    with pytest.raises(SystemExit, match="its first line would change"):
        R.render(root)
    report.unlink()
    assert any("docs/results/quantization.md does not exist" in p for p in R.check(root))


def test_a_missing_file_or_value_and_a_stale_region_are_named(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "x.json").write_text(json.dumps({"a": {"b": [0.123, 2.5]}}))
    doc = tmp_path / "README.md"
    doc.write_text("ok 12.3<!-- = docs/results/x.json:a/b/0|100*{:.1f} --> % and 2.50x<!-- = docs/results/x.json:a/b/1|{:.2f}x -->\n")
    assert R.check(tmp_path) == []
    doc.write_text("bad 12.4<!-- = docs/results/x.json:a/b/0|100*{:.1f} --> %\n"
                   "gone 1<!-- = docs/results/y.json:a|{} -->\n"
                   "no key 1<!-- = docs/results/x.json:a/c|{} -->\n")
    problems = R.check(tmp_path)
    assert len(problems) == 3, problems
    assert "README.md:1: quotes '12.4' where docs/results/x.json:a/b/0 gives '12.3'" in problems[0]
    assert "docs/results/y.json does not exist" in problems[1] and "no 'c'" in problems[2]
    doc.write_text("<!-- figures:nope -->\nx\n<!-- /figures -->\n")
    assert "unknown figures region 'nope'" in R.check(tmp_path)[0]


@pytest.mark.parametrize("fmt, value, want", [
    ("interval", {"diff": 0.0183, "lo": 0.0063, "hi": 0.0304}, "+1.8 [+0.6, +3.0]"),
    ("verdict", {"diff": 0.0079, "lo": -0.00028, "hi": 0.0161}, "borderline"),
    ("100*{:+.1f}", -0.0062, "-0.6"),
    ("{:.2f}x", 1.0912, "1.09x"),
])
def test_formats(fmt, value, want):
    assert R.write_value(value, fmt) == want


def _intervals(node, path=()):
    """Every {diff, lo, hi} entry of a report, by its path."""
    if isinstance(node, dict):
        if {"diff", "lo", "hi"} <= set(node):
            yield path, node
        for k, v in node.items():
            yield from _intervals(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _intervals(v, path + (i,))


def test_exact_intervals_belong_to_the_parts_reports():
    """paired_exact.json (scripts/exact_intervals.py) re-derives the parts' intervals from the same
    per-item outcomes: every difference is the part's own to the last bit, and every end is within
    the 2,000-resample Monte-Carlo error of the part's (0.3 point). A part re-run without
    re-deriving the exact intervals fails here."""
    exact = json.loads((ROOT / R.PAIRED).read_text())
    count = 0
    for part in ("quality", "noise_scale", "recovery", "quantize_order"):
        report = json.loads((ROOT / "docs" / "results" / "paper500" / f"{part}.json").read_text())
        for path, e in _intervals(exact[part]):
            r = report
            for k in path:
                r = r[k]
            assert e["diff"] == r["diff"], (part, path)
            assert abs(e["lo"] - r["lo"]) < 0.003 and abs(e["hi"] - r["hi"]) < 0.003, (part, path, e, r)
            count += 1
    assert count == 84, count  # 42 comparisons, each with its five-task (without BoolQ) interval
