"""The sections of docs/RESULTS.md that start from a quantized model start from one: every results
file that measured the GPTQ + salient-columns model at a bit width records the same fingerprint
(salientft.quant.fingerprint), made by the thread-independent GPTQ, and 1 and 2 threads make it.
(That a later change to the quantization code re-measures it is the benchmarks' cache key: the
code version, tests/test_quant_fingerprint.py.)

Files measured before GPTQ was made thread-independent carry no fingerprint; they are listed in
``BEFORE_DETERMINISM`` with the reason, and the documents say so where they quote them. A file
regenerated since must leave the list (the test fails until it does)."""
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DETERMINISM_COMMIT = "e26e0d7"  # quant/gptq: thread-count-independent inverse Hessian factor
# measured on the former GPTQ; regenerating them is ~6.5 machine-hours (docs/results/paper500/budget.json)
BEFORE_DETERMINISM = {"paper500/recovery.json", "paper500/quantize_order.json"}


def _load(rel):
    return json.loads((RESULTS / rel).read_text())


def _quantization_models():
    q = _load("quantization.json")
    return {row["bits"]: row for row in q["rows"] if row["method"] == "gptq+salient"}


def _is_ancestor(commit, of="HEAD"):
    return subprocess.run(["git", "merge-base", "--is-ancestor", commit, of], cwd=ROOT).returncode == 0


def test_section_3_models_are_fingerprinted_and_made_by_the_deterministic_gptq():
    q = _load("quantization.json")
    assert q["provenance"]["threads"] and q["provenance"].get("commit")
    assert _is_ancestor(DETERMINISM_COMMIT, q["provenance"]["commit"]), "quantization.json predates deterministic GPTQ"
    for row in q["rows"]:
        assert row.get("fingerprint"), f"{row['method']} {row['bits']} bits has no fingerprint"
    runs = [json.loads(p.read_text()) for p in (RESULTS / "runs" / "full").glob("*.json")]
    cached = {(r["result"]["method"], r["result"]["bits"], r["result"].get("fingerprint")) for r in runs
              if r["spec"].get("part") == "quantize" and r["spec"].get("quant_code")}
    for row in q["rows"]:  # the report's rows are the cached runs it was rendered from
        assert (row["method"], row["bits"], row["fingerprint"]) in cached, (row["method"], row["bits"])


def test_recovery_starts_from_section_3s_models():
    models = _quantization_models()
    rec = _load("recovery.json")
    assert rec["rows"], "recovery.json has no rows"
    for row in rec["rows"]:
        assert row["quantized"]["fingerprint"] == models[row["bits"]]["fingerprint"], row["bits"]
        assert row["quantized"]["text_ppl"] == models[row["bits"]]["text_ppl"]


def test_the_1_and_2_thread_models_are_section_3s():
    threads = _load("quant_threads.json")
    models = _quantization_models()
    assert threads["all_identical"]
    for row in threads["rows"]:
        prints = {v["fingerprint"] for v in row["by_threads"].values()}
        assert prints == {models[row["bits"]]["fingerprint"]}, row["bits"]


def test_files_measured_before_deterministic_gptq_are_listed_and_predate_it():
    for rel in BEFORE_DETERMINISM:
        data = _load(rel)
        commit = data["provenance"]["commit"]
        assert not _is_ancestor(DETERMINISM_COMMIT, commit), f"{rel} was regenerated: take it off BEFORE_DETERMINISM"
        assert "fingerprint" not in json.dumps(data), rel
