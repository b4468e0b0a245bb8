"""QuantizedSalientLinear: b-bit packed integer weights plus k salient columns kept in 16 bits.

Storage (no full-precision copy of the weight anywhere):

* ``qweight`` uint8 (out, ceil((in-k)/8)*b): the integers of the non-salient columns, in their
  original column order, packed row by row (``packing.py``);
* ``scale`` float32 (out, groups): the step Delta per row (one group) or per row and group of
  ``group_size`` consecutive non-salient columns; every non-salient weight equals
  ``scale * q`` with q an integer in [-2^(b-1), 2^(b-1)-1];
* ``salient_idx`` (k,) sorted column indices and ``salient_weight`` (out, k), a Parameter in the
  model dtype: the columns GIFT-SW recovery trains;
* ``noise_std`` float32 (out,): Delta_i/2 of the 4-bit quantizer over the dequantized
  non-salient weights (docs/methods.md#quantization-recovery), filled by ``set_noise``; zeros until then.

Forward dequantizes on the fly. When gradients are needed it goes through ``_QuantSalientMatmul``,
which re-dequantizes in backward instead of saving the (out, in) weight: autograd would otherwise
keep one dense copy per layer alive until backward, i.e. the whole 16-bit model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config_base import QUANTIZED_NOISE_MODES
from ..ops.dtype import compute_dtype
from ..ops.grid import quantize_rows
from ..ops.noise import noisy_weight
from ..ops.salient import (SalientLayer, bias_grad, complement, noise_scale, remember_for_backward, salient_indices,
                           weight_grad)
from .gptq import expand_groups, n_groups
from .packing import check_bits, pack, packed_row_bytes, unpack


class _QuantSalientMatmul(torch.autograd.Function):
    """y = x W^T + b, W = dequantized weight (+ noise on the integer columns) with salient columns.

    Saved for backward: the k salient input columns of x, the seed, and a reference to the layer
    (whose packed buffers live anyway). backward dequantizes again (and regenerates the same noise
    from the seed) for the input gradient; the salient gradient is g^T x_S (out x k only).
    """

    @staticmethod
    def forward(ctx, x, salient_weight, bias, layer, seed):
        dtype = compute_dtype(x)
        xd = x.to(dtype)
        w = layer._effective_weight(dtype, salient_weight, seed)
        y = F.linear(xd, w, None)
        del w
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(xd.index_select(-1, layer.salient_idx), salient_weight)
        ctx.layer = layer
        remember_for_backward(ctx, x, bias, dtype, seed)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_s, salient_weight = ctx.saved_tensors
        g = grad_y.to(ctx.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = ctx.layer._effective_weight(ctx.dtype, salient_weight, ctx.seed)
            grad_x = g.matmul(w).to(ctx.x_dtype)
            del w
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(g, x_s, salient_weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = bias_grad(g, ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


class QuantizedSalientLinear(SalientLayer):
    """A b-bit weight-only quantized linear layer whose k salient input columns stay 16-bit.

    Build it with ``from_integers`` (after GPTQ/RTN) or with the constructor (empty, to load a
    state dict into). ``k`` may be 0 (plain quantized layer).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        salient_idx,
        *,
        group_size: int | None = None,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        self.bits = check_bits(bits)
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
        self.in_features, self.out_features, self.group_size = int(in_features), int(out_features), group_size
        # checked on the CPU: the layer may be built on the meta device (load_quantized)
        idx = salient_indices(torch.as_tensor(salient_idx).cpu(), self.in_features, allow_empty=True, keep_one=True)
        self.register_buffer("salient_idx", idx.to(device))
        self.register_buffer("int_idx", complement(idx, self.in_features).to(device), persistent=False)
        n_int = self.in_features - idx.numel()
        self.register_buffer(
            "qweight", torch.zeros(self.out_features, packed_row_bytes(n_int, bits), dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scale", torch.ones(self.out_features, n_groups(n_int, group_size), dtype=torch.float32, device=device)
        )
        self.register_buffer("noise_std", noise_scale(None, self.out_features, device))
        self.salient_weight = nn.Parameter(
            torch.zeros(self.out_features, idx.numel(), dtype=dtype, device=device), requires_grad=False
        )
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.noise = "none"

    @classmethod
    def from_integers(cls, q, scale, salient_idx, salient_weight, bias, bits, group_size=None, dtype=None):
        """From integers q (out, in-k) in original column order, scale (out, groups), 16-bit columns."""
        out_f, n_int = q.shape
        k = torch.as_tensor(salient_idx).numel()
        dtype = dtype or (salient_weight.dtype if k else (bias.dtype if bias is not None else torch.bfloat16))
        layer = cls(n_int + k, out_f, bits, salient_idx, group_size=group_size, bias=bias is not None,
                    dtype=dtype, device=q.device)
        expected = (out_f, n_groups(n_int, group_size))
        if tuple(scale.shape) != expected:
            raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {expected}")
        with torch.no_grad():
            layer.qweight.copy_(pack(q, bits))
            layer.scale.copy_(scale.float())
            # salient_idx is sorted by the constructor: order the given columns the same way.
            order = torch.argsort(torch.as_tensor(salient_idx, dtype=torch.long).flatten().to(q.device))
            layer.salient_weight.copy_(salient_weight.to(q.device)[:, order].to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    def _repr_extra(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}

    # ---- dequantization -------------------------------------------------------------------
    def integers(self) -> torch.Tensor:
        """The (out, in-k) integers of the non-salient columns (int8)."""
        return unpack(self.qweight, self.bits, self.in_features - self.k)

    def dequantized_int_weight(self, dtype=torch.float32) -> torch.Tensor:
        """scale * q for the non-salient columns, (out, in-k), computed in fp32 then cast."""
        n_int = self.in_features - self.k
        q = unpack(self.qweight, self.bits, n_int, dtype=torch.float32)
        return q.mul_(expand_groups(self.scale, n_int, self.group_size)).to(dtype)

    def dequantized_weight(self, dtype=None, salient_weight=None) -> torch.Tensor:
        """The full (out, in) weight: dequantized integer columns plus the 16-bit salient columns."""
        sw = self.salient_weight if salient_weight is None else salient_weight
        dtype = dtype or sw.dtype
        w_int = self.dequantized_int_weight(dtype)
        if self.k == 0:
            return w_int
        w = torch.empty(self.out_features, self.in_features, dtype=dtype, device=w_int.device)
        w.index_copy_(1, self.int_idx, w_int)
        w.index_copy_(1, self.salient_idx, sw.detach().to(dtype))
        return w

    def _effective_weight(self, dtype, salient_weight, seed) -> torch.Tensor:
        w = self.dequantized_weight(dtype, salient_weight)
        if seed is None:
            return w
        # Noise is added block by block into w itself: no second (out, in) temporary.
        return noisy_weight(w, salient_weight.detach(), self.salient_idx, self.noise_std, seed, dtype, out=w)

    # ---- training ---------------------------------------------------------------------------
    @torch.no_grad()
    def set_noise(self, mode: str = "weight", bits: int = 4) -> None:
        """Noise for GIFT-SW recovery: std Delta_i/2 of the ``bits``-bit quantizer of the
        dequantized non-salient weights (the paper used 4-bit noise after quantization)."""
        if mode not in QUANTIZED_NOISE_MODES:
            raise ValueError(f"noise must be one of {QUANTIZED_NOISE_MODES} for a quantized layer, got {mode!r}")
        if mode == "weight":
            _, delta, _ = quantize_rows(self.dequantized_int_weight(torch.float32), bits)
            self.noise_std.copy_(delta / 2)
        self.noise = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = self.weight_noise_seed()
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.salient_weight.requires_grad
            or (self.bias is not None and self.bias.requires_grad)
        )
        if not needs_grad and seed is None:
            dtype = compute_dtype(x)
            b = self.bias.to(dtype) if self.bias is not None else None
            return F.linear(x.to(dtype), self.dequantized_weight(dtype), b)
        return _QuantSalientMatmul.apply(x, self.salient_weight, self.bias, self, seed)

    # ---- accounting -------------------------------------------------------------------------
    def storage_bytes(self) -> int:
        """Bytes of everything this layer stores (integers, scales, salient columns, indices, noise, bias)."""
        tensors = [self.qweight, self.scale, self.salient_idx, self.salient_weight, self.noise_std]
        if self.bias is not None:
            tensors.append(self.bias)
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense_bytes(self, bytes_per_weight: int = 2) -> int:
        """Bytes of the same layer as a dense 16-bit Linear (weight and bias)."""
        return bytes_per_weight * self.out_features * (self.in_features + (self.bias is not None))
