"""How per-step training time and peak memory grow with model width, for every method.

    .venv/bin/python bench/scaling.py                  # widths 512-2048, 5 rounds of 2 x 128 tokens:
                                                       # writes docs/results/scaling.{json,md,png} (~3-6 min)
    .venv/bin/python bench/scaling.py --quick          # widths 256, 512, 2 rounds, seq 64 (< 1 min)
    .venv/bin/python bench/scaling.py --preset tiny --out /tmp/scaling    # CI smoke (seconds)
    .venv/bin/python bench/scaling.py --widths 512,1024 --methods lora,gift-none --rounds 5

Models: randomly initialised 2-layer Llamas of hidden size h (``salientft.models.tiny_random_llama``),
intermediate = round(8/3 h) to a multiple of 64, h/128 attention heads (head dim 128),
gcd(heads, 4) key/value heads, the tiny 320-token vocabulary of bench/step.py's wide-llama, so the
linear layers dominate. Width 1536 is exactly step.py's wide-llama.

Everything else is bench/lib's, as bench/step.py uses it: how each method is built (GIFT-SW with
k = round(in*128/4096) salient columns per layer and weight/output/no noise, LoRA and DoRA with
the rank that matches GIFT-SW's trainable count at that width, full fine-tuning, GMT = full
fine-tuning with gradients masked at ratio 0.5 before each AdamW step), the step
(zero_grad -> forward -> loss -> backward -> AdamW.step on a fixed batch of SciQ text), the
interleaved timing and the peak-memory worker.

Time: median over rounds (and quartiles) of interleaved steps in ONE process, after one warm-up
step each: each round runs one step of every (width, method), the start rotating each round, so
load from other jobs on the shared machine hits all of them alike. When all the models fit in
memory together (an analytic estimate, ~10 GiB for the default widths, under 60 % of
MemAvailable) ALL widths x methods are interleaved, so ratios across widths are fair too;
otherwise each width is timed on its own, interleaved over the methods. The output says which
("interleave"; force one with --interleave). Threads: torch's default (one per core) unless
--threads; --quick and --preset tiny use one, because on a busy machine every op of a
multi-threaded step waits for a descheduled thread (a 3 ms tiny step took 700 ms).

Peak memory: ``lib.methods.peak_memory``, one fresh process per (width, method): the increase of the
process's peak resident set over the loaded base model while it runs a few steps (the method's
extra weights, saved activations, gradients, optimizer states). The processes are forked from
this one before it has built any model or run any op (so they are fresh and do not re-import
torch: a few seconds saved per process), with glibc's mmap/trim thresholds pinned as step.py
does (both: bench/_memory.py). They run one at a time, before the timing, so they do not disturb it.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from _machine import machine_info  # bench/_machine.py
from _memory import meminfo_bytes, peak_rss_bytes, pin_malloc  # bench/_memory.py
from lib import RESULTS
from lib.cli import add_dtype_argument, torch_dtype
from lib.methods import GMT_RATIO, LR, build, peak_memory, step_summary, train_step
from lib.methods import METHODS as ALL_METHODS
from lib.models import RANDOM_LLAMAS, make_batch
from lib.report import write_report
from lib.timing import clock_for, interleave, returned

SEED = 0  # torch.manual_seed before each model is built
METHODS = ("gift-weight", "gift-output", "gift-none", "lora", "dora", "full", "gmt")
VOCAB = 320  # tiny_random_llama's vocabulary, as step.py's wide-llama
LAYERS = 2
# settings per preset: widths, timed rounds, batch (sequences), seq (tokens per sequence), torch
# threads (None: torch's default, one per core). The default's 2 x 128 tokens are step.py's
# wide-llama shape. quick and tiny use one thread: on a busy machine, with two, every small op
# waits for a descheduled thread (a 3 ms step took 700 ms), and they must finish in time anyway.
PRESETS = {
    "default": dict(widths=(512, 1024, 1536, 2048), rounds=5, batch=2, seq=128),
    "quick": dict(widths=(256, 512), rounds=2, batch=2, seq=64, threads=1),
    "tiny": dict(widths=(64, 128), rounds=1, batch=1, seq=32, threads=1),
}
MEMORY_BUDGET = 0.6  # interleave all widths when the estimate is under this share of MemAvailable


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def width_config(hidden: int) -> dict:
    """tiny_random_llama overrides for a 2-layer Llama of the given hidden size."""
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 64 or hidden % 64:
        raise ValueError(f"width must be a multiple of 64 (>= 64), got {hidden!r}")
    heads = max(1, round(hidden / 128))
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"width {hidden} does not split into {heads} heads of even size; use a multiple of 128")
    return dict(hidden_size=hidden, intermediate_size=max(64, round(8 / 3 * hidden / 64) * 64),
                num_hidden_layers=LAYERS, num_attention_heads=heads, num_key_value_heads=math.gcd(heads, 4),
                max_position_embeddings=1024)


def model_name(hidden: int) -> str:
    return f"llama-h{hidden}"


def register(hidden: int, seq: int) -> str:
    """Make the width known to bench/lib's model loader; returns its model name."""
    name = model_name(hidden)
    cfg = width_config(hidden)
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], seq)
    RANDOM_LLAMAS[name] = cfg
    return name


