"""Choosing GIFT-SW's columns with a calibration metric before ``get_peft_model``.

The shape of PEFT's ``preprocess_corda``: run calibration batches through the base model once,
compute the config's salience metric per targeted layer, and keep the scores on the config so
that ``get_peft_model`` selects the top-k columns from them. The scores are not serialised:
the adapter stores the chosen indices themselves.
"""
from __future__ import annotations

from ..gift.model import compute_scores
from ..ops.experts import is_fused_experts
from ..targets import find_expert_weights, find_target_modules


def _targeted_names(model, config) -> tuple[list[str], list[str]]:
    """(linear layer names, fused expert projection names) that ``config`` targets in ``model``,
    as ``get_peft_model`` will choose them."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from .model import fused_experts_modules, targeted_projections

    if config.target_modules == "all-linear":  # every linear layer and fused expert projection in the blocks
        return list(find_target_modules(model)), list(find_expert_weights(model))
    named = dict(model.named_modules())
    names = [n for n in named if n and not is_fused_experts(named[n]) and check_target_module_exists(config, n)]
    experts = [f"{n}.{p}" for n, m in fused_experts_modules(model).items()
               for p in targeted_projections(config, n, m)]
    return [n for n in names if n in find_target_modules(model, names)] if names else [], experts


def preprocess_gift_sw(model, config, calibration) -> dict:
    """Compute ``config.metric``'s scores on ``calibration`` (batches of input_ids/attention_mask)
    for every layer ``config`` targets in ``model`` and attach them to ``config``; returns them.
    A fused MoE expert projection is scored per expert, from the tokens routed to each expert
    ([experts, in] under its parameter's name), as ``salientft.apply_gift`` scores it."""
    names, experts = _targeted_names(model, config)
    if not names and not experts:
        raise ValueError(f"GiftSWConfig.target_modules={config.target_modules!r} matches no linear layer or fused "
                         "MoE experts of the model")
    scores = compute_scores(model, config, calibration, names, experts)
    object.__setattr__(config, "_salient_scores", scores)
    return scores
