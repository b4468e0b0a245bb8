"""Logits only where a label is: the LM head runs on the positions whose next token is labelled.

A causal LM's head turns every position's hidden state into a vocabulary-wide row of logits, and
the loss reads only the rows whose next token carries a label (chat data labels the assistant's
tokens; padding is never labelled). The head is a fifth of SmolLM2's multiply-adds, and its logits
are the largest activation of a step: positions x vocabulary, upcast to fp32 for the loss (one
8 x 2,048 batch of Llama 3, vocabulary 128,256, takes 8 GiB). Selecting the labelled rows before
the head gives the same loss and gradients with that work and memory cut by the unlabelled share.

How: a forward pre-hook on the model's output layer (``get_output_embeddings()``) replaces its
input, hidden states ``(..., hidden)``, by the rows at ``rows`` (flat indices into the positions).
What a model does to its logits afterwards (Gemma's soft-capping, Cohere's scale) is elementwise,
so it works on the kept rows alike. Training passes the kept rows' targets as ``shift_labels``,
which transformers' causal-LM loss reads instead of shifting ``labels`` itself; the rest of the loss
(its reduction, ``num_items_in_batch``, a mixture of experts' router loss) stays the model's.

The rows are found on the host by the collator (``WithLabelledRows``), so a step has no device
sync for them; a batch that did not come through it is read on the device (one sync per forward).
A model the hook does not fit fails on the shapes, never silently: the trainer then turns the
selection off for the run with a warning and computes that step in full.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .data.chat import IGNORE_INDEX
# the collator's key: (rows, labels' shape); the trainer pops it before the model sees the batch
ROWS_KEY = "salientft_labelled_rows"


def next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target, flat: the next position's label (``IGNORE_INDEX`` after the last),
    the shift transformers' causal-LM loss makes."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)


def labelled_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, targets): the flat indices of the positions whose next token is labelled, and those
    tokens. Reads ``labels`` on the host (a device sync when they live on an accelerator)."""
    target = next_tokens(labels)
    rows = (target != IGNORE_INDEX).nonzero().squeeze(1)
    return rows, target.index_select(0, rows)


def output_layer(model: nn.Module) -> nn.Module | None:
    """The module that turns hidden states into logits, or None when the model names none."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def head_on_rows(head: nn.Module, rows: torch.Tensor, positions: int) -> Iterator[dict]:
    """While open, ``head`` sees only the hidden states at ``rows`` of its input's ``positions``
    positions; an input of another size passes unchanged (the loss then fails on the shapes, where
    an out-of-range index would abort a CUDA context). Yields ``{"calls": n}``, the calls it cut."""
    seen = {"calls": 0}

    def keep_rows(module, args):
        hidden = args[0]
        if not torch.is_tensor(hidden) or hidden.dim() < 2 or hidden.shape[:-1].numel() != positions:
            return None
        seen["calls"] += 1
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), *args[1:])

    handle = head.register_forward_pre_hook(keep_rows)
    try:
        yield seen
    finally:
        handle.remove()


class WithLabelledRows:
    """Wraps a collator: each batch also carries its labelled rows, found on the host (``ROWS_KEY``:
    the rows and the labels' shape, which tells the trainer the batch arrived whole)."""

    def __init__(self, collate: Callable[[list], dict]):
        self.collate = collate

    def __call__(self, features: list) -> dict:
        batch = self.collate(features)
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if torch.is_tensor(labels) and labels.dim() == 2 and labels.device.type == "cpu":
            batch[ROWS_KEY] = (labelled_rows(labels)[0], tuple(labels.shape))
        return batch

    def __getattr__(self, name):  # the wrapped collator's settings (pad_token_id, ...)
        if name == "collate":
            raise AttributeError(name)
        return getattr(self.collate, name)


def rows_for(labels: torch.Tensor, carried) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, targets) of a training batch: the collator's rows when they belong to these labels
    (same shape: not split across processes on the way), else found on the device."""
    if carried is not None and tuple(labels.shape) == tuple(carried[1]):
        rows = carried[0].to(labels.device, non_blocking=True)
        return rows, next_tokens(labels).index_select(0, rows)
    return labelled_rows(labels)


def labelled_logits(model: nn.Module, rows: torch.Tensor, **inputs) -> torch.Tensor:
    """The model's logits at ``rows`` only, ``(len(rows), vocabulary)``, for a forward without
    labels (held-out loss); a model the head hook does not fit is run in full and indexed."""
    positions = inputs["input_ids"].numel()
    head = output_layer(model)
    if head is not None:
        with head_on_rows(head, rows, positions):
            logits = model(**inputs).logits
        if logits.dim() == 2 and logits.shape[0] == rows.numel():
            return logits
        if logits.shape[:-1].numel() == positions:  # the hook never ran: these are the full logits
            return logits.reshape(-1, logits.shape[-1]).index_select(0, rows)
    logits = model(**inputs).logits
    return logits.reshape(-1, logits.shape[-1]).index_select(0, rows)
