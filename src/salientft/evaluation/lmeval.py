"""The optional cross-check backend: the same model object through lm-evaluation-harness.

The task definitions are lm-eval's own stock YAML files (loaded from the installed package, with
their ``!function`` hooks), changed in one respect only: the dataset. Instead of downloading from
the Hub, each task gets a ``custom_dataset`` callable that returns the embedded validation split
in the schema the stock file expects (BoolQ: google/boolq -> super_glue's ``label``). Nothing
touches the network. Install with ``pip install -r requirements/lmeval.txt`` (pinned 0.4.13).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .tasks import TASKS, load_records

log = logging.getLogger(__name__)

PINNED = "0.4.13"


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ImportError(
            "the lm-eval backend needs lm-evaluation-harness: "
            "pip install -r requirements/lmeval.txt (or pip install 'salientft[lmeval]')"
        ) from None
    if getattr(lm_eval, "__version__", PINNED) != PINNED:
        log.warning("lm-eval %s installed; salientft's task mirror was checked against %s",
                    lm_eval.__version__, PINNED)
    return lm_eval


def task_config(name: str, limit: int | None = None) -> dict:
    """lm-eval's stock config for ``name`` with its dataset swapped for the embedded records."""
    import datasets

    _import_lm_eval()
    import lm_eval.tasks as lm_tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    spec = TASKS[name]
    path = Path(lm_tasks.__file__).parent / spec.lmeval_yaml
    cfg = load_yaml(path, resolve_func=True)
    docs = [spec.to_lmeval_doc(r) for r in load_records(name, limit)]

    def _dataset(**_):
        return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})

    for key in ("tag", "group", "dataset_kwargs"):
        cfg.pop(key, None)
    cfg.update(
        dataset_path=None, dataset_name=None, custom_dataset=_dataset,
        training_split=None, test_split=None, validation_split="validation", fewshot_split=None,
    )
    return cfg


def evaluate_lmeval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 16,
                    max_length: int | None = None, progress: bool = True, logprob_dtype: str = "model",
                    return_items: bool = False) -> dict:
    """Per-task {"acc", "acc_norm", "n", "seconds", "items_per_s"} as lm-eval computes them.

    ``logprob_dtype="model"`` is HFLM's default (``softmax_dtype=None``); "float32" passes
    ``softmax_dtype="float32"``. acc_norm is None where the stock task does not report it.
    ``return_items=True`` runs with ``log_samples=True`` and adds ``"items"``: per document, in
    document order, ``{"lls": [log-likelihood per choice], "gold", "acc", "acc_norm"}`` from
    lm-eval's logged samples (``filtered_resps`` are ``(loglikelihood, is_greedy)`` per choice).
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=device, softmax_dtype=None if logprob_dtype == "model" else "float32")
    # Our tasks are built objects: an empty index spares simple_evaluate from indexing lm-eval's
    # thousands of task files on every call.
    manager = TaskManager(include_defaults=False)
    out = {}
    for name in tasks:
        task = ConfigurableTask(config=task_config(name, limit))
        t0 = time.perf_counter()
        # seeds None: zero-shot needs no sampling, and the caller's global RNG state stays untouched
        res = simple_evaluate(model=lm, tasks=[task], limit=limit, bootstrap_iters=0, log_samples=return_items,
                              num_fewshot=0, task_manager=manager, random_seed=None, numpy_random_seed=None, torch_random_seed=None)
        seconds = time.perf_counter() - t0
        r = res["results"][name]
        n = int(res["n-samples"][name]["effective"])
        out[name] = {
            "acc": float(r["acc,none"]),
            "acc_norm": float(r["acc_norm,none"]) if "acc_norm,none" in r else None,
            "n": n, "seconds": seconds, "items_per_s": n / seconds if seconds > 0 else None,
        }
        if return_items:
            out[name]["items"] = _logged_items(res["samples"][name])
    return out


def _logged_items(samples: list[dict]) -> list[dict]:
    """lm-eval's logged samples as ``{"lls", "gold", "acc", "acc_norm"}`` per document, by doc_id.

    ``gold`` is the answer index, or None where lm-eval's target is not one (winogrande's target is
    the shared continuation; its answer picks the context).
    """
    items = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        target = s["target"]
        items.append({
            "lls": [float(r[0]) for r in s["filtered_resps"]],
            "gold": int(target) if isinstance(target, (int, str)) and str(target).isdigit() else None,
            "acc": float(s["acc"]),
            "acc_norm": float(s["acc_norm"]) if "acc_norm" in s else None,
        })
    return items
