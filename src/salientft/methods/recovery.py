"""Recovery of a model written by ``salientft quantize`` (docs/methods.md#quantization-recovery) and its baselines.

``gift-sw`` / ``salient`` train the 16-bit salient columns the quantization kept (noise on the
integer columns at the 4-bit step, or none); ``ste`` trains every weight through the fixed-grid
fake quantization; ``lora`` trains LoRA on the frozen quantized model. The 16-bit tensors train
in fp32 and are cast back on saving; the finished run writes a quantized ``model/`` folder
(``lora``: a PEFT ``adapter/`` for the quantized base; it cannot be merged into integers).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config_base import QUANTIZED_NOISE_MODES
from ..quant.model import prepare_gift_recovery, save_quantized
from ..quant.ste import apply_lora_quantized, apply_ste, register_quantized_lora, ste_to_quantized
from .base import Method, MethodConfig, WholeModelMethod, register
from .gift_sw import NoiseSettings, refuse_noise
from .peft_baselines import LoRASettings, attach_peft_adapter, lora_alpha, require_peft, save_peft_adapter


@dataclass
class RecoverGiftSWConfig(NoiseSettings):
    """``gift-sw --quantized``'s settings: the noise on the integer columns (the salient columns are
    the ones quantization kept). A quantized layer has no output noise."""

    NOISE_MODES = QUANTIZED_NOISE_MODES


@dataclass
class RecoverSalientConfig(RecoverGiftSWConfig):
    """``salient --quantized``: no noise."""

    default_noise = "none"

    def check(self) -> None:
        refuse_noise(self)
        super().check()


@dataclass
class STEConfig(MethodConfig):
    """``ste``: no settings of its own."""


@dataclass
class RecoverLoRAConfig(LoRASettings):
    """``lora --quantized``: LoRA's rank, scale and dropout, on every quantized layer."""


def fp32_trainable(model):
    """Train the 16-bit tensors of a quantized model in fp32: an AdamW step of 1e-4 on a bf16 weight
    of magnitude 0.05 is below half its spacing and would be rounded away. Cast back on saving."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return model


def cast_trainable_back(model, dtype) -> None:
    for p in model.parameters():
        if p.dtype == torch.float32 and p.dtype != dtype:
            p.data = p.data.to(dtype)


class QuantizedOutput(WholeModelMethod):
    """A recovery method whose finished run is a whole quantized model in ``model/``."""

    quantized = True

    def to_quantized(self, model):
        """The model as it is saved (STE rounds its weights back onto the grid)."""
        return model

    def save_output(self, model, tokenizer, config, out: Path) -> None:
        model = self.to_quantized(model)
        cast_trainable_back(model, model.get_input_embeddings().weight.dtype)  # as stored before training
        save_quantized(model, out / "model", tokenizer=tokenizer, base_model=config.model)


@register
class RecoverGiftSW(QuantizedOutput):
    name = "gift-sw"
    summary = "train the 16-bit salient columns with noise on the integer columns"
    config_class = RecoverGiftSWConfig
    default_lr = 1e-4

    def prepare(self, model, config, data=None, **_):
        s = config.method_config
        return fp32_trainable(prepare_gift_recovery(model, noise=s.noise_mode(), noise_bits=s.noise_bits))


@register
class RecoverSalient(RecoverGiftSW):
    name = "salient"
    summary = "train the 16-bit salient columns, no noise"
    config_class = RecoverSalientConfig


@register
class STE(QuantizedOutput):
    name = "ste"
    summary = "straight-through training of every weight on the fixed quantization grid"
    config_class = STEConfig

    def prepare(self, model, config, data=None, **_):
        return fp32_trainable(apply_ste(model))

    def to_quantized(self, model):
        return ste_to_quantized(model)


@register
class RecoverLoRA(Method):
    name = "lora"
    quantized = True
    summary = "LoRA on the frozen quantized model"
    config_class = RecoverLoRAConfig
    requires = ("peft",)
    accepts_mask = False

    def prepare(self, model, config, data=None, **_):
        require_peft("LoRA recovery")
        s = config.method_config
        return apply_lora_quantized(model, r=s.lora_r, lora_alpha=lora_alpha(s), lora_dropout=s.lora_dropout)

    def save_output(self, model, tokenizer, config, out: Path) -> None:
        save_peft_adapter(model, out)

    def attach(self, base, out: Path, check_base: bool = True):
        peft = require_peft("LoRA recovery")
        directory = Path(out) / "adapter"
        return attach_peft_adapter(base, directory, register_quantized_lora(peft.LoraConfig.from_pretrained(str(directory))))
