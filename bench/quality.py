"""Quality at a fixed step budget: GIFT-SW, salient-only, GMT, full fine-tuning, LoRA and DoRA.

The paper's comparison (METHODS.md §1.7) at the scale of a 2-core CPU: the embedded
SmolLM2-135M-Instruct fine-tuned on the embedded instruction mix, every method for the same
number of steps on the same batches (same seed), LoRA and DoRA at the rank whose trainable count
is closest to GIFT-SW's, each method at its paper learning rate (GIFT-SW 1e-4, the others 3e-5).
Several seeds per method; reported: the paper's six-task average and held-out perplexity,
mean ± std over seeds, and which differences exceed the seed noise.

    .venv/bin/python bench/quality.py            # 6 methods x 3 seeds (about 45 min), docs/results/quality.*
    .venv/bin/python bench/quality.py --quick    # 4 methods, 1 seed, 5 steps, 10 items per task
    .venv/bin/python bench/quality.py --smoke --out /tmp/q   # tiny random model (CI)
"""
from __future__ import annotations

import argparse
import sys

import _suite as S

METHODS = ("gift-sw", "salient", "gmt", "full", "lora", "dora")
QUICK_METHODS = ("gift-sw", "salient", "full", "lora")
TASK_METRIC = {"hellaswag": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm",
               "boolq": "acc", "winogrande": "acc"}


