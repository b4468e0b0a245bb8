"""Dense fine-tuning: every weight trains, in fp32 master weights. ``gmt`` is the same with
Gradient-Mask Tuning's mask on by default (METHODS.md 2); the mask itself is a Trainer callback
that any method accepting it can run (``--mask-ratio``).
"""
from __future__ import annotations

from pathlib import Path

from ..config_base import GMT_DEFAULT_RATIO
from .base import WholeModelMethod, register, save_plain_model


@register
class Full(WholeModelMethod):
    name = "full"
    summary = "full fine-tuning"
    dense = True

    def prepare(self, model, config, data=None, **_):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save_output(self, model, tokenizer, config, out: Path) -> None:
        save_plain_model(model, tokenizer, out / "model")


@register
class GMT(Full):
    name = "gmt"
    summary = "full fine-tuning with Gradient-Mask Tuning"
    default_mask_ratio = GMT_DEFAULT_RATIO
