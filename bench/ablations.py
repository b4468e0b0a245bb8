"""Ablations: GIFT-SW's noise and salience metric, GMT's mask ratio, and GMT on top of GIFT-SW.

Same preset as bench/quality.py (same model, data, steps, evaluation) and the same cache:
variants equal to a quality run (GIFT-SW with weight noise and the gift metric, salient-only =
no noise, GMT at ratio 0.5, full fine-tuning = ratio 0) are not trained twice. One seed per
variant (seed 0); the seed-to-seed spread of bench/quality.py's GIFT-SW and GMT runs, shown
beside each table, is the yardstick for what counts as a difference.

    .venv/bin/python bench/ablations.py            # 12 new runs (about 40 min), docs/results/ablations.*
    .venv/bin/python bench/ablations.py --quick    # 2 of them, short
    .venv/bin/python bench/ablations.py --smoke --out /tmp/a   # tiny random model (CI)
"""
from __future__ import annotations

import argparse
import sys

import _suite as S

SEED = 0
GROUPS = {
    "noise": ("GIFT-SW noise (docs/methods.md#gift-noise)", "noise", [
        ("weight", {"method": "gift-sw"}),
        ("output", {"method": "gift-sw", "noise": "output"}),
        ("none", {"method": "salient"}),
    ]),
    "metric": ("salience metric for the trained columns (docs/methods.md#sensitivity-metric)", "metric", [
        (m, {"method": "gift-sw"} if m == "gift" else {"method": "gift-sw", "metric": m})
        for m in ("gift", "gift-g2", "owq", "activation", "random")
    ]),
    "gmt_ratio": ("GMT mask ratio (fraction of gradient entries zeroed; 0 = full fine-tuning)", "ratio", [
        ("0", {"method": "full"}),
        *[(str(r), {"method": "gmt", "mask_ratio": r}) for r in (0.2, 0.5, 0.7, 0.9)],
    ]),
    "lora_lr": ("learning rate of LoRA and of the salient columns (the paper's rates are for 500 steps of "
                "batch 128 on 7B models)", "method, lr", [
        ("lora 3e-5", {"method": "lora", "lora_r": None}),
        *[(f"lora {lr}", {"method": "lora", "lora_r": None, "lr": float(lr)}) for lr in ("1e-4", "3e-4")],
        ("salient 1e-4", {"method": "salient"}),
        ("salient 3e-4", {"method": "salient", "lr": 3e-4}),
    ]),
    "gmt_on_gift": ("GMT on top of GIFT-SW (mask ratio 0.5 of the salient columns' gradients)", "variant", [
        ("gift-sw", {"method": "gift-sw"}),
        ("gift-sw + gmt 0.5", {"method": "gift-sw", "mask_ratio": 0.5}),
    ]),
}
QUICK = {("noise", "output"), ("gmt_ratio", "0.9")}  # --quick trains only these (and reuses quality's)
SMOKE = QUICK | {("metric", "random"), ("gmt_on_gift", "gift-sw + gmt 0.5")}  # --smoke: every code path, tiny


def with_seed(spec: dict, seed: int, rank: int | None = None) -> dict:
    spec = {**spec, "seed": seed}
    if "lora_r" in spec:  # the rank matched to GIFT-SW's count, as in bench/quality.py
        spec["lora_r"] = rank
    if spec["method"] == "gmt" and "mask_ratio" not in spec:
        spec["mask_ratio"] = 0.5
    return spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    S.add_common_args(p)
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    args = p.parse_args(argv)
    preset, out = S.resolve(args)
    runs = S.Runs(preset, out, args.max_minutes, part="ablations")
    base = runs.baseline()
    rank = S.lora_rank_matching_gift(preset.model)[0] if "lora_lr" in args.groups else None
    groups = {}
    for g in args.groups:
        title, axis, variants = GROUPS[g]
        rows = []
        for label, spec in variants:
            subset = QUICK if args.quick else SMOKE if args.smoke else None
            if subset is not None and (g, label) not in subset:
                rec = runs.cached(with_seed(spec, SEED, rank))  # quick: only what is cheap or already there
            else:
                rec = runs.train(with_seed(spec, SEED, rank))
            rows.append({"variant": label, "spec": spec, "result": None if rec is None else rec["result"]})
        groups[g] = {"title": title, "axis": axis, "rows": rows}
    noise = seed_spread(runs, preset)
    command = S.report_command("ablations.py", argv)
    result = {"preset": preset.name, "settings": S.asdict(preset), "command": command, "seed": SEED,
              "base": None if base is None else {"paper_avg": base["result"]["paper_avg"],
                                                 "heldout_ppl": S.ppl(base["result"]["heldout_loss_after"])},
              "groups": groups, "seed_spread": noise, "incomplete": runs.skipped, "machine": S.machine()}
    S.write_report(out, "ablations", result, markdown(result, preset), lambda: plot(result), preset=preset)
    return 0


