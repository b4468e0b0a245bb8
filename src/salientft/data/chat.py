"""Chat tokenization with loss on assistant tokens only, packing, and a padding collator.

Assistant spans are found without ``{% generation %}`` support (SmolLM2's template has none):
for each assistant turn ``i`` the template renders ``messages[:i]`` with the generation prompt
(ends right after the assistant header) and ``messages[:i+1]`` (ends after the turn's
end-of-turn token), and both token sequences must be prefixes of the full conversation's tokens.
The tokens between the two prefixes are the assistant's content plus its end-of-turn token;
trailing whitespace-only tokens (the ``\\n`` after ``<|im_end|>``) are not trained on. Templates
that inject a default system prompt (SmolLM2) inject it into every prefix, so this still holds;
a template whose earlier turns change when later ones are added fails with a clear error.

Packing concatenates whole examples (never split) into rows of at most ``max_length`` tokens,
with ``position_ids`` restarting at 0 for each example. :class:`ChatCollator` then leaves out
``attention_mask`` for packed batches, so transformers (>= 4.5x masking utils) derives a
block-diagonal causal mask from the position resets: **attention does not cross example
boundaries** and each example is computed exactly as if it were alone (the batch also carries
``use_cache=False``: transformers skips the packed-mask detection when it builds a KV cache).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from ..config_base import renamed_arguments
from .templates import chat_template_for, render_chat

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# Bytes per token assumed for a tokenizer whose vocabulary cannot be listed.
UNKNOWN_TOKEN_BYTES = 1024


def longest_token_bytes(tokenizer) -> int:
    """An upper bound on the UTF-8 bytes of text one token of ``tokenizer`` covers: the longest
    vocabulary entry as written (a byte-level or SentencePiece entry is never shorter than the text
    it stands for). Computed once per tokenizer."""
    cached = getattr(tokenizer, "_salientft_longest_token_bytes", None)
    if cached is None:
        try:
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        except (AttributeError, TypeError):  # not a transformers tokenizer: a generous bound instead
            return UNKNOWN_TOKEN_BYTES
        cached = max((len(p.encode("utf-8")) for p in pieces if isinstance(p, str)), default=1)
        try:
            tokenizer._salientft_longest_token_bytes = cached
        except AttributeError:  # a tokenizer that takes no attributes: measured again next time
            pass
    return max(int(cached), 1)


def cap_conversation(conv: list[dict], max_bytes: int) -> list[dict]:
    """``conv`` with its message contents cut, in order, to ``max_bytes`` UTF-8 bytes in all (a cut
    content ends on a whole character; the turns after it are dropped). Text beyond the cap cannot
    reach the first ``max_length`` tokens when ``max_bytes`` = max_length x the longest token's
    bytes, so truncating tokens afterwards gives the same example, and a 50 MB record costs the
    tokenizer at most ``max_bytes`` per rendered text, not its whole size."""
    out, left = [], max_bytes
    for m in conv:
        content = m["content"]
        if 4 * len(content) > left:  # may be over the budget: measure it in bytes
            raw = content.encode("utf-8")
            if len(raw) > left:
                out.append({**m, "content": raw[:left].decode("utf-8", errors="ignore")})
                return out
            n = len(raw)
        else:
            n = len(content.encode("utf-8")) if not content.isascii() else len(content)
        out.append(m)
        left -= n
    return out


def _is_blank(tokenizer, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip() == ""


def _conversation_texts(tokenizer, conv, chat_template):
    """[full text, then (prefix-with-header, prefix-with-turn) for every assistant turn]."""
    texts = [render_chat(tokenizer, conv, chat_template=chat_template)]
    for i, m in enumerate(conv):
        if m["role"] == "assistant":
            texts.append(render_chat(tokenizer, conv[:i], add_generation_prompt=True, chat_template=chat_template))
            texts.append(render_chat(tokenizer, conv[: i + 1], chat_template=chat_template))
    return texts


def _labels_from_ids(tokenizer, ids: list[list[int]], texts: list[str], where: str) -> dict:
    full, full_text = ids[0], texts[0]
    labels = [IGNORE_INDEX] * len(full)
    for k in range(1, len(ids), 2):
        for text, pref in ((texts[k], ids[k]), (texts[k + 1], ids[k + 1])):
            if not full_text.startswith(text) or full[: len(pref)] != pref:
                raise ValueError(
                    f"{where}: the chat template does not render conversations incrementally "
                    "(a prefix of the conversation does not tokenize to a prefix of the whole), "
                    "so assistant tokens cannot be located; use a template whose earlier turns do not "
                    "depend on later ones")
        start, end = len(ids[k]), len(ids[k + 1])
        while end > start and _is_blank(tokenizer, full[end - 1]):
            end -= 1
        labels[start:end] = full[start:end]
    return {"input_ids": list(full), "labels": labels}


def tokenize_conversation(conv: list[dict], tokenizer, max_length: int | None = None) -> dict:
    """One conversation -> ``{"input_ids", "labels"}`` (labels -100 outside assistant turns)."""
    return tokenize_conversations([conv], tokenizer, max_length=max_length, drop_empty=False)[0]


def tokenize_conversations(conversations, tokenizer, max_length: int | None = 1024, packing: bool = False,
                           drop_empty: bool = True, batch_size: int = 256) -> list[dict]:
    """Conversations -> examples ``{"input_ids", "labels"}`` (plus ``position_ids`` when packed).

    Examples are truncated to ``max_length`` (keeping the start); those left with no assistant
    token are dropped and counted in a warning. Raises if none remain."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    chat_template = chat_template_for(tokenizer)
    conversations = list(conversations)
    max_bytes = None if max_length is None else max_length * longest_token_bytes(tokenizer)
    examples, tally = [], _Truncation()
    for b in range(0, len(conversations), batch_size):
        chunk = conversations[b: b + batch_size]
        if max_bytes is not None:  # bytes beyond the window never reach the tokenizer
            chunk = [cap_conversation(c, max_bytes) for c in chunk]
        for ex in _label_chunk(tokenizer, chunk, chat_template, first_index=b):
            ex = tally.truncate(ex, max_length)
            if drop_empty and all(x == IGNORE_INDEX for x in ex["labels"]):
                tally.dropped += 1
                continue
            examples.append(ex)
    tally.report(examples, len(conversations), max_length)
    if packing:
        if max_length is None:
            raise ValueError("packing needs a max_length (the row length)")
        examples = pack_examples(examples, max_length)
    return examples


