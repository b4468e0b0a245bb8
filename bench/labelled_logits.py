"""The LM head on the labelled positions only (salientft.labelled_logits), measured on the quick
start's own training.

    .venv/bin/python bench/labelled_logits.py                  # docs/results/labelled_logits.{json,md}
    .venv/bin/python bench/labelled_logits.py --steps 2 --pairs 1 --out /tmp/ll   # a smoke run

Runs configs/quickstart.yaml's training (GIFT-SW on the embedded SmolLM2-135M, batches of
8 x 256 tokens, fp32) for ``--steps`` steps without evaluation, each run in a fresh process,
alternately with the head on the labelled rows (salientft's way) and on every position (as
transformers computes it), ``--pairs`` times each in A-B-B-A order so that a drift in the
machine's load hits both alike. Per run: the training loop's wall time (after loading and
calibration, which are the same for both), the last logged training loss (the two must agree),
and the peak resident memory of the training loop (the kernel's high-water mark, reset when
training starts). Also the share of labelled positions in those batches: what the head is cut to.
Calibration reads 8 chats instead of 64: which columns are salient does not change a step's work.
Each run records the machine's load average at its end: other work on the machine slows both
variants, and the A-B-B-A order and medians only even it out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import machine_info  # bench/_machine.py
from _memory import MALLOC_ENV, peak_rss_bytes, reset_peak_rss  # bench/_memory.py
from lib import RESULTS
from lib.report import write_report

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
VARIANTS = ("labelled rows", "every position")


def worker(variant: str, steps: int, out: Path) -> None:
    """One training run of ``variant`` in this process; writes its measures to ``out``."""
    import torch
    from transformers import TrainerCallback

    from salientft import labelled_logits
    from salientft.config import resolve_train_config
    from salientft.train import train

    if variant == "every position":
        labelled_logits.output_layer = lambda model: None  # the trainer then lets transformers compute the loss
    counted = {"labelled": 0, "positions": 0}
    real_rows = labelled_logits.labelled_rows

    def count(labels):
        rows, targets = real_rows(labels)
        counted["labelled"] += rows.numel()
        counted["positions"] += labels.numel()
        return rows, targets

    labelled_logits.labelled_rows = count  # the collator's rows: every training batch, counted once

    class PeakOfTraining(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            reset_peak_rss()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_train_config(str(CONFIG), {"max_steps": steps, "eval_before": False, "eval_tasks": "",
                                                 "output": str(Path(tmp) / "run"), "save_steps": 0,
                                                 "logging_steps": 1, "calib_samples": 8})
        result = train(cfg, callbacks=[PeakOfTraining()])
    out.write_text(json.dumps({
        "variant": variant, "train_seconds": result["wall_time_s"], "last_loss": result["train_loss"][-1]["loss"],
        "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads(),
        "load_average_1min_after": os.getloadavg()[0], **counted}))


def abba_order(blocks: int) -> list[str]:
    """The runs' variants: ``blocks`` times A, B, B, A (a linear drift of the load cancels)."""
    return [v for _ in range(blocks) for v in (*VARIANTS, *reversed(VARIANTS))]


def run_one(variant: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.json"
        subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(steps), "--result", str(out)],
                       check=True, env={**os.environ, **MALLOC_ENV})
        return json.loads(out.read_text())


def summarize(runs: list[dict]) -> dict:
    by = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    med = {v: {"train_seconds": statistics.median(r["train_seconds"] for r in rs),
               "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in rs)} for v, rs in by.items()}
    a, b = (med[v] for v in VARIANTS)
    first = runs[0]
    return {"median": med,
            "time_ratio": round(a["train_seconds"] / b["train_seconds"], 3),
            "peak_ratio": round(a["peak_rss_bytes"] / b["peak_rss_bytes"], 3),
            "labelled_share": round(first["labelled"] / first["positions"], 4),
            "largest_loss_difference": max(abs(x["last_loss"] - y["last_loss"])
                                           for x, y in zip(by[VARIANTS[0]], by[VARIANTS[1]]))}


def markdown(r: dict) -> list[str]:
    s = r["summary"]
    lines = ["# The LM head on the labelled positions only (bench/labelled_logits.py)", "",
             f"Command: `{r['command']}`. configs/quickstart.yaml's training (GIFT-SW, embedded SmolLM2-135M, 8 x 256 "
             f"tokens, fp32), {r['steps']} steps without evaluation, a fresh process per run, A-B-B-A order. "
             f"Labelled positions in these batches: {100 * s['labelled_share']:.1f} % (the rows the head computes).", "",
             "| head on | runs | training loop (s), median | peak RSS of the loop (MiB), median | last loss | "
             "load average at the end |",
             "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        rs = [x for x in r["runs"] if x["variant"] == v]
        m = s["median"][v]
        losses = ", ".join(f"{x['last_loss']:.4f}" for x in rs)
        loads = ", ".join(f"{x['load_average_1min_after']:.1f}" for x in rs)
        lines.append(f"| {v} | {len(rs)} | {m['train_seconds']:.1f} | {m['peak_rss_bytes'] / 2**20:.0f} | {losses} | "
                     f"{loads} |")
    lines += ["", f"Labelled rows against every position: **{s['time_ratio']:.2f}x** the training loop's time, "
              f"**{s['peak_ratio']:.2f}x** its peak memory; the last losses differ by at most "
              f"{s['largest_loss_difference']:.1e} (the same training)."]
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=2, help="A-B-B-A blocks (each runs both variants twice)")
    ap.add_argument("--out", default=str(RESULTS / "labelled_logits"), help="results stem")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, Path(args.result))
        return
    order = abba_order(args.pairs)
    runs = []
    for i, variant in enumerate(order, 1):
        print(f"run {i}/{len(order)}: head on {variant}", flush=True)
        runs.append(run_one(variant, args.steps))
    result = {"command": " ".join(["bench/labelled_logits.py", *(argv if argv is not None else sys.argv[1:])]),
              "steps": args.steps, "runs": runs, "summary": summarize(runs), "machine": machine_info("torch")}
    write_report(args.out, result, markdown(result), dtype="fp32", seed=0, threads=runs[0]["threads"])
    print("\n".join(markdown(result)))


if __name__ == "__main__":
    main()