def seed_spread(runs: S.Runs, preset) -> dict:
    """Std over seeds of the quality runs (GIFT-SW, GMT) found in the cache: the noise floor."""
    spread = {}
    for name, spec in (("gift-sw", {"method": "gift-sw"}), ("gmt", {"method": "gmt", "mask_ratio": 0.5})):
        recs = [runs.cached(with_seed(spec, s)) for s in preset.seeds]
        recs = [r["result"] for r in recs if r is not None]
        spread[name] = {"n_seeds": len(recs),
                        "paper_avg_std": S.mean_std([r["paper_avg"] for r in recs])[1],
                        "heldout_ppl_std": S.mean_std([S.ppl(r["heldout_loss_after"]) for r in recs])[1]}
    return spread


def markdown(r: dict, preset) -> list[str]:
    lines = ["# Ablations (bench/ablations.py)", ""]
    lines += S.setting_lines(preset, ".venv/bin/python " + r["command"], r["incomplete"])
    lines.append(f"One seed ({r['seed']}) per variant. Seed-to-seed standard deviation of the same setting in "
                 "bench/quality.py (the yardstick): " + "; ".join(
                     f"{n}: six-task avg {S.fmt(v['paper_avg_std'], scale=100, spec='.2f')} points, held-out ppl "
                     f"{S.fmt(v['heldout_ppl_std'], spec='.3f')} ({v['n_seeds']} seeds)" for n, v in r["seed_spread"].items()) + ".")
    if r["base"]:
        lines += ["", f"Base model (no training): six-task avg {S.fmt(r['base']['paper_avg'], scale=100)} %, "
                      f"held-out ppl {S.fmt(r['base']['heldout_ppl'], spec='.3f')}."]
    for g in r["groups"].values():
        lines += ["", f"## {g['title']}", "", f"| {g['axis']} | trainable | six-task avg (%) | held-out ppl | s/step |",
                  "|---|---|---|---|---|"]
        for row in g["rows"]:
            res = row["result"]
            if res is None:
                lines.append(f"| {row['variant']} | not run | - | - | - |")
                continue
            lines.append(f"| {row['variant']} | {res['trainable_params']:,} | {S.fmt(res['paper_avg'], scale=100)} | "
                         f"{S.fmt(S.ppl(res['heldout_loss_after']), spec='.3f')} | "
                         f"{S.fmt(res['wall_time_s'] / max(res['steps'], 1), spec='.2f')} |")
    lines += ["", "![ablations](ablations.png)"]
    return lines


def plot(r: dict):
    import matplotlib.pyplot as plt

    groups = list(r["groups"].values())
    fig, axes = plt.subplots(2, len(groups), figsize=(3.6 * len(groups), 6), squeeze=False)
    for j, g in enumerate(groups):
        rows = [row for row in g["rows"] if row["result"] is not None]
        labels = [row["variant"] for row in rows]
        for i, (key, label, scale) in enumerate((("paper_avg", "six-task avg (%)", 100),
                                                 ("heldout_loss_after", "held-out perplexity", None))):
            ax = axes[i][j]
            vals = [row["result"][key] * 100 if scale else S.ppl(row["result"][key]) for row in rows]
            base = None if not r["base"] else r["base"]["paper_avg"] * 100 if scale else r["base"]["heldout_ppl"]
            drawn = S.base_reference(ax, base, vals, label="base")
            if g["axis"] == "ratio":
                ax.plot([float(v) for v in labels], vals, marker="o")
                ax.set_xlabel("mask ratio")
            else:
                ax.bar(range(len(vals)), vals, color=[f"C{k}" for k in range(len(vals))], alpha=0.75)
                ax.set_xticks(range(len(vals)), labels, rotation=25, fontsize=8)
                if vals:  # bars start at zero: zoom onto the runs (and a base drawn near them)
                    lo, hi = min(vals + [base] * drawn), max(vals + [base] * drawn)
                    ax.set_ylim(lo - 0.3 * (hi - lo or 1), hi + 0.3 * (hi - lo or 1))
            if base is not None and not drawn:
                ax.legend(fontsize=7)
            if j == 0:
                ax.set_ylabel(label)
            if i == 0:
                ax.set_title(g["axis"] if g["axis"] != "variant" else "GMT on GIFT-SW", fontsize=10)
    fig.suptitle(f"Ablations on {r['settings']['model']} (seed {r['seed']}; dashed: base model)")
    return fig


if __name__ == "__main__":
    sys.exit(main())
