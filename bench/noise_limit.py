"""How close GIFT-SW's weight-noise step comes to its floor: the no-noise step plus the noise alone.

    .venv/bin/python bench/noise_limit.py                                   # wide-llama, 2 x 128 tokens
    .venv/bin/python bench/noise_limit.py --model wide-llama --batch 4 --seq 512 --rounds 6
    .venv/bin/python bench/noise_limit.py --model smollm2-135m --batch 2 --seq 256 --out /tmp/limit

One process, interleaved rounds (the start rotating each round, after one warm-up each), built
with bench/lib's functions, as bench/step.py (same models, batch, step, LoRA rank). Each round times:

* the training steps ``gift-none``, ``gift-weight`` (noise drawn in forward and again in
  backward), ``gift-weight-kept`` (drawn once, kept for backward) and ``lora``;
* ``noise``: the noisy weight of every targeted layer, chunk by chunk as the layers build it
  (draw + scale-and-add + salient columns, no matmul), with ``noise_threads()`` drawing threads;
* ``draw``: the N(0, 1) draws alone (same chunks and threads), and ``draw-1t``: in one thread.

The floor of a weight-noise step is ``gift-none + 2 x noise`` (``+ 1 x noise`` when kept):
the step does that work and nothing else extra, so a step at its floor hides nothing behind the
matmuls and loses nothing to the pipeline. Ratios are medians of the per-round ratios.
Writes ``<out>.json`` and ``<out>.md`` (default docs/results/noise_limit).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from _machine import machine_info  # bench/_machine.py
from lib import RESULTS  # bench/lib (puts src/ on the path)
from lib.methods import build, train_step
from lib.models import MODELS, batch_shape_for, make_batch
from lib.report import write_report
from lib.stats import median, round_ratio
from lib.timing import interleave, wall_ms

from salientft.gift.model import gift_layers
from salientft.ops.noise import drawn_chunks, noise_chunks, noise_threads, noisy_row_blocks, set_noise_threads

SEED = 0  # torch.manual_seed before each model is built, and before the timed rounds
STEPS = ("gift-none", "gift-weight", "gift-weight-kept", "lora")


def noise_work(layers, threads: int, draw_only: bool):
    """A callable: one noise draw (or noisy weight) of every layer, as the training step makes it."""
    def run():
        for layer in layers:
            w = layer.base_weight()
            if draw_only:
                for _ in drawn_chunks(7, noise_chunks(*w.shape, w.device.type), w.shape[1], w.device, threads):
                    pass
            else:
                for _ in noisy_row_blocks(w, layer.salient_weight.detach(), layer.salient_idx, layer.noise_std, 7,
                                          w.dtype):
                    pass
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="wide-llama", choices=MODELS)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--noise-threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "noise_limit"))
    args = ap.parse_args(argv)
    set_noise_threads(args.noise_threads)
    threads = noise_threads()
    info = {**machine_info("cpu_model", "threads", "torch", "load_avg_1m", "commit", "omp_wait_policy"),
            "noise_threads": threads}
    shape = batch_shape_for(args.model, False, (args.batch, args.seq))
    runs, tok = {}, None
    for m in STEPS:
        torch.manual_seed(SEED)
        model, tok, opt, _ = build(m, args.model, torch.float32, "cpu")
        runs[m] = (model, opt)
    batch = make_batch(tok, *shape)
    layers = list(gift_layers(runs["gift-none"][0]).values())
    n_weights = sum(layer.out_features * layer.in_features for layer in layers)
    work = {m: (lambda m=m: train_step(*runs[m], batch)) for m in STEPS}
    work["noise"] = noise_work(layers, threads, draw_only=False)
    work["draw"] = noise_work(layers, threads, draw_only=True)
    work["draw-1t"] = noise_work(layers, 1, draw_only=True)
    keys = list(work)
    torch.manual_seed(SEED)
    t = interleave(work, args.rounds, warmup=1, measure=wall_ms,
                   on_round=lambda r, _: print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True))
    med = {k: median(v) for k, v in t.items()}

    floor2 = [t["gift-none"][r] + 2 * t["noise"][r] for r in range(args.rounds)]
    floor1 = [t["gift-none"][r] + t["noise"][r] for r in range(args.rounds)]
    res = {
        **info, "model": args.model, "batch": list(shape), "rounds": args.rounds, "noise_weights": n_weights,
        "median_ms": med,
        "ns_per_weight": {k: med[k] * 1e6 / n_weights for k in ("noise", "draw", "draw-1t")},
        "ratios": {
            "weight / lora": round_ratio(t["gift-weight"], t["lora"]),
            "kept / lora": round_ratio(t["gift-weight-kept"], t["lora"]),
            "none / lora": round_ratio(t["gift-none"], t["lora"]),
            "floor (none + 2 noise) / lora": round_ratio(floor2, t["lora"]),
            "floor (none + 1 noise) / lora": round_ratio(floor1, t["lora"]),
            "weight / floor (none + 2 noise)": round_ratio(t["gift-weight"], floor2),
            "kept / floor (none + 1 noise)": round_ratio(t["gift-weight-kept"], floor1),
            "draw 1 thread / draw": round_ratio(t["draw-1t"], t["draw"]),
        },
    }
    out = Path(args.out)
    lines = [f"# Weight-noise floor (bench/noise_limit.py): {args.model}, {shape[0]} x {shape[1]} tokens", "",
             f"{info['cpu_model']}, {info['threads']} torch threads, {threads} noise-drawing threads, torch "
             f"{info['torch']}, OMP_WAIT_POLICY {info['omp_wait_policy']}, 1-min load average {info['load_avg_1m']} "
             f"at the start; {args.rounds} interleaved "
             f"rounds; {n_weights:,} noisy weights per draw.", "",
             "| timed | median ms | ns per weight |", "|---|---|---|"]
    for k in keys:
        ns = f"{med[k] * 1e6 / n_weights:.2f}" if k in ("noise", "draw", "draw-1t") else ""
        lines.append(f"| {k} | {med[k]:.1f} | {ns} |")
    lines += ["", "| ratio (median of per-round ratios) | |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in res["ratios"].items()]
    lines.append("")
    write_report(out, res, lines, dtype="fp32", seed=SEED, device="cpu")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
