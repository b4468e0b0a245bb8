"""Shared machinery of the reproduction benchmarks (quality.py, ablations.py, quantization.py,
recovery.py, noise_scale.py, quantize_order.py, suite.py). No part imports another: the steps two
parts share (quality's learning-rate grid, quantizing and measuring a model, recovering one) live
here, and reports go through bench/lib's writer, which records the provenance block.

Why a cache: the suite takes about two hours on a 2-core CPU, longer than anyone sits through.
Every finished training run is written as one JSON file under ``<out>/runs/<preset>/<key>.json``
(``key`` hashes the preset and the run's settings), so an interrupted part, or a part stopped by
its ``--max-minutes`` budget, resumes where it stopped, and a rerun only trains what is missing.
Delete a file to rerun that run.

Presets (one per scale, each with its own cache):

- ``full``: SmolLM2-135M (embedded), fp32, 30 steps of 8 chats (<= 256 tokens), 50 items per
  task of the paper's six, 3 seeds. What docs/RESULTS.md reports.
- ``quick`` (``--quick``): the same model, 5 steps, 10 items per task, 1 seed: a sanity run
  (the parts also run fewer variants).
- ``smoke`` (``--smoke``): the tiny random Llama, 2 steps, 4 items per task, 2 seeds: CI.
- ``paper500`` (``--paper500``): the 500-item refresh: 100 steps of 4 chats, the fixed seeded
  ``paper500`` subset (500 items per task, all of ARC-Challenge's 299), 3 seeds; every record
  keeps each item's outcome so that runs are compared item by item (paired intervals).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import this file as a module
from lib import ROOT  # noqa: E402  bench/lib (puts ROOT/src on sys.path)
from lib.provenance import provenance  # noqa: E402
from lib import report as lib_report  # noqa: E402

from salientft._io import write_json  # noqa: E402

from _machine import git_commit, machine_info  # noqa: E402,F401  (bench/_machine.py)

from salientft.evaluation.tasks import PAPER_METRICS  # noqa: E402

log = logging.getLogger("bench")
TASK_METRIC = PAPER_METRICS  # the paper's metric per task: what paired comparisons compare
# BoolQ at 135M sits at its constant-answer floor: nearly every run, trained or not, answers "no" to
# all (37.4-38.2 % on paper500, the share of "no" labels) while a model whose bias flips to "yes" gets
# 61 %. One such flip moves the six-task average by 4 points, so paired comparisons also report the
# other five tasks, to tell a bias flip from a change of ability.
YES_NO_FLOOR_TASK = "boolq"
WITHOUT_FLOOR = f"without_{YES_NO_FLOOR_TASK}"  # the key of that five-task interval in a paired result
CACHE_VERSION = 1  # bump when a change to salientft invalidates cached results


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    max_steps: int
    batch_size: int
    max_length: int
    eval_limit: int | None
    calib_samples: int
    seeds: tuple[int, ...]
    dtype: str = "fp32"  # bf16 is slower than fp32 on CPUs without bf16 units
    data_limit: int | None = None
    warmup_ratio: float = 0.03
    eval_subset: str | None = None  # a fixed item subset (evaluation.tasks.SUBSETS) instead of eval_limit

    def train_fields(self) -> dict:
        """The TrainConfig fields every run of this preset shares."""
        fields = {"model": self.model, "max_steps": self.max_steps, "batch_size": self.batch_size,
                  "max_length": self.max_length, "eval_limit": self.eval_limit, "calib_samples": self.calib_samples,
                  "dtype": self.dtype, "data_limit": self.data_limit, "warmup_ratio": self.warmup_ratio,
                  "data": "embedded", "eval_tasks": "paper"}
        if self.eval_subset is not None:
            fields["eval_subset"] = self.eval_subset
        return fields

    def key_fields(self) -> dict:
        """What a run key hashes: every field, but eval_subset only when set (older presets' cached
        runs keep their keys)."""
        fields = asdict(self)
        if fields["eval_subset"] is None:
            del fields["eval_subset"]
        return fields

    def items_text(self) -> str:
        return (f"the fixed `{self.eval_subset}` subset of each task" if self.eval_subset
                else f"the first {self.eval_limit} items of each task")


PRESETS = {
    "full": Preset("full", "smollm2-135m", max_steps=30, batch_size=8, max_length=256, eval_limit=50,
                   calib_samples=32, seeds=(0, 1, 2)),
    "quick": Preset("quick", "smollm2-135m", max_steps=5, batch_size=8, max_length=256, eval_limit=10,
                    calib_samples=16, seeds=(0,)),
    "smoke": Preset("smoke", "tiny-random-llama", max_steps=2, batch_size=2, max_length=384, eval_limit=4,
                    calib_samples=4, seeds=(0, 1), data_limit=32),
    "paper500": Preset("paper500", "smollm2-135m", max_steps=100, batch_size=4, max_length=256, eval_limit=None,
                       calib_samples=32, seeds=(0, 1, 2), eval_subset="paper500"),
}


def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a sanity run on the real model (minutes)")
    g.add_argument("--smoke", action="store_true", help="the tiny random model (seconds; what CI runs)")
    g.add_argument("--paper500", action="store_true",
                   help="the 500-item refresh: 100 steps, the 500-item subset, per-item outcomes (hours)")
    p.add_argument("--out", default=None, help="results folder (default docs/results, or docs/results/quick)")
    p.add_argument("--max-minutes", type=float, default=45.0,
                   help="start no new run after this many minutes; rerun to continue from the cache")


def resolve(args) -> tuple[Preset, Path]:
    name = ("smoke" if args.smoke else "quick" if args.quick
            else "paper500" if getattr(args, "paper500", False) else "full")
    preset = PRESETS[name]
    if args.out:
        out = Path(args.out)
    elif args.smoke:
        raise SystemExit("--smoke needs --out (it must not overwrite docs/results)")
    else:
        out = ROOT / "docs" / "results" / ("" if name == "full" else name)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return preset, out


def machine() -> dict:
    """The machine facts the suite's reports record (bench/_machine.py), under their recorded keys."""
    return machine_info("python", "torch", "transformers", "threads", "cpus=cpu_count", "processor",
                        "load_avg_1m", "peft", "commit")


