"""Task definitions mirroring lm-evaluation-harness 0.4.13's stock zero-shot tasks.

Each task turns one embedded record into the log-likelihood requests lm-eval would build for it:
the prompt (``doc_to_text``), the answer strings (``doc_to_choice``), the target delimiter " ",
and the gold index. The strings are those of lm-eval's task files (paths in ``TaskSpec.lmeval_yaml``,
relative to ``lm_eval/tasks``); tests pin item 0 of every task. Two shapes exist:

* shared context (all but winogrande): one context, one continuation per choice;
* partial evaluation (winogrande): one context per choice (the sentence up to the blank, filled
  with the option) and one shared continuation (the rest of the sentence).
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Item:
    """One multiple-choice question as (context, continuation) pairs, one per choice.

    ``norm_chars`` are the character lengths lm-eval divides log-likelihoods by for acc_norm:
    ``len(choice)`` of each doc_to_choice string, without the delimiter (see scorer.py).
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    norm_chars: tuple[int, ...]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str  # name in salientft.data.embedded.DATASETS
    to_item: Callable[[dict], Item]
    lmeval_yaml: str  # the stock task file this mirrors (relative to lm_eval/tasks)
    to_lmeval_doc: Callable[[dict], dict] = lambda r: r  # embedded schema -> lm-eval's dataset schema
    lmeval_metrics: tuple[str, ...] = ("acc", "acc_norm")  # what lm-eval itself reports


