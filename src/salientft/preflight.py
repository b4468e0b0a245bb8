"""Refusals before any weight loads: what the model's config, its tokenizer and the data can tell.

A setting that only the model can contradict (``--n-salient`` wider than a layer, a
``--target-modules`` name or regex that matches nothing, data whose every record loses its
assistant tokens at ``--max-length``) used to be found after the weights had loaded and
calibration had run. Here the model is built from its config on the ``meta`` device
(:func:`salientft.models.model_skeleton`: module names and shapes, no memory), the tokenizer is
loaded alone, and the same functions that will run later (target resolution, ``salient_count``,
tokenization) run on them first, so the error is the same, only minutes earlier.

Where the config cannot be had without loading (the embedded preset before its first
conversion, a folder from ``salientft quantize``), the checks run as before, after loading.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .config import TrainConfig
from .config_base import salient_count
from .models import load_tokenizer, model_skeleton
from .targets import in_features_of, resolve_targets

log = logging.getLogger(__name__)


def check_targets(skeleton, target_modules=None, *, n_salient: int | None = None,
                  salient_fraction: float | None = None, salient: bool = True, quantized: bool = False) -> dict:
    """Resolve ``target_modules`` on ``skeleton`` (a meta-device model) and, with ``salient``, the k of
    every target layer (``salient_count``); returns {name: k} (or {name: None}). Raises the errors
    the real run would raise: a name or regex that matches nothing, k wider than a layer."""
    targets = resolve_targets(skeleton, target_modules)
    if not salient:
        return dict.fromkeys(targets)
    return {n: salient_count(in_features_of(m), n_salient, salient_fraction, name=n, quantized=quantized)
            for n, m in targets.items()}


def check_model_settings(model: str, target_modules=None, *, n_salient: int | None = None,
                         salient_fraction: float | None = None, salient: bool = True, quantized: bool = False,
                         trust_remote_code: bool = False) -> dict | None:
    """:func:`check_targets` on ``model``'s skeleton; None when it cannot be built before loading."""
    skeleton = model_skeleton(model, trust_remote_code=trust_remote_code)
    if skeleton is None:
        return None
    return check_targets(skeleton, target_modules, n_salient=n_salient, salient_fraction=salient_fraction,
                         salient=salient, quantized=quantized)


@dataclass
class TrainReady:
    """What :func:`check_train` prepared before the weights: the tokenized data (None when no
    tokenizer could be had without the model) and the target layers' k."""

    train_ds: object = None
    held_ds: object = None
    targets: dict | None = None


def check_train(config: TrainConfig, train_convs, held_convs=None, *, tokenizer=None, model=None) -> TrainReady:
    """Everything ``salientft train`` can refuse from the config, the data and the model's config,
    before the weights load: the method's target layers (names, regexes) and GIFT-SW's k on the
    model's skeleton, and the data tokenized at ``max_length``.

    Data longer than ``max_length`` is truncated (keeping the start, as documented); a record whose
    assistant tokens all fall beyond it has nothing to train on: such records are dropped with a
    warning that counts them, and if none is left the run is refused here. ``model``: an already
    loaded base (its own modules are checked instead of a skeleton).
    """
    method = config.training_method
    ready = TrainReady()
    used = method.declared()
    if not method.quantized and "target_modules" in used:
        skeleton = model if model is not None else model_skeleton(
            method.base_source(config), trust_remote_code=config.trust_remote_code)
        if skeleton is not None:
            ready.targets = check_targets(skeleton, config.target_modules, n_salient=config.n_salient,
                                          salient_fraction=config.salient_fraction,
                                          salient="n_salient" in used)
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(method.base_source(config), trust_remote_code=config.trust_remote_code)
        except Exception as e:  # noqa: BLE001 (offline, a folder without one): loading the model says it
            log.debug("no tokenizer of %s before loading the model: %s", method.base_source(config), e)
    if tokenizer is None:
        return ready
    ready.train_ds, ready.held_ds = tokenize_datasets(config, train_convs, held_convs, tokenizer)
    return ready


def tokenize_datasets(config, train_convs, held_convs, tokenizer):
    """(training set, held-out set or None) of a run, tokenized: a held-out split that leaves no
    trainable token is dropped rather than refused (the run only reports no held-out loss)."""
    from .data.chat import dataset_from_conversations

    train_ds = dataset_from_conversations(train_convs, tokenizer, max_length=config.max_length,
                                          packing=config.packing)
    try:
        held_ds = (dataset_from_conversations(held_convs, tokenizer, max_length=config.max_length)
                   if held_convs else None)
    except (ValueError, KeyError):
        held_ds = None
    return train_ds, held_ds


__all__ = ["check_train", "check_targets", "check_model_settings", "TrainReady"]
