"""Recovering a quantized model: GIFT-SW on the 16-bit salient columns vs STE vs LoRA.

docs/methods.md#quantization-recovery: start from the GPTQ + salient-columns model of bench/quantization.py (4, 3 and
2 bits) and fine-tune it on the instruction mix for the preset's step budget with

- ``gift-sw``: only the 16-bit salient columns, noise at the 4-bit step on the dequantized rest;
- ``ste``: every weight, through the same fake quantization (straight-through estimator);
- ``lora``: LoRA (rank matched to GIFT-SW's trainable count) on the frozen quantized model,

each at its default learning rate (GIFT-SW 1e-4, the others 3e-5), same seed and batches; with
``--paper500`` each at the rate bench/quality.py's grid chose for its family on the unquantized
model (GIFT-SW: gift-sw's, STE: full fine-tuning's, LoRA: lora's), since the default rates are far
from the best at this budget, and every recovered model is compared item by item with the
quantized model and STE's and LoRA's with GIFT-SW's (paired bootstrap 95 % interval of the
six-task average's difference). Reported
beside the quantized model before recovery: held-out text and chat perplexity, the six-task
average, trainable parameters. The quantized models come from salientft's cache (written by
bench/quantization.py); a missing one is quantized again here, so the part runs on its own. This
part trains seed 0 of each method; other seeds already in the cache (bench/quantize_order.py
recovers GIFT-SW with every seed) join the method's row and its paired intervals.

    .venv/bin/python bench/recovery.py            # 3 bit widths x 3 methods (about 35 min), docs/results/recovery.*
    .venv/bin/python bench/recovery.py --quick    # 3 bits only
    .venv/bin/python bench/recovery.py --smoke --out /tmp/r   # tiny random model (CI)
    .venv/bin/python bench/recovery.py --paper500   # the 500-item subset, tuned rates (after quality)
"""
from __future__ import annotations

import sys

import _suite as S
# the recovery steps are in _suite.py: quantize_order.py recovers GIFT-SW with every seed
from _suite import LR_FROM, recover, recovery_spec, text_ppl_of  # noqa: F401

METHODS = S.RECOVERY_METHODS
tuned_lrs = S.recovery_lrs  # the rates quality's grid chose for each method's family (--paper500)


def main(argv=None) -> int:
    args, preset, out, qs, runs = S.quant_args(__doc__, argv, part="recovery")
    rank, gift_count = S.lora_rank_matching_gift(preset.model)
    lrs = tuned_lrs(runs, rank)
    table = []
    for bits in args.bits or qs.bits:
        q_spec = S.spec_for(qs, "gptq+salient", bits)
        start = runs.get(q_spec, lambda: S.quantize_one(preset, qs, "gptq+salient", bits, S.saved_dir(preset, qs, bits)))
        entry = {"bits": bits, "quantized": None if start is None else start["result"], "recovered": {}, "seeds": {}}
        every_seed = {}
        for method in METHODS:
            rec = recover(runs, qs, bits, method, rank, lrs)
            entry["recovered"][method] = None if rec is None else rec["result"]
            # this part trains seed 0; bench/quantize_order.py recovers GIFT-SW with every seed
            every_seed[method] = runs.cached_seeds(
                lambda seed: recovery_spec(runs, qs, bits, method, rank, lrs, seed))
            entry["seeds"][method] = S.seed_summary(every_seed[method])
        quantized = entry["quantized"]  # one deterministic model, paired with every seed of a recovery
        entry["paired_vs_quantized"] = S.paired_table(
            (m, [quantized] * len(res), res) for m, res in every_seed.items() if res and quantized is not None)
        gift = every_seed["gift-sw"]  # the paper's claim: GIFT-SW recovers better than STE and LoRA
        entry["paired_vs_gift_sw"] = S.paired_table(
            (m, gift, res) for m, res in every_seed.items() if m != "gift-sw" and res and gift)
        table.append(entry)
    command = S.report_command("recovery.py", argv)
    result = {"preset": preset.name, "settings": {**S.asdict(preset), **S.asdict(qs)}, "command": command,
              "lora_rank": rank, "gift_trainable": gift_count, "learning_rates": lrs, "rows": table, "incomplete": runs.skipped,
              "machine": S.machine()}
    S.write_report(out, "recovery", result, markdown(result, preset), lambda: plot(result), preset=preset)
    return 0