def run_key(preset: Preset, spec: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "preset": preset.key_fields(), "spec": spec}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


class Runs:
    """The cache of one preset's finished runs, plus the wall-clock budget of this invocation."""

    def __init__(self, preset: Preset, out: Path, max_minutes: float = 45.0, part: str | None = None):
        self.preset, self.dir = preset, out / "runs" / preset.name
        self.part = part  # the part (bench/<part>.py) running: recorded in each new record, not in its key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + 60 * max_minutes
        self.skipped: list[str] = []

    def over_budget(self) -> bool:
        return time.monotonic() > self.deadline

    def path(self, spec: dict) -> Path:
        return self.dir / f"{run_key(self.preset, spec)}.json"

    def cached(self, spec: dict) -> dict | None:
        p = self.path(spec)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            log.warning("ignoring unreadable cache file %s; the run will be redone", p)
            return None

    def cached_seeds(self, spec_of_seed) -> list[dict]:
        """The cached results of ``spec_of_seed(seed)`` for the preset's seeds in order, up to the first
        one missing, so that two such lists pair item by item and seed by seed."""
        found = []
        for seed in self.preset.seeds:
            rec = self.cached(spec_of_seed(seed))
            if rec is None:
                break
            found.append(rec["result"])
        return found

    def get(self, spec: dict, compute) -> dict | None:
        """The cached record of ``spec``, else ``compute()`` (if the budget allows) stored as its record."""
        rec = self.cached(spec)
        if rec is not None:
            return rec
        if self.over_budget():
            self.skipped.append(describe(spec))
            return None
        t0 = time.time()
        result = compute()
        rec = {"spec": spec, "preset": self.preset.name, "key": run_key(self.preset, spec),
               "result": result, "seconds": round(time.time() - t0, 1),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": git_commit(),
               "provenance": provenance(self.preset.dtype, spec.get("seed"))}
        if self.part is not None:  # which part ran it (bench/budget.py); outside spec, which the key hashes
            rec["part"] = self.part
        write_json(self.path(spec), rec)
        return rec

    def train(self, spec: dict, extra: dict | None = None, post=None) -> dict | None:
        """Fine-tune with TrainConfig(preset fields + spec + extra); ``extra`` is not part of the key
        (e.g. a local path), keys of ``spec`` starting with ``_`` are labels kept out of the config.
        ``post(run_dir)`` may measure the saved run before its folder is deleted (returns a dict)."""
        return self.get(spec, lambda: train_run(self.preset, spec, extra or {}, post))

    def baseline(self) -> dict | None:
        """The untrained model: the six-task eval and the held-out loss, once per preset."""
        return self.get({"method": "base"}, lambda: evaluate_base(self.preset))


def describe(spec: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.items())


