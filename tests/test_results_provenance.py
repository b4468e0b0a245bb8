"""Every results file says what produced it: the provenance block (bench/lib/provenance.py) written
by every benchmark, or, for a file older than the block, the block scripts/backfill_provenance.py
made from what the file recorded, each missing fact marked "not recorded", never guessed."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

import backfill_provenance as B  # noqa: E402
from lib.provenance import KEYS  # noqa: E402


def test_every_committed_results_file_has_the_block_and_says_what_it_does_not_know():
    files = B.results_files()
    assert len(files) > 100  # the reports and the suite's cached runs
    for path in files:
        data = json.loads(path.read_text())
        block = data.get("provenance") if isinstance(data, dict) else None
        assert isinstance(block, dict), f"{path.relative_to(ROOT)} has no provenance block: run scripts/backfill_provenance.py"
        assert set(KEYS) <= set(block), f"{path.relative_to(ROOT)}: block lacks {set(KEYS) - set(block)}"
        unknown = sorted(k for k in KEYS if block[k] == B.NOT_RECORDED)
        if "backfilled" in block:
            assert sorted(block["backfilled"]["not_recorded"]) == unknown, path
        else:
            assert not unknown, f"{path.relative_to(ROOT)}: a measured block cannot lack {unknown}"


def test_a_backfilled_block_takes_what_the_file_recorded_and_invents_nothing():
    old = {"machine": {"commit": "abc1234", "threads": 2, "torch": "2.13.0+cpu", "processor": "x86_64"},
           "settings": {"dtype": "fp32", "seeds": [0, 1]}, "rows": []}
    block = B.backfilled_block(old, "def5678")
    assert block["commit"] == "abc1234" and block["threads"] == 2 and block["dtype"] == "fp32"
    assert block["seed"] == [0, 1] and block["torch"] == "2.13.0+cpu"
    assert block["cpu_model"] == B.NOT_RECORDED  # "x86_64" is an architecture, not a CPU model
    assert block["omp_wait_policy"] == B.NOT_RECORDED and block["gpu"] == B.NOT_RECORDED
    assert sorted(block["backfilled"]["not_recorded"]) == ["cpu_model", "dirty", "gpu", "omp_wait_policy"]
    assert block["backfilled"]["committed_in"] == "def5678"
    assert B.backfilled_block({"device": "cpu", "cpu_model": "AMD EPYC"}, None)["gpu"] is None


def test_backfilling_keeps_a_files_layout_and_touches_only_files_without_a_block(tmp_path, monkeypatch):
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    old_text = '{\n "threads": 1,\n "name": "caf\u00e9"\n}\n'
    (results / "old.json").write_text(old_text)
    new = {"provenance": {k: 1 for k in KEYS}, "x": 1}
    (results / "new.json").write_text(json.dumps(new))
    monkeypatch.setattr(B, "ROOT", tmp_path)
    assert B.main(["--check"]) == 1
    assert B.main([]) == 0 and B.main(["--check"]) == 0
    text = (results / "old.json").read_text()
    assert text.startswith(old_text[:-3]) and "caf\u00e9" in text  # one-space indent, non-ASCII as it was
    assert json.loads(text)["provenance"]["threads"] == 1
    assert json.loads((results / "new.json").read_text()) == new


def test_the_check_passes_on_the_repository():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "backfill_provenance.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout
