"""Training methods behind one registry: ``get(name, quantized=False)``, ``names()``.

Families: GIFT-SW (``gift-sw``, ``salient``), the PEFT baselines (``lora``, ``dora``), dense
fine-tuning (``full``, ``gmt``) and recovery of a quantized model (``gift-sw``, ``salient``,
``ste``, ``lora`` with ``quantized=True``). To add a method, write one module here with a
``Method`` subclass decorated with ``@register`` and import it below; the contract test picks it up.
"""
from .base import Method, get, names, register, registered
from . import gift_sw, peft_baselines, dense, recovery  # noqa: E402,F401  (registers the methods)

__all__ = ["Method", "get", "names", "register", "registered"]