def n_params(cfg: dict) -> int:
    h, i, heads, kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_key_value_heads"))
    kv_dim = kv * (h // heads)
    layer = 2 * h * h + 2 * h * kv_dim + 3 * h * i + 2 * h
    return 2 * VOCAB * h + cfg["num_hidden_layers"] * layer + h


def estimate_bytes(widths, methods, batch: int, seq: int, elem: int) -> int:
    """What keeping every (width, method) model resident at once needs, roughly.

    Full FT and GMT hold gradients and two AdamW moments (x4 the weights, as measured: full FT's
    peak is ~3.3x the model over it); the others a model and a few % extras (x1.1). +10 % for the
    allocator, 512 MiB for the process. Activations: one step at a time, the widest counts.
    """
    resident, act = 0, 0
    for h in widths:
        cfg = width_config(h)
        p = n_params(cfg) * elem
        resident += sum(p * (4 if m in ("full", "gmt") else 1.1) for m in methods)
        t = batch * seq
        act = max(act, (LAYERS * t * (16 * h + 6 * cfg["intermediate_size"]) + 4 * t * VOCAB) * elem)
    return int(1.1 * resident + act + 2**29)


# ----------------------------------------------------------------------------------------------
# Peak memory: lib.methods.peak_memory in a forked, fresh process per (width, method)
# ----------------------------------------------------------------------------------------------
def measure_memory(method: str, hidden: int, args) -> dict:
    name = model_name(hidden)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, send one JSON line, exit without running the parent's cleanup
        code = 1
        try:
            os.close(r)
            pin_malloc()  # what step.py's MALLOC_ENV does at process start
            if args.threads:
                torch.set_num_threads(args.threads)
            res = peak_memory(method, name, torch_dtype(args.dtype), args.device, (args.batch, args.seq),
                              args.memory_steps)
            payload, code = json.dumps(res), 0
        except BaseException:
            payload = json.dumps({"error": traceback.format_exc()[-2000:]})
        finally:
            try:
                with os.fdopen(w, "w") as f:
                    f.write(payload)
            finally:
                os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"error": f"memory worker for {method} at width {hidden} died (wait status {status}); "
                         "out of memory? try fewer widths or --no-memory"}
    return json.loads(data)


# ----------------------------------------------------------------------------------------------
# Timing: lib.methods.build + lib.timing.interleave
# ----------------------------------------------------------------------------------------------
def time_keys(keys, args, desc: str) -> dict:
    """{(width, method): step_summary(...) + build info}: build all, then interleave them."""
    dtype = torch_dtype(args.dtype)
    built, batch = {}, None
    for h, m in keys:
        print(f"[build] width {h} {m}", file=sys.stderr, flush=True)
        torch.manual_seed(SEED)
        model, tok, opt, info = build(m, model_name(h), dtype, args.device)
        if batch is None:  # one tokenizer for every width: one batch
            batch = make_batch(tok, args.batch, args.seq).to(args.device)
        built[h, m] = (model, opt, info)
    work = {k: (lambda mo=mo, op=op: train_step(mo, op, batch)) for k, (mo, op, _) in built.items()}
    times = interleave(work, args.rounds, args.warmup, measure=clock_for(args.device, returned), progress=desc)
    res = {k: {**step_summary(times[k]), **built[k][2]} for k in keys}
    del built, times, work
    gc.collect()
    return res


