"""Side-by-side comparison of several runs' evaluation results (table + bar chart), and, when every
run has its per-item samples file, paired statistics of every pair of runs.

A run is a directory holding ``eval_after.json`` (preferred), ``results.json`` or
``eval_before.json`` in the results.json format, and optionally ``metrics.json``
(``trainable_params``, ``wall_time_s``, ``peak_memory_bytes``); or a results JSON file directly.
Its samples file (``salientft eval --log-samples``) is ``<results stem>.samples.jsonl`` beside
the results file, else ``samples.jsonl`` in the run directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .. import deps
from .cli_api import samples_path
from .paired import (DEFAULT_RESAMPLES, DEFAULT_SEED, VERDICT_MARGIN, discordant, mcnemar_exact,
                     paired_bootstrap_tasks)
from .tasks import PAPER_METRICS, TASKS

RESULT_FILES = ("eval_after.json", "results.json", "eval_before.json")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def load_run(path: str | Path) -> dict:
    """{"name", "results_file", "results", "paper_avg", "metrics"} for a run dir or results file."""
    p = Path(path)
    if p.is_file():
        results_file, metrics_file = p, p.parent / "metrics.json"
        name = p.parent.name if p.name in RESULT_FILES and p.parent.name else p.stem
    elif p.is_dir():
        found = [p / f for f in RESULT_FILES if (p / f).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{p} holds none of {', '.join(RESULT_FILES)}: run `salientft eval --output "
                f"{p / 'results.json'}` on it first"
            )
        results_file, metrics_file, name = found[0], p / "metrics.json", p.name
    else:
        raise FileNotFoundError(f"{p} is neither a run directory nor a results JSON file")
    report = _read_json(results_file)
    if "results" not in report or not isinstance(report["results"], dict):
        raise ValueError(f"{results_file} has no \"results\" mapping: not a salientft eval results file")
    metrics = _read_json(metrics_file) if metrics_file.is_file() else {}
    samples = samples_path(results_file)
    if not samples.is_file() and p.is_dir() and (p / "samples.jsonl").is_file():
        samples = p / "samples.jsonl"
    return {
        "name": name, "results_file": str(results_file), "results": report["results"],
        "paper_avg": report.get("paper_avg"), "metrics": metrics,
        "samples_file": str(samples) if samples.is_file() else None,
        "subset": report.get("subset"), "limit": report.get("limit"),
        "dtype": report.get("dtype"), "logprob_dtype": report.get("logprob_dtype"),
    }


def precision_note(runs: Sequence[dict]) -> str | None:
    """A note when the runs were evaluated in different precisions (bf16 vs fp32 model weights, or
    log-probabilities summed in the model's dtype vs float32): their differences then mix the method
    with the numerics (bf16 alone moves accuracies by a few items, docs/testing.md)."""
    for key, what in (("dtype", "model dtypes"), ("logprob_dtype", "log-probability dtypes")):
        seen = {r["name"]: r.get(key) for r in runs if r.get(key)}
        if len(set(seen.values())) > 1:
            listing = ", ".join(f"{name}: {v}" for name, v in seen.items())
            return (f"(note: these runs were evaluated with different {what} ({listing}); part of their "
                    "differences comes from the precision, not the method: evaluate them with the same --dtype "
                    "and --logprob-dtype)")
    return None


def read_samples(path: str | Path) -> dict[str, dict[int, dict]]:
    """A samples file as ``{task: {item id: record}}`` (records as ``sample_records`` writes them)."""
    out: dict[str, dict[int, dict]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                task, item_id, acc = rec["task"], int(rec["id"]), rec["acc"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a salientft samples record ({e})") from None
            if acc not in (0, 1) or rec.get("acc_norm") not in (0, 1, None):
                raise ValueError(f"{path}:{lineno}: acc and acc_norm must be 0 or 1")
            if item_id in out.setdefault(task, {}):
                raise ValueError(f"{path}:{lineno}: item {task} #{item_id} appears twice")
            out[task][item_id] = rec
    return out


def _check_samples(run: dict, samples: dict) -> None:
    """The samples must reproduce the run's results exactly (else they belong to another evaluation)."""
    for task, res in run["results"].items():
        recs = samples.get(task)
        if recs is None:
            raise ValueError(f"{run['samples_file']} has no items of {task}, which {run['results_file']} reports: "
                             "evaluate again with --log-samples")
        for m in ("acc", "acc_norm"):
            if res.get(m) is None or any(r.get(m) is None for r in recs.values()):
                continue
            if len(recs) != res.get("n", len(recs)) or sum(r[m] for r in recs.values()) / len(recs) != res[m]:
                raise ValueError(f"{run['samples_file']} does not match {run['results_file']} ({task} {m}): "
                                 "the two files come from different evaluations; evaluate again with --log-samples")


def _pct(v) -> str:
    return "–" if v is None else f"{100 * float(v):.2f}"


def _human(v, unit: str) -> str:
    if v is None:
        return "–"
    v = float(v)
    if unit == "params":
        for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
            if v >= div:
                return f"{v / div:.2f}{suf}"
        return f"{v:.0f}"
    if unit == "bytes":
        return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.0f} MiB"
    return f"{v:.0f} s" if v < 600 else f"{v / 60:.1f} min"


