"""bench/lib, the benchmarks' shared harness: its pieces do what the reports rely on, and every
benchmark script uses it (no second timing loop, report writer, model builder or ``--dtype``
spelling in bench/; no script importing another), so every results file records the provenance
block."""
import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

from lib import cli, provenance, report, stats, timing  # noqa: E402  bench/lib

SHARED = {"_suite", "_memory", "_machine"}  # the modules scripts may import besides bench/lib
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.stem not in SHARED)


# ----------------------------------------------------------------------------------------------
# The provenance block and the writer
# ----------------------------------------------------------------------------------------------
def test_provenance_records_every_key(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    p = provenance.provenance("bf16", [0, 1])
    assert list(p) == list(provenance.KEYS)
    assert p["dtype"] == "bf16" and p["seed"] == [0, 1] and p["omp_wait_policy"] == "PASSIVE"
    assert p["threads"] == torch.get_num_threads() and p["torch"] == torch.__version__
    assert p["gpu"] is None  # a CPU run names no GPU (and never initialises CUDA)
    if (ROOT / ".git").exists():
        assert len(p["commit"]) == 40 and int(p["commit"], 16) >= 0 and isinstance(p["dirty"], bool)
    monkeypatch.delenv("OMP_WAIT_POLICY")
    q = provenance.provenance(None, None, threads=3, device="cpu")
    assert q["omp_wait_policy"] == "unset (spin)" and q["threads"] == 3


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_dirty_means_the_code_differs_from_the_commit(tmp_path, monkeypatch):
    """Results being regenerated (docs/) leave a run clean; a changed or new file of code makes it dirty."""
    for f in ("src/m.py", "bench/b.py", "docs/results/r.json"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "x")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    sha, dirty, paths = provenance.git_state()
    assert len(sha) == 40 and dirty is False and paths == []
    (tmp_path / "docs/results/r.json").write_text("2\n")
    assert provenance.git_state()[1] is False
    (tmp_path / "src/m.py").write_text("2\n")
    (tmp_path / "bench/new.py").write_text("new\n")
    sha2, dirty, paths = provenance.git_state()
    assert sha2 == sha and dirty is True and sorted(paths) == ["bench/new.py", "src/m.py"]
    monkeypatch.setattr(provenance, "ROOT", tmp_path / "nowhere")  # not a checkout: unknown, not clean
    assert provenance.git_state() == (None, None, [])


def test_write_report_writes_json_markdown_and_png_with_the_block(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def plot():
        fig, ax = plt.subplots()
        ax.plot([1, 2])
        return fig

    stem = tmp_path / "sub" / "bench_x"
    result = report.write_report(stem, {"value": 1.5}, ["# Title", "", "a line"], plot, dtype="fp32", seed=7,
                                 threads=2)
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data == result and data["value"] == 1.5
    block = data["provenance"]
    assert list(block) == list(provenance.KEYS) and block["seed"] == 7 and block["threads"] == 2
    md = stem.with_suffix(".md").read_text()
    assert md.startswith("# Title\n\na line\n\nProvenance: commit ") and "dtype fp32, seed 7." in md
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in stem.parent.iterdir()) == ["bench_x.json", "bench_x.md", "bench_x.png"]
    # no Markdown asked for: JSON only
    report.write_report(tmp_path / "only", {"a": 1}, None, dtype=None, seed=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["only.json", "sub"]


# ----------------------------------------------------------------------------------------------
# Timing and statistics
# ----------------------------------------------------------------------------------------------
def test_interleave_warms_up_then_rotates_the_start_each_round():
    calls = []
    work = {k: (lambda k=k: calls.append(k) or len(calls)) for k in "abc"}
    seen_rounds = []
    times = timing.interleave(work, rounds=4, warmup=2, measure=timing.returned,
                              on_round=lambda r, ts: seen_rounds.append((r, len(ts["a"]))))
    assert calls[:6] == list("aabbcc")  # warm-up: untimed, each key's calls together
    assert "".join(calls[6:]) == "abc" + "bca" + "cab" + "abc"  # the start rotates each round
    assert times == {"a": [7, 12, 14, 16], "b": [8, 10, 15, 17], "c": [9, 11, 13, 18]}  # each key's own readings
    assert seen_rounds == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert timing.rotation(list("abc"), 4) == list("bca")


def test_clocks_measure_the_call_in_ms():
    import time

    ms = timing.wall_ms(lambda: time.sleep(0.02))
    assert 15 < ms < 2000
    assert timing.cpu_ms(lambda: time.sleep(0.02)) < ms  # sleeping costs no CPU time
    assert timing.clock_for("cpu") is timing.wall_ms and timing.clock_for("cpu", timing.returned) is timing.returned
    assert isinstance(timing.clock_for("cuda"), timing.CudaTimer)


@pytest.mark.numerics
def test_quartiles_summary_and_round_ratio():
    assert stats.quartiles([1, 2, 3, 4, 5]) == (1.5, 3, 4.5)  # statistics.quantiles' exclusive method
    assert stats.quartiles([4.0]) == (4.0, 4.0, 4.0)
    with pytest.raises(ValueError):
        stats.quartiles([])
    s = stats.summarize([3.0, 1.0, 2.0])
    assert s == {"median_ms": 2.0, "q1_ms": 1.0, "q3_ms": 3.0, "step_ms": [3.0, 1.0, 2.0]}
    assert stats.summarize([2.0], unit="s", keep=None) == {"median_s": 2.0, "q1_s": 2.0, "q3_s": 2.0}
    # the median of per-round ratios, not the ratio of medians (a slow round slows both keys)
    assert stats.round_ratio([2, 20, 4], [1, 10, 1]) == 2
    with pytest.raises(ValueError):
        stats.round_ratio([1, 2], [1])


def test_dtype_has_one_spelling_and_accepts_the_old_one():
    ap = argparse.ArgumentParser()
    cli.add_dtype_argument(ap)
    assert ap.parse_args([]).dtype == "fp32"
    assert ap.parse_args(["--dtype", "float32"]).dtype == "fp32"
    assert ap.parse_args(["--dtype", "bfloat16"]).dtype == "bf16"
    assert cli.torch_dtype(ap.parse_args(["--dtype", "bf16"]).dtype) is torch.bfloat16
    with pytest.raises(SystemExit):
        ap.parse_args(["--dtype", "fp16"])


def test_random_llama_is_seeded_and_built_as_asked():
    from lib.models import random_batch, random_llama

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    a, tok = random_llama(shape, torch.bfloat16)
    b, _ = random_llama(shape, torch.bfloat16)
    assert a.config.hidden_size == 32 and a.dtype == torch.bfloat16 and not a.training
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    ids = random_batch(64, (2, 8))
    assert ids.shape == (2, 8) and int(ids.min()) >= 3 and torch.equal(ids, random_batch(64, (2, 8)))


# ----------------------------------------------------------------------------------------------
# Every script uses the harness
# ----------------------------------------------------------------------------------------------
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(tree) -> set[str]:
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
    return mods


def _called_names(tree) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def test_scripts_import_no_other_script():
    scripts = {p.stem for p in SCRIPTS}
    for path in [*SCRIPTS, *(BENCH / f"{m}.py" for m in SHARED)]:
        bad = _imported_modules(_tree(path)) & scripts
        assert not bad, f"bench/{path.name} imports the script(s) {sorted(bad)}: move what it needs into bench/lib or _suite.py"


# The only writes outside bench/lib's writer, and why they are not results files.
OTHER_WRITES = {
    ("_suite.py", "write_json"): "a cached run's record (Runs.get), which records the block itself",
    ("distributed.py", "write_text"): "a spawned rank's result, read back by the parent (a temporary file)",
    ("labelled_logits.py", "write_text"): "a worker process's run, read back by the parent (a temporary file)",
}


def test_every_results_writer_goes_through_write_report():
    """write_report adds the provenance block: a script that wrote its own JSON, Markdown or PNG
    would leave it out."""
    for path in [*SCRIPTS, BENCH / "_suite.py"]:
        tree = _tree(path)
        called = _called_names(tree)
        assert "write_report" in called, f"bench/{path.name} writes no report through lib.report.write_report"
        for name in ("write_json", "atomic_path", "write_text", "savefig", "dump"):
            if name in called:
                assert (path.name, name) in OTHER_WRITES, f"bench/{path.name} calls {name}(): write results with write_report"
    suite = (BENCH / "_suite.py").read_text()
    assert '"provenance": provenance(self.preset.dtype' in suite  # the cached records carry it too


def test_no_timing_loop_quartiles_builder_or_dtype_option_outside_lib():
    lib_defs = {"interleave", "rotation", "quartiles", "round_ratio", "step_summary", "Timer", "CudaTimer",
                "random_llama", "load_base", "make_batch", "random_batch", "build", "train_step", "peak_memory",
                "memory_worker", "write_report", "write_markdown", "write_plot", "provenance", "storage_bytes"}
    for path in [*SCRIPTS, BENCH / "_suite.py"]:
        text = path.read_text()
        defined = {n.name for n in ast.walk(_tree(path)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        allowed = {"write_report"} if path.name == "_suite.py" else set()  # a one-line adapter to lib's
        assert not (defined & lib_defs) - allowed, f"bench/{path.name} defines {sorted(defined & lib_defs)}: use bench/lib's"
        assert "% len(" not in text, f"bench/{path.name} rotates keys itself: use lib.timing.interleave"
        assert "quantiles(" not in text, f"bench/{path.name} computes quartiles itself: use lib.stats"
        assert '"--dtype"' not in text.replace('"--dtype", args.dtype', ""), (
            f"bench/{path.name} declares --dtype itself: use lib.cli.add_dtype_argument")
        # the quality half loads its preset's model through salientft (the run being measured loads it so)
        builders = {"tiny_random_llama", "LlamaForCausalLM", "LlamaConfig"} | (
            set() if path.name == "_suite.py" or "_suite" in _imported_modules(_tree(path)) else {"load_model"})
        assert not _called_names(_tree(path)) & builders, f"bench/{path.name} builds a model itself: use lib.models"
