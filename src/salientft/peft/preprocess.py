"""Choosing GIFT-SW's columns with a calibration metric before ``get_peft_model``.

The shape of PEFT's ``preprocess_corda``: run calibration batches through the base model once,
compute the config's salience metric per targeted layer, and keep the scores on the config so
that ``get_peft_model`` selects the top-k columns from them. The scores are not serialised:
the adapter stores the chosen indices themselves.
"""
from __future__ import annotations

from ..calibration import collect_activation_stats
from ..saliency import STATLESS_METRICS, saliency_scores
from ..targets import find_target_modules


def _targeted_names(model, config) -> list[str]:
    from peft.tuners.tuners_utils import check_target_module_exists

    if config.target_modules == "all-linear":
        return list(find_target_modules(model))  # every linear layer inside the blocks
    names = [n for n, _ in model.named_modules() if check_target_module_exists(config, n)]
    return [n for n in names if n in find_target_modules(model, names)]


def preprocess_gift_sw(model, config, calibration) -> dict:
    """Compute ``config.metric``'s scores on ``calibration`` (batches of input_ids/attention_mask)
    for every layer ``config`` targets in ``model`` and attach them to ``config``; returns them."""
    names = _targeted_names(model, config)
    if not names:
        raise ValueError(f"GiftSWConfig.target_modules={config.target_modules!r} matches no linear layer of the model")
    stats = None
    if config.metric not in STATLESS_METRICS:
        stats = collect_activation_stats(model, calibration, target_modules=names)
    scores = saliency_scores(model, stats, metric=config.metric, bits=4, seed=config.seed, target_modules=names)
    object.__setattr__(config, "_salient_scores", scores)
    return scores
