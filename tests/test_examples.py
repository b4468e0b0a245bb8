"""The runnable examples run: each is started as a user would, in a subprocess, with few steps."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_trl_sft_example_trains_saves_and_reloads(tmp_path):
    pytest.importorskip("trl")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_sft_gift_sw.py"), "--steps", "2",
                          "--output", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "adapter saved to" in out.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert '"peft_type": "GIFT_SW"' in (tmp_path / "run" / "adapter" / "adapter_config.json").read_text()