def train_run(preset: Preset, spec: dict, extra: dict, post=None) -> dict:
    from salientft import methods
    from salientft.config import TrainConfig
    from salientft.train import train

    settings = {**{k: v for k, v in spec.items() if not k.startswith("_")}, **extra}
    method = methods.get(settings["method"], quantized=settings.get("quantized") is not None)
    # the preset's shared settings this method does not read (calib_samples for LoRA, ...) are left out
    fields = {**method.only_used(preset.train_fields()), **settings}
    log.info("run: %s", describe(spec))
    with tempfile.TemporaryDirectory(prefix="salientft-bench-") as tmp:
        config = TrainConfig.from_dict({**fields, "output": str(Path(tmp) / "run"), "eval_before": False,
                                        "logging_steps": 1})
        result = compact(train(config))
        samples = Path(tmp) / "run" / "eval_after.samples.jsonl"
        if samples.is_file():
            result["items"] = samples_file_outcomes(samples)
        if post is not None:
            result.update(post(Path(tmp) / "run"))
    return result


def compact(result: dict) -> dict:
    """What the reports need from train()'s metrics (drops nothing that a table or plot uses)."""
    after = result.get("eval_after") or {}
    keep = ("method", "steps", "wall_time_s", "tokens_per_s", "trainable_params", "total_params",
            "trainable_fraction", "peak_memory_bytes", "learning_rate", "heldout_loss_before", "heldout_loss_after")
    import torch

    out = {k: result.get(k) for k in keep}
    out["threads"] = torch.get_num_threads()  # s/step depends on it (and on the machine's load)
    out["train_loss"] = [round(h["loss"], 4) for h in result.get("train_loss", [])]
    out["paper_avg"] = after.get("paper_avg")
    out["tasks"] = {t: {m: r.get(m) for m in ("acc", "acc_norm", "n")} for t, r in (after.get("results") or {}).items()}
    if result.get("kept_fraction"):
        kept = [h["kept_fraction"] for h in result["kept_fraction"]]
        out["kept_fraction_mean"] = sum(kept) / len(kept)
    return out


def item_outcomes(records) -> dict:
    """Each item's outcome from per-item records (``sample_records``, or a samples file's lines),
    compactly: {task: {"ids": [...], "acc": "0110...", "acc_norm": "..."}} (a string of 0/1 per
    metric, in item order), for paired comparisons."""
    by_task: dict[str, dict[int, dict]] = {}
    for rec in records:
        by_task.setdefault(rec["task"], {})[int(rec["id"])] = rec
    out = {}
    for task, recs in by_task.items():
        ids = sorted(recs)
        out[task] = {"ids": ids, **{m: "".join(str(int(recs[i][m])) for i in ids)
                                    for m in ("acc", "acc_norm") if all(recs[i].get(m) is not None for i in ids)}}
    return out


def samples_file_outcomes(samples: Path) -> dict:
    """``item_outcomes`` of a samples file, read and checked by ``compare.read_samples``."""
    from salientft.evaluation.compare import read_samples

    return item_outcomes(rec for recs in read_samples(samples).values() for rec in recs.values())


def item_differences(recs_a: list, recs_b: list) -> tuple[dict, int] | None:
    """({task: per-item sum over seeds of (b - a) in the task's paper metric}, number of seeds),
    seeds matched in order; None when the records carry no per-item outcomes. Sums, not means, so the
    bootstrap stays in exact integers (paired_bootstrap_differences divides by the seed count)."""
    import numpy as np

    pairs = [(a, b) for a, b in zip(recs_a, recs_b) if a.get("items") and b.get("items")]
    if not pairs:
        return None
    out = {}
    for task, metric in TASK_METRIC.items():
        total = None
        for a, b in pairs:
            ia, ib = a["items"][task], b["items"][task]
            if ia["ids"] != ib["ids"]:
                raise ValueError(f"{task}: runs were evaluated on different items")
            d = np.array([int(y) - int(x) for x, y in zip(ia[metric], ib[metric])], dtype=np.int64)
            total = d if total is None else total + d
        out[task] = total
    return out, len(pairs)


def paired_difference(recs_a: list, recs_b: list, resamples: int | None = None, seed: int = 0) -> dict | None:
    """Six-task average of b minus a, item by item: the difference and a paired percentile bootstrap
    95 % interval (items resampled within each task, tasks in TASK_METRIC's order, one rng), each
    item's difference its mean over the matched seeds; the same for the five tasks without BoolQ
    (``without_boolq``, see YES_NO_FLOOR_TASK). ``recs_*``: lists of run results (one per seed, in
    seed order) with per-item outcomes; None when they have none."""
    found = item_differences(recs_a, recs_b)
    return None if found is None else paired_interval(*found, resamples=resamples, seed=seed)


