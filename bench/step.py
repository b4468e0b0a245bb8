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

The authors' approach (docs/methods.md#authors-code) is re-implemented below (``AuthorsSalientLinear``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _machine import machine_info  # bench/_machine.py
from _memory import MALLOC_ENV, peak_rss_bytes, reset_peak_rss, rss_bytes  # bench/_memory.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from salientft._io import atomic_path, write_json  # noqa: E402
from salientft.config_base import GMT_DEFAULT_RATIO  # noqa: E402
from salientft.gift.config import GiftConfig  # noqa: E402
from salientft.gift.model import noise_std_for  # noqa: E402
from salientft.saliency import select_salient  # noqa: E402
from salientft.targets import find_target_modules, linear_weight  # noqa: E402

# Benchmark variants -> (registered salientft method, TrainConfig overrides); "authors" is the
# re-implementation below, not a salientft method.
VARIANTS = {
    "gift-weight": ("gift-sw", {"noise": "weight"}),
    "gift-weight-kept": ("gift-sw", {"noise": "weight", "keep_noise": True}),
    "gift-output": ("gift-sw", {"noise": "output"}),
    "gift-none": ("salient", {}),
    "lora": ("lora", {}),
    "dora": ("dora", {}),
    "full": ("full", {}),
    "gmt": ("gmt", {}),
}
METHODS = (*VARIANTS, "authors")
GMT_RATIO = GMT_DEFAULT_RATIO
MODELS = ("smollm2-135m", "wide-llama")
# The wide random Llama: layers wider than SmolLM2's, few of them, tiny vocabulary so that the
# linear layers (not lm_head) dominate. tokens per micro-batch (512) < in_features (1536).
WIDE = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=12,
            num_key_value_heads=4, max_position_embeddings=1024)
# Random Llamas by name -> tiny_random_llama overrides; other scripts (bench/scaling.py) add theirs.
RANDOM_LLAMAS = {"wide-llama": WIDE}
# (batch, seq_len) per model, default and --quick. The defaults are small because the 2-core
# machine is shared (a 4 x 256 SmolLM2 step took minutes under load); --batch/--seq override.
SHAPES = {"smollm2-135m": ((2, 256), (2, 64)), "wide-llama": ((2, 128), (2, 64))}
LR = 1e-5


# ----------------------------------------------------------------------------------------------
# The authors' approach, re-implemented from its description (docs/methods.md#authors-code).
# ----------------------------------------------------------------------------------------------
class AuthorsSalientLinear(nn.Module):
    """The public reference code's training layer, as described in docs/methods.md#authors-code.

    The original layer stays alive (its weight is kept), and two pieces are stored next to it:
    the trainable salient columns and a frozen copy of the non-salient columns. Every forward
    rebuilds the whole (out, in) weight by concatenating the two pieces and permuting the
    columns back into place, then adds noise drawn over the full (out, in) shape (masked to
    the non-salient columns). Autograd therefore saves the rebuilt weight for the input
    gradient and computes the full (out, in) weight gradient, which the permutation and
    concatenation backward finally slice down to the k salient columns.
    """

    def __init__(self, base: nn.Linear, idx: torch.Tensor, noise_std: torch.Tensor, noise: str = "weight"):
        super().__init__()
        w = base.weight.detach()
        out_f, in_f = w.shape
        keep = torch.ones(in_f, dtype=torch.bool, device=w.device)
        keep[idx] = False
        rest = torch.nonzero(keep).flatten()
        order = torch.cat([idx, rest])  # salient first, then the rest
        self.original = base  # kept: the original weight stays in memory
        self.register_buffer("inverse_order", torch.argsort(order))
        self.salient = nn.Parameter(w[:, idx].clone())
        self.register_buffer("frozen", w[:, rest].clone())  # masked copy of the weight
        self.register_buffer("noise_mask", keep.to(w.dtype).view(1, -1))
        self.register_buffer("noise_std", noise_std.to(w.dtype).view(-1, 1))
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cat([self.salient, self.frozen], dim=1)[:, self.inverse_order]
        if self.training and self.noise == "weight":
            w = w + torch.randn_like(w) * self.noise_std * self.noise_mask
        return F.linear(x, w, self.original.bias)


