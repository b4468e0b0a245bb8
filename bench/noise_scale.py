"""Does GIFT-SW's noise help, and at what scale? And does it hurt full fine-tuning?

docs/methods.md#gift-noise: the noise on the frozen weights has the per-row standard deviation Delta_i / 2
of a b-bit quantizer (b = 4 in the paper), and the paper finds that it helps salient-only
training and hurts full fine-tuning. Our first runs (docs/RESULTS.md, ablations) found no gain at
4 bits. This part sweeps the scale through the quantizer's bit width (2, 3, 4, 6, 8 bits: from
7x the paper's noise down to 1/18 of it) and none (salient-only training), every variant at
GIFT-SW's learning rate, and trains full fine-tuning with and without the paper's 4-bit noise at
full fine-tuning's rate. With ``--paper500`` those rates are the ones bench/quality.py's grid
chose (read from the cache; quality must have run first) and every variant runs the preset's
seeds, evaluated on the fixed 500-item subset; each variant is compared with its noise-free
counterpart item by item (paired bootstrap 95 % interval of the six-task average's difference).
Runs equal to quality runs (GIFT-SW at 4 bits, full fine-tuning) come from the shared cache.

    .venv/bin/python bench/noise_scale.py --paper500   # 7 variants x 3 seeds, about 11 min per run (resumable)
    .venv/bin/python bench/noise_scale.py --smoke --out /tmp/n   # tiny random model (CI)
"""
from __future__ import annotations

import argparse
import sys

import _suite as S

GIFT_BITS = (2, 3, 4, 6, 8)  # the quantizer widths whose step sets the noise; None: no noise
PAPER_BITS = 4


def variants(lrs: dict | None) -> dict:
    """{label: spec without seed}: the GIFT-SW sweep (at GIFT-SW's rate) and full fine-tuning +- noise.
    Specs equal to quality's (4 bits, full fine-tuning) leave out what quality leaves out (same cache key)."""
    def at(method: str, rate_of: str, **extra) -> dict:
        spec = {"method": method, **extra}
        if lrs is not None:
            spec["lr"] = lrs[rate_of]
        return spec

    out = {"gift-sw none": at("salient", "gift-sw")}
    for bits in sorted(GIFT_BITS, reverse=True):
        out[f"gift-sw {bits}-bit"] = at("gift-sw", "gift-sw", **({} if bits == PAPER_BITS else {"noise_bits": bits}))
    out["full none"] = at("full", "full")
    out[f"full {PAPER_BITS}-bit"] = at("full", "full", noise="weight")
    return out


def reference(label: str) -> str:
    """The noise-free variant a noisy one is compared with."""
    return label.split()[0] + " none"


def tuned_lrs(runs: S.Runs) -> dict | None:
    """GIFT-SW's and full fine-tuning's rates from quality's grid (presets with a subset only)."""
    if runs.preset.eval_subset is None:
        return None
    rank = S.lora_rank_matching_gift(runs.preset.model)[0]
    chosen = S.chosen_lrs(runs, ["gift-sw", "full"], rank)
    missing = sorted(m for m, lr in chosen.items() if lr is None)
    if missing:
        raise SystemExit(f"the noise sweep trains at the rates bench/quality.py chose, but the grid of "
                         f"{', '.join(missing)} is incomplete: run `.venv/bin/python bench/quality.py "
                         f"--{runs.preset.name} --lr-grid --methods {' '.join(missing)}` first")
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    S.add_common_args(p)
    args = p.parse_args(argv)
    preset, out = S.resolve(args)
    runs = S.Runs(preset, out, args.max_minutes, part="noise_scale")
    lrs = tuned_lrs(runs)
    table = variants(lrs)
    records: dict[str, list] = {label: [] for label in table}
    for seed in preset.seeds:  # seed-major: after one budget-limited sitting every variant has a seed
        for label, spec in table.items():
            rec = runs.train({**spec, "seed": seed})
            if rec is not None:
                records[label].append(rec["result"])
    base = runs.baseline()
    command = S.report_command("noise_scale.py", argv)
    result = {"preset": preset.name, "settings": S.asdict(preset), "command": command, "learning_rates": lrs,
              "base": None if base is None else {"paper_avg": base["result"]["paper_avg"],
                                                 "heldout_ppl": S.ppl(base["result"]["heldout_loss_after"])},
              "variants": {label: summarize(spec, records[label]) for label, spec in table.items()},
              "paired_vs_none": S.paired_table((label, records[reference(label)], recs)
                                               for label, recs in records.items() if reference(label) != label),
              "incomplete": runs.skipped, "machine": S.machine()}
    S.write_report(out, "noise_scale", result, markdown(result, preset), lambda: plot(result), preset=preset)
    return 0