def markdown(r: dict, preset) -> list[str]:
    lines = ["# Recovery of quantized models (bench/recovery.py)", ""]
    lr_text = ("each method at its tuned rate (below)" if r.get("learning_rates")
               else "each method's default learning rate")
    lines += S.setting_lines(preset, ".venv/bin/python " + r["command"], r["incomplete"], lr_text)
    starts = ", ".join(f"{e['bits']} bits `{e['quantized']['fingerprint']}`" for e in r["rows"]
                       if e["quantized"] and e["quantized"].get("fingerprint"))
    lines += ["Start: GPTQ with 16-bit salient columns (bench/quantization.py"
              + (f"; models {starts}" if starts else "") + f"). LoRA rank {r['lora_rank']} "
              f"(GIFT-SW trains {r['gift_trainable']:,} weights). Text ppl: SciQ support paragraphs; chat ppl: "
              "held-out chats; six-task average in %." + (" Learning rates (chosen by bench/quality.py's grid): " + ", ".join(
                  f"{m} {lr:g}" for m, lr in r["learning_rates"].items()) + "." if r.get("learning_rates") else ""), "",
              "Recovered rows: mean ± std over the seeds run (this part trains seed 0; bench/quantize_order.py "
              "adds GIFT-SW's other seeds).", "",
              "| bits | model | trainable | seeds | text ppl | chat ppl | six-task avg | size (MiB) |",
              "|---|---|---|---|---|---|---|---|"]
    mb = 2 ** 20
    for e in r["rows"]:
        q = e["quantized"]
        if q:
            lines.append(f"| {e['bits']} | quantized, no training | 0 | - | {q['text_ppl']:.2f} | "
                         f"{S.ppl(q['heldout_loss_after']):.3f} | {S.fmt(q['paper_avg'], scale=100)} | {q['model_bytes'] / mb:.1f} |")
        for m, res in e["recovered"].items():
            if res is None:
                lines.append(f"| {e['bits']} | + {m} | not run | - | - | - | - | - |")
                continue
            s = e["seeds"][m]
            lines.append(f"| {e['bits']} | + {m} | {res['trainable_params']:,} | {s['n_seeds']} | "
                         f"{S.fmt(*s['text_ppl'], spec='.2f')} | {S.fmt(*s['heldout_ppl'], spec='.3f')} | "
                         f"{S.fmt(*s['paper_avg'], scale=100)} | {res['model_bytes'] / mb:.1f} |")
    paired = [(e["bits"], m, c) for e in r["rows"] for m, c in (e.get("paired_vs_quantized") or {}).items() if c]
    if paired:
        lines += ["", "Recovered minus quantized, item by item (six-task average, points; paired bootstrap 95 % "
                  "interval over the items of each task; each item's difference averaged over the recovery's seeds):", "",
                  f"| bits | method | {S.PAIRED_HEAD} | seeds | items |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {b} | {m} | {S.paired_cells(c)} | {c['seeds']} | {c['items']} |" for b, m, c in paired]
    versus = [(e["bits"], m, c) for e in r["rows"] for m, c in (e.get("paired_vs_gift_sw") or {}).items()]
    if versus:
        lines += ["", "Each other recovery minus GIFT-SW's, item by item (the paper's claim is that GIFT-SW "
                  "recovers best; six-task average, points, paired bootstrap 95 % interval):", "",
                  f"| bits | method - gift-sw | {S.PAIRED_HEAD} | seeds | items |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {b} | {m} | {S.paired_cells(c)} | {c['seeds']} | {c['items']} |" for b, m, c in versus]
    lines += ["", "Sizes count every tensor of the model as stored (LoRA: plus its adapter; STE: after rounding "
              "back onto the quantized grid).", "", "![recovery](recovery.png)"]
    return lines


