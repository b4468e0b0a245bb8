"""NoisyLinear: a fully trainable linear layer under GIFT-SW's noise, for dense fine-tuning.

Why it exists: docs/methods.md#gift-noise reports that the paper's noise helps salient-only training and
hurts full fine-tuning (LLaMA2-7B: 71.97 without, 71.64 with). To reproduce that ablation the
dense methods (``full``, ``gmt``) can train every weight while each training forward of a target
layer uses ``W + diag(Delta / 2) * Omega``, Omega ~ N(0, 1) fresh every forward, Delta_i the
per-row step of the quantizer of docs/methods.md#row-quantizer at ``noise_bits`` over all columns (there are no salient
columns), computed once before training by the same function GIFT-SW uses (``noise_std_for``).

Why a custom autograd function: autograd through an explicit ``W + noise`` would keep an
(out x in) noise matrix per layer alive until backward. Here the noise comes from
``ops.noise`` exactly as in ``SalientLinear``, with an empty salient index: drawn in row blocks
from a 64-bit seed in forward and drawn again from that seed in backward (bit-identical), so
backward keeps only the input, the weight (which lives anyway) and the seed. ``keep_noise``
keeps the noisy weight instead (one (out, in) tensor in the compute dtype until backward). The
weight gradient is g^T x over all columns; the input gradient uses the noisy weight.

``noise="output"`` is the same Gaussian moved to the output (``gift.layer.output_noise`` with no
salient columns: per token and output, (Delta_i / 2) * ||x||_2 * xi). In eval mode the layer is
the plain layer: no noise.

The wrapper holds the original module's own ``weight`` and ``bias`` Parameters under the same
names, and its ``noise_std`` buffer is not persistent, so state dicts, optimizer parameter names,
checkpoints and FSDP paths are those of the plain model; :func:`plain_layers` swaps plain modules
(sharing the same Parameters) back in, e.g. around ``save_pretrained``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..config_base import NOISE_MODES
from ..ops.dtype import compute_dtype
from ..ops.noise import draw_seed, noisy_forward, noisy_input_grad
from ..ops.salient import bias_grad, noise_scale, remember_for_backward, weight_grad
from ..targets import find_target_modules, is_linear_like, linear_weight, set_module
from .layer import output_noise
from .model import noise_std_for

DENSE_NOISE_MODES = tuple(m for m in NOISE_MODES if m != "none")


def _no_columns(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty salient index and its (out, 0) "salient weight": ops.noise then perturbs every column."""
    return torch.empty(0, dtype=torch.long, device=weight.device), weight[:, :0]


