"""Training methods behind one registry: ``get(name, quantized=False)``, ``names()``.

Families: GIFT-SW (``gift-sw``, ``salient``), the PEFT baselines (``lora``, ``dora``), dense
fine-tuning (``full``, ``gmt``) and recovery of a quantized model (``gift-sw``, ``salient``,
``ste``, ``lora`` with ``quantized=True``). To add a method, write one module here with a
``Method`` subclass decorated with ``@register`` (its settings in a ``MethodConfig`` subclass
beside it: they become flags and YAML keys, docs/configuration.md) and import it below; the
contract test picks it up.
"""
from .base import Method, MethodConfig, get, names, register, registered
from . import gift_sw, peft_baselines, dense, recovery  # noqa: E402,F401  (registers the methods)
from .dense import FullMethodConfig, GMTMethodConfig
from .gift_sw import GiftSWMethodConfig, SalientMethodConfig
from .peft_baselines import DoRAMethodConfig, LoRAMethodConfig
from .recovery import RecoverGiftSWConfig, RecoverLoRAConfig, RecoverSalientConfig, STEConfig

__all__ = ["Method", "MethodConfig", "get", "names", "register", "registered", "GiftSWMethodConfig",
           "SalientMethodConfig", "LoRAMethodConfig", "DoRAMethodConfig", "FullMethodConfig", "GMTMethodConfig",
           "RecoverGiftSWConfig", "RecoverSalientConfig", "STEConfig", "RecoverLoRAConfig"]