def paired_difference_in_differences(before_a: list, after_a: list, before_b: list, after_b: list,
                                     resamples: int | None = None, seed: int = 0) -> dict | None:
    """(after_b - before_b) - (after_a - before_a), item by item, with paired_difference's interval:
    e.g. how much less model b loses to quantization than model a, each against its own unquantized
    self. Seeds matched in order, over the seeds all four lists have."""
    n = min(len(before_a), len(after_a), len(before_b), len(after_b))
    a = item_differences(before_a[:n], after_a[:n])
    b = item_differences(before_b[:n], after_b[:n])
    if a is None or b is None or a[1] != b[1]:
        return None
    return paired_interval({t: b[0][t] - a[0][t] for t in TASK_METRIC}, a[1], resamples=resamples, seed=seed)


def paired_interval(sums: dict, n_seeds: int, resamples: int | None = None, seed: int = 0) -> dict:
    """The six-task difference, its paired bootstrap 95 % interval and the five tasks without BoolQ, from
    per-item sums over ``n_seeds`` seeds ({task: int array}, as item_differences returns them)."""
    from salientft.evaluation.paired import paired_bootstrap_differences

    boot = paired_bootstrap_differences(sums, scale=n_seeds, resamples=resamples, seed=seed)
    rest = paired_bootstrap_differences({t: d for t, d in sums.items() if t != YES_NO_FLOOR_TASK},
                                        scale=n_seeds, resamples=resamples, seed=seed)
    return {"diff": boot["diff"], "lo": boot["lo"], "hi": boot["hi"], "seeds": n_seeds, "items": boot["n"],
            "per_task": {t: int(sums[t].sum()) / (sums[t].size * n_seeds) for t in TASK_METRIC},
            WITHOUT_FLOOR: {k: rest[k] for k in ("diff", "lo", "hi")}}


PAIRED_HEAD = "diff | 95 % interval | without BoolQ"  # the table columns paired_cells fills


def paired_cells(c: dict) -> str:
    """A paired difference as table cells (points): the six-task difference, its interval, and the five
    tasks without BoolQ as "diff [lo, hi]" ("-" for records from before that was kept)."""
    five = c.get(WITHOUT_FLOOR)
    rest = f"{100 * five['diff']:+.1f} [{100 * five['lo']:+.1f}, {100 * five['hi']:+.1f}]" if five else "-"
    return f"{100 * c['diff']:+.1f} | [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] | {rest}"


def paired_table(pairs, resamples: int | None = None, seed: int = 0) -> dict:
    """{name: paired_difference(a, b)} for each ``(name, recs_a, recs_b)`` of ``pairs`` whose records
    carry per-item outcomes; pairs without them (runs from before --log-samples) are left out."""
    found = ((name, paired_difference(a, b, resamples=resamples, seed=seed)) for name, a, b in pairs)
    return {name: d for name, d in found if d is not None}


def evaluate_base(preset: Preset) -> dict:
    import torch

    from salientft.models import load_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[preset.dtype]
    model, tok = load_model(preset.model, dtype=dtype)
    return {"method": "base", **model_metrics(model, tok, preset)}


def model_metrics(model, tok, preset: Preset) -> dict:
    """What train() measures after training, for a model that was not trained (same data, same items)."""
    from salientft.data.chat import ChatCollator, build_dataset
    from salientft.evaluation import evaluate
    from salientft.train import heldout_loss

    held = build_dataset("embedded", tok, max_length=preset.max_length, packing=False, split="heldout",
                         limit=200, seed=0)
    ev = evaluate(model, tok, "paper", limit=preset.eval_limit, subset=preset.eval_subset, return_items=True)
    loss = heldout_loss(model, held, ChatCollator(tok))
    from salientft.evaluation.cli_api import sample_records

    # per-item outcomes on every preset, as train_run keeps them: pairing against an untrained
    # (base or quantized) model must not depend on which preset measured it
    return {"heldout_loss_before": loss, "heldout_loss_after": loss, "paper_avg": ev["paper_avg"],
            "tasks": {t: {m: r.get(m) for m in ("acc", "acc_norm", "n")} for t, r in ev["results"].items()},
            "items": item_outcomes(sample_records(ev))}


def lora_rank_matching_gift(model_name: str) -> tuple[int, int]:
    """(LoRA rank whose trainable count is closest to GIFT-SW's default, GIFT-SW's count) on ``model_name``."""
    from lib.methods import gift_budget  # bench/lib: the same matching as the speed benchmarks

    from salientft.config import GiftConfig
    from salientft.models import load_model

    model, _ = load_model(model_name, dtype="bf16")
    kout, _, rank = gift_budget(model, GiftConfig())
    return rank, kout


# --------------------------------------------------------------------------- statistics

def ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(loss)