from salientft.targets import set_module as _set_module  # noqa: E402


def apply_authors(model: nn.Module, config: GiftConfig, scores, noise_std=None) -> nn.Module:
    targets = find_target_modules(model, config.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in targets.items():
        w = linear_weight(mod).detach()
        idx = select_salient(scores[name], config.k_for(w.shape[1], name)).to(w.device)
        std = noise_std[name] if noise_std is not None else noise_std_for(w, idx, config.noise_bits)
        _set_module(model, name, AuthorsSalientLinear(mod, idx, std, noise=config.noise))
    return model


# ----------------------------------------------------------------------------------------------
# Models, data, methods
# ----------------------------------------------------------------------------------------------
def load_base(model_name: str, dtype: torch.dtype):
    from salientft.models import load_model, tiny_random_llama, tiny_tokenizer

    if model_name == "smollm2-135m":
        return load_model("smollm2-135m", dtype=dtype)
    if model_name in RANDOM_LLAMAS:
        return tiny_random_llama(seed=0, dtype=dtype, **RANDOM_LLAMAS[model_name]), tiny_tokenizer()
    raise ValueError(f"unknown model {model_name!r}; choose from {MODELS + tuple(RANDOM_LLAMAS)}")


def make_batch(tok, batch: int, seq: int) -> torch.Tensor:
    """batch x seq token ids of real text: SciQ support paragraphs, concatenated and chunked."""
    from salientft.data.embedded import read_records

    need = batch * seq
    ids: list[int] = []
    for row in read_records("sciq"):
        text = (row.get("support") or "").strip()
        if text:
            ids.extend(tok(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise RuntimeError(f"not enough SciQ text for {batch}x{seq} tokens")
    return torch.tensor(ids[:need], dtype=torch.long).view(batch, seq)


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: linear_weight(m).detach().float().norm(dim=0) for n, m in find_target_modules(model).items()}


def cheap_noise_std(model: nn.Module, bits: int = 4) -> dict[str, torch.Tensor]:
    """Delta_i / 2 without the clip search: max|W_i| / (2^(b-1)-1) / 2 (the p = 1 grid point).

    The MSE clip search of docs/methods.md#row-quantizer (``noise_std_for``) costs seconds per layer on this shared CPU
    (minutes per model); the noise scale's value does not change the step time, so the
    benchmark uses this stand-in for every noisy method alike.
    """
    qmax = 2 ** (bits - 1) - 1
    return {n: (linear_weight(m).detach().float().abs().amax(dim=1) / qmax / 2)
            for n, m in find_target_modules(model).items()}


def gift_budget(model: nn.Module, config: GiftConfig) -> tuple[int, int, int]:
    """(sum k*out, sum (in+out), LoRA rank r matching GIFT-SW's trainable count)."""
    kout = io = 0
    for name, m in find_target_modules(model).items():
        out_f, in_f = linear_weight(m).shape
        kout += config.k_for(in_f, name) * out_f
        io += in_f + out_f
    return kout, io, max(1, round(kout / io))


def build(method: str, model_name: str, dtype: torch.dtype, device: str, base=None, train_dtype: str = "fp32"):
    """(model in train mode, optimizer, info) for one method on a freshly loaded base model.

    Every method but the authors' re-implementation is prepared by ``salientft.methods``, as
    ``salientft train`` prepares it, with the benchmark's stand-ins for the costly parts
    (magnitude scores, ``cheap_noise_std``) and LoRA/DoRA at GIFT-SW's trainable count.
    ``base``: an already built (model, tokenizer) to prepare instead of loading ``model_name``
    (bench/gpu_step.py builds its large random models once, on the GPU); ``train_dtype``: the
    TrainConfig dtype the method is prepared for ("bf16": fp32 salient columns, as ``salientft
    train --dtype bf16``).
    """
    from salientft import methods
    from salientft.config import TrainConfig

    model, tok = base if base is not None else load_base(model_name, dtype)
    model.to(device)
    info = {}
    _, _, r = gift_budget(model, GiftConfig())  # paper ratio k = 128/4096 of in_features
    info["lora_rank"] = r
    mask_config = None
    if method == "authors":
        apply_authors(model, GiftConfig(noise="weight"), magnitude_scores(model), cheap_noise_std(model))
    elif method in VARIANTS:
        name, overrides = VARIANTS[method]
        spec = methods.get(name)
        cfg = TrainConfig(**spec.only_used(dict(method=name, dtype=train_dtype, lora_r=r, lora_alpha=2 * r)),
                          **overrides)
        model = spec.prepare(model, cfg, scores=magnitude_scores(model), noise_std=cheap_noise_std(model))
        mask_config = cfg.mask
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    if mask_config is not None:
        from salientft.gmt import build_gradient_mask

        mask = build_gradient_mask(model, mask_config)

        def apply_mask(*_):  # paper mode: mask, then a stock optimizer.step()
            mask.apply_()  # (a pre-hook must return None: its return value replaces the args)

        opt.register_step_pre_hook(apply_mask)
        opt.gradient_mask = mask  # for inspection (tests, last_stats)
        info["gmt_ratio"] = mask_config.ratio
    seen = set()
    info["trainable"] = sum(p.numel() for p in params if not (id(p) in seen or seen.add(id(p))))
    info["train_state_mb"] = sum(p.numel() * (2 * p.element_size() + 8) for p in params) / 2**20
    return model, tok, opt, info


def storage_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def train_step(model, opt, batch) -> tuple[float, float, float]:
    """One optimizer step; returns (forward, backward, optimizer) seconds."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


# ----------------------------------------------------------------------------------------------
# Peak memory: one method per fresh subprocess
# ----------------------------------------------------------------------------------------------
def batch_shape_for(model_name: str, quick: bool, override=(None, None)) -> tuple[int, int]:
    b, s = SHAPES[model_name][1 if quick else 0]
    return (override[0] or b, override[1] or s)


def memory_worker(method: str, model_name: str, dtype: torch.dtype, device: str, quick: bool, steps: int,
                  batch_override=(None, None)) -> dict:
    torch.manual_seed(0)
    batch_shape = batch_shape_for(model_name, quick, batch_override)
    cuda = device.startswith("cuda")
    base, tok = load_base(model_name, dtype)
    base_bytes = storage_bytes(base)
    del base
    gc.collect()
    # Baseline: the process with one loaded base model (as every method starts from).
    model, tok, opt, info = build(method, model_name, dtype, device)
    batch = make_batch(tok, *batch_shape).to(device)
    extra_weights = storage_bytes(model) - base_bytes
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base_alloc = torch.cuda.memory_allocated() - extra_weights
        torch.cuda.reset_peak_memory_stats()
    else:
        base_rss = rss_bytes() - extra_weights
        reset_peak_rss()  # the high-water mark VmHWM
    for _ in range(steps):
        train_step(model, opt, batch)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base_alloc
    else:
        peak = peak_rss_bytes() - base_rss
    return {"peak_mb": peak / 2**20, "extra_weights_mb": extra_weights / 2**20, **info}


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
# Interleaved timing
# ----------------------------------------------------------------------------------------------
def interleave(runs: dict, rounds: int, warmup: int = 1, device: str = "cpu", desc: str = "rounds") -> dict:
    """Time ``runs`` (key -> (model, optimizer, batch)) interleaved in this process.

    ``warmup`` untimed steps each (allocates optimizer states, primes kernels), then ``rounds``
    rounds of one step per key, the starting key rotating each round, so load from other
    processes hits every key alike. Returns {key: [(forward, backward, optimizer) seconds, ...]}.
    """
    from tqdm import tqdm

    keys = list(runs)
    for k in keys:
        for _ in range(warmup):
            train_step(*runs[k])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = {k: [] for k in keys}
    for r in tqdm(range(rounds), desc=desc, file=sys.stderr):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            sync()
            t = train_step(*runs[k])
            sync()
            times[k].append(t)
    return times


def summarize(ts) -> dict:
    """Median step time (ms), quartiles and the median forward/backward/optimizer parts."""
    tot = [sum(t) * 1000 for t in ts]
    q = statistics.quantiles(tot, n=4) if len(tot) >= 2 else [tot[0]] * 3
    return {
        "median_ms": statistics.median(tot), "q1_ms": q[0], "q3_ms": q[2],
        "forward_ms": statistics.median(t[0] * 1000 for t in ts),
        "backward_ms": statistics.median(t[1] * 1000 for t in ts),
        "optimizer_ms": statistics.median(t[2] * 1000 for t in ts),
        "step_ms": tot,
    }


def time_methods(model_name: str, methods, args) -> dict:
    dtype = getattr(torch, args.dtype)
    batch_shape = batch_shape_for(model_name, args.quick, (args.batch, args.seq))
    built = {}
    for m in methods:
        torch.manual_seed(0)
        model, tok, opt, info = build(m, model_name, dtype, args.device)
        built[m] = (model, opt, info)
    batch = make_batch(tok, *batch_shape).to(args.device)
    times = interleave({m: (model, opt, batch) for m, (model, opt, _) in built.items()}, args.rounds,
                       args.warmup, args.device, desc=f"{model_name} rounds")
    res = {"batch": list(batch_shape), "tokens_per_step": batch.numel(), "methods": {}}
    for m in methods:
        res["methods"][m] = {**summarize(times[m]), **built[m][2]}
        for ref in ("lora", "authors"):  # the median of the per-round ratios (same round, same load)
            if ref in times and m != ref:
                res["methods"][m][f"round_ratio_vs_{ref}"] = statistics.median(
                    sum(a) / sum(b) for a, b in zip(times[m], times[ref]))
    del built
    gc.collect()
    return res


def describe_model(model_name: str) -> dict:
    if model_name == "wide-llama":
        return {"name": "wide-llama", "source": "salientft.models.tiny_random_llama(**WIDE), random init",
                "vocab_size": 320, **WIDE}
    return {"name": model_name, "source": "salientft.models.load_model('smollm2-135m')",
            "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30}


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
def write_markdown(result: dict, path: Path) -> None:
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
    lines += [f"![step time and peak memory]({path.with_suffix('.png').name})", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def write_plot(result: dict, path: Path) -> None:
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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all", choices=MODELS + ("all",))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 4, --quick 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small batches and 2 rounds: a smoke run")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (overrides the model's default)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (overrides the model's default)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--noise-threads", type=int, default=None,
                    help="threads drawing GIFT-SW's weight noise on CPU (default: torch's thread count)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "step"),
                    help="output path without suffix: writes .json, .md and .png")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from salientft.ops.noise import noise_threads, set_noise_threads

    set_noise_threads(args.noise_threads)
    if args.memory_worker:
        res = memory_worker(args.memory_worker, args.model, getattr(torch, args.dtype), args.device,
                            args.quick, args.memory_steps, (args.batch, args.seq))
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
        write_json(out.with_suffix(".json"), result)
        write_markdown(result, out.with_suffix(".md"))
        write_plot(result, out.with_suffix(".png"))

    for model_name in models:
        res = time_methods(model_name, methods, args)
        res["model"] = describe_model(model_name)
        result["models"][model_name] = res
        report()
    report()
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
