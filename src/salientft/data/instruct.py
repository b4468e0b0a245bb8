"""Instruction data as chat conversations: JSONL files, Hugging Face datasets, the embedded mix.

Every source ends up as ``list[list[dict]]``: conversations, each a list of
``{"role": "system"|"user"|"assistant", "content": str}`` turns with at least one assistant turn.
Bad input fails early and names its location (``path:line: problem``) so a user can fix the
file instead of debugging a tokenizer error thousands of steps later.

The held-out split is a content hash (``sha1`` of the conversation, 5 % of buckets), not a
seeded shuffle, so membership never depends on ``seed``, ``limit``, the order of the rows or
which other rows exist; ``seed`` only shuffles the order of what is returned.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import random
from functools import lru_cache
from pathlib import Path

from .._io import is_path_like, iter_jsonl  # is_path_like re-exported: salientft.data.instruct.is_path_like
from .templates import render_chat

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "heldout", "all")
HELDOUT_PER_MILLE = 50  # 5 % of hash buckets are held out
DEFAULT_SEED = 0

# The embedded mix: source -> cap on rows taken (file order; None = all). TriviaQA alone has 7993
# validation rows, more than the other three together, so it is capped to keep the mix balanced.
EMBEDDED_MIX = {"sciq": None, "social_iqa": None, "commonsense_qa": None, "trivia_qa": 2000}
# Never used for training: they are the evaluation tasks.
EVAL_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

# prompt/response-like column pairs accepted in Hugging Face datasets (first match wins).
_PAIR_COLUMNS = (
    ("prompt", "response"), ("prompt", "completion"), ("instruction", "output"),
    ("instruction", "response"), ("question", "answer"), ("input", "output"),
)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


# ----------------------------------------------------------------------------- validation
def _check_messages(messages, where: str) -> list[dict]:
    """Validate chat turns; return clean copies ({role, content} only)."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} turns, "
                         f"got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{where}: 'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content', "
                             f"got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"{where}: message {i} has no '{key}' field")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"{where}: message {i} has unknown role {role!r}; "
                             f"expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {i} content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"{where}: message {i} is a system turn; only the first turn may be 'system'")
        if role == "assistant" and not content.strip():
            raise ValueError(f"{where}: message {i} (assistant) is empty (nothing to train on); "
                             "give it a reply or drop the turn")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant turn (nothing to train on)")
    return out


def _from_pair(prompt, response, system, where: str, names=("prompt", "response")) -> list[dict]:
    for name, value in zip(names, (prompt, response)):
        if not isinstance(value, str):
            raise ValueError(f"{where}: '{name}' must be a string, got {type(value).__name__}")
    if not response.strip():
        raise ValueError(f"{where}: '{names[1]}' is empty (nothing to train on)")
    conv = []
    if system is not None:
        if not isinstance(system, str):
            raise ValueError(f"{where}: 'system' must be a string, got {type(system).__name__}")
        conv.append({"role": "system", "content": system})
    conv += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return conv


def record_to_conversation(record, where: str) -> list[dict]:
    """One JSONL record (``messages`` or ``prompt``/``response`` [+ ``system``]) -> a conversation."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    has_pair = "prompt" in record or "response" in record
    if "messages" in record:
        if has_pair:
            raise ValueError(f"{where}: has both 'messages' and 'prompt'/'response'; use one form")
        if "system" in record:
            raise ValueError(f"{where}: 'system' goes inside 'messages' as the first turn")
        return _check_messages(record["messages"], where)
    if has_pair:
        for key in ("prompt", "response"):
            if key not in record:
                raise ValueError(f"{where}: has no '{key}' field (the prompt/response form needs both)")
        return _from_pair(record["prompt"], record["response"], record.get("system"), where)
    raise ValueError(f"{where}: needs a 'messages' list or 'prompt' and 'response' fields; "
                     f"found keys {sorted(record)}")


# ----------------------------------------------------------------------------- sources
class DatasetUnavailableError(ValueError, RuntimeError):
    """A Hugging Face dataset could not be loaded (unknown name, offline, bad split).

    A ValueError (a bad input, reported in one line by the command line) and, as before, a
    RuntimeError."""


def read_jsonl(path) -> list[list[dict]]:
    """All conversations of a JSONL file (blank lines skipped); errors say ``path:line: problem``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist; give an existing .jsonl file, 'embedded', "
                                "or hf:NAME for a Hugging Face dataset")
    if path.is_dir():
        raise IsADirectoryError(f"data file {path} is a directory; pass a .jsonl file")
    kind = _TABLE_FORMATS.get(path.suffix.lower())
    if kind is not None:
        raise ValueError(f"data file {path} is {kind}; salientft reads JSONL: {JSONL_FORMAT} (convert it, e.g. "
                         "with pandas: read it, then df.to_json('train.jsonl', orient='records', lines=True))")
    try:
        return [record_to_conversation(record, where) for where, record in iter_jsonl(path)]
    except ValueError as e:
        if f"{path}:1: invalid JSON" in str(e):  # not JSONL at all: say what is expected
            raise ValueError(f"{e}; a data file is JSONL: {JSONL_FORMAT}") from None
        raise