def measured(values: list) -> list[float]:
    """The values that were measured: not None, not NaN."""
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (n-1), None where undefined."""
    vals = measured(values)
    if not vals:
        return None, None, 0
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None, len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)), len(vals)


def seed_summary(results: list[dict]) -> dict:
    """Mean and seed spread (None for one seed) of a quantized or recovered model's measures over its
    seeds: six-task average, held-out chat perplexity, text perplexity (None where not measured); and
    each measure's [min, max] over the seeds under "range" (a plot's bars on a log axis, where a std
    can exceed the mean)."""
    values = {"paper_avg": [r["paper_avg"] for r in results],
              "heldout_ppl": [ppl(r["heldout_loss_after"]) for r in results],
              "text_ppl": [r.get("text_ppl") for r in results]}
    found = {k: measured(v) for k, v in values.items()}
    return {"n_seeds": len(results), **{k: mean_std(v)[:2] for k, v in found.items()},
            "range": {k: [min(v), max(v)] if v else [None, None] for k, v in found.items()}}


def differs(a: list[float], b: list[float], z: float = 2.0) -> tuple[float | None, float | None, bool | None]:
    """(mean(a) - mean(b), its standard error over seeds, |diff| > z * SE). SE needs >= 2 seeds each."""
    ma, sa, na = mean_std(a)
    mb, sb, nb = mean_std(b)
    if ma is None or mb is None:
        return None, None, None
    if sa is None or sb is None:
        return ma - mb, None, None
    se = math.sqrt(sa ** 2 / na + sb ** 2 / nb)
    return ma - mb, se, abs(ma - mb) > z * se if se > 0 else ma != mb


def fmt(m, s=None, scale=1.0, spec=".1f") -> str:
    if m is None:
        return "-"
    text = format(m * scale, spec)
    return text if s is None else f"{text} ± {format(s * scale, spec.lstrip('+'))}"


def write_report(out: Path, name: str, result: dict, markdown: list[str], plot=None, *, preset: Preset) -> None:
    """``<out>/<name>.json``, ``.md`` and (given ``plot()`` returning a figure) ``.png``, through bench/lib's
    writer, with the provenance block of ``preset`` (its dtype, its seeds)."""
    lib_report.write_report(out / name, result, markdown, plot, dtype=preset.dtype, seed=list(preset.seeds))


def base_reference(ax, base: float | None, values: list[float], label: str = "base (no training)") -> bool:
    """Mark the untrained model's value on a plot of trained runs' ``values``: a dashed line when it
    lies within 3x their range of them; else only named in the legend, since on the scale a far base
    (perplexity 86 against 11-12) would flatten every difference. True when the line was drawn."""
    if base is None:
        return False
    lo, hi = min(values, default=base), max(values, default=base)
    if min(abs(base - lo), abs(base - hi)) <= 3 * (hi - lo or 1):
        ax.axhline(base, color="gray", ls="--", lw=1, label=label)
        return True
    ax.plot([], [], color="gray", ls="--", lw=1, label=f"{label}: {base:.3g}, off the scale")
    return False


def tick_text(v: float) -> str:
    """A log-axis tick as a reader writes it: "12", "5000", and from 10,000 up a power of ten ("10^8"
    in mathtext) or "2x10^5", never Python's "1e+08"."""
    if v < 1e4:
        return f"{v:g}"
    exponent = math.floor(math.log10(v) + 1e-9)
    mantissa = round(v / 10 ** exponent)
    return f"$10^{{{exponent}}}$" if mantissa == 1 else f"${mantissa}\\times10^{{{exponent}}}$"


