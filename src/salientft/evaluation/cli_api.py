"""``run_eval``: what ``salientft eval`` does, as one library call (load, score, perplexity, write)."""
from __future__ import annotations

import json
from pathlib import Path

SAMPLES_SUFFIX = ".samples.jsonl"


def samples_path(results_file: str | Path) -> Path:
    """Where the per-item records of a results JSON file live: ``<stem>.samples.jsonl`` beside it."""
    p = Path(results_file)
    return p.with_name(p.stem + SAMPLES_SUFFIX)


def sample_records(report: dict) -> list[dict]:
    """One record per item of every task of an ``evaluate(..., return_items=True)`` report:
    ``{"task", "id", "lls", "gold", "pred", "pred_norm", "acc", "acc_norm"}`` (acc, acc_norm 0/1;
    acc_norm and pred_norm null where the backend reports no acc_norm). Items the backend returned
    without ids (lm-eval, first ``limit`` items) get their position; missing predictions and gold
    indices are filled from the task's own items (the same requests, see tasks.py)."""
    from .scorer import choose
    from .tasks import load_items

    out = []
    for task, res in report["results"].items():
        items = res.get("items")
        if items is None:
            raise ValueError(f"no per-item records for {task}: evaluate with return_items=True")
        ref = None
        for pos, it in enumerate(items):
            rec = {"task": task, "id": int(it.get("id", pos)), "lls": [float(x) for x in it["lls"]],
                   "gold": it.get("gold"), "pred": it.get("pred"), "pred_norm": it.get("pred_norm")}
            if rec["gold"] is None or rec["pred"] is None:
                if ref is None:
                    ref = load_items(task, report.get("limit"))
                pred, pred_norm = choose(rec["lls"], ref[pos].norm_chars)
                rec["gold"] = ref[pos].gold if rec["gold"] is None else rec["gold"]
                rec["pred"] = pred
                rec["pred_norm"] = pred_norm if it.get("acc_norm") is not None else None
            rec["acc"] = int(it["acc"])
            rec["acc_norm"] = None if it.get("acc_norm") is None else int(it["acc_norm"])
            out.append(rec)
    return out


def write_samples(path: str | Path, records: list[dict]) -> Path:
    """The records as JSON Lines, written atomically."""
    from .._io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return path


def _check_eval_args(names: list[str], *, perplexity_source, output, log_samples: bool, subset, limit,
                     backend: str) -> None:
    """Every refusal of ``run_eval``'s arguments, before anything loads."""
    from .tasks import get_subset

    if not names and not perplexity_source:
        raise ValueError("nothing to do: give --tasks and/or --perplexity FILE|heldout")
    if log_samples and output is None:
        raise ValueError("--log-samples writes <output stem>.samples.jsonl beside the results: give --output")
    if log_samples and not names:
        raise ValueError("--log-samples records the items of --tasks: give --tasks")
    if subset is not None:
        get_subset(subset)
        if limit is not None:
            raise ValueError("--limit and --subset are exclusive: a subset fixes the items itself")
        if backend != "native":
            raise ValueError(f"--subset runs on the native backend only (the {backend} backend takes the first "
                             "--limit items); drop --backend or --subset")


def _add_perplexity(report: dict, m, tok, source: str, *, max_length: int, stride, batch_size: int,
                    progress: bool) -> None:
    from .perplexity import heldout_texts, perplexity

    src = heldout_texts(tokenizer=tok) if source == "heldout" else source
    ppl = perplexity(m, tok, src, max_length=max_length, stride=stride, batch_size=max(1, batch_size // 4),
                     progress=progress)
    ppl["source"] = source
    report["perplexity"] = ppl


def _move_items_to_samples(report: dict, output) -> None:
    """Write every item's record beside ``output`` and keep only the file's name in the report."""
    from ..outputs import prepare_file

    records = sample_records(report)
    for res in report["results"].values():
        res.pop("items", None)
    report["samples"] = samples_path(output).name
    write_samples(prepare_file(samples_path(output)), records)


def run_eval(model: str, tasks="paper", *, adapter: str | None = None, limit: int | None = None,
             batch_size: int = 16, output: str | Path | None = None, backend: str = "native",
             perplexity_source: str | None = None, ppl_max_length: int = 1024, ppl_stride: int | None = None,
             dtype: str = "fp32", logprob_dtype: str = "model", progress: bool = True,
             check_base: bool = True, log_samples: bool = False, subset: str | None = None,
             device="auto") -> dict:
    """Load ``model`` (preset, path, hub id or run dir), evaluate, optionally add perplexity, and
    write the report atomically to ``output``. ``tasks`` may be empty ("") for perplexity only.
    ``output`` (and the samples file) is checked before the model loads: writable, and not a file
    salientft did not write (``salientft.outputs``); ``check_base=False`` lets an adapter
    onto a base other than the one it was trained on. ``log_samples=True`` (needs ``output``) also
    writes every item's record to ``samples_path(output)`` (JSON Lines, before the results file).
    ``subset`` names a fixed seeded item subset (``tasks.SUBSETS``), exclusive with ``limit``.
    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``): where the model loads and is scored; checked
    before anything loads. ``dtype`` defaults to fp32, where the per-item choices are lm-eval's
    (docs/evaluation.md); bf16 is faster but moves a few items (measured there)."""
    from ..devices import resolve_device
    from ..outputs import claim_file, write_json
    from .loading import load_for_eval
    from .runner import evaluate
    from .tasks import parse_tasks

    device = resolve_device(device)
    names = parse_tasks(tasks) if tasks else []
    _check_eval_args(names, perplexity_source=perplexity_source, output=output, log_samples=log_samples,
                     subset=subset, limit=limit, backend=backend)
    if output is not None:
        claim_file(output, flag="--output")  # refused if it holds a file salientft did not write
        if log_samples:
            claim_file(samples_path(output), flag="--log-samples")
    m, tok, desc = load_for_eval(model, adapter=adapter, dtype=dtype, device=device, check_base=check_base)
    if names:
        report = evaluate(m, tok, names, limit=limit, batch_size=batch_size, progress=progress,
                          backend=backend, model_name=desc, logprob_dtype=logprob_dtype,
                          return_items=log_samples, subset=subset)
    else:
        report = {"results": {}, "paper_avg": None, "items_per_s": None, "model": desc, "limit": limit,
                  "backend": backend}
    if perplexity_source:
        _add_perplexity(report, m, tok, perplexity_source, max_length=ppl_max_length, stride=ppl_stride,
                        batch_size=batch_size, progress=progress)
    if log_samples:
        _move_items_to_samples(report, output)
    if output is not None:
        write_json(output, report)
    return report
