"""Quality at a fixed step budget: GIFT-SW, salient-only, GMT, full fine-tuning, LoRA and DoRA.

The paper's comparison (docs/methods.md#gift-paper-results) at the scale of a 2-core CPU: the embedded
SmolLM2-135M-Instruct fine-tuned on the embedded instruction mix, every method for the same
number of steps on the same batches (same seed), LoRA and DoRA at the rank whose trainable count
is closest to GIFT-SW's, each method at its paper learning rate (GIFT-SW 1e-4, the others 3e-5).
Several seeds per method; reported: the paper's six-task average and held-out perplexity,
mean ± std over seeds, and which differences exceed the seed noise.

    .venv/bin/python bench/quality.py            # 6 methods x 3 seeds (about 45 min), docs/results/quality.*
    .venv/bin/python bench/quality.py --quick    # 4 methods, 1 seed, 5 steps, 10 items per task
    .venv/bin/python bench/quality.py --smoke --out /tmp/q   # tiny random model (CI)
    .venv/bin/python bench/quality.py --paper500 --lr-grid   # the 500-item refresh (hours; resumable)

``--lr-grid``: each method first runs seed 0 at every learning rate of its grid (``LR_GRID``),
measuring held-out loss only (no six-task evaluation, which takes most of a run); the rate with
the lowest held-out loss is chosen (grid, losses and choice recorded), and every seed runs at it
with the evaluation. A grid whose best rate is at one of its ends grows by a half-decade that way
(1e-3 -> 3e-3), up to twice, so that no chosen rate is a grid edge unless the report says so. With per-item outcomes in the records (the ``paper500`` preset), each method is
compared with GIFT-SW item by item: the difference of the six-task average with a paired
bootstrap 95 % interval that resamples items within each task, every item's difference being its
mean over the seeds both methods have; so is each pair a paper compares directly (``CLAIM_PAIRS``:
GMT against full fine-tuning).
"""
from __future__ import annotations

import argparse
import sys

import _suite as S
from _suite import LR_GRID, MAX_GRID_EXTENSIONS, choose_lrs, chosen_lrs, half_decade_step  # noqa: F401  (the grid:
# in _suite.py, since the parts that train at its rates read it too)

METHODS = ("gift-sw", "salient", "gmt", "full", "lora", "dora")
QUICK_METHODS = ("gift-sw", "salient", "full", "lora")
BOOTSTRAP_RESAMPLES = None  # the exact bootstrap (salientft.evaluation.paired): no seed moves an interval
# Paired comparisons a paper makes between two methods other than GIFT-SW (first minus second).
CLAIM_PAIRS = (("gmt", "full", "GMT against the full fine-tuning it modifies (docs/methods.md#gmt-algorithm)"),)
TASK_METRIC = S.TASK_METRIC
specs = S.quality_spec  # one run's spec: method, seed, LoRA rank, GMT's ratio


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    S.add_common_args(p)
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help=f"default: all ({', '.join(METHODS)}); --quick: {', '.join(QUICK_METHODS)}")
    p.add_argument("--lr-grid", action="store_true",
                   help="choose each method's learning rate on held-out loss (seed 0) from LR_GRID first")
    args = p.parse_args(argv)
    args.methods = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    preset, out = S.resolve(args)
    runs = S.Runs(preset, out, args.max_minutes, part="quality")
    rank, gift_count = S.lora_rank_matching_gift(preset.model)
    base = runs.baseline()
    grid = choose_lrs(runs, args.methods, preset.seeds[0], rank) if args.lr_grid else None
    records = {m: [] for m in args.methods}
    for seed in preset.seeds:  # seed-major: after one budget-limited sitting every method has a seed
        for m in args.methods:
            if grid is not None and grid[m]["chosen"] is None:
                continue  # its grid is not complete yet: rerun to continue
            spec = specs(m, seed, rank)
            if grid is not None:
                spec["lr"] = grid[m]["chosen"]
            rec = runs.train(spec)
            if rec is not None:
                records[m].append(rec["result"])
    command = S.report_command("quality.py", argv)
    result = summarize(records, base, preset, rank, gift_count, command, runs.skipped)
    result["lr_grid"] = grid
    result["paired_vs_gift_sw"] = paired_vs(records, "gift-sw")
    result["paired_claims"] = paired_claims(records)
    S.write_report(out, "quality", result, markdown(result, preset), lambda: plot(result), preset=preset)
    return 0


