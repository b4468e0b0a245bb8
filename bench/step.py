"""Training-step time and peak memory: GIFT-SW (each noise mode) vs LoRA, DoRA, full FT, GMT and
the authors' approach.

    .venv/bin/python bench/step.py                 # both models, writes docs/results/step.{json,md,png}
    .venv/bin/python bench/step.py --quick         # a smoke run: small batches, 2 rounds
    .venv/bin/python bench/step.py --model wide-llama --rounds 8 --out /tmp/step

A step is ``zero_grad -> forward -> loss -> backward -> AdamW.step`` on the same batch.

Time: every method's model is built in ONE process and the methods are interleaved round-robin
(each round runs one step of every method, the start rotating each round) after a warm-up
step each, so load from other processes on the shared machine hits all methods alike. We
report the median over rounds (and the quartiles).

Peak memory: each method runs alone in a fresh subprocess. On CPU, torch's allocator memory is
invisible to tracemalloc, so we measure the process's resident set: after loading the base
model we record VmRSS, apply the method, reset the kernel's high-water mark
(``echo 5 > /proc/self/clear_refs``), run the steps and read VmHWM (bench/_memory.py). The
delta is what the method adds over the loaded model: its extra weights, saved activations,
gradients and optimizer states. glibc's adaptive mmap threshold is pinned
(MALLOC_MMAP_THRESHOLD_) so that large freed blocks go back to the kernel and are not silently
reused (which would hide a peak). On CUDA ``torch.cuda.max_memory_allocated`` is used instead.
As an analytic cross-check we also count the bytes of trainable parameters + their gradients +
the two AdamW moments, and the extra bytes of weights/buffers the method keeps beyond the base
model (shared storage counted once).

Parameter budget: GIFT-SW uses the paper's ratio k = round(in * 128/4096) columns per layer;
LoRA/DoRA get the rank r = round(sum(k*out) / sum(in+out)) over the same targets (all linear
layers in the blocks), so their trainable counts are about equal (both reported).

GMT (``gmt``) is full fine-tuning whose gradients are masked before every AdamW step
(salientft.gmt.GradientMask, ratio 0.5, default granularity "tensor", mode "paper", embeddings
and lm_head unmasked). The mask runs in an optimizer step pre-hook, so ``train_step`` is the same
for every method and the masking time is part of the "opt" column.

The authors' approach (docs/methods.md#authors-code) is re-implemented in bench/lib/methods.py
(``AuthorsSalientLinear``). Models, methods, the step, the timing loop and the report writer are
bench/lib's, shared with the other speed benchmarks.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from _machine import machine_info  # bench/_machine.py
from _memory import MALLOC_ENV  # bench/_memory.py
from lib import RESULTS
from lib.cli import add_dtype_argument, torch_dtype
from lib.methods import GMT_RATIO, METHODS, build, peak_memory, step_summary, train_step
from lib.models import MODELS, batch_shape_for, describe_model, make_batch
from lib.report import write_report
from lib.stats import round_ratio
from lib.timing import clock_for, interleave, returned

SEED = 0  # torch.manual_seed before each method is built (its salient columns, LoRA init, noise)


# ----------------------------------------------------------------------------------------------
# Peak memory: one method per fresh subprocess (lib.methods.peak_memory)
# ----------------------------------------------------------------------------------------------
def measure_memory(method, model_name, args) -> dict:
    env = dict(os.environ, **MALLOC_ENV)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", method, "--model", model_name,
           "--dtype", args.dtype, "--device", args.device] + (["--quick"] if args.quick else [])
    cmd += (["--batch", str(args.batch)] if args.batch else []) + (["--seq", str(args.seq)] if args.seq else [])
    cmd += ["--noise-threads", str(args.noise_threads)] if args.noise_threads else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker {method} on {model_name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Interleaved timing (lib.timing.interleave)
# ----------------------------------------------------------------------------------------------
def time_methods(model_name: str, methods, args) -> dict:
    dtype = torch_dtype(args.dtype)
    batch_shape = batch_shape_for(model_name, args.quick, (args.batch, args.seq))
    built = {}
    for m in methods:
        torch.manual_seed(SEED)
        model, tok, opt, info = build(m, model_name, dtype, args.device)
        built[m] = (model, opt, info)
    batch = make_batch(tok, *batch_shape).to(args.device)
    work = {m: (lambda model=model, opt=opt: train_step(model, opt, batch)) for m, (model, opt, _) in built.items()}
    times = interleave(work, args.rounds, args.warmup, measure=clock_for(args.device, returned),
                       progress=f"{model_name} rounds")
    res = {"batch": list(batch_shape), "tokens_per_step": batch.numel(), "methods": {}}
    for m in methods:
        res["methods"][m] = {**step_summary(times[m]), **built[m][2]}
        for ref in ("lora", "authors"):  # the median of the per-round ratios (same round, same load)
            if ref in times and m != ref:
                res["methods"][m][f"round_ratio_vs_{ref}"] = round_ratio([sum(a) for a in times[m]],
                                                                         [sum(b) for b in times[ref]])
    del built, work
    gc.collect()
    return res


def add_ratios(res: dict) -> None:
    ms = res["methods"]
    for m, r in ms.items():
        for ref in ("lora", "authors"):
            if ref in ms:
                r[f"time_vs_{ref}"] = r["median_ms"] / ms[ref]["median_ms"]
                if "peak_mb" in r and "peak_mb" in ms[ref]:
                    r[f"peak_vs_{ref}"] = r["peak_mb"] / ms[ref]["peak_mb"]
    targets = {}
    if {"gift-none", "lora"} <= ms.keys():
        targets["none <= 1.0x LoRA time"] = ms["gift-none"]["time_vs_lora"] <= 1.0
    if {"gift-weight", "lora"} <= ms.keys():
        targets["weight noise <= 1.15x LoRA time"] = ms["gift-weight"]["time_vs_lora"] <= 1.15
        targets["aim: weight noise <= 1.0x LoRA time"] = ms["gift-weight"]["time_vs_lora"] <= 1.0
    if {"gift-weight", "authors"} <= ms.keys():
        targets["weight noise <= 0.85x authors' time"] = ms["gift-weight"]["time_vs_authors"] <= 0.85
    if "lora" in ms and "peak_mb" in ms["lora"]:
        for m in ("gift-weight", "gift-output", "gift-none"):
            if m in ms and "peak_mb" in ms[m]:
                targets[f"{m} peak memory <= LoRA's"] = ms[m]["peak_mb"] <= ms["lora"]["peak_mb"]
    res["targets"] = targets


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def markdown(result: dict, png_name: str) -> list[str]:
    lines = ["# Training-step benchmark (bench/step.py)", "",
             f"Device {result['device']}"
             + (f" ({result['cpu_model']}, 1-min load average {result['load_avg_1m']} at the start, "
                f"OMP_WAIT_POLICY {result.get('omp_wait_policy', 'unset (spin)')})"
                if result.get("cpu_model") else "")
             + f", dtype {result['dtype']}, torch {result['torch']}, peft "
             f"{result['peft']}, {result['threads']} threads"
             + (f" ({result['noise_threads']} drawing the weight noise)" if result.get("noise_threads") else "")
             + f", {result['rounds']} interleaved rounds "
             f"after {result['warmup']} warm-up step(s) per method. Machine shared with other jobs: "
             "times are noisy; the methods were interleaved so the noise hits them alike.", "",
             "Step = zero_grad + forward + loss + backward + AdamW step. Time: median over rounds "
             "(q1-q3). Peak: increase of the process's peak RSS over the loaded base model, one fresh "
             "process per method (includes the method's extra weights, activations saved for backward, "
             "gradients, optimizer states). State: analytic bytes of trainable params + grads + AdamW "
             "moments. Extra weights: bytes of weights/buffers beyond the base model.", ""]
    for model_name, res in result["models"].items():
        ms = res["methods"]
        r = next(iter(ms.values())).get("lora_rank")
        lines += [f"## {model_name}", "",
                  f"{res['model']['source']}; batch {res['batch'][0]} x {res['batch'][1]} tokens "
                  f"(SciQ support paragraphs); GIFT-SW k = round(in*128/4096) per layer; LoRA/DoRA rank "
                  f"r = {r}, alpha = 2r, all linear layers in the blocks."
                  + (f" GMT: full FT whose gradients are masked (ratio {GMT_RATIO}, per tensor, paper mode, "
                     "embeddings/lm_head unmasked) before each AdamW step; the mask is in the opt time."
                     if "gmt" in ms else ""), "",
                  "| method | median ms (q1-q3) | fwd / bwd / opt ms | vs LoRA | vs authors | per-round vs LoRA | "
                  "per-round vs authors | peak MB | peak vs LoRA | state MB | extra weights MB | trainable |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, v in ms.items():
            lines.append(
                f"| {m} | {v['median_ms']:.0f} ({v['q1_ms']:.0f}-{v['q3_ms']:.0f}) | "
                f"{v['forward_ms']:.0f} / {v['backward_ms']:.0f} / {v['optimizer_ms']:.0f} | "
                f"{v.get('time_vs_lora', float('nan')):.2f}x | {v.get('time_vs_authors', float('nan')):.2f}x | "
                f"{v.get('round_ratio_vs_lora', float('nan')):.2f}x | {v.get('round_ratio_vs_authors', float('nan')):.2f}x | "
                f"{v.get('peak_mb', float('nan')):.0f} | {v.get('peak_vs_lora', float('nan')):.2f}x | "
                f"{v['train_state_mb']:.1f} | {v.get('extra_weights_mb', float('nan')):.1f} | {v['trainable']:,} |")
        lines += ["", "Targets:", ""]
        lines += [f"- {'PASS' if ok else 'MISS'}: {t}" for t, ok in res["targets"].items()]
        lines.append("")
    lines += [f"![step time and peak memory]({png_name})", ""]
    return lines


def plot(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.6 * len(models)), squeeze=False)
    for row, model_name in enumerate(models):
        ms = result["models"][model_name]["methods"]
        names = list(ms)
        colors = ["tab:green" if n.startswith("gift") else "tab:red" if n == "authors"
                  else "tab:purple" if n == "gmt" else "tab:blue" for n in names]
        ax = axes[row][0]
        ax.bar(names, [ms[n]["median_ms"] for n in names], color=colors,
               yerr=[[ms[n]["median_ms"] - ms[n]["q1_ms"] for n in names],
                     [ms[n]["q3_ms"] - ms[n]["median_ms"] for n in names]], capsize=3)
        if "lora" in ms:
            ax.axhline(ms["lora"]["median_ms"], color="gray", ls="--", lw=1, label="LoRA")
            ax.legend()
        ax.set_ylabel("median step time (ms)")
        ax.set_title(f"{model_name}: step time")
        ax.tick_params(axis="x", rotation=30)
        ax = axes[row][1]
        ax.bar(names, [ms[n].get("peak_mb", 0) for n in names], color=colors)
        if "lora" in ms and "peak_mb" in ms["lora"]:
            ax.axhline(ms["lora"]["peak_mb"], color="gray", ls="--", lw=1, label="LoRA")
            ax.legend()
        ax.set_ylabel("peak memory over base model (MB)")
        ax.set_title(f"{model_name}: peak memory")
        ax.tick_params(axis="x", rotation=30)
    return fig


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all", choices=MODELS + ("all",))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 4, --quick 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small batches and 2 rounds: a smoke run")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (overrides the model's default)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (overrides the model's default)")
    add_dtype_argument(ap)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--noise-threads", type=int, default=None,
                    help="threads drawing GIFT-SW's weight noise on CPU (default: torch's thread count)")
    ap.add_argument("--out", default=str(RESULTS / "step"),
                    help="output path without suffix: writes .json, .md and .png")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from salientft.ops.noise import noise_threads, set_noise_threads

    set_noise_threads(args.noise_threads)
    if args.memory_worker:
        res = peak_memory(args.memory_worker, args.model, torch_dtype(args.dtype), args.device,
                          batch_shape_for(args.model, args.quick, (args.batch, args.seq)), args.memory_steps)
        print(json.dumps(res))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    if args.rounds is None:
        args.rounds = 2 if args.quick else 4
    models = MODELS if args.model == "all" else (args.model,)
    result = {"device": args.device, "dtype": args.dtype,
              **machine_info("torch", "peft", "threads", "cpu_model", "load_avg_1m", "commit", "omp_wait_policy"),
              "rounds": args.rounds, "warmup": args.warmup, "quick": args.quick, "models": {}}
    if args.device == "cpu":
        result["noise_threads"] = noise_threads()
    t_start = time.time()
    # Memory workers run one at a time BEFORE the timing loop: run concurrently, they would compete
    # for the 2 cores with the timed steps and multiply their spread (measured: q1-q3 of 4-22 s).
    memory = {}
    if not args.no_memory:
        for model_name in models:
            for m in methods:
                print(f"[memory] {model_name} {m}", file=sys.stderr, flush=True)
                try:
                    memory[model_name, m] = measure_memory(m, model_name, args)
                except Exception as e:  # reported, not fatal for the timings
                    memory[model_name, m] = {"error": str(e)[-500:]}
    out = Path(args.out)

    def report():  # also after each model, so a cut-short run leaves its finished part
        for model_name, res in result["models"].items():
            for m in methods:
                mem = memory.get((model_name, m), {})
                if "peak_mb" in mem:
                    res["methods"][m].update(peak_mb=mem["peak_mb"], extra_weights_mb=mem["extra_weights_mb"])
                elif mem:
                    res["methods"][m]["memory_error"] = mem["error"]
            add_ratios(res)
        result["wall_s"] = time.time() - t_start
        write_report(out, result, markdown(result, out.with_suffix(".png").name), lambda: plot(result),
                     dtype=args.dtype, seed=SEED, device=args.device, quiet=True)

    for model_name in models:
        res = time_methods(model_name, methods, args)
        res["model"] = describe_model(model_name)
        result["models"][model_name] = res
        report()
    report()
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