# What a data file must hold, for messages that refuse another format.
JSONL_FORMAT = ('one JSON object per line, with a "messages" list of {"role", "content"} turns or '
                '"prompt" and "response" strings')
# Table formats a user may pass as --data, refused with JSONL_FORMAT (read as JSONL they fail on line 1).
_TABLE_FORMATS = {".csv": "CSV", ".tsv": "TSV (tab-separated)", ".parquet": "Parquet", ".xlsx": "an Excel sheet",
                  ".xls": "an Excel sheet", ".arrow": "Arrow"}


def _hf_row_to_conversation(row: dict, where: str) -> list[dict]:
    for col in ("messages", "conversations", "conversation"):
        if col in row and row[col] is not None:
            turns = row[col]
            if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]:
                # ShareGPT style {"from": "human"|"gpt", "value": ...}
                turns = [{"role": _SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
                         for t in turns]
            return _check_messages(turns, where)
    for p, r in _PAIR_COLUMNS:
        if p in row and r in row:
            prompt = row[p]
            if p == "instruction" and isinstance(row.get("input"), str) and row["input"].strip():
                prompt = f"{prompt}\n\n{row['input']}"
            return _from_pair(prompt, row[r], row.get("system") or None, where, names=(p, r))
    raise ValueError(f"{where}: no 'messages' column and no prompt/response-like pair "
                     f"({', '.join('/'.join(x) for x in _PAIR_COLUMNS)}); columns: {sorted(row)}")


def read_hf_dataset(name: str, hf_split: str = "train", config: str | None = None,
                    limit: int | None = None) -> list[list[dict]]:
    """A Hugging Face hub dataset (needs ``datasets`` and network, or its local cache)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"loading the Hugging Face dataset {name!r} needs the 'datasets' package: "
            "pip install datasets (or pass a .jsonl file, or 'embedded')") from None
    split = hf_split if limit is None else f"{hf_split}[:{int(limit)}]"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, bad split: all surface as one clear message
        raise DatasetUnavailableError(
            f"could not load Hugging Face dataset {name!r} (config={config!r}, split={split!r}): "
            f"{type(e).__name__}: {e}. Offline? Set HF_HUB_OFFLINE=0 with network access; "
            f"a local file? give its path (./{name}.jsonl)") from e
    return [_hf_row_to_conversation(dict(row), f"{name}[{hf_split}]:row {i}") for i, row in enumerate(ds)]


# ----------------------------------------------------------------------------- embedded mix
def _literal(value, where: str):
    """Struct columns sometimes arrive as their Python repr; parse safely (never eval)."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: cannot parse {value[:80]!r}") from None
    return value


def _phrase(answer: str) -> str:
    """The answer as a short sentence: first letter capitalised, final period."""
    answer = " ".join(str(answer).split())
    if not answer:
        raise ValueError("empty answer")
    answer = answer[0].upper() + answer[1:]
    return answer if answer[-1] in ".!?\"')" else answer + "."


def _qa(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question.strip()},
            {"role": "assistant", "content": _phrase(answer)}]


def _sciq(row, where, sciq_support=False):
    q = row["question"]
    if sciq_support and row.get("support"):
        q = f"{row['support'].strip()}\n\n{q}"
    return _qa(q, row["correct_answer"])


def _social_iqa(row, where, **_):
    label = str(row["label"]).strip()
    key = {"1": "answerA", "2": "answerB", "3": "answerC"}.get(label)
    if key is None:
        raise ValueError(f"{where}: label {label!r} is not 1, 2 or 3")
    return _qa(f"{row['context'].strip()} {row['question'].strip()}", row[key])