def _label_chunk(tokenizer, chunk: list, chat_template, first_index: int) -> list[dict]:
    """The labelled examples of a chunk of conversations, tokenized in one batched (Rust) call;
    ``first_index`` (the chunk's first conversation's index) names a conversation in errors."""
    text_groups = [_conversation_texts(tokenizer, c, chat_template) for c in chunk]
    flat_ids = _encode(tokenizer, [t for g in text_groups for t in g])
    out, pos = [], 0
    for j, texts in enumerate(text_groups):
        ids = flat_ids[pos: pos + len(texts)]
        pos += len(texts)
        out.append(_labels_from_ids(tokenizer, ids, texts, f"conversation {first_index + j}"))
    return out


@dataclass
class _Truncation:
    """What truncating to ``max_length`` did, for the log, the warning and the error."""

    truncated: int = 0
    dropped: int = 0
    need: int | None = None  # the smallest --max-length that keeps an assistant token of a dropped example

    def truncate(self, ex: dict, max_length: int | None) -> dict:
        """``ex`` cut to its first ``max_length`` tokens (counted)."""
        if max_length is None or len(ex["input_ids"]) <= max_length:
            return ex
        self.truncated += 1
        first = next((i for i, x in enumerate(ex["labels"]) if x != IGNORE_INDEX), None)
        if first is not None and first >= max_length:  # --max-length first + 1 would keep a token
            self.need = first + 1 if self.need is None else min(self.need, first + 1)
        return {k: v[:max_length] for k, v in ex.items()}

    def report(self, examples: list, n_conversations: int, max_length: int | None) -> None:
        """Log the truncations, warn about the dropped conversations, raise when none is left."""
        if self.truncated:
            logger.info("truncated %d of %d conversations to max_length=%s", self.truncated, n_conversations,
                        max_length)
        hint = f"; --max-length {self.need} would keep the shortest of them" if self.need is not None else ""
        if not examples:
            raise ValueError(f"no examples left: all {n_conversations} conversations lost their assistant "
                             f"tokens (max_length={max_length} too small, or the data is empty){hint}")
        if self.dropped:
            logger.warning("dropped %d of %d conversations with no assistant tokens left after truncation "
                           "to max_length=%s%s", self.dropped, n_conversations, max_length, hint)


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Greedy, order-preserving packing of whole examples into rows of <= ``max_length`` tokens.
    ``position_ids`` restart at 0 for each example (see the module docstring)."""
    rows, cur = [], {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"an example of {n} tokens exceeds max_length={max_length}; truncate first")
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_length:
            rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += ex["labels"]
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        rows.append(cur)
    return rows


class ChatDataset(torch.utils.data.Dataset):
    """Tokenized examples for the HF Trainer, with counts that training logs and metrics use."""

    def __init__(self, examples: list[dict], pad_token_id: int = 0, n_conversations: int | None = None):
        self.examples = examples
        self.pad_token_id = pad_token_id
        self.n_conversations = n_conversations if n_conversations is not None else len(examples)
        self.packed = bool(examples) and "position_ids" in examples[0]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    @property
    def n_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)

    @property
    def n_label_tokens(self) -> int:
        return sum(sum(1 for x in e["labels"] if x != IGNORE_INDEX) for e in self.examples)


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


@dataclass
class ChatCollator:
    """Right-pads a list of examples into tensors (labels -100 at pads).

    Unpacked examples get an ``attention_mask``. Packed examples (with ``position_ids``) get
    ``position_ids`` and, when ``block_diagonal`` (default), no ``attention_mask`` and
    ``use_cache=False`` so the model keeps attention inside each example; pads then form their own block (positions 0, 1, ...)
    after the real tokens and, being -100 in labels, never reach the loss."""

    tokenizer: object = None
    pad_to_multiple_of: int | None = None
    block_diagonal: bool = True
    pad_token_id: int | None = field(default=None)

    def __post_init__(self):
        if self.pad_token_id is None:
            self.pad_token_id = pad_id_of(self.tokenizer) if self.tokenizer is not None else 0
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            raise ValueError("ChatCollator got an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        if m:
            length = -(-length // m) * m
        n = len(features)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        packed = "position_ids" in features[0]
        positions = torch.zeros((n, length), dtype=torch.long) if packed else None
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            lab = f.get("labels", f["input_ids"])
            labels[i, :k] = torch.as_tensor(lab, dtype=torch.long)
            attention[i, :k] = 1
            if packed:
                positions[i, :k] = torch.as_tensor(f["position_ids"], dtype=torch.long)
                positions[i, k:] = torch.arange(length - k)
        batch = {"input_ids": input_ids, "labels": labels}
        if packed:
            batch["position_ids"] = positions
            if self.block_diagonal:
                # transformers only derives the packed mask when no KV cache is built (a cache is
                # built whenever config.use_cache is on, even in training mode)
                batch["use_cache"] = False
            else:
                batch["attention_mask"] = attention
        else:
            batch["attention_mask"] = attention
        return batch


def build_dataset(source, tokenizer, max_length: int = 1024, packing: bool = False, split: str = "train",
                  limit: int | None = None, seed: int = 0, **source_kwargs) -> ChatDataset:
    """A Trainer-ready dataset: load (:func:`~salientft.data.instruct.load_conversations`),
    tokenize with assistant-only labels, truncate, optionally pack. Use with :class:`ChatCollator`."""
    from .instruct import load_conversations

    convs = load_conversations(source, split=split, limit=limit, seed=seed, **source_kwargs)
    return dataset_from_conversations(convs, tokenizer, max_length=max_length, packing=packing)


def dataset_from_conversations(convs: list[list[dict]], tokenizer, max_length: int = 1024,
                               packing: bool = False) -> ChatDataset:
    """:func:`build_dataset` for conversations already loaded (and so validated, which needs no
    tokenizer: ``salientft train`` reads the data before it loads the model)."""
    examples = tokenize_conversations(convs, tokenizer, max_length=max_length, packing=packing)
    return ChatDataset(examples, pad_token_id=pad_id_of(tokenizer), n_conversations=len(convs))


@renamed_arguments(n_samples="calib_samples")
def calibration_batches_from_dataset(dataset, calib_samples: int = 128, batch_size: int = 8, seed: int = 0,
                                     pad_token_id: int | None = None) -> list[dict]:
    """``calib_samples`` random examples of ``dataset`` as right-padded ``{input_ids, attention_mask}``
    batches (GIFT-SW calibrates on the training data). Samples are grouped by length so padding,
    which the statistics exclude anyway, costs little compute."""
    if calib_samples < 1 or batch_size < 1:
        raise ValueError(f"calib_samples and batch_size must be >= 1, got {calib_samples}, {batch_size}")
    if len(dataset) == 0:
        raise ValueError("cannot calibrate on an empty dataset")
    if calib_samples > len(dataset):
        logger.warning("calibration: asked for %d samples, the dataset has %d; using all", calib_samples, len(dataset))
        calib_samples = len(dataset)
    if pad_token_id is None:
        pad_token_id = getattr(dataset, "pad_token_id", 0)
    idx = random.Random(seed).sample(range(len(dataset)), calib_samples)
    feats = sorted((dataset[i] for i in idx), key=lambda f: len(f["input_ids"]))
    collate = ChatCollator(pad_token_id=pad_token_id)
    batches = []
    for b in range(0, calib_samples, batch_size):
        chunk = [{"input_ids": f["input_ids"]} for f in feats[b: b + batch_size]]
        out = collate(chunk)
        batches.append({"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]})
    return batches
