"""Perplexity of a model on text, with the standard strided sliding window.

Texts are joined with a blank line into one token stream (as the Hugging Face perplexity guide
does); windows of ``max_length`` tokens advance by ``stride`` and score only the tokens not
scored by the previous window, each conditioned on up to ``max_length - stride`` tokens before it.
The LM head runs on the scored positions only (``labelled_logits``): the others' logits are never
computed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import torch


def _texts(texts_or_file) -> list[str]:
    if isinstance(texts_or_file, (str, os.PathLike)):
        path = Path(texts_or_file)
        if not path.is_file():
            raise FileNotFoundError(f"perplexity text file {path} does not exist (give a UTF-8 text file)")
        return [path.read_text(encoding="utf-8")]
    texts = list(texts_or_file)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("perplexity takes a list of strings or a path to a text file")
    return texts


def perplexity(model, tokenizer, texts_or_file: str | os.PathLike | Iterable[str], max_length: int = 1024,
               stride: int | None = None, batch_size: int = 4, progress: bool = True) -> dict:
    """{"perplexity", "nll_per_token", "tokens", "windows", "max_length", "stride"} on the text.

    ``stride`` defaults to ``max_length // 2``; at most ``max_length - 1``, so that every window
    starts inside the previous one and every token after the first is scored exactly once.
    """
    from tqdm.auto import tqdm

    texts = [t for t in _texts(texts_or_file) if t.strip()]
    if not texts:
        raise ValueError("no text to compute perplexity on (empty input)")
    stride = stride or max(1, max_length // 2)
    if max_length < 2 or not 1 <= stride < max_length:
        raise ValueError(f"need max_length >= 2 and 1 <= stride < max_length ({max_length}), got stride {stride}")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=True)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    n = ids.numel()
    if n < 2:
        raise ValueError("the text is a single token; perplexity needs at least two")
    # windows: (start, end, first scored target position)
    windows, prev_end, start = [], 0, 0
    while True:
        end = min(start + max_length, n)
        windows.append((start, end, max(prev_end, start + 1)))
        prev_end = end
        if end == n:
            break
        start += stride
    from ..labelled_logits import labelled_logits

    device = next(model.parameters()).device
    # summed on the model's device and read once at the end: no host sync per batch
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
                chunk = windows[s:s + batch_size]
                T = max(e - b for b, e, _ in chunk)
                inp = torch.zeros((len(chunk), T), dtype=torch.long)
                att = torch.zeros((len(chunk), T), dtype=torch.long)
                for i, (b, e, _) in enumerate(chunk):
                    inp[i, :e - b] = ids[b:e]
                    att[i, :e - b] = 1
                keep = torch.zeros((len(chunk), T), dtype=torch.bool)  # positions that predict a target
                for i, (b, e, first) in enumerate(chunk):
                    keep[i, first - b - 1:e - b - 1] = True
                rows = keep.reshape(-1).nonzero().squeeze(1)  # on the host; the head computes only these
                logits = labelled_logits(model, rows.to(device), input_ids=inp.to(device),
                                         attention_mask=att.to(device), use_cache=False)
                lp = torch.log_softmax(logits.float(), dim=-1)
                tgt = torch.cat([ids[first:e] for b, e, first in chunk]).to(lp.device)
                total -= lp.gather(1, tgt[:, None]).sum()
                count += tgt.numel()
    finally:
        model.train(was_training)
    nll = float(total)
    return {
        "perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count,
        "windows": len(windows), "max_length": max_length, "stride": stride,
    }


def heldout_texts(tokenizer=None, limit: int | None = None) -> list[str]:
    """The held-out split of the embedded instruction data (salientft.data.instruct)."""
    try:
        from ..data.instruct import heldout_texts as _heldout
    except ImportError as e:
        raise ImportError(f"--perplexity heldout needs salientft.data.instruct.heldout_texts ({e})") from None
    return _heldout(tokenizer=tokenizer, limit=limit)
