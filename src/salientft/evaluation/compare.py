"""Side-by-side comparison of several runs' evaluation results (table + bar chart).

A run is a directory holding ``eval_after.json`` (preferred), ``results.json`` or
``eval_before.json`` in the results.json format, and optionally ``metrics.json``
(``trainable_params``, ``wall_time_s``, ``peak_memory_bytes``); or a results JSON file directly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .. import deps
from .tasks import PAPER_METRICS

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
        name = p.parent.name if p.name in RESULT_FILES else p.stem
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
    return {
        "name": name, "results_file": str(results_file), "results": report["results"],
        "paper_avg": report.get("paper_avg"), "metrics": metrics,
    }


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


def compare_runs(paths: Sequence[str | Path], plot: str | Path | None = None) -> dict:
    """Load every run, build a Markdown table (runs as columns) and optionally a bar chart PNG."""
    if not paths:
        raise ValueError("compare needs at least one run directory or results file")
    if plot is not None:
        deps.require("compare", plot=plot)  # an asked-for plot needs matplotlib: refuse before any work
    runs = [load_run(p) for p in paths]
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):  # disambiguate same-named runs by their full path
        names = [str(p) for p in paths]
        for r, n in zip(runs, names):
            r["name"] = n
    tasks = list(dict.fromkeys(t for r in runs for t in r["results"]))
    header = "| | " + " | ".join(names) + " |"
    lines = [header, "|---|" + "---:|" * len(runs)]
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
    out = {"table": "\n".join(lines), "runs": runs, "tasks": tasks}
    if plot is not None:
        out["plot"] = str(plot_comparison(runs, tasks, plot))
    return out


def plot_comparison(runs: list[dict], tasks: list[str], path: str | Path) -> Path:
    """Grouped bars: one group per task (+ the paper average), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_path

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
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
