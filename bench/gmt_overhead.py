"""GMT step-time overhead vs plain fine-tuning on the embedded SmolLM2-135M.

    .venv/bin/python bench/gmt_overhead.py             # writes docs/results/gmt_overhead.{json,md}
    .venv/bin/python bench/gmt_overhead.py --quick     # fewer rounds, a few minutes
    .venv/bin/python bench/gmt_overhead.py --dtype bf16 --batch 4 --seq 128 --strict

A step is ``accum x (forward + backward) -> [GMT mask] -> clip_grad_norm_(1.0) -> AdamW.step ->
zero_grad``: full fine-tuning of every parameter, GMT (ratio 0.5, paper mode) masking all but the
tied embedding/lm_head matrix (the default exclude). All methods share one model and one
optimizer in ONE process and are interleaved: each round runs one step of every method, the
starting method rotating, after a warm-up step each, so load from other processes on the shared
machine hits all methods alike. We report the median over rounds (and quartiles).

Time is measured as process CPU time (``time.process_time``) with ONE torch thread by default:
on a 2-core machine shared with other jobs, wall time mostly measures the other jobs, while the
CPU time our process spends is what the method costs. Wall time is recorded too.

Two overhead figures: ``step_overhead`` = median GMT step / median plain step - 1 (what a user
sees), and ``mask_overhead`` = median time of the mask call alone / median plain step (the same
quantity measured directly, less noisy).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _machine import machine_info  # bench/_machine.py
from lib import RESULTS  # bench/lib (puts src/ on the path)
from lib.cli import add_dtype_argument, torch_dtype
from lib.models import load_base, random_batch
from lib.report import write_report
from lib.stats import median, summarize
from lib.timing import interleave, returned

from salientft.config_base import GMT_DEFAULT_RATIO
from salientft.gmt import GradientMask

TARGETS = {1: 0.10, 8: 0.03}  # GMT's overhead targets per accumulation (docs/gmt.md)
SEED = 0  # torch.manual_seed before the model is loaded; the batches' generator


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dtype_argument(ap)
    ap.add_argument("--batch", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--accum", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ratio", type=float, default=GMT_DEFAULT_RATIO)
    ap.add_argument("--strict", action="store_true", help="also time tensor granularity in strict mode")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is measured)")
    ap.add_argument("--quick", action="store_true", help="2 rounds at accumulation 8, 4 at 1")
    ap.add_argument("--out", default=str(RESULTS / "gmt_overhead"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    model, _ = load_base("smollm2-135m", torch_dtype(args.dtype))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-7, weight_decay=0.0)
    masks = {
        "gmt-tensor": GradientMask(model, args.ratio, "tensor"),
        "gmt-global": GradientMask(model, args.ratio, "global"),
    }
    if args.strict:
        masks["gmt-tensor-strict"] = GradientMask(model, args.ratio, "tensor", mode="strict")
    methods = ["plain", *masks]
    vocab = model.config.vocab_size
    batches = list(random_batch(vocab, (max(args.accum) * args.batch, args.seq), seed=SEED).split(args.batch))

    clock = time.process_time

    def step(method, accum):
        w0, t0 = time.perf_counter(), clock()
        for ids in batches[:accum]:
            (model(input_ids=ids, labels=ids).loss / accum).backward()
        apply_s, step_s, kept = 0.0, 0.0, None
        if method != "plain":
            t1 = clock()
            kept = masks[method].apply_()["kept_fraction"]
            apply_s = clock() - t1
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t1 = clock()
        if method == "plain":
            opt.step()
        else:
            masks[method].step(opt)  # strict: snapshot + step + restore
        step_s = clock() - t1
        opt.zero_grad(set_to_none=True)
        return clock() - t0, (apply_s, step_s), kept, time.perf_counter() - w0

    results = []
    n_masked = sum(p.numel() for _, p in masks["gmt-tensor"].params)
    for accum in args.accum:
        rounds = (2 if accum > 1 else 4) if args.quick else args.rounds
        # one warm-up step each before the first accumulation's rounds (allocator, optimizer state)
        readings = interleave({m: (lambda m=m: step(m, accum)) for m in methods}, rounds,
                              warmup=1 if accum == args.accum[0] else 0, measure=returned,
                              on_round=lambda r, ts: print(f"accum {accum} round {r + 1}/{rounds}: " + ", ".join(
                                  f"{m} {ts[m][-1][0]:.3f}s" for m in methods), flush=True))
        times = {m: [x[0] for x in v] for m, v in readings.items()}
        mask_times = {m: [x[1] for x in v] for m, v in readings.items()}
        kept = {m: v[-1][2] for m, v in readings.items() if m != "plain"}
        opt_s = median([st for _, st in mask_times["plain"]])  # a plain AdamW step
        base = median(times["plain"])
        for m in methods:
            q = summarize(times[m], unit="s", keep=None)
            row = {"accum": accum, "method": m, "rounds": rounds, **q, "step_overhead": q["median_s"] / base - 1,
                   "wall_median_s": median(x[3] for x in readings[m])}
            if m != "plain":
                # mask time = apply_ (+ in strict mode, step() minus a plain optimizer step:
                # the snapshot and restore)
                extra = [a + (st - opt_s if masks[m].config.mode == "strict" else 0.0)
                         for a, st in mask_times[m]]
                mask_med = max(0.0, median(extra))
                row.update(mask_ms=1e3 * mask_med, mask_overhead=mask_med / base, kept_fraction=kept[m])
                row["target"] = TARGETS.get(accum)
            results.append(row)

    env = {"model": "smollm2-135m", "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
           "ratio": args.ratio, "masked_entries": n_masked,
           "trainable_entries": sum(p.numel() for p in params), **machine_info("torch", "threads"),
           "clock": "process_time", **machine_info("cpu=processor"), "quick": args.quick}
    out = Path(args.out)
    lines = [
        "# GMT overhead vs plain fine-tuning",
        "",
        f"SmolLM2-135M ({args.dtype}), CPU, {env['threads']} threads, micro-batch {args.batch} x "
        f"{args.seq} tokens, CPU time of one process, AdamW, clip 1.0, ratio {args.ratio}; {n_masked:,} of "
        f"{env['trainable_entries']:,} trainable entries masked (the tied embedding is excluded). "
        "Methods interleaved in one process, median over rounds. Produced by `bench/gmt_overhead.py`"
        + (" --quick" if args.quick else "") + ".",
        "",
        "| accum | method | median step CPU (s) | q1-q3 (s) | step overhead | mask time (ms) | mask overhead | target | kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tgt = f"<= {r['target']:.0%}" if r.get("target") is not None else ""
        lines.append(
            f"| {r['accum']} | {r['method']} | {r['median_s']:.3f} | {r['q1_s']:.3f}-{r['q3_s']:.3f} | "
            f"{r['step_overhead']:+.1%} | {r.get('mask_ms', 0):.1f} | "
            f"{r['mask_overhead']:.1%} | {tgt} | {r['kept_fraction']:.4f} |" if r["method"] != "plain" else
            f"| {r['accum']} | plain | {r['median_s']:.3f} | {r['q1_s']:.3f}-{r['q3_s']:.3f} | - | - | - | | |"
        )
    lines += ["", "step overhead: median step / plain median - 1 (noisy on a shared machine); "
              "mask overhead: median time spent masking (and, in strict mode, snapshot/restore) / "
              "plain median step.", ""]
    write_report(out, {"config": env, "results": results}, lines, dtype=args.dtype, seed=SEED, device="cpu")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
