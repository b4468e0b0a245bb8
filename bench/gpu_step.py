"""GPU step time, peak memory and host syncs of every method on large random Llamas, in bf16: the
benchmark part of ``scripts/gpu_check.sh`` (docs/gpu.md).

    python bench/gpu_step.py --out OUTDIR                 # on a CUDA machine: OUTDIR/gpu_step.{json,md}
    python bench/gpu_step.py --out OUTDIR --dry-run       # on CPU, tiny models, seconds (CI runs this)

Models (random init, built on the device; the embedded SmolLM2 files are too large to travel):
``llama-2048`` (hidden 2048, intermediate 5632, 8 layers, 32 heads / 4 KV heads, TinyLlama's
shape) and ``smollm2-shape`` (SmolLM2-135M's shape: 576 wide, intermediate 1536, 30 layers, 9 / 3
heads, tied embeddings), both with SmolLM2's vocabulary of 49152, at 4 x 2048 tokens per micro-batch.

Methods, as ``salientft train --dtype bf16`` prepares them (``lib.methods.build``: frozen
weights bf16, trainable salient columns and LoRA fp32, dense methods fp32 masters, all under bf16
autocast; GIFT-SW k = round(in/32) per layer, LoRA at GIFT-SW's trainable count): GIFT-SW without
noise (``gift-none``), with weight noise (``gift-weight``: the library's default noise generator;
``gift-weight-philox`` / ``gift-weight-torch``: with ``SALIENTFT_NOISE_GENERATOR`` set during its
steps), with weight noise kept from forward to backward, with output noise, LoRA, full fine-tuning;
then GMT at gradient accumulation 8 against full fine-tuning at accumulation 8.

Step = zero_grad, ``accum`` x (forward + loss + backward), AdamW step (GMT's mask in the
optimizer's pre-hook). Time: CUDA events around each step, the methods interleaved round-robin in
one process (the start rotating each round) after two warm-up steps each; medians over rounds and
the median of per-round ratios. Peak memory: ``torch.cuda.max_memory_allocated`` over the warm-up
steps minus what was allocated with the method's base model loaded (so what the method adds:
its extra weights, activations, gradients, optimizer states); the models already built stay
constant meanwhile, so one process gives clean peaks. Host syncs: one extra step counted twice, by
CUDA itself (``torch.cuda.set_sync_debug_mode``: every synchronizing call warns) and on the CPU
side by a ``TorchDispatchMode`` counting the ops that synchronize on CUDA (``SYNC_OPS``); the
latter is the project's GPU target and also runs in the CPU dry run.

Budget: ``--budget-s`` seconds for the whole benchmark. Four phases (each model's main group, then
its GMT group) share what is left (3 : 2); a method is skipped by name when its estimated cost no longer
fits, the rounds shrink to what fits (at least 3, else the group's timing is skipped), and every
skip is recorded with its reason. The reports are rewritten after each phase, so a killed run
leaves its finished part.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import this file as a module
from _machine import git_commit  # noqa: E402  bench/_machine.py
from lib import ROOT  # noqa: E402  (bench/lib; puts ROOT/src on sys.path)
from lib.methods import build  # noqa: E402
from lib.models import random_batch, random_llama  # noqa: E402
from lib.report import write_report  # noqa: E402
from lib.stats import round_ratio, summarize  # noqa: E402
from lib.timing import clock_for, interleave  # noqa: E402

NOISE_GENERATOR_ENV = "SALIENTFT_NOISE_GENERATOR"
VOCAB = 49152  # SmolLM2's
MODELS = {
    "llama-2048": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=2048),
    "smollm2-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=VOCAB, max_position_embeddings=2048,
                          tie_word_embeddings=True),
}
TOKENS = (4, 2048)  # micro-batch: sequences x tokens
# --dry-run: the same code on CPU with models and batches small enough for seconds.
DRY_MODELS = {
    "llama-2048": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=320, max_position_embeddings=64),
    "smollm2-shape": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                          num_key_value_heads=1, vocab_size=320, max_position_embeddings=64,
                          tie_word_embeddings=True),
}
DRY_TOKENS = (2, 32)
# variant -> (lib.methods variant, gradient accumulation, SALIENTFT_NOISE_GENERATOR during its steps)
VARIANTS = {
    "gift-none": ("gift-none", 1, None),
    "gift-weight": ("gift-weight", 1, None),
    "gift-weight-philox": ("gift-weight", 1, "philox"),
    "gift-weight-torch": ("gift-weight", 1, "torch"),
    "gift-weight-kept": ("gift-weight-kept", 1, None),
    "gift-output": ("gift-output", 1, None),
    "lora": ("lora", 1, None),
    "full": ("full", 1, None),
    "full-acc8": ("full", 8, None),
    "gmt-acc8": ("gmt", 8, None),
}
# Timed together (interleaved); a group's models are freed before the next group is built.
GROUPS = {
    "main": ("lora", "gift-none", "gift-weight", "gift-weight-philox", "gift-weight-torch", "gift-weight-kept",
             "gift-output", "full"),
    "gmt": ("full-acc8", "gmt-acc8"),
}
WARMUP = 2
PHASE_WEIGHT = {"main": 3, "gmt": 2}  # a group's share of the budget: the main group builds 8 methods
MIN_ROUNDS = 3
DENSE = ("full", "gmt")  # lib.methods variants whose master weights are fp32
SEED = 0  # the random models' weights and batch; each method's warm-up noise starts from seed 1

# Ops that make the host wait for the device on CUDA (a scalar read, a data-dependent output size,
# a comparison returning a Python bool); device-to-host copies are counted separately.
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "masked_select",
            "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "histc",
            "repeat_interleave", "masked_scatter"}

# The project's GPU targets (goal, must; docs/gpu.md) and how each is read off the results.
TARGETS = [
    ("GIFT-SW, no noise: step time / LoRA (same trainable count)", 0.78, 1.0, "ratio", ("gift-none", "lora")),
    ("GIFT-SW, no noise: peak memory / LoRA", 0.84, 1.0, "peak", ("gift-none", "lora")),
    ("GIFT-SW, weight noise: step time / LoRA, 4 x 2048 tokens", 1.1, 1.3, "ratio", ("gift-weight", "lora")),
    ("GMT, accumulation 8: step time / full fine-tuning", 1.02, 1.05, "ratio", ("gmt-acc8", "full-acc8")),
    ("host syncs per optimizer step beyond LoRA's (GMT: beyond full FT's; CPU-side count)", 1, 4, "syncs", None),
    ("weight noise: Philox generator step time / torch's (keep Philox if <= 1.05)", 1.05, 1.05,
     "ratio", ("gift-weight-philox", "gift-weight-torch")),
]


# ----------------------------------------------------------------------------------------------
# Host-sync counting
# ----------------------------------------------------------------------------------------------
def _sync_counter(cuda: bool, ignore: set):
    """A TorchDispatchMode counting the ops in SYNC_OPS (and device-to-host copies) it sees.

    On a GPU only ops on CUDA tensors count (a CPU tensor's ``.item()`` waits for nothing). On the
    CPU dry run every op counts except on ``ignore`` (data pointers of the optimizer's ``step``
    counters: AdamW keeps them on the CPU on every device and reads them with ``.item()``).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    def counted(t) -> bool:
        if not torch.is_tensor(t):
            return True
        return t.device.type == "cuda" if cuda else t.data_ptr() not in ignore

    class SyncCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts: dict[str, int] = {}

        def _add(self, name):
            self.counts[name] = self.counts.get(name, 0) + 1

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            first = args[0] if args else None
            if name in SYNC_OPS:
                if counted(first) and (name != "repeat_interleave" or kwargs.get("output_size") is None):
                    self._add(name)
            elif name in ("index", "index_put", "index_put_"):  # boolean-mask indexing sizes its output on the host
                idx = args[1] if len(args) > 1 else ()
                if counted(first) and any(torch.is_tensor(i) and i.dtype == torch.bool for i in (idx or ()) if i is not None):
                    self._add(name + "[bool]")
            elif name in ("_to_copy", "copy_"):
                src = args[1] if name == "copy_" else args[0]
                dst_dev = args[0].device if name == "copy_" else kwargs.get("device")
                if torch.is_tensor(src) and src.device.type == "cuda" and dst_dev is not None \
                        and torch.device(dst_dev).type == "cpu":
                    self._add("device_to_host")
            return func(*args, **(kwargs or {}))

    return SyncCounter()


def count_syncs(step_fn, cuda: bool, opt=None) -> dict:
    """Host syncs of one call of ``step_fn``: the CPU-side op count, and CUDA's own where there is one."""
    out = {}
    ignore = {t.data_ptr() for st in (opt.state.values() if opt is not None else ()) for k, t in st.items()
              if k == "step" and torch.is_tensor(t) and t.device.type == "cpu"}
    with _sync_counter(cuda, ignore) as counter:
        step_fn()
    out["syncs"] = sum(counter.counts.values())
    out["sync_ops"] = counter.counts
    if cuda:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step_fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["syncs_cuda"] = sum("synchroniz" in str(w.message) for w in caught)
    return out


# ----------------------------------------------------------------------------------------------
# Steps and timing
# ----------------------------------------------------------------------------------------------
@contextmanager
def noise_generator(value):
    """``SALIENTFT_NOISE_GENERATOR=value`` while the block runs (None: as the environment has it)."""
    if value is None:
        yield
        return
    old = os.environ.get(NOISE_GENERATOR_ENV)
    os.environ[NOISE_GENERATOR_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(NOISE_GENERATOR_ENV, None)
        else:
            os.environ[NOISE_GENERATOR_ENV] = old


def make_step(model, opt, batch, accum: int, generator, device_type: str):
    """One optimizer step: zero_grad, ``accum`` x (bf16-autocast forward + loss, backward), AdamW step."""

    def step():
        with noise_generator(generator):
            opt.zero_grad(set_to_none=True)
            for _ in range(accum):
                with torch.autocast(device_type, dtype=torch.bfloat16):
                    loss = model(input_ids=batch, labels=batch).loss
                (loss / accum).backward()
            opt.step()

    return step


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def allocated(cuda: bool) -> int:
    return torch.cuda.memory_allocated() if cuda else 0


def run_group(model_name: str, shape: dict, group: str, batch: torch.Tensor, args, deadline: float,
              result: dict) -> None:
    """Build, warm up, measure memory and syncs, then time one group's methods interleaved."""
    cuda = args.device.startswith("cuda")
    device_type = "cuda" if cuda else "cpu"
    res = result["models"][model_name]
    skipped = result["skipped"]
    bases: dict = {}
    steps: dict = {}
    est_ms: dict = {}
    keep = []
    phase_start = time.perf_counter()
    for name in GROUPS[group]:
        if name not in args.methods:
            continue
        variant, accum, gen = VARIANTS[name]
        left = deadline - time.perf_counter()
        spent = time.perf_counter() - phase_start
        built = len(steps)
        # estimated cost of this method: its build (the mean so far) + warm-up, sync count and rounds
        guess = (spent / built if built else 0.0) + (max(est_ms.values()) / 1000 if est_ms else 0.0) * (
            WARMUP + 2 + MIN_ROUNDS)
        if left <= 0 or guess > left:
            skipped.append({"model": model_name, "method": name, "reason": f"budget: {left:.0f} s left, "
                                                                           f"about {guess:.0f} s needed"})
            continue
        try:
            dense = variant in DENSE
            dtype = torch.float32 if dense else torch.bfloat16
            if dtype not in bases:
                synchronize(cuda)
                bases[dtype] = random_llama(shape, dtype, args.device, seed=SEED)
            base_copy = (copy.deepcopy(bases[dtype][0]), bases[dtype][1])
            synchronize(cuda)
            with_base = allocated(cuda)
            model, tok, opt, info = build(variant, model_name, dtype, args.device, base=base_copy, train_dtype="bf16")
            step = make_step(model, opt, batch, accum, gen, device_type)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(1)  # the noise seeds: every method's warm-up draws the same stream
            t0 = time.perf_counter()
            for _ in range(WARMUP):
                step()
            synchronize(cuda)
            est_ms[name] = (time.perf_counter() - t0) * 1000 / WARMUP
            entry = {"accum": accum, "noise_generator": gen or "default", "trainable": info["trainable"],
                     "lora_rank": info.get("lora_rank"), "warmup_ms": est_ms[name]}
            if cuda:
                entry["peak_mb"] = (torch.cuda.max_memory_allocated() - with_base) / 2**20
            entry.update(count_syncs(step, cuda, opt))
            res["methods"][name] = entry
            steps[name] = step
            keep.append((model, opt))
        except torch.cuda.OutOfMemoryError as e:
            skipped.append({"model": model_name, "method": name, "reason": f"out of memory: {str(e)[:200]}"})
            gc.collect()
            torch.cuda.empty_cache()
    if gen_check := noise_switch_check(res, {n: m for n, (m, _) in zip(steps, keep)}, batch, device_type):
        res["noise_generator_switch"] = gen_check
        if not gen_check["effective"]:
            for k in ("gift-weight-philox", "gift-weight-torch"):
                res["methods"][k]["note"] = (f"{NOISE_GENERATOR_ENV} did not change the noise here: both "
                                             "timings measure the same generator")
    if steps:
        per_round = sum(est_ms[k] for k in steps) / 1000
        left = deadline - time.perf_counter()
        rounds = min(args.rounds, int(left / per_round) if per_round > 0 else args.rounds)
        if rounds < MIN_ROUNDS:
            skipped.append({"model": model_name, "method": f"{group} timing ({', '.join(steps)})",
                            "reason": f"budget: {left:.0f} s left, {MIN_ROUNDS} rounds need about "
                                      f"{MIN_ROUNDS * per_round:.0f} s"})
        else:
            times = interleave(steps, rounds, warmup=0, measure=clock_for(args.device))  # warmed up above
            res.setdefault("rounds", {})[group] = rounds
            for k, ms in times.items():
                res["methods"][k].update(summarize(ms))
            for k in times:
                for ref in ("lora", "full-acc8", "gift-weight-torch"):
                    if ref in times and k != ref:
                        res["methods"][k][f"round_ratio_vs_{ref}"] = round_ratio(times[k], times[ref])
    del keep, steps, bases
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def noise_switch_check(res: dict, models: dict, batch: torch.Tensor, device_type: str) -> dict | None:
    """Whether SALIENTFT_NOISE_GENERATOR changes GIFT-SW's weight noise here: one training-mode
    forward of the same model with the same seed under ``philox``, ``torch`` and ``philox`` again
    (forwards are deterministic, so the first and last must agree). Without the check, a variable
    read once at import (or not at all) would make the two timings silently measure one generator."""
    model = models.get("gift-weight-philox")
    if model is None:
        return None
    losses = {}
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16):
        for key, gen in (("philox", "philox"), ("torch", "torch"), ("philox_again", "philox")):
            torch.manual_seed(5)
            with noise_generator(gen):
                losses[key] = float(model(input_ids=batch[:1], labels=batch[:1]).loss)
    repeatable = losses["philox"] == losses["philox_again"]
    return {"variable": NOISE_GENERATOR_ENV, "losses": losses, "repeatable": repeatable,
            "effective": repeatable and losses["philox"] != losses["torch"]}


# ----------------------------------------------------------------------------------------------
# Targets and reports
# ----------------------------------------------------------------------------------------------
def evaluate_targets(result: dict) -> list[dict]:
    rows = []
    for model_name, res in result["models"].items():
        ms = res["methods"]
        for label, goal, must, kind, pair in TARGETS:
            value = None
            if kind == "ratio" and all(p in ms for p in pair):
                value = ms[pair[0]].get(f"round_ratio_vs_{pair[1]}")
            elif kind == "peak" and all("peak_mb" in ms.get(p, {}) for p in pair):
                value = ms[pair[0]]["peak_mb"] / ms[pair[1]]["peak_mb"] if ms[pair[1]]["peak_mb"] > 0 else None
            elif kind == "syncs":
                extra = []
                for m, v in ms.items():
                    ref = "full-acc8" if m == "gmt-acc8" else "lora"
                    if m not in ("lora", "full-acc8") and ref in ms and "syncs" in v:
                        extra.append(v["syncs"] - ms[ref]["syncs"])
                value = max(extra) if extra else None
            if value is None:
                verdict = "not measured"
            elif value <= goal:
                verdict = "pass (goal)"
            elif value <= must:
                verdict = "pass (must)"
            else:
                verdict = "FAIL"
            rows.append({"model": model_name, "measure": label, "goal": goal, "must": must, "value": value,
                         "verdict": verdict})
    return rows


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def write_reports(result: dict, out: Path) -> None:
    result["targets"] = evaluate_targets(result)
    result["wall_s"] = round(time.perf_counter() - result.pop("_t0", time.perf_counter()), 1)
    lines = ["# GPU step benchmark (bench/gpu_step.py, run by scripts/gpu_check.sh)", ""]
    if result["dry_run"]:
        lines += ["**DRY RUN on CPU with tiny models: these numbers say nothing about a GPU.**", ""]
    lines += [f"Device {result['device_name']}, torch {result['torch']} (CUDA {result['cuda']}), transformers "
              f"{result['transformers']}, commit {result['commit']}, {result['date']}. bf16 autocast; micro-batch "
              f"{result['tokens'][0]} x {result['tokens'][1]} random tokens; {WARMUP} warm-up steps per method; "
              f"budget {result['budget_s']} s, took {result['wall_s']} s.", "",
              "Time: CUDA events per step, methods interleaved; median (q1-q3) and the median of per-round "
              "ratios. Peak: max_memory_allocated over the warm-up steps minus the allocation with the "
              "method's base model loaded. Syncs: ops that synchronize on CUDA in one step (CPU-side count); "
              "CUDA: warnings of torch.cuda.set_sync_debug_mode in one step.", ""]
    for model_name, res in result["models"].items():
        lines += [f"## {model_name}", "", f"Shape: {json.dumps(res['shape'])}; rounds: {res.get('rounds', {})}",
                  "", "| method | accum | median ms (q1-q3) | per-round ratio | peak MB | peak vs LoRA | "
                  "syncs (CPU-side / CUDA) | trainable |", "|---|---|---|---|---|---|---|---|"]
        ms = res["methods"]
        lora_peak = ms.get("lora", {}).get("peak_mb")
        for m, v in ms.items():
            med = (f"{v['median_ms']:.1f} ({v['q1_ms']:.1f}-{v['q3_ms']:.1f})" if "median_ms" in v else "not timed")
            ref = "full-acc8" if v["accum"] > 1 else "lora"
            ratio = v.get(f"round_ratio_vs_{ref}")
            peak = v.get("peak_mb")
            lines.append(f"| {m} | {v['accum']} | {med} | {_fmt(ratio)}{' vs ' + ref if ratio else ''} | {_fmt(peak, '.0f')} | "
                         f"{_fmt(peak / lora_peak if peak is not None and lora_peak else None)} | "
                         f"{v.get('syncs', '-')} / {v.get('syncs_cuda', '-')} | {v['trainable']:,} |")
        lines.append("")
    lines += ["## Targets", "", "| model | measure | goal | must | value | verdict |", "|---|---|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['model']} | {t['measure']} | {t['goal']} | {t['must']} | {_fmt(t['value'])} | "
                     f"{t['verdict']} |")
    lines += ["", "## Skipped", ""]
    lines += [f"- {s['model']} / {s['method']}: {s['reason']}" for s in result["skipped"]] or ["- nothing"]
    lines.append("")
    write_report(out / "gpu_step", result, lines, dtype="bf16", seed=SEED, device=result["device"], quiet=True)


# ----------------------------------------------------------------------------------------------
# scripts/gpu_check.sh's helpers: the environment check after the offline install, the summary
# ----------------------------------------------------------------------------------------------
CHECKED_EXTRAS = ("peft", "embedded", "export", "trl", "test")


def check_env() -> int:
    """After the offline install: every requirement of salientft (core and the extras the suite
    uses) and of those packages is met by what Python now imports; prints the versions. Returns
    the exit code (1 with the unmet requirements listed)."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement

    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    reqs = [Requirement(r) for r in re.findall(r'^\s*"([^"]+)"', deps, re.M)]
    for extra in CHECKED_EXTRAS:
        line = re.search(rf"^{extra} = \[(.*)\]", text, re.M)
        reqs += [Requirement(r) for r in re.findall(r'"([^"]+)"', line.group(1)) if not r.startswith("salientft")]
    bad, seen, queue = [], set(), list(reqs)
    while queue:
        req = queue.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = (req.name.lower(), str(req.specifier))
        if key in seen:
            continue
        seen.add(key)
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            bad.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            bad.append(f"{req} (found {version})")
        elif req in reqs:  # one level down: the direct dependencies' own requirements
            queue += [Requirement(r) for r in (md.requires(req.name) or []) if "extra ==" not in r]
    import salientft  # noqa: F401  (from src/)
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "huggingface-hub"):
        try:
            print(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            print(f"{name} not installed")
    if bad:
        print("unmet requirements:\n  " + "\n  ".join(sorted(bad)), file=sys.stderr)
        return 1
    return 0


def junit_summary(path: Path) -> dict | None:
    """Counts (and the first failing tests) of a pytest junit xml; None without one."""
    import xml.etree.ElementTree as ET

    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"unreadable: {e}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed[:50]
    return counts


def check_report(phases_file: str, out: Path, dry_run: bool) -> int:
    """gpu_check.{json,md}: the phases (status, seconds), the machine, the suite's counts and the
    benchmark's target verdicts."""
    import transformers

    phases = []
    for line in Path(phases_file).read_text().splitlines():
        name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        phases.append({"phase": name, "status": status, "seconds": int(seconds or 0), "note": note})
    cuda = torch.cuda.is_available() and not dry_run
    bench = json.loads((out / "gpu_step.json").read_text()) if (out / "gpu_step.json").exists() else None
    report = {
        "dry_run": dry_run, "device_name": torch.cuda.get_device_name(0) if cuda else "CPU (dry run)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "phases": phases, "suite": junit_summary(out / "tests.xml"),
        "targets": bench["targets"] if bench else None, "skipped": bench["skipped"] if bench else None,
    }
    lines = ["# GPU check (scripts/gpu_check.sh)", ""]
    if dry_run:
        lines += ["**DRY RUN on CPU: no GPU was used; nothing here is a GPU measurement.**", ""]
    lines += [f"{report['device_name']}, torch {report['torch']} (CUDA {report['cuda']}), transformers "
              f"{report['transformers']}, commit {report['commit']}, {report['date']}.", "",
              "| phase | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p['status']} | {p['seconds']} | {p['note']} |" for p in phases]
    suite = report["suite"]
    if suite and "tests" in suite:
        lines += ["", f"Suite (SALIENTFT_TEST_DEVICE=cuda, tests.xml): {suite['passed']} passed, {suite['failures']} "
                      f"failed, {suite['errors']} errors, {suite['skipped']} skipped in {suite['time_s']} s."]
        lines += [f"- failed: `{t}`" for t in suite["failed_tests"]]
    if report["targets"]:
        lines += ["", "Targets (details in gpu_step.md):", "", "| model | measure | goal | must | value | verdict |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {t['model']} | {t['measure']} | {t['goal']} | {t['must']} | {_fmt(t['value'])} | {t['verdict']} |"
                  for t in report["targets"]]
    lines.append("")
    write_report(out / "gpu_check", report, lines, dtype="bf16", seed=SEED, device="cpu" if not cuda else "cuda",
                 quiet=True)
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for gpu_step.json and gpu_step.md (required)")
    ap.add_argument("--dry-run", action="store_true", help="on CPU with tiny models (seconds): exercises the code")
    ap.add_argument("--device", default=None, help="default: cuda (--dry-run: cpu)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for the whole benchmark (default 150, dry run 120)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds at most (default 7, dry run 3)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--methods", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--check-env", action="store_true", help=argparse.SUPPRESS)  # scripts/gpu_check.sh
    ap.add_argument("--check-report", default=None, help=argparse.SUPPRESS)  # scripts/gpu_check.sh
    args = ap.parse_args(argv)
    if args.check_env:
        return check_env()
    if args.out is None:
        ap.error("--out OUTDIR is required")
    if args.check_report:
        return check_report(args.check_report, Path(args.out), args.dry_run)
    threads = torch.get_num_threads()
    if args.dry_run and not args.device:
        torch.set_num_threads(1)  # tiny models: one thread is fastest, and kind to a shared CI machine
    try:
        return run(args, ap)
    finally:
        torch.set_num_threads(threads)


def run(args, ap) -> int:
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    args.budget_s = args.budget_s if args.budget_s is not None else (120.0 if args.dry_run else 150.0)
    args.rounds = args.rounds or (3 if args.dry_run else 7)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in VARIANTS] + [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown method(s)/model(s) {bad}; methods: {', '.join(VARIANTS)}; models: {', '.join(MODELS)}")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"gpu_step.py: --device {args.device} but torch {torch.__version__} sees no CUDA device; "
              "run on a GPU machine, or pass --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    result = {
        "_t0": t0, "dry_run": args.dry_run, "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if cuda else "CPU (dry run)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "noise_generator_env": os.environ.get(NOISE_GENERATOR_ENV), "budget_s": args.budget_s,
        "tokens": list(DRY_TOKENS if args.dry_run else TOKENS), "models": {}, "skipped": [],
    }
    shapes = DRY_MODELS if args.dry_run else MODELS
    phases = [(m, g) for m in models for g in GROUPS]
    for i, (model_name, group) in enumerate(phases):
        shape = shapes[model_name]
        result["models"].setdefault(model_name, {"shape": shape, "methods": {}})
        # this phase's share of what is left, by weight over the phases still to run (what a phase
        # leaves unspent goes to the next ones)
        share = PHASE_WEIGHT[group] / sum(PHASE_WEIGHT[g] for _, g in phases[i:])
        phase_deadline = time.perf_counter() + (deadline - time.perf_counter()) * share
        batch = random_batch(shape["vocab_size"], result["tokens"], args.device, seed=SEED)
        print(f"[gpu_step] {model_name} {group}", file=sys.stderr, flush=True)
        run_group(model_name, shape, group, batch, args, phase_deadline, result)
        result["_t0"] = t0
        write_reports(result, out)
    result["_t0"] = t0
    write_reports(result, out)
    print((out / "gpu_step.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
