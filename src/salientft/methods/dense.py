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
from dataclasses import dataclass
from pathlib import Path

from ..gift.noisy_dense import apply_dense_noise, plain_layers
from .base import WholeModelMethod, _flag, register, save_plain_model
from .gift_sw import DenseNoiseSettings

# Read only when the noise is on: the quantizer bits of its scale, keeping it for backward, the
# layers it goes to (GIFT-SW's targets).
NOISE_FIELDS = ("noise_bits", "keep_noise", "target_modules")


@dataclass
class FullMethodConfig(DenseNoiseSettings):
    """``full``'s settings: GIFT-SW's noise on the target layers, every weight still training (the
    paper's ablation); off by default, and its bits, keep and targets only with the noise on."""

    default_noise = "none"

    def check(self) -> None:
        if self.noise_mode() == "none":
            given = [f.name for f in dataclasses.fields(self)
                     if f.name in NOISE_FIELDS and getattr(self, f.name) != f.default]
            if given:
                flags = ", ".join(_flag(n) for n in given)
                raise ValueError(f"{type(self).__name__}: method {self.method_name!r} reads {flags} only with "
                                 "GIFT-SW's noise; "
                                 f"add --noise weight, or remove {'it' if len(given) == 1 else 'them'}")
        super().check()


@dataclass
class GMTMethodConfig(FullMethodConfig):
    """``gmt``'s settings: full's (the mask itself is the run's: ``TrainConfig.mask``)."""


@register
class Full(WholeModelMethod):
    name = "full"
    summary = "full fine-tuning"
    config_class = FullMethodConfig
    dense = True

    def prepare(self, model, config, data=None, **_):
        s = config.method_config
        for p in model.parameters():
            p.requires_grad_(True)
        if s.noise_mode() != "none":
            apply_dense_noise(model, s.target_modules, noise=s.noise_mode(), noise_bits=s.noise_bits,
                              keep_noise=s.keep_noise)
        return model

    def save_output(self, model, tokenizer, config, out: Path) -> None:
        with plain_layers(model):  # a plain transformers model, whatever the noise wrapped
            save_plain_model(model, tokenizer, out / "model")


@register
class GMT(Full):
    name = "gmt"
    summary = "full fine-tuning with Gradient-Mask Tuning"
    config_class = GMTMethodConfig
    mask_by_default = True
