"""Dense fine-tuning: every weight trains, in fp32 master weights. ``gmt`` is the same with
Gradient-Mask Tuning's mask on by default (docs/methods.md#gmt); the mask itself is a Trainer callback
that any method accepting it can run (``--mask-ratio``).

``--noise weight`` (or ``output``) adds GIFT-SW's noise to GIFT-SW's target layers during
training, every weight still training (the paper's ablation, docs/methods.md#gift-noise): the targets are
wrapped in ``gift.noisy_dense.NoisyLinear``, which keeps the original Parameters under their
names, and the outputs are written with the plain layers swapped back in. Default: no noise.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config_base import GMT_DEFAULT_RATIO
from ..gift.noisy_dense import apply_dense_noise, plain_layers
from .base import WholeModelMethod, _flag, register, save_plain_model
from .gift_sw import gift_settings

# Read only when the noise is on: the quantizer bits of its scale, keeping it for backward, the
# layers it goes to (GIFT-SW's targets).
NOISE_FIELDS = ("noise_bits", "keep_noise", "target_modules")


@register
class Full(WholeModelMethod):
    name = "full"
    summary = "full fine-tuning"
    dense = True
    default_noise = "none"
    uses = frozenset({"noise", *NOISE_FIELDS})

    def noise(self, config) -> str:
        return config.noise or self.default_noise

    def fields_used(self, config) -> frozenset[str]:
        used = super().fields_used(config)
        return used if self.noise(config) != "none" else used - set(NOISE_FIELDS)

    def validate(self, config) -> None:
        """GIFT-SW's noise settings only with the noise on (they are checked as GIFT-SW checks them)."""
        if self.noise(config) == "none":
            given = [f.name for f in dataclasses.fields(config)
                     if f.name in NOISE_FIELDS and getattr(config, f.name) != f.default]
            if given:
                flags = ", ".join(_flag(n) for n in given)
                raise ValueError(f"TrainConfig: method {self.name!r} reads {flags} only with GIFT-SW's noise; "
                                 f"add --noise weight, or remove {'it' if len(given) == 1 else 'them'}")
        super().validate(config)
        if self.noise(config) != "none":
            gift_settings(noise=self.noise(config), noise_bits=config.noise_bits, keep_noise=config.keep_noise,
                          target_modules=config.target_modules)

    def prepare(self, model, config, data=None, **_):
        for p in model.parameters():
            p.requires_grad_(True)
        if self.noise(config) != "none":
            apply_dense_noise(model, config.target_modules, noise=self.noise(config), noise_bits=config.noise_bits,
                              keep_noise=config.keep_noise)
        return model

    def save_output(self, model, tokenizer, config, out: Path) -> None:
        with plain_layers(model):  # a plain transformers model, whatever the noise wrapped
            save_plain_model(model, tokenizer, out / "model")


@register
class GMT(Full):
    name = "gmt"
    summary = "full fine-tuning with Gradient-Mask Tuning"
    default_mask_ratio = GMT_DEFAULT_RATIO