class _NoisyDenseMatmul(torch.autograd.Function):
    """y = x (W + noise)^T + b, the noise drawn from ``seed``; gradients for x, W and b.

    Saved for backward: x in the compute dtype (only when W needs a gradient), references to W
    and the noise scale, the seed; never an (out, in) tensor unless ``keep_noise`` asks for one.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, noise_std, seed, keep_noise=False):
        dtype = compute_dtype(x)
        xd = x.to(dtype)
        idx, none = _no_columns(weight)
        keep = bool(keep_noise) and ctx.needs_input_grad[0]  # nothing to keep it for otherwise
        y, kept = noisy_forward(xd, weight, none, idx, noise_std, seed, dtype, keep=keep)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(xd if ctx.needs_input_grad[1] else None, weight, noise_std, kept)
        remember_for_backward(ctx, x, bias, dtype, seed)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xd, weight, noise_std, kept = ctx.saved_tensors
        g = grad_y.to(ctx.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            idx, none = _no_columns(weight)
            grad_x = noisy_input_grad(g.reshape(-1, g.shape[-1]), weight, none, idx, noise_std, ctx.seed, ctx.dtype,
                                      kept=kept).view(*g.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(g, xd, weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = bias_grad(g, ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None


def noisy_dense_linear(x, weight, bias, noise_std, seed, keep_noise=False):
    """y = x (W + diag(noise_std) * Omega)^T + b with Omega ~ N(0, 1) drawn from ``seed`` by
    ``ops.noise`` (``weight``: (out, in)); backward draws Omega again from the seed, or uses the
    noisy weight forward kept with ``keep_noise``."""
    return _NoisyDenseMatmul.apply(x, weight, bias, noise_std, seed, keep_noise)


class NoisyLinear(nn.Module):
    """nn.Linear or transformers' Conv1D whose every weight trains under GIFT-SW's noise.

    ``weight`` and ``bias`` are the original module's Parameters (shared, their ``requires_grad``
    untouched); ``noise_std`` (out,) is Delta_i / 2, a non-persistent buffer.
    """

    def __init__(self, base: nn.Module, noise_std, noise: str = "weight", keep_noise: bool = False):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"NoisyLinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        if noise not in DENSE_NOISE_MODES:
            raise ValueError(f"noise must be one of {DENSE_NOISE_MODES}, got {noise!r}")
        if keep_noise and noise != "weight":
            raise ValueError(f"keep_noise keeps the weight noise for backward: it needs noise='weight', not {noise!r}")
        self.is_conv1d = not isinstance(base, nn.Linear)
        self.base_class = type(base)
        self.weight = base.weight
        self.bias = base.bias
        self.out_features, self.in_features = self.base_weight().shape
        self.register_buffer("noise_std", noise_scale(noise_std, self.out_features, self.weight.device),
                             persistent=False)
        self.noise = noise
        self.keep_noise = bool(keep_noise)
        self.train(base.training)  # a model in eval mode stays noise-free until model.train()

    def base_weight(self) -> torch.Tensor:
        """The weight as an (out, in) view (Conv1D stores it transposed)."""
        return self.weight.t() if self.is_conv1d else self.weight

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's own forward (Conv1D's addmm on the (in, out) weight)."""
        if self.is_conv1d:
            y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.plain(x)
        if self.noise == "output":
            y = self.plain(x)
            idx, _ = _no_columns(self.weight)
            return y + output_noise(x, y, idx, self.noise_std)
        return noisy_dense_linear(x, self.base_weight(), self.bias, self.noise_std, draw_seed(), self.keep_noise)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, noise={self.noise!r}, "
                f"bias={self.bias is not None}")

    def to_base(self) -> nn.Module:
        """A plain module of the original class holding this layer's Parameters (no copy)."""
        with torch.device("meta"):  # throwaway init; the real Parameters are put in below
            base = (self.base_class(self.out_features, self.in_features) if self.is_conv1d
                    else nn.Linear(self.in_features, self.out_features, bias=self.bias is not None))
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias
        base.train(self.training)
        return base


def noisy_layers(model: nn.Module) -> dict[str, NoisyLinear]:
    """Every NoisyLinear of ``model`` by full module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, NoisyLinear)}


@torch.no_grad()
def apply_dense_noise(model: nn.Module, target_modules=None, noise: str = "weight", noise_bits: int = 4,
                      keep_noise: bool = False) -> nn.Module:
    """Replace every target linear layer (GIFT-SW's targets: ``targets.find_target_modules``) by a
    NoisyLinear with noise_std = Delta / 2 at ``noise_bits`` over all columns, in place. Parameters
    and their ``requires_grad`` are unchanged. Returns the model."""
    if noisy_layers(model):
        raise ValueError("this model already has noisy dense layers; load a fresh base")
    no_columns = torch.empty(0, dtype=torch.long)
    for name, module in find_target_modules(model, target_modules).items():
        w = linear_weight(module).detach()
        std = noise_std_for(w, no_columns.to(w.device), noise_bits)
        set_module(model, name, NoisyLinear(module, std, noise=noise, keep_noise=keep_noise))
    return model


@contextmanager
def plain_layers(model: nn.Module):
    """Inside the block every NoisyLinear of ``model`` is replaced by the plain module it wraps
    (sharing the same Parameters), so ``save_pretrained`` and the like see a plain transformers
    model; the wrappers are put back on exit. A no-op for a model without them."""
    layers = noisy_layers(model)
    for name, layer in layers.items():
        set_module(model, name, layer.to_base())
    try:
        yield model
    finally:
        for name, layer in layers.items():
            set_module(model, name, layer)