def _field(value, key: str):
    """A nested field that pyarrow gives as a struct (dict) but other exports give as a string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = ast.literal_eval(value)
    if isinstance(value, dict):
        return list(value[key])
    raise ValueError(f"expected a struct with key {key!r}, got {type(value).__name__}: {value!r:.80}")


def _list(value) -> list:
    if isinstance(value, str):
        try:
            return list(json.loads(value))
        except ValueError:
            return list(ast.literal_eval(value))
    return list(value)


def _choice_item(context: str, choices: list[str], gold: int) -> Item:
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} out of range for {len(choices)} choices")
    return Item(
        requests=tuple((context, TARGET_DELIMITER + c) for c in choices),
        gold=int(gold),
        norm_chars=tuple(len(c) for c in choices),
    )


# --- boolq: super_glue/boolq/default.yaml -----------------------------------------------------
def _boolq(r: dict) -> Item:
    text = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
    return _choice_item(text, ["no", "yes"], _boolq_label(r))


def _boolq_label(r: dict) -> int:
    # The embedded file is google/boolq (answer: bool); lm-eval reads super_glue (label: 0/1).
    if "label" in r:
        return int(r["label"])
    a = r["answer"]
    return int(a if isinstance(a, bool) else str(a).lower() in ("true", "1", "yes"))


def _boolq_doc(r: dict) -> dict:
    return {"question": r["question"], "passage": r["passage"], "label": _boolq_label(r)}


# --- piqa: piqa/piqa.yaml ---------------------------------------------------------------------
def _piqa(r: dict) -> Item:
    return _choice_item(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))


# --- hellaswag: hellaswag/hellaswag.yaml + hellaswag/utils.py ---------------------------------
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's WikiHow clean-up: " [title]" becomes ". ", other [tags] vanish, one "  " pass."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict) -> Item:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    query = hellaswag_preprocess(r["activity_label"] + ": " + ctx)
    choices = [hellaswag_preprocess(e) for e in _list(r["endings"])]
    return _choice_item(query, choices, int(r["label"]))


# --- winogrande: winogrande/default.yaml + preprocess_winogrande.py ---------------------------
def _winogrande(r: dict) -> Item:
    s = r["sentence"]
    idx = s.index("_")
    contexts = [s[:idx] + r["option1"], s[:idx] + r["option2"]]
    continuation = s[idx + 1:].strip()
    gold = {"1": 0, "2": 1}[str(r["answer"])]
    # Partial evaluation: only the shared continuation is scored, so normalising by its length
    # cannot change the argmax; lm-eval reports acc only. We report acc_norm == acc.
    n = len(continuation)
    return Item(
        requests=tuple((c, TARGET_DELIMITER + continuation) for c in contexts),
        gold=gold,
        norm_chars=(n, n),
    )


# --- arc_easy / arc_challenge: arc/arc_easy.yaml (arc_challenge.yaml includes it) -------------
def _arc(r: dict) -> Item:
    texts, labels = _field(r["choices"], "text"), _field(r["choices"], "label")
    return _choice_item(f"Question: {r['question']}\nAnswer:", texts, labels.index(r["answerKey"]))


# --- openbookqa: openbookqa/openbookqa.yaml ---------------------------------------------------
def _openbookqa(r: dict) -> Item:
    texts, labels = _field(r["choices"], "text"), _field(r["choices"], "label")
    return _choice_item(r["question_stem"], texts, labels.index(r["answerKey"].lstrip()))


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("boolq", "boolq", _boolq, "super_glue/boolq/default.yaml", _boolq_doc, ("acc",)),
        TaskSpec("piqa", "piqa", _piqa, "piqa/piqa.yaml"),
        TaskSpec("hellaswag", "hellaswag", _hellaswag, "hellaswag/hellaswag.yaml"),
        TaskSpec("winogrande", "winogrande", _winogrande, "winogrande/default.yaml",
                 lmeval_metrics=("acc",)),
        TaskSpec("arc_easy", "arc_easy", _arc, "arc/arc_easy.yaml"),
        TaskSpec("arc_challenge", "arc_challenge", _arc, "arc/arc_challenge.yaml"),
        TaskSpec("openbookqa", "openbookqa", _openbookqa, "openbookqa/openbookqa.yaml"),
    )
}

# The GIFT-SW paper's six-task average (docs/methods.md#gift-paper-results): which metric each task contributes.
PAPER_METRICS = {
    "hellaswag": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm",
    "boolq": "acc", "winogrande": "acc",
}
DEFAULT_TASKS = tuple(PAPER_METRICS)


def parse_tasks(tasks) -> list[str]:
    """Accept "a,b", ["a", "b"] or "all"; reject unknown names, listing the valid ones."""
    if isinstance(tasks, str):
        tasks = [t for t in (s.strip() for s in tasks.split(",")) if t]
    names = list(dict.fromkeys(tasks))  # dedupe, keep order
    if names == ["all"]:
        return list(TASKS)
    if names == ["paper"]:
        return list(DEFAULT_TASKS)
    if not names:
        raise ValueError(f"no task given; valid tasks: {', '.join(TASKS)} (or 'all', 'paper')")
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise ValueError(
            f"unknown task{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
            f"valid tasks: {', '.join(TASKS)} (or 'all', 'paper')"
        )
    return names


def load_records(task: str, limit: int | None = None) -> list[dict]:
    """The first ``limit`` validation records of a task (lm-eval's --limit takes the first N too)."""
    from ..data.embedded import read_records

    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    return read_records(TASKS[task].dataset, split="validation", limit=limit)


def load_items(task: str, limit: int | None = None, ids: Sequence[int] | None = None) -> list[Item]:
    """The task's items: the first ``limit``, or those at the validation-split positions ``ids``."""
    spec = TASKS[parse_tasks([task])[0]]
    if ids is None:
        return [spec.to_item(r) for r in load_records(task, limit)]
    if limit is not None:
        raise ValueError("give limit or ids, not both")
    records = load_records(task)
    bad = [i for i in ids if not 0 <= i < len(records)]
    if bad:
        raise ValueError(f"{task} has {len(records)} items; no item id {bad[0]}")
    return [spec.to_item(records[i]) for i in ids]


@lru_cache(maxsize=None)
def task_size(task: str) -> int:
    """The number of validation items of a task in the embedded data."""
    return len(load_records(task))


# --- fixed evaluation subsets -----------------------------------------------------------------
@dataclass(frozen=True)
class Subset:
    """A fixed, seeded choice of items per task, the same for every run (so that runs pair up).

    A task with fewer than ``2 * per_task`` items is taken whole (subsampling it would save little
    and leave the smallest tasks smaller still: ARC-Challenge 299, ARC-Easy 570, OpenBookQA 500);
    otherwise ``per_task`` items, the first of a permutation of the item ids (positions in the
    validation split) ordered by ``sha256(f"{name}:{seed}:{task}:{id}")``: a seeded permutation
    that no library version or CPU can change. Items are evaluated in ascending id order.
    """

    name: str
    per_task: int
    seed: int
    summary: str

    def size(self, total: int) -> int:
        return total if total < 2 * self.per_task else self.per_task

    def ids(self, task: str, total: int | None = None) -> list[int]:
        total = task_size(task) if total is None else total
        order = sorted(range(total), key=lambda i: hashlib.sha256(
            f"{self.name}:{self.seed}:{task}:{i}".encode()).digest())
        return sorted(order[:self.size(total)])

    def describe(self, tasks: Sequence[str]) -> dict:
        """What results.json records: ``{"name", "seed", "per_task", "n": {task: n}}``."""
        return {"name": self.name, "seed": self.seed, "per_task": self.per_task,
                "n": {t: self.size(task_size(t)) for t in tasks}}


SUBSETS: dict[str, Subset] = {
    s.name: s
    for s in (
        Subset("paper500", 500, 20240501,
               "500 items per task; tasks with fewer than 1000 (arc_challenge, arc_easy, openbookqa) whole"),
        Subset("smoke20", 20, 20240501, "20 items per task (smoke tests, quick comparisons)"),
    )
}


def get_subset(name: str) -> Subset:
    if name not in SUBSETS:
        raise ValueError(f"unknown subset {name!r}; valid subsets: "
                         + "; ".join(f"{s.name} ({s.summary})" for s in SUBSETS.values()))
    return SUBSETS[name]
