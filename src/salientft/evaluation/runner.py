"""``evaluate``: the zero-shot suite on a model, the results.json format and its Markdown table."""
from __future__ import annotations

import logging
import time
from typing import Sequence

from .scorer import DEFAULT_MAX_BATCH_TOKENS
from .tasks import PAPER_METRICS, TASKS, get_subset, load_items, load_records, parse_tasks

log = logging.getLogger(__name__)

BACKENDS = ("native", "lm-eval")


def paper_average(results: dict) -> float | None:
    """The GIFT-SW paper's six-task average, or None unless all six tasks ran."""
    if not all(t in results for t in PAPER_METRICS):
        return None
    return sum(float(results[t][m]) for t, m in PAPER_METRICS.items()) / len(PAPER_METRICS)


def evaluate(
    model,
    tokenizer,
    tasks: str | Sequence[str] = tuple(PAPER_METRICS),
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    *,
    backend: str = "native",
    share_context: bool = True,
    max_length: int | None = None,
    model_name: str | None = None,
    logprob_dtype: str = "model",
    return_items: bool = False,
    subset: str | None = None,
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
) -> dict:
    """Zero-shot log-likelihood multiple choice on the embedded validation splits.

    Returns ``{"results": {task: {"acc", "acc_norm", "n", "items_per_s", "seconds"}},
    "paper_avg", "items_per_s", "model", "limit", "backend", ...}``. ``limit`` takes the first N
    items of each task, as lm-eval's ``--limit`` does. ``backend="lm-eval"`` runs the same model
    object through lm-evaluation-harness instead (the optional ``lmeval`` extra).
    ``logprob_dtype="model"`` normalises log-probabilities in the model's dtype as lm-eval's HFLM
    does by default (bf16 sums are rounded to bf16); ``"float32"`` is exact.
    ``return_items=True`` adds ``"items"`` to each task's result: per item, in item order,
    ``{"lls": [log-likelihood per choice], "gold", "acc", "acc_norm"}`` (for tie-aware comparisons
    of two runs; ``salientft eval --log-samples`` writes them), plus, on the native backend,
    ``"id"`` (position in the validation split), ``"pred"`` and ``"pred_norm"`` (chosen indices).
    ``subset`` (a name in ``tasks.SUBSETS``, exclusive with ``limit``) evaluates that fixed seeded
    choice of items instead (native backend only); the report then has ``"subset": {"name",
    "seed", "per_task", "n": {task: n}}``. ``max_batch_tokens`` (native backend): padded tokens
    per batch besides ``batch_size`` sequences (``None``: no limit, as in the scorer).
    """
    names = parse_tasks(tasks)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    chosen = None
    if subset is not None:
        if limit is not None:
            raise ValueError("--limit and --subset are exclusive: a subset fixes the items itself")
        if backend != "native":
            raise ValueError(f"--subset runs on the native backend only (the {backend} backend takes the first "
                             "--limit items); drop --backend or --subset")
        spec = get_subset(subset)
        chosen = {name: spec.ids(name) for name in names}
    if backend == "lm-eval":
        from .lmeval import evaluate_lmeval

        per_task = evaluate_lmeval(model, tokenizer, names, limit=limit, batch_size=batch_size,
                                   max_length=max_length, progress=progress, logprob_dtype=logprob_dtype,
                                   return_items=return_items)
    else:
        from .scorer import LoglikScorer

        scorer = LoglikScorer(model, tokenizer, batch_size=batch_size, max_length=max_length,
                              share_context=share_context, progress=progress, logprob_dtype=logprob_dtype,
                              max_batch_tokens=max_batch_tokens)
        per_task = {name: score_task(scorer, name, limit, return_items=return_items,
                                     ids=None if chosen is None else chosen[name]) for name in names}
    total_items = sum(r["n"] for r in per_task.values())
    total_s = sum(r["seconds"] for r in per_task.values())
    report = {
        "results": per_task,
        "paper_avg": paper_average(per_task),
        "items_per_s": total_items / total_s if total_s > 0 else None,
        "model": model_name or _model_name(model),
        "limit": limit,
        "backend": backend,
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "num_fewshot": 0,
        "logprob_dtype": logprob_dtype,
    }
    if subset is not None:
        report["subset"] = get_subset(subset).describe(names)
    return report


def score_task(scorer, name: str, limit: int | None = None, return_items: bool = False,
               ids: Sequence[int] | None = None) -> dict:
    """acc / acc_norm of one task with a :class:`~salientft.evaluation.scorer.LoglikScorer`.

    ``return_items=True`` adds ``"items"``: per item ``{"id", "lls", "gold", "pred", "pred_norm",
    "acc", "acc_norm"}``. ``ids``: evaluate the items at these positions instead of the first ``limit``.
    """
    from .scorer import choose

    items = load_items(name, limit, ids=ids)
    item_ids = list(ids) if ids is not None else list(range(len(items)))
    t0 = time.perf_counter()
    lls = scorer.score([it.requests for it in items], desc=name)
    seconds = time.perf_counter() - t0
    acc = acc_norm = 0
    per_item = []
    for item_id, it, ll in zip(item_ids, items, lls):
        pred, pred_norm = choose(ll, it.norm_chars)
        acc += pred == it.gold
        acc_norm += pred_norm == it.gold
        if return_items:
            per_item.append({"id": int(item_id), "lls": [float(x) for x in ll], "gold": it.gold,
                             "pred": int(pred), "pred_norm": int(pred_norm),
                             "acc": float(pred == it.gold), "acc_norm": float(pred_norm == it.gold)})
    n = len(items)
    out = {
        "acc": acc / n, "acc_norm": acc_norm / n, "n": n,
        "seconds": seconds, "items_per_s": n / seconds if seconds > 0 else None,
    }
    if return_items:
        out["items"] = per_item
    return out


def _model_name(model) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or type(model).__name__


def results_markdown(report: dict) -> str:
    """The results as a Markdown table (percentages; the paper's metric per task marked *)."""
    lines = ["| task | n | acc | acc_norm |", "|---|---:|---:|---:|"]
    for task, r in report["results"].items():
        paper = PAPER_METRICS.get(task)
        cells = []
        for m in ("acc", "acc_norm"):
            v = r.get(m)
            cell = "–" if v is None else f"{100 * v:.2f}"
            cells.append(cell + ("*" if paper == m else ""))
        lines.append(f"| {task} | {r['n']} | {cells[0]} | {cells[1]} |")
    if report.get("paper_avg") is not None:
        lines.append(f"| **paper avg (6 tasks)** | | | **{100 * report['paper_avg']:.2f}** |")
    ips = report.get("items_per_s")
    lines.append("")
    lines.append(
        f"backend {report.get('backend', 'native')}, {report.get('dtype', '?')}"
        + (f", {ips:.1f} items/s" if ips else "")
        + (f", first {report['limit']} items per task" if report.get("limit") else "")
        + (f", subset {report['subset']['name']}" if report.get("subset") else "")
        + " (* = metric in the paper's average)"
    )
    return "\n".join(lines)


__all__ = ["evaluate", "score_task", "paper_average", "results_markdown", "TASKS", "load_records"]
