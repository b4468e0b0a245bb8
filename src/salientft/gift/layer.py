"""SalientLinear: a linear layer whose k salient input columns are trainable (GIFT-SW).

Why a custom autograd function: the authors' code rebuilt the full weight every step and let
autograd compute an (out x in) weight gradient only to slice k columns out of it
(docs/methods.md#authors-code). Here the frozen weight is shared with the original module (never copied) and backward
computes only what training needs: the (out x k) gradient of the salient columns, from the
k saved input columns, and the input gradient.

Noise modes (training only; evaluation, generation and merging are noise-free):

* ``"weight"`` - the paper's noise: one N(0, 1) draw of shape (out, in) per forward, scaled per
  row by ``noise_std`` (Delta_i / 2) and added to the non-salient columns, shared by all tokens.
  By default the draw is never kept, nor even built whole: ``salientft.ops.noise`` draws it in
  row blocks from a seed (in parallel threads on CPU), and backward regenerates the identical
  noise from that saved 64-bit seed. ``keep_noise=True`` trades memory for time: forward keeps
  the layer's noisy weight (out x in, compute dtype) for backward instead of drawing it again
  (the same outputs and gradients, bit for bit; freed by backward).
* ``"output"`` - the same Gaussian moved to the output: per token t and output i,
  (Delta_i / 2) * ||x_{t,N}||_2 * xi_{t,i}. It draws tokens x out numbers instead of out x in,
  so it pays off only when a micro-batch holds fewer tokens than the layer has input features.
  Tokens get independent noise, so it is a different joint distribution (a separate mode).
  xi is drawn from a seed and drawn again in backward (``ops.noise.OutputNoise``): backward
  keeps the layer input and one norm per token, never the (tokens, out) noise.
* ``"none"`` - salient-only training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config_base import NOISE_MODES
from ..ops.dtype import compute_dtype
from ..ops.noise import OutputNoise, draw_seed, noisy_forward, noisy_input_grad
from ..ops.salient import (SalientLayer, bias_grad, noise_scale, remember_for_backward, salient_indices,
                           weight_grad)
from ..targets import is_linear_like


class _SalientMatmul(torch.autograd.Function):
    """y = x W_eff^T + b with W_eff = W (+ noise) with columns idx replaced by the salient weight.

    Saved for backward: the k salient input columns of x (tokens x k), a seed, and references
    to tensors that live anyway (W, the salient weight). Never an (out, in) copy, unless
    ``keep_noise`` asks to keep the noisy weight (and the input gradient needs it).
    """

    @staticmethod
    def forward(ctx, x, weight, salient_weight, bias, idx, noise_std, seed, keep_noise=False):
        dtype = compute_dtype(x)
        xd = x.to(dtype)
        x_s = xd.index_select(-1, idx)
        kept = None
        if seed is None:
            w = weight.to(dtype)
            # Eval / no-noise path: W plus a rank-k correction, no (out, in) temporary in fp-native dtype.
            delta = salient_weight.to(dtype) - w.index_select(1, idx)
            y = F.linear(xd, w, None) + F.linear(x_s, delta, None)
        else:
            keep = bool(keep_noise) and ctx.needs_input_grad[0]  # nothing to keep it for otherwise
            y, kept = noisy_forward(xd, weight, salient_weight, idx, noise_std, seed, dtype, keep=keep)
        if bias is not None:
            y = y + bias.to(dtype)
        # kept: the noisy weight (keep_noise) or None; a saved tensor, so autograd frees it after backward
        ctx.save_for_backward(x_s, weight, salient_weight, idx, noise_std, kept)
        remember_for_backward(ctx, x, bias, dtype, seed)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_s, weight, salient_weight, idx, noise_std, kept = ctx.saved_tensors
        dtype = ctx.dtype
        g = grad_y.to(dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if ctx.seed is None:
                w = weight.to(dtype)
                grad_x = g.matmul(w)
                delta = salient_weight.to(dtype) - w.index_select(1, idx)
                grad_x.index_add_(-1, idx, g.matmul(delta))
            else:
                grad_x = noisy_input_grad(g.reshape(-1, g.shape[-1]), weight, salient_weight, idx, noise_std,
                                           ctx.seed, dtype, kept=kept).view(*g.shape[:-1], weight.shape[1])
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_w = weight_grad(g, x_s, salient_weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = bias_grad(g, ctx.bias_dtype)
        return grad_x, None, grad_w, grad_b, None, None, None, None


def salient_linear(x, weight, salient_weight, bias, salient_idx, noise_std, seed=None, keep_noise=False):
    """y = x W_eff^T + b, W_eff = W (+ weight noise from ``seed``) with columns ``salient_idx``
    replaced by ``salient_weight``: the GIFT-SW matmul for any layer that holds these tensors
    (``SalientLinear``, the PEFT tuner layer). ``weight`` is the (out, in) frozen weight;
    ``seed=None`` adds no noise. Backward computes only the input and (out, k) salient gradients;
    it draws the noise again from ``seed``, or with ``keep_noise`` uses the noisy weight that
    forward kept (one (out, in) tensor in the compute dtype until backward).
    """
    return _SalientMatmul.apply(x, weight, salient_weight, bias, salient_idx, noise_std, seed, keep_noise)


def output_noise(x: torch.Tensor, y: torch.Tensor, salient_idx: torch.Tensor, noise_std: torch.Tensor) -> torch.Tensor:
    """GIFT-SW's output noise for output ``y`` of input ``x``: per token and output,
    (Delta_i/2) * ||x_N||_2 * xi with xi ~ N(0, 1) and x_N the non-salient inputs, in ``y``'s dtype.

    xi is drawn from a seed taken from torch's global RNG (reproducible under ``torch.manual_seed``,
    recomputed identically by gradient checkpointing) and drawn again in backward, so the layer
    keeps only its input and one fp32 norm per token for backward, never the (tokens, out) noise
    (``ops.noise.OutputNoise``)."""
    return OutputNoise.apply(x, salient_idx, noise_std, draw_seed(), y.dtype, y.shape[-1])


class SalientLinear(SalientLayer):
    """A linear layer (nn.Linear or transformers' Conv1D) with trainable salient input columns.

    Buffers: ``salient_idx`` (k sorted column indices), ``noise_std`` (out,: Delta_i / 2).
    Parameter: ``salient_weight`` (out, k), initialised to W[:, salient_idx].
    ``keep_noise`` (weight noise only): keep the noisy weight from forward to backward instead of
    drawing it again: faster, one (out, in) tensor in the compute dtype per layer until backward.
    ``weight`` and ``bias`` are the original module's own Parameters (shared, frozen), so the
    state dict keeps the original names and no weight is ever copied.
    """

    def __init__(
        self,
        base: nn.Module,
        salient_idx: torch.Tensor,
        noise_std: torch.Tensor | None = None,
        noise: str = "weight",
        fp32_salient: bool = False,
        keep_noise: bool = False,
    ):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"SalientLinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        self.is_conv1d = not isinstance(base, nn.Linear)
        self.base_class = type(base)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.out_features, self.in_features = self.base_weight().shape
        idx = salient_indices(salient_idx, self.in_features, device=self.weight.device)
        self.register_buffer("salient_idx", idx)
        self.register_buffer("noise_std", noise_scale(noise_std, self.out_features, self.weight.device))
        self.noise = noise
        self.keep_noise = bool(keep_noise)
        w_dtype = self.weight.dtype
        p_dtype = torch.float32 if fp32_salient and w_dtype in (torch.bfloat16, torch.float16) else w_dtype
        with torch.no_grad():
            init = self.base_weight().index_select(1, idx).to(p_dtype).clone()
        self.salient_weight = nn.Parameter(init)
        self.train(base.training)  # a model in eval mode stays noise-free until model.train()

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as an (out, in) view (Conv1D stores it transposed)."""
        return self.weight.t() if self.is_conv1d else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = self.weight_noise_seed()
        y = salient_linear(x, self.base_weight(), self.salient_weight, self.bias, self.salient_idx, self.noise_std,
                           seed, self.keep_noise)
        if self.training and self.noise == "output":
            y = y + output_noise(x, y, self.salient_idx, self.noise_std)
        return y

    @torch.no_grad()
    def merged_weight_(self) -> None:
        """Write the trained columns into the shared base weight (in place)."""
        w = self.base_weight()
        if type(w) is not torch.Tensor and hasattr(w, "full_tensor"):
            raise RuntimeError(
                "cannot merge a sharded (FSDP2 DTensor) weight in place: merge on gathered weights "
                "(salientft.methods.sharding.gathered, or a model loaded from the saved adapter)"
            )
        w.index_copy_(1, self.salient_idx, self.salient_weight.to(w.dtype))

    def to_base(self) -> nn.Module:
        """A plain module of the original class sharing this layer's (possibly merged) weight."""
        if self.is_conv1d:
            base = self.base_class(self.out_features, self.in_features)
        else:
            base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                             device="meta")
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias
        return base