def choose_interleave(args) -> tuple[str, str]:
    est = estimate_bytes(args.widths, args.methods, args.batch, args.seq, torch_dtype(args.dtype).itemsize)
    avail = meminfo_bytes("MemAvailable")
    detail = (f"estimated {est / 2**30:.1f} GiB for all models at once, "
              f"{avail / 2**30:.1f} GiB available (budget {MEMORY_BUDGET:.0%})")
    if args.interleave != "auto":
        return args.interleave, f"forced by --interleave {args.interleave}; {detail}"
    if est <= MEMORY_BUDGET * avail:
        return "all", detail
    return "width", detail


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def add_ratios(widths: dict) -> None:
    for res in widths.values():
        ms = res["methods"]
        lora = ms.get("lora")
        for r in ms.values():
            if lora:
                r["time_vs_lora"] = r["median_ms"] / lora["median_ms"]
                if r.get("peak_mb") is not None and lora.get("peak_mb"):
                    r["peak_vs_lora"] = r["peak_mb"] / lora["peak_mb"]


def _f(v, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def markdown(result: dict, png_name: str) -> list[str]:
    s, mc = result["settings"], result["machine"]
    il = result["interleave"]
    lines = [
        "# Scaling with model width (bench/scaling.py)", "",
        "How the per-step training time and the peak memory of each method grow with the width of "
        f"a randomly initialised {LAYERS}-layer Llama (intermediate = round(8/3 h) to a multiple of "
        f"64, h/128 heads, gcd(heads, 4) KV heads, vocabulary {VOCAB}; width 1536 is bench/step.py's "
        "wide-llama). Methods, the step and the measurements are bench/step.py's: GIFT-SW with "
        "k = round(in*128/4096) salient columns per layer (noise on the weights, on the outputs, or "
        "none), LoRA/DoRA with the rank matching GIFT-SW's trainable count at each width (alpha 2r), "
        "full fine-tuning, and GMT (full fine-tuning, gradients masked at ratio 0.5 per tensor "
        "before each AdamW step). A step is zero_grad + forward + loss + backward + AdamW step on "
        f"a fixed batch of {s['batch']} x {s['seq']} tokens of SciQ text.", "",
        f"Time: median (q1-q3) over {s['rounds']} interleaved round(s) after {s['warmup']} warm-up "
        "step(s) each, in one process; "
        + ("ALL widths x methods were interleaved round-robin" if il["mode"] == "all"
           else "each width was timed separately, interleaved over the methods")
        + f" ({il['reason']}). "
        + (f"Peak: increase of the process's peak RSS over the loaded base model during "
           f"{s['memory_steps']} steps, one fresh (forked) process per width and method. "
           if s["memory_steps"] else "Peak memory not measured (--no-memory). ")
        + "Ratios are to LoRA at the same width.", "",
        f"Run: `{result['command']}` ({result['wall_s']:.0f} s; `--quick` for a smoke run, "
        "`--widths 512,1024 --methods lora,gift-none --rounds 5 --batch 2 --seq 128 --threads 1` to "
        f"vary; see the script's docstring). Machine: {mc['cpu_count']} CPUs, "
        f"{mc['threads']} torch threads, Python {mc['python']}, torch {mc['torch']}, transformers "
        f"{mc['transformers']}, peft {mc['peft']}, dtype {s['dtype']}, device {s['device']}; "
        f"load average {mc['loadavg_before'][0]:.2f} before, {mc['loadavg_after'][0]:.2f} after "
        "(1 min). The machine may be shared: times are noisy; interleaving spreads the noise over "
        "all methods.", "",
        "| width | method | median ms (q1-q3) | fwd / bwd / opt ms | vs LoRA | peak MB | peak vs LoRA | trainable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    widths = result["widths"]
    for h, res in widths.items():
        for m, v in res["methods"].items():
            lines.append(
                f"| {h} | {m} | {v['median_ms']:.0f} ({v['q1_ms']:.0f}-{v['q3_ms']:.0f}) | "
                f"{v['forward_ms']:.0f} / {v['backward_ms']:.0f} / {v['optimizer_ms']:.0f} | "
                f"{_f(v.get('time_vs_lora'), '.2f', 'x')} | {_f(v.get('peak_mb'), '.1f')} | "
                f"{_f(v.get('peak_vs_lora'), '.2f', 'x')} | {v['trainable']:,} |")
    methods = s["methods"]
    for key, title in (("time_vs_lora", "Step time / LoRA's"), ("peak_vs_lora", "Peak memory / LoRA's")):
        lines += ["", f"{title}, by width:", "", "| method | " + " | ".join(widths) + " |",
                  "|---|" + "---|" * len(widths)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_f(widths[h]["methods"][m].get(key), ".2f", "x")
                                                  for h in widths) + " |")
    lines += ["", "Models: " + "; ".join(
        f"{h}: intermediate {r['config']['intermediate_size']}, {r['config']['num_attention_heads']} heads, "
        f"{r['params']:,} params, LoRA rank {r['lora_rank']}" for h, r in widths.items()) + ".", ""]
    errors = [f"- {h} {m}: {v['memory_error'].strip().splitlines()[-1]}" for h, r in widths.items()
              for m, v in r["methods"].items() if "memory_error" in v]
    if errors:
        lines += ["Memory measurement failed for:", "", *errors, ""]
    lines += [f"![step time and peak memory vs width]({png_name})", ""]
    return lines


STYLE = {"gift-weight": ("tab:green", "-"), "gift-output": ("tab:olive", "-"), "gift-none": ("lime", "-"),
         "lora": ("tab:blue", "--"), "dora": ("tab:cyan", "--"), "full": ("black", ":"),
         "gmt": ("tab:purple", ":"), "authors": ("tab:red", "-.")}


def plot(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    widths = result["widths"]
    xs = [int(h) for h in widths]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in result["settings"]["methods"]:
        color, ls = STYLE.get(m, ("gray", "-"))
        vs = [widths[h]["methods"][m] for h in widths]
        med = [v["median_ms"] for v in vs]
        axes[0].errorbar(xs, med, yerr=[[a - v["q1_ms"] for a, v in zip(med, vs)],
                                        [v["q3_ms"] - a for a, v in zip(med, vs)]],
                         color=color, ls=ls, marker="o", capsize=3, label=m)
        peak = [v.get("peak_mb") for v in vs]
        pts = [(x, p) for x, p in zip(xs, peak) if p is not None and p > 0]  # log axis: positive only
        if pts:
            axes[1].plot(*zip(*pts), color=color, ls=ls, marker="o", label=m)
    for ax, ylabel, title in ((axes[0], "median step time (ms)", "step time"),
                              (axes[1], "peak memory over base model (MB)", "peak memory")):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(xs)
        ax.set_xlabel("hidden size")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} vs width ({result['settings']['batch']} x {result['settings']['seq']} tokens)")
        ax.grid(True, which="both", alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None,
                    help="default: widths 512-2048; quick: 256, 512 (== --quick); tiny: the CI smoke")
    ap.add_argument("--quick", action="store_true", help="widths 256, 512, 2 rounds, seq 64, 1 thread")
    ap.add_argument("--widths", type=_int_list, default=None, help="comma-separated hidden sizes (multiples of 64)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(ALL_METHODS))
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per model before the rounds")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    add_dtype_argument(ap)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default torch's, i.e. one per core; quick and tiny: 1). On a busy "
                         "machine use 1: with more, every op waits for a descheduled thread")
    ap.add_argument("--interleave", default="auto", choices=("auto", "all", "width"),
                    help="all: every width x method in one round-robin; width: per width; auto: all if it fits")
    ap.add_argument("--memory-steps", type=int, default=2, help="steps per peak-memory process")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--out", default=str(RESULTS / "scaling"),
                    help="output path without suffix: writes .json, .md and .png")
    args = ap.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        ap.error("--quick is --preset quick; give one of them")
    preset = "quick" if args.quick else (args.preset or "default")
    for key, val in PRESETS[preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, list(val) if key == "widths" else val)
    args.preset = preset
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad or not args.methods:
        ap.error(f"unknown method(s) {bad}; choose from {list(ALL_METHODS)}")
    if not args.widths or len(set(args.widths)) != len(args.widths):
        ap.error(f"--widths needs distinct hidden sizes, got {args.widths}")
    for h in args.widths:
        try:
            width_config(h)
        except ValueError as e:
            ap.error(str(e))
    for key in ("rounds", "batch", "seq", "memory_steps"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    args.widths = sorted(args.widths)
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    load_before = os.getloadavg()
    import peft  # noqa: F401  (imported before forking, so the memory processes do not pay for it)
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    for h in args.widths:
        register(h, args.seq)
    machine = machine_info("python", "torch", "transformers", "peft", "platform", "cpu_count", "cpu_affinity",
                           "threads", "mem_total_gib", "mem_available_gib")
    mode, reason = choose_interleave(args)
    memory = {}
    if not args.no_memory:  # first: forked from this process before it runs any torch op
        for h in args.widths:
            for m in args.methods:
                print(f"[memory] width {h} {m}", file=sys.stderr, flush=True)
                memory[h, m] = measure_memory(m, h, args)
    keys = [(h, m) for h in args.widths for m in args.methods]
    timed = {}
    if mode == "all":
        timed = time_keys(keys, args, desc="all widths rounds")
    else:
        for h in args.widths:
            timed.update(time_keys([k for k in keys if k[0] == h], args, desc=f"width {h} rounds"))
    widths = {}
    for h in args.widths:
        cfg = RANDOM_LLAMAS[model_name(h)]
        ms = {}
        for m in args.methods:
            v = dict(timed[h, m])
            mem = memory.get((h, m), {})
            if "peak_mb" in mem:
                v.update(peak_mb=mem["peak_mb"], extra_weights_mb=mem["extra_weights_mb"])
            elif mem:
                v["memory_error"] = mem["error"]
            ms[m] = v
        widths[str(h)] = {"config": cfg, "params": n_params(cfg), "lora_rank": ms[args.methods[0]]["lora_rank"],
                          "methods": ms}
    add_ratios(widths)
    machine["loadavg_before"] = list(load_before)
    machine["loadavg_after"] = list(os.getloadavg())
    machine["peak_rss_gib"] = round(peak_rss_bytes() / 2**30, 2)  # this (timing) process
    result = {
        "benchmark": "bench/scaling.py",
        "command": shlex.join([".venv/bin/python", "bench/scaling.py", *argv]),
        "settings": {"preset": args.preset, "widths": args.widths, "methods": args.methods,
                     "rounds": args.rounds, "warmup": args.warmup, "batch": args.batch, "seq": args.seq,
                     "tokens_per_step": args.batch * args.seq, "dtype": args.dtype, "device": args.device,
                     "threads": torch.get_num_threads(),
                     "memory_steps": None if args.no_memory else args.memory_steps,
                     "gmt_ratio": GMT_RATIO, "lr": LR,
                     "model_family": f"tiny_random_llama: {LAYERS} layers, vocab {VOCAB}, seed 0"},
        "interleave": {"mode": mode, "reason": reason},
        "machine": machine,
        "widths": widths,
        "wall_s": time.time() - t_start,
    }
    out = Path(args.out)
    write_report(out, result, markdown(result, out.with_suffix(".png").name), lambda: plot(result),
                 dtype=args.dtype, seed=SEED, device=args.device, quiet=True)
    print(out.with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