def _metric(task: str, r: dict):
    """The paper's metric for the paper's tasks, else acc_norm when present, else acc."""
    m = PAPER_METRICS.get(task) or ("acc_norm" if r.get("acc_norm") is not None else "acc")
    return r.get(m), m


def _claim_outputs(plot, output, plot_diffs, resamples) -> None:
    """Refuse bad arguments and unwritable outputs before any run is read."""
    from ..outputs import claim_file

    if resamples is not None and (int(resamples) != resamples or resamples < 1):
        raise ValueError(f"--resamples must be a positive integer (or left out for the exact bootstrap), got {resamples}")
    if plot is not None:
        deps.require("compare", plot=plot)  # an asked-for plot needs matplotlib: refuse before any work
    if plot_diffs is not None:
        deps.require("compare", plot=plot_diffs)
        claim_file(plot_diffs, flag="--plot-diffs")
    if output is not None:
        claim_file(output, flag="--output")
    if plot is not None:
        claim_file(plot, flag="--plot")


def _load_runs(paths: Sequence[str | Path]) -> list[dict]:
    """Every run, same-named runs disambiguated by their full path."""
    runs = [load_run(p) for p in paths]
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        for r, p in zip(runs, paths):
            r["name"] = str(p)
    return runs


def _missing_note(missing: list[str]) -> str:
    return f"{', '.join(missing)} ha{'s' if len(missing) == 1 else 've'}"


def results_table(runs: list[dict], tasks: list[str]) -> str:
    """The Markdown table: one row per task (its paper metric), the paper average, and the training
    metrics any run has; runs as columns."""
    lines = ["| | " + " | ".join(r["name"] for r in runs) + " |", "|---|" + "---:|" * len(runs)]
    for t in tasks:
        metric = None
        cells = []
        for r in runs:
            res = r["results"].get(t)
            if res is None:
                cells.append("–")
                continue
            v, metric = _metric(t, res)
            cells.append(_pct(v))
        lines.append(f"| {t} ({metric}) | " + " | ".join(cells) + " |")
    lines.append("| **paper avg** | " + " | ".join(f"**{_pct(r['paper_avg'])}**" for r in runs) + " |")
    for key, label, unit in (("trainable_params", "trainable params", "params"),
                             ("wall_time_s", "wall time", "s"),
                             ("peak_memory_bytes", "peak memory", "bytes")):
        if any(key in r["metrics"] for r in runs):
            lines.append(f"| {label} | " + " | ".join(_human(r["metrics"].get(key), unit) for r in runs) + " |")
    return "\n".join(lines)


def _all_pairs(runs: list[dict], resamples, seed) -> list[dict]:
    """paired_rows of every pair of runs, from their samples files (checked against the results)."""
    samples = [read_samples(r["samples_file"]) for r in runs]
    for r, smp in zip(runs, samples):
        _check_samples(r, smp)
    rows = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            rows += paired_rows(runs[i], samples[i], runs[j], samples[j], resamples=resamples, seed=seed)
    return rows