def _commonsense_qa(row, where, **_):
    choices = _literal(row["choices"], where)
    labels, texts = list(choices["label"]), list(choices["text"])
    key = str(row["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"{where}: answerKey {key!r} not among choices {labels}")
    return _qa(row["question"], texts[labels.index(key)])


def _trivia_qa(row, where, **_):
    answer = _literal(row["answer"], where)
    value = answer.get("value") if isinstance(answer, dict) else answer
    if not isinstance(value, str):
        raise ValueError(f"{where}: answer has no string 'value'")
    return _qa(row["question"], value)


_CONVERTERS = {
    "sciq": (_sciq, ["question", "correct_answer", "support"]),
    "social_iqa": (_social_iqa, ["context", "question", "answerA", "answerB", "answerC", "label"]),
    "commonsense_qa": (_commonsense_qa, ["question", "choices", "answerKey"]),
    "trivia_qa": (_trivia_qa, ["question", "answer"]),
}


@lru_cache(maxsize=4)
def _embedded_mix(sciq_support: bool = False) -> tuple:
    """(source, conversation) pairs of the whole mix, in file order; cached (it never changes)."""
    from .embedded import read_columns

    pairs, skipped = [], 0
    for name, cap in EMBEDDED_MIX.items():
        convert, columns = _CONVERTERS[name]
        for i, row in enumerate(read_columns(name, columns, limit=cap)):
            try:
                pairs.append((name, convert(row, f"{name}:row {i}", sciq_support=sciq_support)))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                skipped += 1
                logger.debug("skipping embedded row: %s", e)
    if skipped:
        logger.info("embedded mix: skipped %d unusable rows", skipped)
    return tuple(pairs)


def embedded_mix_summary() -> dict:
    """Counts per source and split of the embedded mix (for docs and logs)."""
    out: dict = {}
    for name, conv in _embedded_mix():
        split = "heldout" if is_heldout(conv) else "train"
        out.setdefault(name, {"train": 0, "heldout": 0})[split] += 1
    return out


# ----------------------------------------------------------------------------- splitting
def conversation_key(conv: list[dict]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in conv], ensure_ascii=False)


def is_heldout(conv: list[dict]) -> bool:
    """Fixed 5 % held-out membership from a hash of the conversation's content."""
    digest = hashlib.sha1(conversation_key(conv).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PER_MILLE


def load_conversations(source="embedded", split: str = "train", limit: int | None = None,
                       seed: int = DEFAULT_SEED, hf_split: str = "train", hf_config: str | None = None,
                       sciq_support: bool = False) -> list[list[dict]]:
    """Conversations of ``source``: ``"embedded"``, a ``.jsonl`` path, a Hugging Face dataset
    name (``"hf:owner/name"`` forces the hub; :func:`is_path_like` tells a path from a name), or a
    list of chats in memory (each a list of messages, or a JSONL-style record).
    ``split`` picks the fixed 5 % held-out part (``"heldout"``), the rest (``"train"``) or
    everything (``"all"``) for every kind of source; ``hf_split`` is the hub dataset's own split.
    ``seed`` shuffles the order; ``limit`` keeps the first rows after the shuffle, so a small
    limit still mixes all sources."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if not isinstance(source, (str, Path, list, tuple)):
        raise TypeError(f"data source must be 'embedded', a .jsonl path, a Hugging Face dataset name or a list of "
                        f"chats (each a list of {{'role', 'content'}} messages), got {type(source).__name__}")
    source_str = None if isinstance(source, (list, tuple)) else str(source)
    if source_str is None:  # chats in memory, never str()-ed into a file name
        convs, what = in_memory_conversations(source), "the list of chats"
    elif source_str == "embedded":
        convs = [conv for _, conv in _embedded_mix(bool(sciq_support))]
        what = "the embedded mix"
    elif source_str.startswith("hf:"):
        convs = read_hf_dataset(source_str[3:], hf_split=hf_split, config=hf_config)
        what = f"Hugging Face dataset {source_str[3:]!r}"
    elif isinstance(source, Path) or is_path_like(source_str):
        convs = read_jsonl(source_str)
        what = f"data file {source_str}"
    else:
        convs = read_hf_dataset(source_str, hf_split=hf_split, config=hf_config)
        what = f"Hugging Face dataset {source_str!r}"
    if not convs:
        raise ValueError(f"{what} is empty: no conversations to train on")
    if split != "all":
        want = split == "heldout"
        convs = [c for c in convs if is_heldout(c) == want]
        if not convs:
            raise ValueError(f"{what} has no conversations in the {split!r} split "
                             f"(the held-out split is a fixed 5 %; use split='all' for tiny datasets)")
    convs = [list(map(dict, c)) for c in convs]  # callers may mutate; keep the cache pristine
    random.Random(seed).shuffle(convs)
    return convs[:limit] if limit is not None else convs


def in_memory_conversations(chats) -> list[list[dict]]:
    """A list of chats given in Python: each a list of messages, or a record as in a JSONL file
    (``messages`` or ``prompt``/``response``); validated like a file's lines."""
    if not chats:
        raise ValueError("the list of chats is empty: no conversations to train on")
    if isinstance(chats[0], dict) and "role" in chats[0]:
        raise ValueError("got one chat (a list of messages) where a list of chats is expected: wrap it in a list, "
                         "[chat]")
    out = []
    for i, chat in enumerate(chats):
        where = f"chats[{i}]"
        if isinstance(chat, dict):
            out.append(record_to_conversation(chat, where))
        elif isinstance(chat, (list, tuple)):
            out.append(_check_messages(list(chat), where))
        else:
            raise ValueError(f"{where}: a chat must be a list of {{'role', 'content'}} messages or a record "
                             f"with 'messages' or 'prompt'/'response', got {type(chat).__name__}")
    return out


def render_plain(conv: list[dict]) -> str:
    """A template-free rendering ("User: ...\\nAssistant: ...") for tokenizers without one."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in conv)


def heldout_texts(source="embedded", tokenizer=None, limit: int | None = None, **kwargs) -> list[str]:
    """The held-out conversations as text for perplexity: rendered with ``tokenizer``'s chat
    template when given, else :func:`render_plain`. Stable order (fixed seed)."""
    convs = load_conversations(source, split="heldout", limit=limit, seed=DEFAULT_SEED, **kwargs)
    if tokenizer is None:
        return [render_plain(c) for c in convs]
    return [render_chat(tokenizer, c) for c in convs]