def specs(method: str, seed: int, rank: int) -> dict:
    spec = {"method": method, "seed": seed}
    if method in ("lora", "dora"):
        spec["lora_r"] = rank
    if method == "gmt":
        spec["mask_ratio"] = 0.5
    return spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    S.add_common_args(p)
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help=f"default: all ({', '.join(METHODS)}); --quick: {', '.join(QUICK_METHODS)}")
    args = p.parse_args(argv)
    args.methods = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    preset, out = S.resolve(args)
    runs = S.Runs(preset, out, args.max_minutes)
    rank, gift_count = S.lora_rank_matching_gift(preset.model)
    base = runs.baseline()
    records = {m: [] for m in args.methods}
    for seed in preset.seeds:  # seed-major: after one budget-limited sitting every method has a seed
        for m in args.methods:
            rec = runs.train(specs(m, seed, rank))
            if rec is not None:
                records[m].append(rec["result"])
    command = ("bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    result = summarize(records, base, preset, rank, gift_count, command, runs.skipped)
    S.write_report(out, "quality", result, markdown(result, preset), lambda: plot(result))
    return 0


def summarize(records: dict, base: dict | None, preset, rank: int, gift_count: int, command: str, skipped) -> dict:
    rows = {}
    for m, recs in records.items():
        avg = [r["paper_avg"] for r in recs]
        hppl = [S.ppl(r["heldout_loss_after"]) for r in recs]
        row = {"n_seeds": len(recs), "paper_avg": S.mean_std(avg)[:2], "heldout_ppl": S.mean_std(hppl)[:2],
               "paper_avg_values": avg, "heldout_ppl_values": hppl,
               "trainable_params": recs[0]["trainable_params"] if recs else None,
               "learning_rate": recs[0]["learning_rate"] if recs else None,
               "s_per_step": S.mean_std([r["wall_time_s"] / max(r["steps"], 1) for r in recs])[0],
               "tasks": {t: S.mean_std([r["tasks"].get(t, {}).get(k) for r in recs])[:2] for t, k in TASK_METRIC.items()}}
        rows[m] = row
    comparisons = {}
    for ref in ("gift-sw", "full", "lora"):
        if ref not in rows:
            continue
        for m in rows:
            if m == ref or f"{m} - {ref}" in comparisons:
                continue
            comparisons[f"{ref} - {m}"] = {
                key: dict(zip(("diff", "se", "exceeds_2se"),
                              S.differs(rows[ref][f"{key}_values"], rows[m][f"{key}_values"])))
                for key in ("paper_avg", "heldout_ppl")}
    base_row = None if base is None else {"paper_avg": base["result"]["paper_avg"],
                                          "heldout_ppl": S.ppl(base["result"]["heldout_loss_after"]),
                                          "tasks": {t: base["result"]["tasks"].get(t, {}).get(k) for t, k in TASK_METRIC.items()}}
    return {"preset": preset.name, "settings": S.asdict(preset), "command": command, "lora_rank": rank,
            "gift_trainable": gift_count, "base": base_row, "methods": rows, "comparisons": comparisons,
            "incomplete": skipped, "machine": S.machine()}


def markdown(r: dict, preset) -> list[str]:
    lines = ["# Quality at a fixed step budget (bench/quality.py)", ""]
    lines += S.setting_lines(preset, ".venv/bin/python " + r["command"], r["incomplete"])
    lines += [f"LoRA and DoRA rank {r['lora_rank']} (alpha 2r), closest to GIFT-SW's {r['gift_trainable']:,} "
              "trainable weights; GMT masks 50 % of each tensor's gradient entries (full fine-tuning otherwise). "
              "Six-task average: acc_norm for HellaSwag, ARC-e/c, PIQA; acc for BoolQ, WinoGrande (in %).", "",
              "s/step is the training loop's wall time per step on a shared machine, a rough guide only "
              "(bench/step.py measures speed properly).", "",
              "| method | seeds | trainable | lr | six-task avg (%) | held-out ppl | s/step |", "|---|---|---|---|---|---|---|"]
    if r["base"]:
        lines.append(f"| base (no training) | - | - | - | {S.fmt(r['base']['paper_avg'], scale=100)} | "
                     f"{S.fmt(r['base']['heldout_ppl'], spec='.3f')} | - |")
    for m, row in r["methods"].items():
        lines.append(f"| {m} | {row['n_seeds']} | {row['trainable_params'] or 0:,} | {row['learning_rate']} | "
                     f"{S.fmt(*row['paper_avg'], scale=100)} | {S.fmt(*row['heldout_ppl'], spec='.3f')} | "
                     f"{S.fmt(row['s_per_step'], spec='.2f')} |")
    lines += ["", "Per task (mean over seeds, %):", "",
              "| method | " + " | ".join(f"{t} ({k})" for t, k in TASK_METRIC.items()) + " |",
              "|---|" + "---|" * len(TASK_METRIC)]
    if r["base"]:
        lines.append("| base | " + " | ".join(S.fmt(r["base"]["tasks"][t], scale=100) for t in TASK_METRIC) + " |")
    for m, row in r["methods"].items():
        lines.append(f"| {m} | " + " | ".join(S.fmt(row["tasks"][t][0], scale=100) for t in TASK_METRIC) + " |")
    lines += ["", "Differences of means (first minus second) and whether they exceed twice their standard "
              "error over seeds (sqrt(s1²/n1 + s2²/n2)); with 3 seeds this is a rough screen, not a test:", "",
              "| pair | six-task avg (points) | exceeds | held-out ppl | exceeds |", "|---|---|---|---|---|"]
    for pair, c in r["comparisons"].items():
        a, h = c["paper_avg"], c["heldout_ppl"]
        lines.append(f"| {pair} | {S.fmt(a['diff'], a['se'], scale=100, spec='+.1f')} | {_yn(a['exceeds_2se'])} | "
                     f"{S.fmt(h['diff'], h['se'], spec='+.3f')} | {_yn(h['exceeds_2se'])} |")
    lines += ["", "![quality](quality.png)"]
    return lines


def _yn(v) -> str:
    return "-" if v is None else ("yes" if v else "no")


def plot(r: dict):
    import matplotlib.pyplot as plt

    names = list(r["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label, scale in ((axes[0], "paper_avg", "six-task average (%)", 100),
                                  (axes[1], "heldout_ppl", "held-out perplexity", 1)):
        for i, m in enumerate(names):
            vals = [v * scale for v in r["methods"][m][f"{key}_values"] if v is not None]
            mean, std = r["methods"][m][key]
            if mean is None:
                continue
            ax.bar(i, mean * scale, yerr=(std or 0) * scale, capsize=4, color=f"C{i}", alpha=0.7)
            ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
        if r["base"] and r["base"][key] is not None:
            ax.axhline(r["base"][key] * scale, color="gray", ls="--", label="base (no training)")
            ax.legend()
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylabel(label)
        lo = min([v * scale for m in names for v in r["methods"][m][f"{key}_values"] if v is not None]
                 + ([r["base"][key] * scale] if r["base"] and r["base"][key] is not None else []), default=0)
        hi = max([v * scale for m in names for v in r["methods"][m][f"{key}_values"] if v is not None]
                 + ([r["base"][key] * scale] if r["base"] and r["base"][key] is not None else []), default=1)
        pad = 0.15 * (hi - lo or 1)
        ax.set_ylim(lo - pad, hi + pad)
    fig.suptitle(f"{r['settings']['model']}: {r['settings']['max_steps']} steps, mean ± std over seeds (dots: seeds)")
    return fig


if __name__ == "__main__":
    sys.exit(main())
