"""``run_eval``: what ``salientft eval`` does, as one library call (load, score, perplexity, write)."""
from __future__ import annotations

from pathlib import Path


def run_eval(model: str, tasks="paper", *, adapter: str | None = None, limit: int | None = None,
             batch_size: int = 16, output: str | Path | None = None, backend: str = "native",
             perplexity_source: str | None = None, ppl_max_length: int = 1024, ppl_stride: int | None = None,
             dtype: str = "bf16", logprob_dtype: str = "model", progress: bool = True,
             check_base: bool = True) -> dict:
    """Load ``model`` (preset, path, hub id or run dir), evaluate, optionally add perplexity, and
    write the report atomically to ``output``. ``tasks`` may be empty ("") for perplexity only.
    ``output`` is checked writable before the model loads; ``check_base=False`` lets an adapter
    onto a base other than the one it was trained on."""
    from .._io import check_writable, write_json
    from .loading import load_for_eval
    from .runner import evaluate
    from .tasks import parse_tasks

    names = parse_tasks(tasks) if tasks else []
    if not names and not perplexity_source:
        raise ValueError("nothing to do: give --tasks and/or --perplexity FILE|heldout")
    if output is not None:
        check_writable(output, kind="file", flag="--output")
    m, tok, desc = load_for_eval(model, adapter=adapter, dtype=dtype, check_base=check_base)
    if names:
        report = evaluate(m, tok, names, limit=limit, batch_size=batch_size, progress=progress,
                          backend=backend, model_name=desc, logprob_dtype=logprob_dtype)
    else:
        report = {"results": {}, "paper_avg": None, "items_per_s": None, "model": desc, "limit": limit,
                  "backend": backend}
    if perplexity_source:
        from .perplexity import heldout_texts, perplexity

        src = heldout_texts(tokenizer=tok) if perplexity_source == "heldout" else perplexity_source
        ppl = perplexity(m, tok, src, max_length=ppl_max_length, stride=ppl_stride,
                         batch_size=max(1, batch_size // 4), progress=progress)
        ppl["source"] = perplexity_source
        report["perplexity"] = ppl
    if output is not None:
        write_json(output, report)
    return report