def paired_claims(records: dict, resamples: int | None = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """{"a - b": paired difference and the claim it tests} for each of CLAIM_PAIRS both of whose
    methods have per-item records."""
    claims = {f"{a} - {b}": claim for a, b, claim in CLAIM_PAIRS}
    found = S.paired_table(((f"{a} - {b}", records[b], records[a]) for a, b, _ in CLAIM_PAIRS
                            if a in records and b in records), resamples=resamples, seed=seed)
    return {name: {**d, "claim": claims[name]} for name, d in found.items()}


def paired_vs(records: dict, ref: str, resamples: int | None = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Each method minus ``ref`` on the six-task average (S.paired_difference: items resampled
    within each task, each item's difference its mean over the seeds both methods have)."""
    if ref not in records:
        return {}
    return S.paired_table(((m, records[ref], recs) for m, recs in records.items() if m != ref),
                          resamples=resamples, seed=seed)


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
    lr_text = ("each method at the learning rate its grid chose (table below)" if r.get("lr_grid")
               else "each method's default learning rate")
    lines += S.setting_lines(preset, ".venv/bin/python " + r["command"], r["incomplete"], lr_text)
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
        lr = row["learning_rate"] if row["learning_rate"] is not None else ((r.get("lr_grid") or {}).get(m) or {}).get("chosen")
        trainable = "-" if row["trainable_params"] is None else f"{row['trainable_params']:,}"
        lines.append(f"| {m} | {row['n_seeds']} | {trainable} | {lr if lr is not None else '-'} | "
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
    if r.get("lr_grid"):
        lines += ["", "Learning rates: seed 0 at every rate of the grid, the lowest held-out loss chosen; a best "
                  "rate at an end of the grid extends it by a half-decade that way (held-out loss per rate):", "",
                  "| method | grid: held-out loss | chosen |", "|---|---|---|"]
        for m, g in r["lr_grid"].items():
            cells = ", ".join(f"{lr:g}: {g['heldout_loss'][str(lr)]:.3f}" if str(lr) in g["heldout_loss"] else f"{lr:g}: -"
                              for lr in g["grid"])
            choice = "grid incomplete" if g["chosen"] is None else f"{g['chosen']:g}"
            if g.get("at_edge"):
                choice += f" (still at the grid's edge after {g['extended']} extensions)"
            elif g.get("extended"):
                choice += f" (grid extended by {g['extended']})"
            lines.append(f"| {m} | {cells} | {choice} |")
    if r.get("paired_vs_gift_sw"):
        lines += ["", "Each method minus GIFT-SW, item by item (six-task average, points; paired bootstrap 95 % "
                  "interval over items, each item's difference averaged over the seeds both have):", "",
                  f"| method - gift-sw | {S.PAIRED_HEAD} | seeds | items per seed |", "|---|---|---|---|---|---|"]
        for m, c in r["paired_vs_gift_sw"].items():
            lines.append(f"| {m} | {S.paired_cells(c)} | {c['seeds']} | {c['items']} |")
    if r.get("paired_claims"):
        lines += ["", "The papers' other comparisons, item by item (first minus second, same bootstrap):", "",
                  f"| pair | claim | {S.PAIRED_HEAD} | seeds | items per seed |", "|---|---|---|---|---|---|---|"]
        for pair, c in r["paired_claims"].items():
            lines.append(f"| {pair} | {c['claim']} | {S.paired_cells(c)} | {c['seeds']} | {c['items']} |")
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
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylabel(label)
        trained = [v * scale for m in names for v in r["methods"][m][f"{key}_values"] if v is not None]
        lo, hi = min(trained, default=0), max(trained, default=1)
        base = r["base"][key] * scale if r["base"] and r["base"][key] is not None else None
        if S.base_reference(ax, base, trained):
            lo, hi = min(lo, base), max(hi, base)
        if base is not None:
            ax.legend()
        pad = 0.15 * (hi - lo or 1)
        ax.set_ylim(lo - pad, hi + pad)
    fig.suptitle(f"{r['settings']['model']}: {r['settings']['max_steps']} steps, mean ± std over seeds (dots: seeds)")
    return fig


if __name__ == "__main__":
    sys.exit(main())
