"""Recovery baselines of docs/methods.md#quantization-recovery: STE training of all weights, and LoRA on the frozen
quantized model (through PEFT).

STE: every target weight becomes trainable; the forward uses its fake-quantized value
(scale * clamp(round(w / scale))) on the non-salient columns with the scales held fixed (the
quantized model's, so training starts exactly from the quantized model) and the salient
columns unquantized; backward passes the gradient straight through the rounding.
``ste_to_quantized`` rounds the trained weights back onto the same grid.

LoRA: PEFT has no LoRA layer for a custom quantized module, but accepts one through
``LoraConfig._register_custom_module``; ``QuantizedLoraLinear`` is that layer (frozen quantized
base plus the usual A/B path). Merging into the integer weights is not possible (it would need
requantization), so ``merge`` raises.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dtype import compute_dtype
from ..ops.salient import bias_grad, complement, remember_for_backward, salient_indices, weight_grad
from ..targets import find_target_modules, linear_weight, set_module
from .gptq import expand_groups, group_scales
from .layer import QuantizedSalientLinear
from .packing import check_bits


class _STEMatmul(torch.autograd.Function):
    """y = x fq(W)^T + b; dW = g^T x (straight through). fq(W) is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        dtype = compute_dtype(x)
        xd = x.to(dtype)
        w = layer.fake_quant_weight(dtype)
        y = F.linear(xd, w, bias.to(dtype) if bias is not None else None)
        ctx.save_for_backward(xd)
        ctx.layer = layer
        remember_for_backward(ctx, x, bias, dtype, seed=None)  # no noise: fq(W) is recomputed, not drawn
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (xd,) = ctx.saved_tensors
        layer = ctx.layer
        g = grad_y.to(ctx.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g.matmul(layer.fake_quant_weight(ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(g, xd, layer.weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = bias_grad(g, ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


class STELinear(nn.Module):
    """A linear layer trained with fake quantization (fixed scales) and a straight-through gradient."""

    def __init__(self, weight: torch.Tensor, bias, scale: torch.Tensor, salient_idx, bits: int,
                 group_size: int | None = None):
        super().__init__()
        self.bits = check_bits(bits)
        self.group_size = group_size
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = bias
        idx = salient_indices(torch.as_tensor(salient_idx).cpu(), self.in_features, allow_empty=True)
        self.register_buffer("salient_idx", idx.to(weight.device))
        self.register_buffer("int_idx", complement(idx, self.in_features).to(weight.device), persistent=False)
        self.register_buffer("scale", scale.detach().float().clone())

    @classmethod
    def from_quantized(cls, layer: QuantizedSalientLinear) -> "STELinear":
        w = layer.dequantized_weight(layer.salient_weight.dtype)
        bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None
        return cls(nn.Parameter(w), bias, layer.scale, layer.salient_idx, layer.bits, layer.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, k={self.salient_idx.numel()}")

    def integers(self) -> torch.Tensor:
        w = self.weight.detach().float()[:, self.int_idx]
        s = expand_groups(self.scale, self.int_idx.numel(), self.group_size)
        return torch.clamp(torch.round(w / s), -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1)

    def fake_quant_weight(self, dtype) -> torch.Tensor:
        s = expand_groups(self.scale, self.int_idx.numel(), self.group_size)
        w = self.weight.detach().to(dtype).clone()
        w.index_copy_(1, self.int_idx, (self.integers() * s).to(dtype))
        return w

    def forward(self, x):
        return _STEMatmul.apply(x, self.weight, self.bias, self)

    @torch.no_grad()
    def to_quantized(self) -> QuantizedSalientLinear:
        """Round the trained weight onto the fixed grid: a QuantizedSalientLinear."""
        return QuantizedSalientLinear.from_integers(
            self.integers().to(torch.int8), self.scale, self.salient_idx,
            self.weight[:, self.salient_idx], self.bias, self.bits, self.group_size, dtype=self.weight.dtype,
        )


def apply_ste(model: nn.Module, bits: int | None = None, group_size: int | None = None,
              target_modules=None) -> nn.Module:
    """Make every target weight trainable under fake quantization (STE); freeze the rest.

    On a quantized model (QuantizedSalientLinear layers) the layers' own grid is used and
    ``bits``/``group_size`` must be None or match. On a plain model, ``bits`` is required and the
    scales come from the MSE clip search of docs/methods.md#row-quantizer (per row or per group),
    with no salient columns.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedSalientLinear)}
    if quantized:
        for n, m in quantized.items():
            if bits is not None and bits != m.bits:
                raise ValueError(f"{n} is quantized at {m.bits} bits, not {bits}; omit bits for a quantized model")
            set_module(model, n, STELinear.from_quantized(m))
    else:
        if bits is None:
            raise ValueError("apply_ste on an unquantized model needs bits=2, 3, 4 or 8")
        check_bits(bits)
        for n, m in find_target_modules(model, target_modules).items():
            if not isinstance(m, nn.Linear):
                raise ValueError(f"{n}: STE supports nn.Linear only, got {type(m).__name__}")
            scale = group_scales(linear_weight(m).detach().float(), bits, group_size)
            set_module(model, n, STELinear(m.weight, m.bias, scale, torch.zeros(0, dtype=torch.long), bits,
                                            group_size))
    for m in model.modules():
        if isinstance(m, STELinear):
            m.weight.requires_grad_(True)
    return model


def ste_to_quantized(model: nn.Module) -> nn.Module:
    """Replace every STELinear by the QuantizedSalientLinear of its rounded weights (in place)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, STELinear)}
    if not layers:
        raise ValueError("model has no STE layers: call apply_ste first")
    for n, m in layers.items():
        set_module(model, n, m.to_quantized())
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---- LoRA on the frozen quantized model -------------------------------------------------------
def _lora_layer_class():
    from peft.tuners.lora.layer import LoraLayer

    class QuantizedLoraLinear(nn.Module, LoraLayer):
        """LoRA A/B path on top of a frozen QuantizedSalientLinear (PEFT custom module)."""

        def __init__(self, base_layer, adapter_name, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            if config.use_dora:
                raise ValueError("DoRA is not supported on quantized layers")
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def forward(self, x, *args, **kwargs):
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A.keys():
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, a.weight.dtype)
                out = b(a(self.lora_dropout[name](xa))) * self.scaling[name]
                result = result + out.to(result.dtype)
            return result

        def merge(self, *args, **kwargs):
            raise AttributeError("LoRA cannot be merged into the integer weights of a quantized layer")

        def unmerge(self, *args, **kwargs):
            raise AttributeError("LoRA on a quantized layer is never merged")

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return QuantizedLoraLinear


_LORA_CLASS = None


def quantized_lora_class():
    """The PEFT LoRA layer class for QuantizedSalientLinear (built once, on first use)."""
    global _LORA_CLASS
    if _LORA_CLASS is None:
        _LORA_CLASS = _lora_layer_class()
    return _LORA_CLASS


def register_quantized_lora(lora_config):
    """Teach a peft ``LoraConfig`` to wrap QuantizedSalientLinear layers; returns the config."""
    lora_config._register_custom_module({QuantizedSalientLinear: quantized_lora_class()})
    return lora_config


def apply_lora_quantized(model: nn.Module, r: int = 64, lora_alpha: int = 16, lora_dropout: float = 0.0,
                         target_modules=None, **lora_kwargs):
    """Frozen quantized model + LoRA (PEFT) on every quantized layer; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    layers = [n for n, m in model.named_modules() if isinstance(m, QuantizedSalientLinear)]
    if not layers:
        raise ValueError("model has no quantized layers: call salientft.quantize or load_quantized first")
    if target_modules is None:
        target_modules = sorted({n.rsplit(".", 1)[-1] for n in layers})
    cfg = register_quantized_lora(LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                             target_modules=target_modules, **lora_kwargs))
    for p in model.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return get_peft_model(model, cfg)
