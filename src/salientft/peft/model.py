"""GiftSWModel: the PEFT tuner that swaps targeted linear layers and fused MoE experts modules for
GIFT-SW tuner layers, registered in PEFT's mappings under the string peft type ``GIFT_SW`` (no PEFT fork)."""
from __future__ import annotations

import warnings

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists

from ..gift.adapter import fingerprint
from ..gift.model import warn_uncovered
from ..ops.experts import expert_projections, is_fused_experts
from ..targets import find_expert_weights, find_target_modules, is_linear_like
from .config import PEFT_TYPE, GiftSWConfig
from .layer import Experts, GiftSWLayer, Linear

try:  # what check_target_module_exists returns for an excluded module (PEFT >= 0.14)
    from peft.tuners.tuners_utils import _ExcludedModule
except ImportError:  # pragma: no cover - older PEFT has no exclude_modules
    _ExcludedModule = ()

PREFIX = "giftsw_"


def targeted_projections(config, module_name: str, experts) -> list[str]:
    """The fused projections of the experts module ``module_name`` that ``config`` targets, matched
    as PEFT matches module names: the module itself (``"experts"``: every projection) or a
    projection's full parameter name (``"experts.down_proj"``, ``"down_proj"``, a regex over
    ``model.layers.0.mlp.experts.down_proj``); ``exclude_modules`` works on both."""
    whole = check_target_module_exists(config, module_name)
    if isinstance(whole, _ExcludedModule):
        return []
    out = []
    for proj in expert_projections(experts):
        hit = check_target_module_exists(config, f"{module_name}.{proj}")
        if not isinstance(hit, _ExcludedModule) and (whole or hit):
            out.append(proj)
    return out


def fused_experts_modules(model) -> dict:
    """Every fused experts module of ``model`` by its name, seen through a GIFT-SW tuner layer that
    already wraps it (its ``base_layer``)."""
    return {n.removesuffix(".base_layer"): m for n, m in model.named_modules() if is_fused_experts(m)}


class GiftSWModel(BaseTuner):
    """GIFT-SW on a transformers model: ``get_peft_model(model, GiftSWConfig(...))``.

    Targets: linear layers (``Linear``) and fused MoE experts (``Experts``, one per experts module,
    with the targeted projections), the same set ``salientft.apply_gift`` trains by default.
    """

    prefix: str = PREFIX
    tuner_layer_cls = GiftSWLayer
    target_module_mapping: dict = {}  # GiftSWConfig defaults to "all-linear"

    def _check_target_module_exists(self, config, key):
        # An experts module is a target when one of its projections is (named by its parameter).
        experts = getattr(self, "_giftsw_experts", {}).get(key)
        if experts is not None:
            return bool(targeted_projections(config, key, experts))
        return check_target_module_exists(config, key)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, Experts):
            target.update_layer(adapter_name, config, current_key,
                                targeted_projections(config, current_key, target.get_base_layer()))
            return
        if isinstance(target, GiftSWLayer):
            target.update_layer(adapter_name, config, current_key)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if is_fused_experts(base):
            new = Experts(target, adapter_name, config, current_key, targeted_projections(config, current_key, base))
        elif is_linear_like(base):
            new = Linear(target, adapter_name, config, current_key)
        else:
            raise TypeError(f"GIFT-SW targets linear layers and fused MoE experts; {current_key} is a "
                            f"{type(base).__name__}")
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if is_fused_experts(new_module):  # unloading an Experts layer: its base module goes back as it was
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        config = self.peft_config[adapter_name]
        default = config.target_modules in (None, "all-linear")  # not the user's own subset
        if config.target_modules == "all-linear":
            # salientft's default set, not PEFT's "every linear but the output layer": the linear layers
            # of the transformer blocks (OPT-350m's project_in/project_out are outside them) and every
            # fused expert projection in them, named by its 3-D parameter, as apply_gift's adapters name it.
            # (a second adapter finds the first one's tuner layers: their base_layer is the target)
            experts = {f"{m.removesuffix('.base_layer')}.{p}" for m, _, p in
                       (n.rpartition(".") for n in find_expert_weights(model))}
            config.target_modules = {n.removesuffix(".base_layer") for n in find_target_modules(model)} | experts
        self._giftsw_experts = fused_experts_modules(model)
        if kwargs.get("state_dict") is not None:
            # PEFT takes a state dict's targets to be the module names before ".giftsw_"; a fused
            # projection's tensors sit under its parameter's name: name its experts module too (PEFT
            # reads only the keys).
            owners = {k.rsplit(f".{PREFIX}", 1)[0].rpartition(".")[0] for k in kwargs["state_dict"]}
            kwargs["state_dict"] = {**kwargs["state_dict"], **{
                f"{o}.{PREFIX}experts": None for o in owners if o.removeprefix("_orig_mod.") in self._giftsw_experts}}
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, GiftSWLayer)}
        # The base fingerprint, as salientft's own adapters carry it: recorded when the columns are
        # chosen, checked when a saved adapter is loaded (a warning: PEFT has no flag to force it).
        weights = {k: w for n, m in layers.items() for k, w in m.base_weights(n, adapter_name).items()}
        if weights and (not config.salient_indices_in_adapter or config.base_fingerprint):
            fp = fingerprint(weights)
            if not config.salient_indices_in_adapter:
                config.base_fingerprint = fp
            elif fp != config.base_fingerprint:
                warnings.warn(f"GIFT-SW adapter {adapter_name!r} was trained on other base weights than these "
                              "(base fingerprint mismatch): load the base it was trained from, not a merged or "
                              "other fine-tuned copy", stacklevel=2)
        if default:
            warn_uncovered(model, [c for n, m in layers.items() for c in m.covered(n)])
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
