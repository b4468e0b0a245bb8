"""Does the thread count change the quantized model? GPTQ + salient columns of the embedded SmolLM2
under 1 and 2 torch threads, compared by fingerprint (every packed integer, scale, salient column).

tests/test_quant_threads.py checks the same on small matrices in every CI run; this is the check at
the scale the results quote (docs/results/quantization.json's models: same settings, calibration and
salient fraction), where the old GPTQ gave different 2-bit integers under 1 and 2 threads. Each
thread count runs in its own process (torch's thread pools are set once per process).

    .venv/bin/python bench/quant_threads.py                 # 4, 3, 2 bits x 1, 2 threads (about 15 min)
    .venv/bin/python bench/quant_threads.py --bits 2        # one bit width
    .venv/bin/python bench/quant_threads.py --smoke --out /tmp/qt   # tiny random model (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import _suite as S

THREADS = (1, 2)


def quantize_in_this_process(preset_name: str, bits: int) -> dict:
    """Quantize like bench/quantization.py's gptq+salient row; the fingerprint and what it took."""
    import torch

    from salientft.quant.fingerprint import code_version, quantized_fingerprint

    model, _, seconds, _ = S.quantized_model(S.PRESETS[preset_name], S.QUANT[preset_name], "gptq+salient", bits,
                                            progress=False)
    return {"bits": bits, "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
            "fingerprint": quantized_fingerprint(model), "quant_code": code_version()}


def run_child(preset_name: str, bits: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", preset_name, str(bits)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the {threads}-thread quantization at {bits} bits failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(r: dict) -> list[str]:
    lines = ["# GPTQ + salient columns under 1 and 2 threads (bench/quant_threads.py)", "",
             f"Model {r['model']} in bf16, the settings of docs/results/quantization.json's gptq+salient rows. "
             "Fingerprint: SHA-256 of every quantized layer's packed integers, scales, salient columns and "
             "16-bit weights.", "",
             "| bits | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in THREADS) + " | identical |",
             "|---|" + "---|" * len(THREADS) + "---|"]
    for row in r["rows"]:
        cells = " | ".join(f"`{row['by_threads'][str(t)]['fingerprint']}` ({row['by_threads'][str(t)]['seconds']} s)"
                           for t in THREADS)
        lines.append(f"| {row['bits']} | {cells} | {'yes' if row['identical'] else '**no**'} |")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(quantize_in_this_process(argv[1], int(argv[2]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--smoke", action="store_true", help="tiny random model (needs --out)")
    p.add_argument("--out", default=None, help="folder for quant_threads.{json,md} (default docs/results)")
    args = p.parse_args(argv)
    if args.smoke and not args.out:
        raise SystemExit("--smoke needs --out (it must not overwrite docs/results)")
    preset_name = "smoke" if args.smoke else "full"
    out = Path(args.out) if args.out else S.ROOT / "docs" / "results"
    rows = []
    for bits in args.bits:
        by_threads = {str(t): run_child(preset_name, bits, t) for t in THREADS}
        prints = {v["fingerprint"] for v in by_threads.values()}
        rows.append({"bits": bits, "by_threads": by_threads, "identical": len(prints) == 1})
        print(f"{bits} bits: " + ", ".join(f"{t} threads {v['fingerprint']}" for t, v in by_threads.items()))
    result = {"model": S.PRESETS[preset_name].model, "preset": preset_name, "rows": rows,
              "all_identical": all(r["identical"] for r in rows)}
    from lib import report

    report.write_report(out / "quant_threads", result, markdown(result), dtype="bf16", seed=0, threads=list(THREADS))
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
