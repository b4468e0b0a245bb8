"""What every layer with k trainable salient input columns shares, whatever stores the rest of
its weight (``gift.SalientLinear``: the frozen dense weight; ``quant.QuantizedSalientLinear``:
packed integers): the index checks, the noise-scale buffer, the seed of the weight noise, the
gradients of the salient columns and of the bias, and the repr.
"""
from __future__ import annotations

import torch
from torch import nn

from .noise import draw_seed


def salient_indices(salient_idx, in_features: int, *, allow_empty: bool = False, keep_one: bool = False,
                    device=None) -> torch.Tensor:
    """``salient_idx`` as a sorted 1-D long tensor on ``device``, checked.

    The indices must be distinct and in [0, in_features); at least one unless ``allow_empty``;
    with ``keep_one`` (a quantized layer) at least one column must be left out of them.
    """
    idx = torch.as_tensor(salient_idx, dtype=torch.long, device=device).flatten()
    if idx.numel() == 0 and not allow_empty:
        raise ValueError("salient_idx is empty: k must be at least 1")
    idx, _ = torch.sort(idx)
    if idx.numel() and (idx[0] < 0 or idx[-1] >= in_features or torch.unique(idx).numel() != idx.numel()):
        raise ValueError(
            f"salient_idx must hold distinct column indices in [0, {in_features}), "
            f"got {idx.numel()} indices in [{int(idx.min())}, {int(idx.max())}]"
        )
    if keep_one and idx.numel() >= in_features:
        raise ValueError(
            f"{idx.numel()} salient columns leave nothing to quantize in a layer with {in_features} "
            "input features; use fewer salient columns"
        )
    return idx


def complement(idx: torch.Tensor, in_features: int) -> torch.Tensor:
    """The sorted column indices in [0, in_features) that are not in ``idx``."""
    keep = torch.ones(in_features, dtype=torch.bool, device=idx.device)
    keep[idx] = False
    return keep.nonzero().flatten()


def noise_scale(noise_std, out_features: int, device=None) -> torch.Tensor:
    """The (out,) float32 noise std per output row (Delta_i / 2); zeros when ``noise_std`` is None."""
    if noise_std is None:
        return torch.zeros(out_features, dtype=torch.float32, device=device)
    std = torch.as_tensor(noise_std, dtype=torch.float32, device=device).reshape(-1)
    if std.numel() != out_features:
        raise ValueError(f"noise_std must have {out_features} entries, got {std.numel()}")
    return std


def weight_grad(grad_y: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (out, n) gradient of the weight columns whose inputs are ``x`` (..., n): g^T x summed
    over every token. With x the k salient input columns: the (out, k) salient gradient."""
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    return g2.t().matmul(x.reshape(-1, x.shape[-1])).to(dtype)


def bias_grad(grad_y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (out,) gradient of the bias: g summed over every token."""
    return grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(dtype)


def remember_for_backward(ctx, x: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, seed) -> None:
    """Store on an autograd ``ctx`` what backward needs besides saved tensors: the noise seed (the
    noise is drawn again, never kept), the compute dtype, and the dtypes to return x's and the
    bias's gradients in."""
    ctx.seed = seed
    ctx.dtype = dtype
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


class SalientLayer(nn.Module):
    """Base of the layers whose k salient input columns train.

    A subclass sets ``in_features``, ``out_features``, ``bias`` and ``noise`` and registers the
    buffers ``salient_idx`` (:func:`salient_indices`) and ``noise_std`` (:func:`noise_scale`).
    """

    in_features: int
    out_features: int
    noise: str

    @property
    def k(self) -> int:
        return self.salient_idx.numel()

    def _repr_extra(self) -> dict:
        """Fields a subclass shows between the shape and k (e.g. bits)."""
        return {}

    def extra_repr(self) -> str:
        fields = {"in_features": self.in_features, "out_features": self.out_features, **self._repr_extra(),
                  "k": self.k, "noise": repr(self.noise), "bias": self.bias is not None}
        return ", ".join(f"{name}={value}" for name, value in fields.items())

    def weight_noise_seed(self) -> int | None:
        """A fresh seed when this forward adds weight noise (training, noise "weight", k > 0), else None."""
        if self.training and self.noise == "weight" and self.k > 0:
            return draw_seed()
        return None