def summarize(spec: dict, recs: list) -> dict:
    avg = [r["paper_avg"] for r in recs]
    hppl = [S.ppl(r["heldout_loss_after"]) for r in recs]
    return {"spec": spec, "n_seeds": len(recs), "paper_avg": S.mean_std(avg)[:2], "heldout_ppl": S.mean_std(hppl)[:2],
            "paper_avg_values": avg, "heldout_ppl_values": hppl,
            "learning_rate": recs[0]["learning_rate"] if recs else spec.get("lr")}


def per_seed_change(none: list, noisy: list) -> list[float]:
    """Noisy minus noise-free, seed by seed (both lists in seed order, as main() builds them): same seed,
    same batches, so the spread across seeds of this change is smaller than of either value."""
    return [b - a for a, b in zip(none, noisy)]


def markdown(r: dict, preset) -> list[str]:
    lines = ["# Noise scale (bench/noise_scale.py)", ""]
    lr_text = ("GIFT-SW's and full fine-tuning's rates as bench/quality.py's grid chose them ("
               + ", ".join(f"{m} {lr:g}" for m, lr in r["learning_rates"].items()) + ")"
               if r["learning_rates"] else "each method's default learning rate")
    lines += S.setting_lines(preset, ".venv/bin/python " + r["command"], r["incomplete"], lr_text)
    lines += ["The noise's standard deviation is Delta_i / 2 of a b-bit quantizer of each row (docs/methods.md#gift-noise), "
              "so each bit less roughly doubles it (2 bits: 7x the paper's 4-bit noise; 8 bits: 1/18 of it). "
              "`none`: the same training without noise (GIFT-SW: salient-only).", "",
              "| variant | seeds | lr | six-task avg (%) | held-out ppl |", "|---|---|---|---|---|"]
    if r["base"]:
        lines.append(f"| base (no training) | - | - | {S.fmt(r['base']['paper_avg'], scale=100)} | "
                     f"{S.fmt(r['base']['heldout_ppl'], spec='.3f')} |")
    for label, v in r["variants"].items():
        lines.append(f"| {label} | {v['n_seeds']} | {v['learning_rate'] if v['learning_rate'] is not None else 'default'} | "
                     f"{S.fmt(*v['paper_avg'], scale=100)} | {S.fmt(*v['heldout_ppl'], spec='.3f')} |")
    if r["paired_vs_none"]:
        lines += ["", "Each noisy variant minus its noise-free counterpart, item by item (six-task average, points; "
                  "paired bootstrap 95 % interval over items, each item's difference averaged over the seeds both "
                  "have), and the held-out perplexity change of each seed against the same seed without noise:", "",
                  f"| variant - none | {S.PAIRED_HEAD} | seeds | items per seed | held-out ppl change per seed |",
                  "|---|---|---|---|---|---|---|"]
        for label, c in r["paired_vs_none"].items():
            change = per_seed_change(r["variants"][reference(label)]["heldout_ppl_values"],
                                     r["variants"][label]["heldout_ppl_values"])
            lines.append(f"| {label} | {S.paired_cells(c)} | {c['seeds']} | {c['items']} | "
                         f"{', '.join(f'{d:+.2f}' for d in change)} |")
    lines += ["", "![noise scale](noise_scale.png)"]
    return lines


def plot(r: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "heldout_ppl", "held-out perplexity"), (axes[1], "paper_avg", "six-task average (%)")):
        scale = 100 if key == "paper_avg" else 1
        plotted = []
        for family, color in (("gift-sw", "C0"), ("full", "C3")):
            rows = [(lab, v) for lab, v in r["variants"].items() if lab.startswith(family + " ")]
            xs = list(range(len(rows))) if family == "gift-sw" else [0, 1 + GIFT_BITS[::-1].index(PAPER_BITS)]
            pts = [(x, v) for x, (lab, v) in zip(xs, rows) if v[key][0] is not None]
            if pts:
                ax.plot([x for x, _ in pts], [v[key][0] * scale for _, v in pts], marker="o", color=color,
                        ls="-" if family == "gift-sw" else ":", label=f"{family} (mean over seeds)")
                for x, v in pts:
                    vals = [y * scale for y in v[f"{key}_values"]]
                    ax.scatter([x] * len(vals), vals, color=color, s=10, alpha=0.5)
                    plotted += vals
        S.base_reference(ax, r["base"][key] * scale if r["base"] else None, plotted, label="base")
        if key == "heldout_ppl":
            S.log_axis(ax)
        ax.set_xticks(range(1 + len(GIFT_BITS)), ["none"] + [f"{b}-bit" for b in sorted(GIFT_BITS, reverse=True)])
        ax.set_ylabel(label)
    for ax in axes:  # each panel names its own base: a line on one, a far value on the other
        ax.legend(fontsize=8)
    fig.supxlabel("noise scale: the quantizer whose step sets it (it grows to the right)", fontsize=10)
    fig.suptitle(f"{r['settings']['model']}: noise scale, GIFT-SW and full fine-tuning "
                 f"({r['settings']['max_steps']} steps; dots: seeds)")
    return fig


if __name__ == "__main__":
    sys.exit(main())
