"""Re-derive every paired interval of the 500-item refresh (docs/RESULTS.md section 7) from the
per-item outcomes its cached runs keep, with the exact bootstrap (salientft.evaluation.paired:
no seed, so no verdict can flip with one), into ``docs/results/paper500/paired_exact.json``.

Nothing is trained, quantized or evaluated: each part (bench/quality.py, noise_scale.py,
recovery.py, quantize_order.py) is run with its recorded command in a scratch copy of
``docs/results/paper500`` with ``--max-minutes 0`` (a part then starts no run; every run is in
the cache), with ``paired_bootstrap_differences`` held to its exact path (the parts pass a
Monte-Carlo resample count of their own). The paired sections of the four reports are collected
with the code commit; the intervals the parts themselves wrote stay as they were measured.

    PYTHONPATH=src .venv/bin/python scripts/exact_intervals.py        # about a minute
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "results" / "paper500"
OUTPUT = SOURCE / "paired_exact.json"
PARTS = {  # part -> (its recorded arguments, the report keys holding paired intervals)
    "quality": (["--lr-grid", "--methods", "gift-sw", "lora", "salient", "full", "dora", "gmt"],
                ("paired_vs_gift_sw", "paired_claims")),
    "noise_scale": ([], ("paired_vs_none",)),
    "recovery": ([], ("rows",)),
    "quantize_order": ([], ("rows",)),
}


def _exact_only():
    """Hold paired_bootstrap_differences to the exact bootstrap whatever resample count a caller passes."""
    import salientft.evaluation.paired as paired

    original = paired.paired_bootstrap_differences

    def exact(diffs, **kwargs):
        kwargs.pop("resamples", None)
        kwargs.pop("seed", None)
        return original(diffs, **kwargs)

    paired.paired_bootstrap_differences = exact


def _paired_only(value):
    """The paired intervals of a report section (rows keep their bits and the paired entries only)."""
    if isinstance(value, list):
        return [{k: v for k, v in row.items() if k == "bits" or k.startswith("paired") or k == "quantization_cost"}
                for row in value]
    return value


def derive(scratch: Path) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    _exact_only()
    out = {}
    for part, (args, keys) in PARTS.items():
        module = __import__(part)
        if module.main(["--paper500", "--out", str(scratch), "--max-minutes", "0", *args]) != 0:
            raise SystemExit(f"bench/{part}.py failed")
        report = json.loads((scratch / f"{part}.json").read_text())
        if report.get("incomplete"):
            raise SystemExit(f"bench/{part}.py is missing cached runs: {report['incomplete']}")
        out[part] = {k: _paired_only(report[k]) for k in keys}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=str(OUTPUT))
    args = p.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "paper500"
        shutil.copytree(SOURCE, scratch, ignore=shutil.ignore_patterns("*.png", "*.md"))
        parts = derive(scratch)
    from salientft.evaluation.paired import VERDICT_MARGIN

    result = {"method": "exact bootstrap (salientft.evaluation.paired, no seed), 95 % percentile interval",
              "verdict_margin": VERDICT_MARGIN, "source": "docs/results/paper500/runs/paper500 (per-item outcomes)",
              "commit": commit, "command": "scripts/exact_intervals.py", **parts}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