def plot(r: dict):
    """One panel per measure the claims are judged on; on the six-task average each recovered point
    carries its paired 95 % interval, placed on the quantized model's value plus the interval."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    bits = [e["bits"] for e in r["rows"]]
    panels = ((axes[0], "chat", "held-out chat perplexity (log)"), (axes[1], "text", "SciQ text perplexity (log)"),
              (axes[2], "avg", "six-task average (%)"))
    for ax, key, label in panels:
        def value(res):
            if res is None:
                return None
            return {"chat": S.ppl(res["heldout_loss_after"]), "text": res["text_ppl"], "avg": 100 * res["paper_avg"]}[key]
        series = {"quantized": [value(e["quantized"]) for e in r["rows"]]}
        for m in METHODS:  # a recovery's point is its mean over seeds, as its paired interval is
            series[f"+ {m}"] = [seed_mean(e, m, key) for e in r["rows"]]
        for i, (name, ys) in enumerate(series.items()):
            # on the average, methods sit side by side so their interval bars do not hide each other
            dx = 0.0 if key != "avg" or name == "quantized" else 0.06 * (i - 2)
            pts = [(b + dx, y) for b, y in zip(bits, ys) if y is not None]
            if pts:
                xs, vals = zip(*pts)
                ax.plot(xs, vals, marker="o", label=name, ls="--" if name == "quantized" else "-", color=f"C{i}")
            if key == "avg" and name != "quantized":
                _paired_bars(ax, r["rows"], name[2:], i, dx)
            elif name != "quantized":
                _seed_range_bars(ax, r["rows"], name[2:], key, i)
        ax.set_xticks(bits)
        ax.invert_xaxis()
        if key != "avg":
            S.log_axis(ax)
        ax.set_xlabel("bits")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{r['settings']['model']}: recovery after GPTQ with 16-bit salient columns"
                 + ("\nbars: perplexities, range over a recovery's seeds; average, paired 95 % interval against "
                    "the quantized model" if any(e.get("paired_vs_quantized") for e in r["rows"]) else ""))
    return fig


def seed_mean(entry: dict, method: str, key: str) -> float | None:
    """A recovery's mean over its seeds on one plotted measure ("chat", "text" or "avg")."""
    s = entry["seeds"].get(method)
    if not s or not s["n_seeds"]:
        return None
    field = {"chat": "heldout_ppl", "text": "text_ppl", "avg": "paper_avg"}[key]
    return s[field][0] * (100 if key == "avg" else 1)


def _seed_range_bars(ax, rows: list, method: str, key: str, color: int):
    """A perplexity's [min, max] over a recovery's seeds, where it has two or more: the mean of a
    seed that did not escape a broken start (2 bits) and of seeds that did shows no one run's value."""
    field = {"chat": "heldout_ppl", "text": "text_ppl"}[key]
    for e in rows:
        s = e["seeds"].get(method)
        if s and s["n_seeds"] >= 2 and s[field][0] is not None:
            (lo, hi), m = s["range"][field], s[field][0]
            ax.errorbar([e["bits"]], [m], yerr=[[m - lo], [hi - m]], color=f"C{color}", capsize=3, lw=1)


def _paired_bars(ax, rows: list, method: str, color: int, dx: float):
    """Error bars from the item-paired interval of (recovered - quantized), drawn around the quantized
    value plus the difference, so a bar that crosses the dashed quantized line is no resolved change."""
    for e in rows:
        c = (e.get("paired_vs_quantized") or {}).get(method)
        if c and e["quantized"]:
            q = 100 * e["quantized"]["paper_avg"]
            y = q + 100 * c["diff"]
            ax.errorbar([e["bits"] + dx], [y], yerr=[[100 * (c["diff"] - c["lo"])], [100 * (c["hi"] - c["diff"])]],
                        color=f"C{color}", capsize=3, lw=1)


if __name__ == "__main__":
    sys.exit(main())
