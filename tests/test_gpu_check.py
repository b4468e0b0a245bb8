"""The GPU check (scripts/gpu_check.sh, scripts/gpu_wheels.sh, bench/gpu_step.py) cannot rot on a
machine without a GPU: its benchmark runs as a CPU dry run with tiny models, the shell scripts'
refusals and dry run run here, and its pieces (sync counter, target verdicts, junit summary,
environment check) are checked against what they must report."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import gpu_step  # noqa: E402  bench/gpu_step.py

VERDICTS = {"pass (goal)", "pass (must)", "FAIL", "not measured"}


def _script(name, *args, env=None, timeout=300):
    full_env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(["bash", str(ROOT / "scripts" / name), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_measures_every_method_and_evaluates_the_targets(tmp_path):
    """One model, every method: timed, trainable counts matched, syncs counted, targets evaluated."""
    threads = torch.get_num_threads()
    rc = gpu_step.main(["--dry-run", "--out", str(tmp_path), "--models", "smollm2-shape", "--budget-s", "900",
                        "--rounds", "3"])
    assert rc == 0
    assert torch.get_num_threads() == threads  # the dry run's one thread does not leak into the caller
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    assert result["dry_run"] and result["device"] == "cpu" and result["skipped"] == []
    methods = result["models"]["smollm2-shape"]["methods"]
    assert list(methods) == [*gpu_step.GROUPS["main"], *gpu_step.GROUPS["gmt"]]
    for name, m in methods.items():
        assert len(m["step_ms"]) == 3 and m["median_ms"] > 0, name
        assert isinstance(m["syncs"], int) and m["syncs"] >= 0, name
        assert m["accum"] == gpu_step.VARIANTS[name][1]
    # LoRA runs at GIFT-SW's trainable count (rank rounded: within 10 %); dense methods train everything
    assert abs(methods["lora"]["trainable"] / methods["gift-none"]["trainable"] - 1) < 0.1
    assert methods["full"]["trainable"] == methods["gmt-acc8"]["trainable"] > 10 * methods["lora"]["trainable"]
    assert methods["gmt-acc8"]["round_ratio_vs_full-acc8"] > 0 and methods["gift-none"]["round_ratio_vs_lora"] > 0
    # the generator switch is checked, not assumed (on CPU the variable may change nothing)
    switch = result["models"]["smollm2-shape"]["noise_generator_switch"]
    assert switch["repeatable"] is True and isinstance(switch["effective"], bool)
    targets = result["targets"]
    assert len(targets) == len(gpu_step.TARGETS) and {t["verdict"] for t in targets} <= VERDICTS
    measured = {t["measure"] for t in targets if t["value"] is not None}
    assert len(measured) == len(gpu_step.TARGETS) - 1  # all but peak memory (CUDA only)
    md = (tmp_path / "gpu_step.md").read_text()
    assert "DRY RUN" in md and "| gmt-acc8 | 8 |" in md and "## Targets" in md
    prov = result["provenance"]  # bench/lib's block; the dry run's one thread, no GPU
    assert prov["dtype"] == "bf16" and prov["seed"] == 0 and prov["threads"] == 1 and prov["gpu"] is None
    assert "Provenance: commit " in md


def test_a_spent_budget_skips_every_method_by_name(tmp_path):
    assert gpu_step.main(["--dry-run", "--out", str(tmp_path), "--models", "smollm2-shape", "--budget-s", "0"]) == 0
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    skipped = {s["method"] for s in result["skipped"]}
    assert skipped == set(gpu_step.VARIANTS) and all("budget" in s["reason"] for s in result["skipped"])
    assert all(t["verdict"] == "not measured" for t in result["targets"])
    assert "smollm2-shape / gmt-acc8: budget" in (tmp_path / "gpu_step.md").read_text()


def test_cuda_device_without_cuda_is_refused(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_step.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "gpu_step.json").exists()


def test_sync_counter_counts_the_ops_that_wait_for_the_device():
    x = torch.randn(8)
    step = torch.zeros((), dtype=torch.float32)  # an optimizer's step counter: ignored by data pointer

    def work():
        _ = x @ x  # no sync
        _ = (x > 0).nonzero()  # data-dependent size
        _ = float(x.sum())  # a scalar read
        _ = x[x > 0]  # boolean-mask indexing
        _ = step.item()  # ignored

    with gpu_step._sync_counter(False, {step.data_ptr()}) as counter:
        work()
    assert counter.counts == {"nonzero": 1, "_local_scalar_dense": 1, "index[bool]": 1}
    # on a GPU, CPU tensors wait for nothing: none of these count
    with gpu_step._sync_counter(True, set()) as counter:
        work()
    assert counter.counts == {}


def _result(ms):
    return {"models": {"m": {"methods": ms}}}


def test_target_verdicts_goal_must_fail_and_unmeasured():
    ms = {
        "lora": {"syncs": 0, "peak_mb": 100.0},
        "gift-none": {"round_ratio_vs_lora": 0.7, "syncs": 1, "peak_mb": 90.0},  # time: goal; peak 0.9: must
        "gift-weight": {"round_ratio_vs_lora": 1.4, "syncs": 0},  # > must 1.3
        "full-acc8": {"syncs": 3},
        "gmt-acc8": {"round_ratio_vs_full-acc8": 1.04, "syncs": 7},  # must; syncs 7 - 3 = 4 beyond full: must
    }
    rows = {t["measure"]: t for t in gpu_step.evaluate_targets(_result(ms))}
    labels = [t[0] for t in gpu_step.TARGETS]
    assert rows[labels[0]]["verdict"] == "pass (goal)"
    assert rows[labels[1]]["verdict"] == "pass (must)" and rows[labels[1]]["value"] == pytest.approx(0.9)
    assert rows[labels[2]]["verdict"] == "FAIL"
    assert rows[labels[3]]["verdict"] == "pass (must)"
    assert rows[labels[4]]["value"] == 4 and rows[labels[4]]["verdict"] == "pass (must)"
    assert rows[labels[5]]["verdict"] == "not measured"
    ms["gift-output"] = {"syncs": 5}  # 5 beyond LoRA's: over the must of 4
    rows = {t["measure"]: t for t in gpu_step.evaluate_targets(_result(ms))}
    assert rows[labels[4]]["verdict"] == "FAIL"


def test_junit_summary_counts_and_names_failures(tmp_path):
    xml = tmp_path / "tests.xml"
    xml.write_text(textwrap.dedent("""\
        <?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
        skipped="1" tests="5" time="2.5"><testcase classname="tests.test_a" name="test_ok"/>
        <testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>
        <testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>
        </testsuite></testsuites>"""))
    s = gpu_step.junit_summary(xml)
    assert (s["tests"], s["passed"], s["failures"], s["errors"], s["skipped"]) == (5, 2, 1, 1, 1)
    assert s["failed_tests"] == ["tests.test_a::test_bad", "tests.test_b::test_err"]
    assert gpu_step.junit_summary(tmp_path / "missing.xml") is None


def test_check_env_passes_here_and_names_an_unmet_requirement(monkeypatch, capsys):
    assert gpu_step.check_env() == 0
    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "5.17.0" if name.lower() == "transformers" else real(name))
    assert gpu_step.check_env() == 1
    err = capsys.readouterr().err
    assert "transformers" in err and "found 5.17.0" in err


@pytest.mark.slow
def test_gpu_check_dry_run_writes_the_reports(tmp_path):
    out = tmp_path / "gpu"
    r = _script("gpu_check.sh", "--dry-run", str(out),
                env={"GPU_CHECK_BENCH_ARGS": "--models smollm2-shape --methods lora,gift-none"})
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    phases = {p["phase"]: p["status"] for p in report["phases"]}
    assert phases == {"install": "skipped", "suite": "skipped", "bench": "ok", "total": "ok"}
    assert report["dry_run"] and report["targets"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_step.json", "gpu_step.md"]
    assert "DRY RUN" in (out / "gpu_check.md").read_text()
    assert report["provenance"]["dtype"] == "bf16" and report["provenance"]["gpu"] is None


def test_gpu_check_refuses_before_any_work(tmp_path):
    out = tmp_path / "never"
    for args, env, words in [
        ((), {}, "OUTDIR missing"),
        (("--fast", str(out)), {}, "unknown option --fast"),
        ((str(out), str(out) + "2"), {}, "one OUTDIR only"),
        ((str(out),), {"PYTHON": "/nonexistent/python"}, "cannot import torch"),
    ]:
        r = _script("gpu_check.sh", *args, env=env, timeout=120)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
    if not torch.cuda.is_available():
        r = _script("gpu_check.sh", str(out), timeout=120)
        assert r.returncode == 2 and "sees no CUDA device" in r.stderr and "--dry-run" in r.stderr
    # with CUDA (faked here: torch.cuda.is_available patched at start-up) the missing wheels are named
    fake = tmp_path / "fake_cuda"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    r = _script("gpu_check.sh", str(out), env={"PYTHONPATH": str(fake), "GPU_CHECK_WHEELS": str(tmp_path / "none")},
                timeout=120)
    assert r.returncode == 2 and "bash scripts/gpu_wheels.sh" in r.stderr, r.stderr
    assert not out.exists()


def test_gpu_wheels_list_never_carries_torch_and_every_name_has_a_version(tmp_path):
    pins = {line.split("==")[0].lower() for line in (ROOT / "requirements" / "ci.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    names = [line.split("#")[0].strip() for line in (ROOT / "scripts" / "gpu_wheels.txt").read_text().splitlines()]
    names = [n for n in names if n]
    assert "transformers" in names  # the GPU machine's 5.17 is refused by salientft
    for n in names:
        base = n.split("==")[0].lower()
        assert base not in ("torch", "triton") and not base.startswith("nvidia"), n
        assert "==" in n or base in pins, f"{n}: no version and no pin in requirements/ci.txt"
    # the script itself refuses a list that names torch, before downloading anything
    bad = tmp_path / "list.txt"
    bad.write_text("peft\ntorch==2.11.0\n")
    r = _script("gpu_wheels.sh", str(tmp_path / "wheels"), env={"GPU_WHEELS_LIST": str(bad)}, timeout=60)
    assert r.returncode == 2 and "torch" in r.stderr and not (tmp_path / "wheels").exists()


@pytest.mark.slow
def test_gpu_check_reports_a_failed_phase_and_exits_1(tmp_path):
    out = tmp_path / "gpu"
    r = _script("gpu_check.sh", "--dry-run", str(out), env={"GPU_CHECK_BENCH_ARGS": "--methods no-such-method"})
    assert r.returncode == 1, r.stderr[-2000:]
    phases = {p["phase"]: p for p in json.loads((out / "gpu_check.json").read_text())["phases"]}
    assert phases["bench"]["status"] == "FAILED" and "bench.log" in phases["bench"]["note"]
    assert "no-such-method" in (out / "bench.log").read_text()
    assert "| bench | FAILED |" in (out / "gpu_check.md").read_text()
