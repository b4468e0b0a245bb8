"""The whole reproduction suite (docs/RESULTS.md), part by part, each part resumable from its cache.

Parts (each at most about 45 minutes on a quiet 2-core CPU; the estimates are measured):

    quality       bench/quality.py       GIFT-SW, salient, GMT, full, LoRA, DoRA x 3 seeds
    ablations     bench/ablations.py     noise, salience metric, GMT ratio, GMT on GIFT-SW
    quantization  bench/quantization.py  RTN / GPTQ with and without salient columns at 4, 3, 2 bits
    recovery      bench/recovery.py      GIFT-SW vs STE vs LoRA on the quantized models
    noise_scale   bench/noise_scale.py   GIFT-SW's noise at 2-8 bits and none; full fine-tuning +- noise
    quantize_order bench/quantize_order.py  train with noise then quantize, vs quantize then train
    speed         bench/step.py + bench/scaling.py   step time and peak memory, and their growth with width

    .venv/bin/python bench/suite.py                       # every part (about 2 h); reruns skip finished runs
    .venv/bin/python bench/suite.py --parts quality       # one part
    .venv/bin/python bench/suite.py --quick               # every part, small (about 15 min), docs/results/quick/
    .venv/bin/python bench/suite.py --smoke --out /tmp/s  # tiny random model, about two minutes (CI)
    .venv/bin/python bench/suite.py --paper500            # the 500-item refresh, docs/results/paper500/ (many hours)

``--paper500`` runs the parts that take the 500-item subset, in the order they depend on each
other: quality (with its learning-rate grids, whose choices the others read), recovery,
noise_scale, quantize_order.

Each part runs in its own process (so one part's memory or thread state cannot slow the next);
a failing part is reported and the others still run; the exit code is non-zero if any failed.
Timings go to ``<out>/suite.json`` (one entry per part, from its latest run).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("quality", "ablations", "quantization", "recovery", "noise_scale", "quantize_order", "speed")
PAPER500_PARTS = ("quality", "recovery", "noise_scale", "quantize_order")  # in dependency order


def commands(part: str, mode: str, out: Path, max_minutes: float, explicit_out: bool) -> list[list[str]]:
    flags = {"full": [], "quick": ["--quick"], "smoke": ["--smoke"], "paper500": ["--paper500"]}[mode]
    if mode == "paper500" and part == "quality":
        flags = flags + ["--lr-grid"]
    if part != "speed":  # the parts' own default folders are the suite's: pass --out only if given
        return [[f"{part}.py", *flags, *(["--out", str(out)] if explicit_out else []),
                 *(["--max-minutes", f"{max_minutes:g}"] if max_minutes != 45 else [])]]
    if mode == "smoke":
        return [["scaling.py", "--preset", "tiny", "--out", str(out / "scaling")]]
    if mode == "quick":
        return [["scaling.py", "--quick", "--out", str(out / "scaling")]]  # never over the full results
    if not explicit_out:
        return [["step.py", "--model", "smollm2-135m"], ["scaling.py"]]
    return [["step.py", "--model", "smollm2-135m", "--out", str(out / "step")],
            ["scaling.py", "--out", str(out / "scaling")]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--smoke", action="store_true")
    g.add_argument("--paper500", action="store_true", help="the 500-item refresh: " + ", ".join(PAPER500_PARTS))
    p.add_argument("--parts", nargs="+", default=None, choices=PARTS)
    p.add_argument("--out", default=None, help="results folder (default docs/results, or docs/results/quick)")
    p.add_argument("--max-minutes", type=float, default=45.0, help="per part: start no new run after this")
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "paper500" if args.paper500 else "full"
    if mode == "smoke" and not args.out:
        p.error("--smoke needs --out")
    if mode == "paper500":
        wrong = sorted(set(args.parts or ()) - set(PAPER500_PARTS))
        if wrong:
            p.error(f"--paper500 runs {', '.join(PAPER500_PARTS)}; not {', '.join(wrong)}")
    args.parts = args.parts or list(PAPER500_PARTS if mode == "paper500" else PARTS)
    out = Path(args.out) if args.out else ROOT / "docs" / "results" / ({"quick": "quick", "paper500": "paper500"}.get(mode, ""))
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    from _suite import PRESETS
    from lib.report import write_report

    report_path = out / f"suite{'-' + mode if mode != 'full' else ''}.json"
    report, failed = {"mode": mode, "parts": {}}, []
    t_all = time.time()
    for part in args.parts:
        t = time.time()
        codes = []
        for cmd in commands(part, mode, out, args.max_minutes, bool(args.out)):
            print(f"== {part}: {' '.join(cmd)}", flush=True)
            codes.append(subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], cwd=ROOT).returncode)
        minutes = (time.time() - t) / 60
        report["parts"][part] = {"minutes": round(minutes, 2), "exit_codes": codes,
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if any(codes):
            failed.append(part)
        print(f"== {part}: {'FAILED' if any(codes) else 'done'} in {minutes:.1f} min", flush=True)
    # re-read: another invocation (another part) may have finished meanwhile
    latest = json.loads(report_path.read_text()) if report_path.is_file() else {"mode": mode, "parts": {}}
    latest["parts"].update(report["parts"])
    latest["last_invocation_minutes"] = round((time.time() - t_all) / 60, 2)
    preset = PRESETS[mode]  # the parts' models and seeds (the speed part records its own)
    write_report(report_path.with_suffix(""), latest, None, dtype=preset.dtype, seed=list(preset.seeds), quiet=True)
    if failed:
        print(f"failed parts: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
