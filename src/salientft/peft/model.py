"""GiftSWModel: the PEFT tuner that swaps targeted linear layers for GIFT-SW tuner layers,
registered in PEFT's mappings under the string peft type ``GIFT_SW`` (no PEFT fork)."""
from __future__ import annotations

import warnings

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ..gift.adapter import fingerprint
from ..gift.model import warn_uncovered
from ..ops.experts import is_fused_experts
from ..targets import find_target_modules, is_linear_like
from .config import PEFT_TYPE, GiftSWConfig
from .layer import GiftSWLayer, Linear

PREFIX = "giftsw_"


class GiftSWModel(BaseTuner):
    """GIFT-SW on a transformers model: ``get_peft_model(model, GiftSWConfig(...))``."""

    prefix: str = PREFIX
    tuner_layer_cls = GiftSWLayer
    target_module_mapping: dict = {}  # GiftSWConfig defaults to "all-linear"

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, GiftSWLayer):
            target.update_layer(adapter_name, config, current_key)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if is_fused_experts(base):
            raise TypeError(f"GIFT-SW's PEFT tuner wraps linear layers; {current_key} holds fused MoE experts "
                            f"({type(base).__name__}), which salientft.apply_gift / salientft train do train: use that "
                            "route for them, or target only linear layers here")
        if not is_linear_like(base):
            raise TypeError(f"GIFT-SW targets linear layers; {current_key} is a {type(base).__name__}")
        new = Linear(target, adapter_name, config, current_key)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new, target)

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        config = self.peft_config[adapter_name]
        default = config.target_modules in (None, "all-linear")  # not the user's own subset
        if config.target_modules == "all-linear":
            # salientft's default set, not PEFT's "every linear but the output layer": the linear layers
            # of the transformer blocks (OPT-350m's project_in/project_out are outside them).
            # (a second adapter finds the first one's tuner layers: their base_layer is the target)
            config.target_modules = {n.removesuffix(".base_layer") for n in find_target_modules(model)}
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        # The base fingerprint, as salientft's own adapters carry it: recorded when the columns are
        # chosen, checked when a saved adapter is loaded (a warning: PEFT has no flag to force it).
        weights = {n: m.base_weight() for n, m in model.named_modules()
                   if isinstance(m, GiftSWLayer) and adapter_name in m.giftsw_weight}
        if weights and (not config.salient_indices_in_adapter or config.base_fingerprint):
            fp = fingerprint(weights)
            if not config.salient_indices_in_adapter:
                config.base_fingerprint = fp
            elif fp != config.base_fingerprint:
                warnings.warn(f"GIFT-SW adapter {adapter_name!r} was trained on other base weights than these "
                              "(base fingerprint mismatch): load the base it was trained from, not a merged or "
                              "other fine-tuned copy", stacklevel=2)
        if default:
            wrapped = [n for n, m in model.named_modules() if isinstance(m, GiftSWLayer)]
            warn_uncovered(model, wrapped, hint="the PEFT route wraps linear layers only; salientft.apply_gift "
                                                "(salientft train) also trains fused MoE experts")
        # The columns are chosen: a saved adapter carries them, and loading it must not re-select.
        config.salient_indices_in_adapter = True


def register() -> None:
    """Put GIFT-SW into PEFT's config, tuner and prefix mappings (idempotent).

    ``peft.register_peft_method`` accepts only names of PEFT's own ``PeftType`` enum, but the
    mappings themselves accept a string key (huggingface/peft#2634), which is all that
    ``get_peft_model``, ``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and the
    adapter state-dict functions look up.
    """
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = GiftSWConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = GiftSWModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX
