"""Train with noise, then quantize; or quantize, then train? (docs/methods.md#quantization-recovery)

GIFT-SW's noise has a second purpose: a model fine-tuned with the quantization noise should lose
less when it is quantized afterwards. The paper found "train with noise, then quantize" best at 4
bits and "quantize, then train the salient columns" best at 3 and 2. For each bit width this part
measures three models on the same items and seeds:

- ``noise, then quantize``: GIFT-SW (the paper's 4-bit noise) on the unquantized model, merged,
  then GPTQ with 16-bit salient columns at b bits, the trained columns kept in 16 bits;
- ``no noise, then quantize``: the same with salient-only training (the control);
- ``quantize, then train``: bench/recovery.py's GIFT-SW recovery of the GPTQ + salient model
  (the same run, from the shared cache).

Both trainings use the rate bench/quality.py's grid chose for GIFT-SW (``--paper500``; read from
the cache) or the default; a trained adapter is kept in salientft's cache and quantized at each
width by its own cached step. Reported per width: text perplexity (held-out SciQ paragraphs),
chat perplexity, six-task average, and with per-item outcomes paired bootstrap 95 % intervals of
the six-task difference for noise vs no noise (both then quantized) and for the two orders. The
same trainings, evaluated unquantized, are bench/quality.py's runs (same method, seed and rate): from
its cache, the report also gives what quantizing costs each trained model and the claim itself,
noise's cost minus no-noise's, item by item.

    .venv/bin/python bench/quantize_order.py --paper500   # per seed: 2 trainings + 6 quantizations (+ recovery's 3)
    .venv/bin/python bench/quantize_order.py --smoke --out /tmp/o   # tiny random model (CI)
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import _suite as S

TRAINED = {"noise, then quantize": "gift-sw", "no noise, then quantize": "salient"}
RECOVERED = "quantize, then train"


def adapter_dir(preset: S.Preset, train_spec: dict) -> Path:
    """Where a trained run's adapter is kept for quantization (salientft's cache; outside the repo)."""
    from salientft.models import cache_dir

    return cache_dir() / "bench" / f"{preset.name}-adapter-{S.run_key(preset, train_spec)}"


def keep_adapter(dest: Path):
    """A ``post`` hook for Runs.train: copy the run's adapter folder to ``dest`` (atomically, by rename)."""
    def post(run_dir: Path) -> dict:
        tmp = dest.with_name(dest.name + f".tmp{time.time_ns()}")
        shutil.copytree(Path(run_dir) / "adapter", tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        return {"adapter_dir": str(dest)}

    return post


def quantized_trained_model(preset: S.Preset, qs: S.QuantSetting, adapter: Path, bits: int):
    """(model, tokenizer, seconds): a trained GIFT-SW / salient adapter merged into the bf16 base and
    quantized with GPTQ, its 16-bit salient columns being the trained columns of every layer."""
    import torch

    from salientft.calibration import calibration_batches
    from salientft.gift import load_adapter, merge_gift, read_adapter
    from salientft.models import load_model
    from salientft.quant.model import quantize

    torch.manual_seed(0)
    model, tok = load_model(preset.model, dtype="bf16")
    meta, tensors = read_adapter(adapter)
    model = merge_gift(load_adapter(model, adapter, check_base=False))  # trained in fp32 from the same bf16 weights
    scores = {}  # rank the trained columns first in every layer
    for name, shape in meta["modules"].items():
        s = torch.zeros(shape["in_features"] or model.get_submodule(name).in_features)  # None: a PEFT-format adapter
        s[tensors[f"{name}.salient_idx"].long()] = 1.0
        scores[name] = s
    calib = calibration_batches(tok, S.calibration_texts(), qs.samples, qs.seq_len, 8, seed=0)
    t = time.time()
    quantize(model, bits, salient_fraction=S.SALIENT_FRACTION, quantizer="gptq", calibration=calib, scores=scores,
             target_modules=list(meta["modules"]), progress=True)
    return model, tok, time.time() - t


def quantize_trained(preset: S.Preset, qs: S.QuantSetting, adapter: Path, bits: int) -> dict:
    """Quantize a trained adapter's merged model and measure it as bench/quantization.py does."""
    model, tok, seconds = quantized_trained_model(preset, qs, adapter, bits)
    return S.measure_quantized(model, tok, preset, qs, bits, seconds)


def main(argv=None) -> int:
    args, preset, out, qs, runs = S.quant_args(__doc__, argv, part="quantize_order")
    bits_list = args.bits or list(qs.bits)
    rank = S.lora_rank_matching_gift(preset.model)[0]
    lrs = S.recovery_lrs(runs, rank)
    records = {b: {label: [] for label in (*TRAINED, RECOVERED)} for b in bits_list}
    for seed in preset.seeds:
        for label, method in TRAINED.items():
            spec = train_spec(method, seed, lrs)
            trained = runs.train(spec, post=keep_adapter(adapter_dir(preset, spec)))
            for b in bits_list:
                q_spec = {**S.spec_for(qs, "gptq+salient", b), "part": "quantize-trained", "trained": S.run_key(preset, spec)}
                rec = None
                if trained is not None:
                    adapter = Path(trained["result"]["adapter_dir"])
                    if runs.cached(q_spec) is None and not adapter.is_dir():
                        raise SystemExit(f"{adapter} (the adapter of {S.describe(spec)}) is gone from the cache: "
                                         f"delete {runs.path(spec)} to train it again")
                    rec = runs.get(q_spec, lambda: quantize_trained(preset, qs, adapter, b))
                if rec is not None:
                    records[b][label].append(rec["result"])
        for b in bits_list:
            rec = S.recover(runs, qs, b, "gift-sw", rank, lrs, seed=seed)
            if rec is not None:
                records[b][RECOVERED].append(rec["result"])
    unquantized = {label: runs.cached_seeds(lambda seed: evaluated_spec(train_spec(method, seed, lrs)))
                   for label, method in TRAINED.items()}
    command = S.report_command("quantize_order.py", argv)
    rows = []
    for b in bits_list:
        recs = records[b]
        noisy, plain, recov = (recs[k] for k in (*TRAINED, RECOVERED))
        rows.append({"bits": b, "models": {label: S.seed_summary(v) for label, v in recs.items()},
                     "paired": S.paired_table((("noise - no noise (both then quantized)", plain, noisy),
                                               ("quantize-then-train - noise-then-quantize", noisy, recov))),
                     "quantization_cost": quantization_cost(unquantized, recs)})
    result = {"preset": preset.name, "settings": {**S.asdict(preset), **S.asdict(qs)}, "command": command,
              "learning_rate": None if lrs is None else lrs["gift-sw"], "rows": rows, "incomplete": runs.skipped,
              "unquantized": {label: S.seed_summary(v) for label, v in unquantized.items() if v},
              "machine": S.machine()}
    S.write_report(out, "quantize_order", result, markdown(result, preset), lambda: plot(result), preset=preset)
    return 0


def train_spec(method: str, seed: int, lrs: dict | None) -> dict:
    """The cache key of training ``method`` (at GIFT-SW's tuned rate) for quantizing: no evaluation, adapter kept."""
    spec = {"method": method, "seed": seed, "eval_tasks": "", "_keep": "adapter"}
    if lrs is not None:
        spec["lr"] = lrs["gift-sw"]
    return spec


def evaluated_spec(spec: dict) -> dict:
    """The cache key of the same training run *with* the six-task evaluation: bench/quality.py's run
    of that method, seed and rate (salient-only matches only when quality chose GIFT-SW's rate for it)."""
    return {k: v for k, v in spec.items() if k not in ("eval_tasks", "_keep")}


def quantization_cost(unquantized: dict, recs: dict) -> dict:
    """What quantizing costs each trained model, item by item against the same model unquantized
    (from quality's cache), and the claim itself: noise's cost minus no-noise's (docs/methods.md#quantization-recovery, a
    model trained with the noise should lose less). Empty where quality's runs are missing."""
    noisy, plain = (unquantized[label] for label in TRAINED)
    q_noisy, q_plain = (recs[label] for label in TRAINED)
    out = {}
    for name, before, after in (("noise: quantized - unquantized", noisy, q_noisy),
                                ("no noise: quantized - unquantized", plain, q_plain)):
        d = S.paired_difference(before, after)
        if d is not None:
            out[name] = d
    saving = S.paired_difference_in_differences(plain, q_plain, noisy, q_noisy)
    if saving is not None:
        out["noise's cost - no noise's cost"] = saving
    return out


def markdown(r: dict, preset) -> list[str]:
    lines = ["# Train with noise, then quantize; or quantize, then train (bench/quantize_order.py)", ""]
    lr_text = (f"GIFT-SW's tuned rate {r['learning_rate']:g} (bench/quality.py's grid)"
               if r["learning_rate"] is not None else "GIFT-SW's default learning rate")
    lines += S.setting_lines(preset, ".venv/bin/python " + r["command"], r["incomplete"], lr_text)
    lines += ["Quantization: GPTQ, weight-only, symmetric per row, 16-bit salient columns (for the trained models: "
              "the trained columns). Text ppl: SciQ support paragraphs; chat ppl: held-out chats; six-task average "
              "in %; mean ± std over seeds.", "",
              "| bits | order | seeds | text ppl | chat ppl | six-task avg |", "|---|---|---|---|---|---|"]
    for label, m in (r.get("unquantized") or {}).items():  # the trained models before quantization (quality's runs)
        lines.append(f"| unquantized | {label.split(',')[0]} | {m['n_seeds']} | - | {S.fmt(*m['heldout_ppl'], spec='.3f')} | "
                     f"{S.fmt(*m['paper_avg'], scale=100)} |")
    for row in r["rows"]:
        for label, m in row["models"].items():
            lines.append(f"| {row['bits']} | {label} | {m['n_seeds']} | {S.fmt(*m['text_ppl'], spec='.2f')} | "
                         f"{S.fmt(*m['heldout_ppl'], spec='.3f')} | {S.fmt(*m['paper_avg'], scale=100)} |")
    paired = [(row["bits"], name, c) for row in r["rows"] for name, c in row["paired"].items() if c]
    if paired:
        lines += ["", "Differences item by item (six-task average, points; paired bootstrap 95 % interval over items, "
                  "each item's difference averaged over the seeds both have):", "",
                  f"| bits | comparison | {S.PAIRED_HEAD} | seeds |", "|---|---|---|---|---|---|"]
        lines += [f"| {b} | {name} | {S.paired_cells(c)} | {c['seeds']} |" for b, name, c in paired]
    cost = [(row["bits"], name, c) for row in r["rows"] for name, c in (row.get("quantization_cost") or {}).items()]
    if cost:
        lines += ["", "What quantizing costs each trained model, item by item against the same model unquantized "
                  "(bench/quality.py's evaluated run of the same training), and the claim: noise's cost minus "
                  "no-noise's (positive: the noise-trained model loses less; six-task average, points):", "",
                  f"| bits | comparison | {S.PAIRED_HEAD} | seeds |", "|---|---|---|---|---|---|"]
        lines += [f"| {b} | {name} | {S.paired_cells(c)} | {c['seeds']} |" for b, name, c in cost]
    lines += ["", "![quantize order](quantize_order.png)"]
    return lines


def plot(r: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    bits = [row["bits"] for row in r["rows"]]
    labels = list(r["rows"][0]["models"]) if r["rows"] else []
    for ax, key, name, scale, log in ((axes[0], "text_ppl", "held-out text perplexity", 1, True),
                                      (axes[1], "heldout_ppl", "held-out chat perplexity", 1, True),
                                      (axes[2], "paper_avg", "six-task average (%)", 100, False)):
        shown = []
        for i, label in enumerate(labels):
            pts = [(b, row["models"][label][key][0], row["models"][label]["range"][key])
                   for b, row in zip(bits, r["rows"]) if row["models"][label][key][0] is not None]
            if pts:  # the orders side by side, so their seed-range bars do not hide each other
                ax.errorbar([b + 0.05 * (i - 1) for b, _, _ in pts], [m * scale for _, m, _ in pts],
                            yerr=[[(m - lo) * scale for _, m, (lo, _) in pts], [(hi - m) * scale for _, m, (_, hi) in pts]],
                            marker="o", capsize=3, label=label, color=f"C{i}")
                shown += [v for _, m, (lo, hi) in pts for v in (m, lo, hi)]
        ax.set_xticks(bits)
        ax.invert_xaxis()
        if log and shown and max(shown) > 5 * min(shown):  # a log axis only where the values span one
            S.log_axis(ax)
            name = name + " (log)"
        ax.set_ylabel(name)
        ax.set_xlabel("bits")
    next((ax for ax in axes if ax.get_legend_handles_labels()[0]), axes[0]).legend(fontsize=8)  # a panel with points
    fig.suptitle(f"{r['settings']['model']}: train with noise then quantize, vs quantize then train (point: seed mean; bar: range over seeds)")
    return fig


if __name__ == "__main__":
    sys.exit(main())