def log_axis(ax) -> None:
    """A log y axis for perplexities (a ratio scale: 37 beside 11-12 must not flatten 11 vs 12), labelled
    "12" rather than "1.2x10^1"; within a decade every minor tick is named, over a few only 2 and 5."""
    from matplotlib.ticker import FuncFormatter

    def minor(v, _):
        lo, hi = ax.get_ylim()
        decades = math.log10(hi / lo) if lo > 0 else math.inf
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        return tick_text(v) if decades <= 1.2 or (decades <= 3 and mantissa in (2, 5)) else ""

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_text(v)))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def report_command(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a report: ``script`` and its arguments without ``--max-minutes``,
    which splits the work into sittings but does not change a result (every run is cached)."""
    args, out, skip = list(sys.argv[1:] if argv is None else argv), [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--max-minutes":
            skip = True
        elif not a.startswith("--max-minutes="):
            out.append(a)
    return " ".join([f"bench/{script}", *out])


def setting_lines(preset: Preset, command: str, skipped: list[str],
                  lr_text: str = "each method's default learning rate") -> list[str]:
    """The report's paragraph on how it was made; ``lr_text`` says which learning rates were used."""
    lines = [f"Command: `{command}` (preset `{preset.name}`: {preset.model}, {preset.dtype}, "
             f"{preset.max_steps} steps x {preset.batch_size} chats of <= {preset.max_length} tokens from the "
             f"embedded instruction mix, AdamW + cosine, {lr_text}; six-task average "
             f"on {preset.items_text()}; held-out perplexity on 200 held-out chats "
             f"(assistant tokens).)", ""]
    if skipped:
        lines += [f"**Incomplete**: {len(skipped)} run(s) not yet done (budget reached); rerun the same command "
                  "to continue from the cache: " + "; ".join(skipped), ""]
    return lines


# ----------------------------------------------------------------------------------------------
# Steps several parts share (scripts never import each other: what two parts use lives here)
# ----------------------------------------------------------------------------------------------
# The learning-rate grid (quality.py --lr-grid); noise_scale.py, recovery.py and quantize_order.py
# train at the rates it chose.
# Learning-rate grids around each method's paper rate (GIFT-SW 1e-4, the others 3e-5), a factor ~3 apart.
LR_GRID = {"gift-sw": (3e-5, 1e-4, 3e-4, 1e-3), "salient": (3e-5, 1e-4, 3e-4, 1e-3),
           "lora": (3e-5, 1e-4, 3e-4, 1e-3), "dora": (3e-5, 1e-4, 3e-4, 1e-3),
           "full": (1e-5, 3e-5, 1e-4), "gmt": (1e-5, 3e-5, 1e-4)}

MAX_GRID_EXTENSIONS = 2  # a grid grows by at most this many half-decades past its ends


def quality_spec(method: str, seed: int, rank: int) -> dict:
    spec = {"method": method, "seed": seed}
    if method in ("lora", "dora"):
        spec["lora_r"] = rank
    if method == "gmt":
        spec["mask_ratio"] = 0.5
    return spec


def choose_lrs(runs, methods, seed: int, rank: int, run=None) -> dict:
    """{method: {"grid", "heldout_loss": {lr: loss}, "chosen", "extended"}}: seed 0 at every rate of
    the method's grid without the six-task evaluation, the lowest held-out loss chosen (None while
    incomplete). A best rate at either end of the grid is not a tuned rate, so the grid grows by one
    half-decade in that direction (at most MAX_GRID_EXTENSIONS times) until the best is inside it.
    ``run`` (default ``runs.train``) runs or looks up one spec; ``runs.cached`` reads the choice
    without training anything (:func:`chosen_lrs`)."""
    run = run or runs.train
    out = {}
    for m in methods:
        rates, losses, chosen = sorted(LR_GRID[m]), {}, None
        while True:
            for lr in rates:
                if lr in losses:
                    continue
                # held-out loss only: the six-task evaluation (2/3 of a run's time) is for the chosen rate
                rec = run({**quality_spec(m, seed, rank), "lr": lr, "eval_tasks": ""})
                if rec is not None and rec["result"].get("heldout_loss_after") is not None:
                    losses[lr] = rec["result"]["heldout_loss_after"]
            if len(losses) < len(rates):
                break  # grid incomplete (budget): rerun to continue
            best = min(rates, key=lambda lr: losses[lr] if math.isfinite(losses[lr]) else math.inf)
            at_edge = len(rates) > 1 and best in (rates[0], rates[-1])
            if not at_edge or len(rates) - len(LR_GRID[m]) >= MAX_GRID_EXTENSIONS:
                chosen = best
                break
            rates = sorted(rates + [half_decade_step(best, up=best == rates[-1])])
        out[m] = {"grid": rates, "heldout_loss": {str(k): v for k, v in losses.items()}, "chosen": chosen,
                  "extended": len(rates) - len(LR_GRID[m]),
                  "at_edge": None if chosen is None else chosen in (rates[0], rates[-1])}
    return out


def chosen_lrs(runs, methods, rank: int) -> dict:
    """{method: the learning rate its grid chose, or None while the grid is incomplete}, from the cache
    alone: for the other parts of the refresh, which train at the rates quality chose."""
    grid = choose_lrs(runs, methods, runs.preset.seeds[0], rank, run=runs.cached)
    return {m: g["chosen"] for m, g in grid.items()}


def half_decade_step(lr: float, up: bool) -> float:
    """lr's neighbour on the 1-3-10 ladder the grids use (1e-4 -> 3e-4 -> 1e-3; down: 1e-4 -> 3e-5)."""
    exp = math.floor(math.log10(lr) + 1e-9)
    three = lr / 10 ** exp > 2  # lr is 3e<exp>, else 1e<exp>
    if up:
        return float(f"1e{exp + 1}") if three else float(f"3e{exp}")
    return float(f"1e{exp}") if three else float(f"3e{exp - 1}")


# Quantization (quantization.py); recovery.py and quantize_order.py start from its models and
# measure theirs the same way.
QUANT_METHODS = {  # name -> (method, keep salient columns)
    "rtn": ("rtn", False),
    "rtn+salient": ("rtn", True),
    "gptq": ("gptq", False),
    "gptq+salient": ("gptq", True),
}

SALIENT_FRACTION = 128 / 4096


@dataclass(frozen=True)
class QuantSetting:
    bits: tuple[int, ...]
    methods: tuple[str, ...]
    samples: int
    seq_len: int
    text_tokens: int


QUANT = {
    "full": QuantSetting((4, 3, 2), tuple(QUANT_METHODS), samples=32, seq_len=512, text_tokens=8192),
    "quick": QuantSetting((3,), ("rtn+salient", "gptq+salient"), samples=16, seq_len=256, text_tokens=2048),
    "smoke": QuantSetting((3,), tuple(QUANT_METHODS), samples=4, seq_len=64, text_tokens=512),
    # the 500-item refresh: the start points of recovery (and of train-then-quantize), measured on the subset
    "paper500": QuantSetting((4, 3, 2), ("gptq+salient",), samples=32, seq_len=512, text_tokens=8192),
}


def embedded_records(name: str) -> list[dict]:
    from salientft.data.embedded import read_records

    return read_records(name)


def calibration_texts() -> list[str]:
    docs = [r.get("passage") or "" for r in embedded_records("boolq")] + [r.get("ctx") or "" for r in embedded_records("hellaswag")]
    return [d.strip() for d in docs if d and d.strip()]


def text_ids(tok, n_tokens: int, window: int = 256):
    """Held-out text: SciQ support paragraphs from the end of the file, cut into windows."""
    import torch

    texts = [r["support"] for r in embedded_records("sciq") if r.get("support")]
    ids: list[int] = []
    for t in reversed(texts):
        ids += tok(t.strip()).input_ids + [tok.eos_token_id]
        if len(ids) >= n_tokens:
            break
    n = (min(len(ids), n_tokens) // window) * window
    return torch.tensor(ids[:n]).view(-1, window)


def text_perplexity(model, ids, batch_size: int = 4) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, ids.shape[0], batch_size):
            x = ids[b : b + batch_size]
            n = x.shape[0] * (x.shape[1] - 1)
            nll += float(model(input_ids=x, labels=x).loss) * n
            count += n
    return math.exp(nll / count)


def spec_for(qs: QuantSetting, name: str, bits: int) -> dict:
    """The cache key of one quantized model: its settings and, for a quantized one, the version of the
    code that decides its integers (salientft.quant.fingerprint), so that a change to that code
    quantizes again instead of quoting a model the code no longer makes."""
    from salientft.quant.fingerprint import code_version

    spec = {"part": "quantize", "method": name, "bits": bits, "salient_fraction": SALIENT_FRACTION,
            "samples": qs.samples, "seq_len": qs.seq_len, "text_tokens": qs.text_tokens}
    return spec if name == "bf16" else {**spec, "quant_code": code_version()}


def saved_dir(preset: Preset, qs: QuantSetting, bits: int) -> Path:
    """Where the GPTQ + salient model at ``bits`` is kept (salientft's cache; outside the repo)."""
    from salientft.models import cache_dir

    return cache_dir() / "bench" / f"{preset.name}-gptq+salient-{run_key(preset, spec_for(qs, 'gptq+salient', bits))}"


def quantized_model(preset: Preset, qs: QuantSetting, name: str, bits: int, progress: bool = True):
    """(model, tokenizer, seconds, bf16 sizes): the preset's bf16 model quantized with configuration
    ``name`` ("bf16": left as it is), calibrated and seeded as every quantized model of the suite."""
    import torch

    from salientft.calibration import calibration_batches
    from salientft.models import load_model
    from salientft.quant.model import model_bytes, quantize, target_bytes

    torch.manual_seed(0)
    model, tok = load_model(preset.model, dtype="bf16")
    before = {"target_bytes": target_bytes(model), "model_bytes": model_bytes(model)}
    if name == "bf16":
        return model, tok, 0.0, before
    quantizer, salient = QUANT_METHODS[name]
    calib = calibration_batches(tok, calibration_texts(), qs.samples, qs.seq_len, 8, seed=0)
    t = time.time()
    quantize(model, bits, salient_fraction=SALIENT_FRACTION if salient else 0.0, quantizer=quantizer,
             calibration=calib, progress=progress)
    return model, tok, time.time() - t, before


def quantize_one(preset: Preset, qs: QuantSetting, name: str, bits: int, save: Path | None = None) -> dict:
    """Quantize the bf16 model with one configuration and measure it (and save it if asked)."""
    from salientft.quant.model import save_quantized

    model, tok, seconds, before = quantized_model(preset, qs, name, bits)
    if save is not None and name != "bf16":
        save_quantized(model, save, tokenizer=tok, base_model=preset.model)
    return {"method": name, "bf16": before, **measure_quantized(model, tok, preset, qs, bits, seconds)}


def measure_quantized(model, tok, preset: Preset, qs: QuantSetting, bits: int, seconds: float) -> dict:
    """What every quantized model of the suite reports: bits, time, text perplexity, sizes, and
    train()'s measurements (held-out loss, six-task evaluation)."""
    from salientft.quant.model import model_bytes, target_bytes

    from salientft.quant.fingerprint import quantized_fingerprint

    return {"bits": bits, "quantize_seconds": round(seconds, 1), "fingerprint": quantized_fingerprint(model) or None,
            "text_ppl": text_perplexity(model, text_ids(tok, qs.text_tokens)),
            "target_bytes": target_bytes(model), "model_bytes": model_bytes(model), **model_metrics(model, tok, preset)}


def quant_args(doc: str, argv=None, part: str | None = None):
    """(args, preset, out, quant setting, runs) of a quantization part (--bits and the suite's flags);
    ``part``: the script's name, recorded in its runs."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(p)
    p.add_argument("--bits", type=int, nargs="+", default=None)
    args = p.parse_args(argv)
    preset, out = resolve(args)
    return args, preset, out, QUANT[preset.name], Runs(preset, out, args.max_minutes, part)


def ensure_saved(runs: Runs, qs: QuantSetting, bits: int) -> Path:
    """The saved GPTQ + salient model at ``bits``, quantizing it again if it is not on disk."""
    path = saved_dir(runs.preset, qs, bits)
    if not (path / "quantization_config.json").is_file():
        log.info("quantizing gptq+salient at %d bits for recovery (not on disk: %s)", bits, path)
        quantize_one(runs.preset, qs, "gptq+salient", bits, save=path)
    return path


# Recovery of a quantized model (recovery.py); quantize_order.py recovers GIFT-SW with every seed.
RECOVERY_METHODS = ("gift-sw", "ste", "lora")

LR_FROM = {"gift-sw": "gift-sw", "ste": "full", "lora": "lora"}  # whose quality grid sets the rate (--paper500)


def recovery_lrs(runs: Runs, rank: int) -> dict | None:
    """{method: rate} chosen by quality's grid on this preset (None for presets without tuning);
    refuses when a grid is incomplete, naming the command that completes it."""
    if runs.preset.eval_subset is None:
        return None
    chosen = chosen_lrs(runs, sorted(set(LR_FROM.values())), rank)
    missing = sorted(m for m, lr in chosen.items() if lr is None)
    if missing:
        raise SystemExit(f"recovery trains at the learning rates bench/quality.py chose, but the grid of "
                         f"{', '.join(missing)} is incomplete: run `.venv/bin/python bench/quality.py --{runs.preset.name} "
                         f"--lr-grid --methods {' '.join(missing)}` first")
    return {m: chosen[LR_FROM[m]] for m in RECOVERY_METHODS}


def text_ppl_of(preset: Preset, qs: QuantSetting):
    def post(run_dir) -> dict:
        from salientft.quant.model import model_bytes
        from salientft.train import load_run

        model, tok = load_run(run_dir)
        return {"text_ppl": text_perplexity(model, text_ids(tok, qs.text_tokens)), "model_bytes": model_bytes(model)}

    return post


def recovery_spec(runs: Runs, qs: QuantSetting, bits: int, method: str, rank: int, lrs: dict | None,
                  seed: int) -> dict:
    """The cache key of ``method`` recovering the GPTQ + salient model at ``bits`` with ``seed``."""
    q_spec = spec_for(qs, "gptq+salient", bits)
    spec = {"method": method, "seed": seed, "_start": f"gptq+salient-{bits}bit", "_quantize": run_key(runs.preset, q_spec)}
    if method == "lora":
        spec["lora_r"] = rank
    if lrs is not None:
        spec["lr"] = lrs[method]
    return spec


def recover(runs: Runs, qs: QuantSetting, bits: int, method: str, rank: int, lrs: dict | None,
            seed: int = 0) -> dict | None:
    """The cached or new record of ``method`` recovering the GPTQ + salient model at ``bits``."""
    spec = recovery_spec(runs, qs, bits, method, rank, lrs, seed)
    if runs.cached(spec) is None and not runs.over_budget():
        extra = {"quantized": str(ensure_saved(runs, qs, bits))}
    else:
        extra = {}
    return runs.train(spec, extra, post=text_ppl_of(runs.preset, qs))
