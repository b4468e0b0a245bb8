"""Throughput of the evaluation backends on the same items (embedded SmolLM2-135M).

    .venv/bin/python bench/eval_throughput.py --limit 50 --tasks piqa,arc_easy,hellaswag,boolq \
        --out docs/results/eval_throughput.json

Runs: native (tree-packed shared context), native without context sharing (one sequence per
choice, lm-eval's layout), and lm-evaluation-harness 0.4.13 (HFLM on the same model object).
Records items/s per task (wall clock), items per CPU-second of this process (robust when other
processes share the machine; use --threads 1 there), accuracies, load average and thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from _machine import machine_info  # bench/_machine.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--tasks", default="piqa,arc_easy,hellaswag,boolq")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="native,native-unshared,lm-eval")
    ap.add_argument("--out", default="docs/results/eval_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from salientft._io import write_json
    from salientft.evaluation import evaluate
    from salientft.models import load_model

    model, tok = load_model("smollm2-135m", dtype=args.dtype)
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
           "threads": args.threads, **machine_info("cpu_count", "torch"), "runs": runs}
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