def compare_runs(paths: Sequence[str | Path], plot: str | Path | None = None, *,
                 output: str | Path | None = None, plot_diffs: str | Path | None = None,
                 resamples: int | None = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict:
    """Load every run, build a Markdown table (runs as columns) and optionally a bar chart PNG.

    When every run has a samples file and there are two runs or more, adds the paired statistics
    of every pair (``pairs``: see :func:`paired_rows`; ``pairs_table``: Markdown); ``plot_diffs``
    draws them as a forest plot PNG; ``output`` writes the whole comparison as JSON (atomically).
    The intervals are the exact bootstrap's (``resamples=None``, no seed) unless ``resamples`` asks
    for that many seeded Monte-Carlo resamples. Runs evaluated on different subsets or items are
    refused, naming them.
    """
    if not paths:
        raise ValueError("compare needs at least one run directory or results file")
    _claim_outputs(plot, output, plot_diffs, resamples)
    runs = _load_runs(paths)
    missing = [r["name"] for r in runs if r["samples_file"] is None]
    if plot_diffs is not None and (missing or len(runs) < 2):
        raise ValueError("--plot-diffs needs two runs or more, each with its samples file"
                         + (f"; {_missing_note(missing)} none (evaluate with salientft eval --log-samples --output ...)"
                            if missing else ""))
    tasks = list(dict.fromkeys(t for r in runs for t in r["results"]))
    out = {"table": results_table(runs, tasks), "runs": runs, "tasks": tasks, "pairs": [], "notes": []}
    note = precision_note(runs)
    if note:
        out["notes"].append(note)
    if len(runs) >= 2 and not missing:
        out["pairs"] = _all_pairs(runs, resamples, seed)
        out["pairs_table"] = pairs_markdown(out["pairs"])
        out.update(method="exact" if resamples is None else "monte-carlo", resamples=resamples,
                   seed=None if resamples is None else seed, confidence=0.95, verdict_margin=VERDICT_MARGIN)
    elif len(runs) >= 2:
        out["notes"].append(f"(no paired statistics: {_missing_note(missing)} no samples file; evaluate with "
                            "salientft eval --log-samples)")
    if plot is not None:
        out["plot"] = str(plot_comparison(runs, tasks, plot))
    if plot_diffs is not None:
        out["plot_diffs"] = str(plot_differences(out["pairs"], plot_diffs))
    if output is not None:
        from ..outputs import write_json

        write_json(output, {k: v for k, v in out.items() if k != "output"})
        out["output"] = str(output)
    return out


def _describe_items(run: dict) -> str:
    s = run.get("subset")
    if s:
        return f"subset {s.get('name')} (seed {s.get('seed')})"
    return f"the first {run['limit']} items" if run.get("limit") else "all items"


def paired_rows(run_a: dict, samples_a: dict, run_b: dict, samples_b: dict, *,
                resamples: int | None = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> list[dict]:
    """Paired statistics of run B against run A on the tasks both ran, per task and metric (acc;
    acc_norm where lm-eval reports it) and for the paper's six-task average when both have all six.

    Each row: ``{"a", "b", "task", "metric", "n", "acc_a", "acc_b", "diff" (B - A), "lo", "hi"
    (paired bootstrap 95% interval), "verdict" (``paired.verdict``: "higher"/"lower" only where the
    interval clears zero by 0.05 point, else "borderline"/"not resolved"), "a_only", "b_only"
    (discordant items), "p_mcnemar"}``. The
    average row resamples items within each task and its McNemar test pools the six tasks' items.
    Refuses runs whose subsets or items differ.
    """
    sa, sb = run_a.get("subset"), run_b.get("subset")
    key = (lambda s: None if not s else (s.get("name"), s.get("seed")))
    if key(sa) != key(sb):
        raise ValueError(f"runs {run_a['name']} and {run_b['name']} were evaluated on different items "
                         f"({_describe_items(run_a)} vs {_describe_items(run_b)}); evaluate both with the same --subset")
    common = [t for t in run_a["results"] if t in run_b["results"]]
    vectors: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for t in common:
        ids_a, ids_b = set(samples_a[t]), set(samples_b[t])
        if ids_a != ids_b:
            only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
            raise ValueError(f"runs {run_a['name']} and {run_b['name']} were evaluated on different {t} items "
                             f"({len(only_a)} only in {run_a['name']}, {len(only_b)} only in {run_b['name']}; "
                             f"{_describe_items(run_a)} vs {_describe_items(run_b)}); evaluate both with the same --subset")
        ids = sorted(ids_a)
        metrics = TASKS[t].lmeval_metrics if t in TASKS else ("acc", "acc_norm")
        for m in metrics:
            va = [samples_a[t][i].get(m) for i in ids]
            vb = [samples_b[t][i].get(m) for i in ids]
            if None in va or None in vb:
                continue
            vectors[(t, m)] = (va, vb)
    rows = []
    for (t, m), (va, vb) in vectors.items():
        rows.append(_row(run_a, run_b, t, m, {t: (va, vb)}, resamples, seed))
    if all((t, m) in vectors for t, m in PAPER_METRICS.items()):
        rows.append(_row(run_a, run_b, "paper avg", "paper", {t: vectors[(t, m)] for t, m in PAPER_METRICS.items()},
                         resamples, seed))
    return rows


def _row(run_a, run_b, task, metric, pairs, resamples, seed) -> dict:
    boot = paired_bootstrap_tasks(pairs, resamples=resamples, seed=seed)
    a_only = b_only = 0
    acc_a = acc_b = 0.0
    for va, vb in pairs.values():
        x, y = discordant(va, vb)
        a_only, b_only = a_only + x, b_only + y
        acc_a, acc_b = acc_a + sum(va) / len(va), acc_b + sum(vb) / len(vb)
    return {"a": run_a["name"], "b": run_b["name"], "task": task, "metric": metric, "n": boot["n"],
            "acc_a": acc_a / len(pairs), "acc_b": acc_b / len(pairs), "diff": boot["diff"],
            "lo": boot["lo"], "hi": boot["hi"], "verdict": boot["verdict"], "a_only": a_only, "b_only": b_only,
            "p_mcnemar": mcnemar_exact(a_only, b_only)}


def _pp(v: float, sign: bool = True) -> str:
    return f"{100 * v:+.2f}" if sign else f"{100 * v:.2f}"


def pairs_markdown(rows: list[dict]) -> str:
    """The paired statistics as a Markdown table (percentage points; B − A)."""
    lines = ["| B vs A | task | metric | n | A | B | B − A | 95% CI | B vs A | McNemar p | A only / B only |",
             "|---|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        bold = "**" if r["task"] == "paper avg" else ""
        lines.append(f"| {r['b']} vs {r['a']} | {bold}{r['task']}{bold} | {r['metric']} | {r['n']} | "
                     f"{_pp(r['acc_a'], False)} | {_pp(r['acc_b'], False)} | {bold}{_pp(r['diff'])}{bold} | "
                     f"[{_pp(r['lo'])}, {_pp(r['hi'])}] | {r['verdict']} | {r['p_mcnemar']:.3g} | {r['a_only']} / {r['b_only']} |")
    lines.append("")
    lines.append("Differences in accuracy points, B − A on the same items; 95% paired bootstrap interval "
                 "(items resampled; the paper avg resamples within each task); B vs A says higher or lower "
                 f"only where the interval clears zero by more than {100 * VERDICT_MARGIN:.2f} point, borderline "
                 "where an end is within that of zero; exact McNemar p on the discordant items (paper avg: "
                 "pooled over its six tasks).")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str | Path) -> Path:
    """Lay out, write atomically, close."""
    import matplotlib.pyplot as plt

    from ..outputs import output_file

    fig.tight_layout()
    path = Path(path)
    with output_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def plot_differences(rows: list[dict], path: str | Path) -> Path:
    """Forest plot: one line per pair, task and metric: the difference and its 95% interval."""
    plt = _pyplot()
    labels = [f"{r['b']} − {r['a']}: {r['task']}" + ("" if r["task"] == "paper avg" else f" {r['metric']}")
              for r in rows]
    fig, ax = plt.subplots(figsize=(8.0, 1.0 + 0.28 * max(1, len(rows))))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        color = "black" if r["task"] == "paper avg" else "tab:blue"
        ax.plot([100 * r["lo"], 100 * r["hi"]], [y, y], color=color, lw=1.5)
        ax.plot([100 * r["diff"]], [y], "o", color=color, ms=4)
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("accuracy difference (points), paired bootstrap 95% interval")
    ax.grid(axis="x", alpha=0.3)
    return _save_png(fig, path)


def plot_comparison(runs: list[dict], tasks: list[str], path: str | Path) -> Path:
    """Grouped bars: one group per task (+ the paper average), one bar per run."""
    plt = _pyplot()
    groups = tasks + (["paper avg"] if any(r["paper_avg"] is not None for r in runs) else [])
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(runs)) ** 0.5 + 2), 4.2))
    for i, r in enumerate(runs):
        vals = []
        for g in groups:
            if g == "paper avg":
                v = r["paper_avg"]
            else:
                res = r["results"].get(g)
                v = _metric(g, res)[0] if res else None
            vals.append(float("nan") if v is None else 100 * float(v))
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, vals, width=width, label=r["name"])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("zero-shot accuracy by run (paper metric per task)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save_png(fig, path)
