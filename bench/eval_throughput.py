"""Throughput of the evaluation backends on the same items (embedded SmolLM2-135M).

    .venv/bin/python bench/eval_throughput.py --limit 150 --profile \
        --tasks hellaswag,arc_easy,arc_challenge,piqa,boolq,winogrande --out docs/results/eval_throughput

Runs: native (tree-packed shared context, batches cut by padded tokens), native without context
sharing (one sequence per choice, lm-eval's layout), and lm-evaluation-harness 0.4.13 (HFLM on the
same model object). Records items/s per task (wall clock), items per CPU-second of this process
(robust when other processes share the machine), accuracies, load average, CPU model and thread
count; ``--profile`` adds where the native backend's time goes (torch profiler, self CPU time by
operator). Use at least 100 items per task: with a few dozen, padding inside the few batches
dominates and the figures say little about a real evaluation. Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from _machine import machine_info  # bench/_machine.py
from lib.cli import add_dtype_argument, torch_dtype  # bench/lib (puts src/ on the path)
from lib.models import load_base
from lib.report import write_report


def profile_native(model, tok, tasks, limit, batch_size) -> dict:
    """Self CPU time share of the top operators over one native evaluation of ``tasks``."""
    from torch.profiler import ProfilerActivity, profile

    from salientft.evaluation import evaluate

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        evaluate(model, tok, tasks, limit=limit, batch_size=batch_size, progress=False)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return {e.key: round(e.self_cpu_time_total / total, 4) for e in rows[:8]}


def markdown(out: dict) -> str:
    runs = out["runs"]
    names = list(runs)
    lines = ["# Evaluation throughput (bench/eval_throughput.py)", "",
             f"SmolLM2-135M-Instruct (embedded), {out['dtype']}, first {out['limit']} items of each task, batch "
             f"{out['batch_size']} sequences; {out.get('cpu_model')}, {out['threads']} torch threads, torch "
             f"{out.get('torch')}, 1-min load average {runs[names[0]]['load_avg_1m_before']:.2f} at the start. "
             "Items per second (wall clock), by task:", "",
             "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in runs[names[0]]["results"]:
        lines.append(f"| {t} | " + " | ".join(f"{runs[b]['results'][t]['items_per_s']:.2f}" for b in names) + " |")
    lines.append("| **all** (items / wall s) | " + " | ".join(f"**{runs[b]['items_per_s']:.2f}**" for b in names) + " |")
    lines.append("| items / CPU s | " + " | ".join(f"{runs[b]['items_per_cpu_s']:.2f}" for b in names) + " |")
    if "lm-eval" in runs and "native" in runs:
        lines += ["", f"native / lm-eval: {runs['native']['items_per_s'] / runs['lm-eval']['items_per_s']:.2f}x "
                  f"(wall clock), {runs['native']['items_per_cpu_s'] / runs['lm-eval']['items_per_cpu_s']:.2f}x "
                  "(CPU time). Both score the same items with the same prompts; tests/test_evaluation.py checks that "
                  "they give the same log-likelihoods item by item."]
    if out.get("profile"):
        lines += ["", "Where the native backend's time goes (self CPU time, all tasks):", "",
                  "| operator | share |", "|---|---|"]
        lines += [f"| `{k}` | {100 * v:.1f} % |" for k, v in out["profile"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=150)
    ap.add_argument("--tasks", default="hellaswag,arc_easy,arc_challenge,piqa,boolq,winogrande")
    ap.add_argument("--batch-size", type=int, default=16)
    add_dtype_argument(ap, default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="native,native-unshared,lm-eval")
    ap.add_argument("--profile", action="store_true", help="also profile one native evaluation")
    ap.add_argument("--out", default="docs/results/eval_throughput")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from salientft.evaluation import evaluate

    model, tok = load_base("smollm2-135m", torch_dtype(args.dtype))
    tasks = args.tasks.split(",")
    runs = {}
    for be in args.backends.split(","):
        load0 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        rep = evaluate(model, tok, tasks, limit=args.limit, batch_size=args.batch_size, progress=False,
                       backend="lm-eval" if be == "lm-eval" else "native", share_context=be != "native-unshared")
        runs[be] = {
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "load_avg_1m_before": load0,
            "load_avg_1m_after": os.getloadavg()[0], "items_per_s": rep["items_per_s"],
            "results": {t: {k: r[k] for k in ("acc", "acc_norm", "n", "items_per_s")} for t, r in rep["results"].items()},
        }
        n = sum(r["n"] for r in rep["results"].values())
        runs[be]["items_per_cpu_s"] = n / runs[be]["cpu_s"]
        print(be, json.dumps(runs[be]), flush=True)
    out = {"model": "smollm2-135m", "dtype": args.dtype, "limit": args.limit, "batch_size": args.batch_size,
           "threads": args.threads, **machine_info("cpu_model", "cpu_count", "torch", "commit"), "runs": runs}
    if args.profile:
        out["profile"] = profile_native(model, tok, tasks, args.limit, args.batch_size)
    stem = Path(args.out[:-5] if args.out.endswith(".json") else args.out)
    # evaluation draws nothing at random: no seed
    write_report(stem, out, markdown(out), dtype=args.dtype, seed=None, threads=args.threads)


if __name__ == "__main__":
    main()
