"""SalientLinear: a linear layer whose k salient input columns are trainable (GIFT-SW).

Why a custom autograd function: the authors' code rebuilt the full weight every step and let
autograd compute an (out x in) weight gradient only to slice k columns out of it (METHODS.md
§1.8). Here the frozen weight is shared with the original module (never copied) and backward
computes only what training needs: the (out x k) gradient of the salient columns, from the
k saved input columns, and the input gradient.

Noise modes (training only; evaluation, generation and merging are noise-free):

* ``"weight"`` - the paper's noise: one N(0, 1) draw of shape (out, in) per forward, scaled per
  row by ``noise_std`` (Delta_i / 2) and added to the non-salient columns, shared by all tokens.
  The draw is never kept, nor even built whole: forward and backward run over row blocks of
  about 256K weights, each drawn from a generator seeded by (seed, block), so backward
  regenerates the identical noise from a saved 64-bit seed. The seed itself comes from torch's global RNG, so seeding torch
  makes runs reproducible, and gradient checkpointing (which restores the RNG state before
  recomputing) recomputes the same noise.
* ``"output"`` - the same Gaussian moved to the output: per token t and output i,
  (Delta_i / 2) * ||x_{t,N}||_2 * xi_{t,i}. It draws tokens x out numbers instead of out x in,
  so it pays off only when a micro-batch holds fewer tokens than the layer has input features.
  Tokens get independent noise, so it is a different joint distribution (a separate mode).
* ``"none"`` - salient-only training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import is_linear_like

NOISE_MODES = ("weight", "output", "none")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_GENERATORS: dict[torch.device, torch.Generator] = {}
# Noise is drawn in row blocks of about this many elements (1 MB in fp32): the block is
# drawn, scaled, added to W and multiplied while it is still in cache, and no (out, in)
# temporary is ever allocated. The block size depends only on the layer shape, so the noise of
# a given seed is the same whatever the thread count.
NOISE_BLOCK_ELEMS = 1 << 18  # measured: 1<<16..1<<20 within 10%, smaller blocks much slower
_SEED_MIX = 0x9E3779B97F4A7C15


def _generator(device: torch.device) -> torch.Generator:
    g = _GENERATORS.get(device)
    if g is None:
        g = _GENERATORS[device] = torch.Generator(device=device)
    return g


def noise_blocks(out_features: int, in_features: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) in which the weight noise of a layer is drawn."""
    rows = max(1, min(out_features, NOISE_BLOCK_ELEMS // max(1, in_features)))
    return [(r0, min(out_features, r0 + rows)) for r0 in range(0, out_features, rows)]


def _noisy_rows(weight, salient_weight, idx, noise_std, seed, r0, r1, dtype, buf):
    """Rows r0:r1 of W + noise, with the salient columns replaced, written into ``buf``."""
    g = _generator(weight.device).manual_seed((seed + r0 * _SEED_MIX) % (1 << 63))
    blk = buf[: (r1 - r0) * weight.shape[1]].view(r1 - r0, weight.shape[1])
    blk.normal_(generator=g)
    torch.addcmul(weight[r0:r1].to(dtype), blk, noise_std[r0:r1].to(dtype).view(-1, 1), out=blk)
    blk.index_copy_(1, idx, salient_weight[r0:r1].to(dtype))
    return blk


def _noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype):
    """Yield (r0, r1, rows r0:r1 of the noisy weight), all blocks sharing one scratch buffer.

    A yielded block is valid until the next one is drawn: consume it before advancing.
    """
    blocks = noise_blocks(*weight.shape)
    r0, r1 = blocks[0]
    buf = torch.empty((r1 - r0) * weight.shape[1], device=weight.device, dtype=dtype)
    for r0, r1 in blocks:
        yield r0, r1, _noisy_rows(weight, salient_weight, idx, noise_std, seed, r0, r1, dtype, buf)


def _noisy_weight(weight, salient_weight, idx, noise_std, seed, dtype, out=None):
    """The full (out, in) noisy weight with columns idx replaced (same noise as the blocked path).

    ``out`` may be ``weight`` itself (a temporary the caller owns) to add the noise in place.
    Used by references and by layers that need the whole matrix; the training path never builds it.
    """
    if out is None:
        out = torch.empty(weight.shape, device=weight.device, dtype=dtype)
    for r0, r1, blk in _noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype):
        out[r0:r1] = blk
    return out


def _noisy_forward(x2, weight, salient_weight, idx, noise_std, seed, dtype):
    """x2 (tokens, in) @ (W + noise)^T, one row block of the noisy weight at a time."""
    y = torch.empty(x2.shape[0], weight.shape[0], device=x2.device, dtype=dtype)
    for r0, r1, blk in _noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype):
        y[:, r0:r1] = x2 @ blk.t()
    return y


def _noisy_input_grad(g2, weight, salient_weight, idx, noise_std, seed, dtype):
    """g2 (tokens, out) @ (W + noise), regenerating the same noise block by block."""
    gx = torch.zeros(g2.shape[0], weight.shape[1], device=g2.device, dtype=dtype)
    for r0, r1, blk in _noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype):
        gx.addmm_(g2[:, r0:r1], blk)
    return gx


class _SalientMatmul(torch.autograd.Function):
    """y = x W_eff^T + b with W_eff = W (+ noise) with columns idx replaced by the salient weight.

    Saved for backward: the k salient input columns of x (tokens x k), a seed, and references
    to tensors that live anyway (W, the salient weight). Never an (out, in) copy.
    """

    @staticmethod
    def forward(ctx, x, weight, salient_weight, bias, idx, noise_std, seed):
        dtype = _compute_dtype(x)
        xd = x.to(dtype)
        x_s = xd.index_select(-1, idx)
        if seed is None:
            w = weight.to(dtype)
            # Eval / no-noise path: W plus a rank-k correction, no (out, in) temporary in fp-native dtype.
            delta = salient_weight.to(dtype) - w.index_select(1, idx)
            y = F.linear(xd, w, None) + F.linear(x_s, delta, None)
        else:
            y = _noisy_forward(xd.reshape(-1, xd.shape[-1]), weight, salient_weight, idx, noise_std, seed, dtype)
            y = y.view(*xd.shape[:-1], weight.shape[0])
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(x_s, weight, salient_weight, idx, noise_std)
        ctx.seed = seed
        ctx.dtype = dtype
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_s, weight, salient_weight, idx, noise_std = ctx.saved_tensors
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
                grad_x = _noisy_input_grad(g.reshape(-1, g.shape[-1]), weight, salient_weight, idx, noise_std,
                                           ctx.seed, dtype).view(*g.shape[:-1], weight.shape[1])
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            g2 = g.reshape(-1, g.shape[-1])
            grad_w = g2.t().matmul(x_s.reshape(-1, x_s.shape[-1])).to(salient_weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_w, grad_b, None, None, None


class SalientLinear(nn.Module):
    """A linear layer (nn.Linear or transformers' Conv1D) with trainable salient input columns.

    Buffers: ``salient_idx`` (k sorted column indices), ``noise_std`` (out,: Delta_i / 2).
    Parameter: ``salient_weight`` (out, k), initialised to W[:, salient_idx].
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
        idx = torch.as_tensor(salient_idx, dtype=torch.long, device=self.weight.device).flatten()
        if idx.numel() == 0:
            raise ValueError("salient_idx is empty: k must be at least 1")
        idx, _ = torch.sort(idx)
        if idx[0] < 0 or idx[-1] >= self.in_features or torch.unique(idx).numel() != idx.numel():
            raise ValueError(
                f"salient_idx must hold distinct column indices in [0, {self.in_features}), "
                f"got {idx.numel()} indices in [{int(idx.min())}, {int(idx.max())}]"
            )
        self.register_buffer("salient_idx", idx)
        if noise_std is None:
            noise_std = torch.zeros(self.out_features, dtype=torch.float32)
        noise_std = torch.as_tensor(noise_std, dtype=torch.float32, device=self.weight.device).reshape(-1)
        if noise_std.numel() != self.out_features:
            raise ValueError(f"noise_std must have {self.out_features} entries, got {noise_std.numel()}")
        self.register_buffer("noise_std", noise_std)
        self.noise = noise
        w_dtype = self.weight.dtype
        p_dtype = torch.float32 if fp32_salient and w_dtype in (torch.bfloat16, torch.float16) else w_dtype
        with torch.no_grad():
            init = self.base_weight().index_select(1, idx).to(p_dtype).clone()
        self.salient_weight = nn.Parameter(init)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as an (out, in) view (Conv1D stores it transposed)."""
        return self.weight.t() if self.is_conv1d else self.weight

    @property
    def k(self) -> int:
        return self.salient_idx.numel()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
            f"noise={self.noise!r}, bias={self.bias is not None}"
        )

    def _draw_seed(self) -> int:
        # From the global CPU RNG: reproducible under torch.manual_seed, restored by checkpointing.
        return int(torch.randint(0, 2**62, (1,)).item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = self.training and self.noise != "none"
        seed = self._draw_seed() if noisy and self.noise == "weight" else None
        y = _SalientMatmul.apply(
            x, self.base_weight(), self.salient_weight, self.bias, self.salient_idx, self.noise_std, seed
        )
        if noisy and self.noise == "output":
            y = y + self._output_noise(x, y)
        return y

    def _output_noise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per token and output: (Delta_i/2) * ||x_N||_2 * xi, xi ~ N(0, 1)."""
        dtype = y.dtype
        xf = x.float()
        sq = xf.pow(2).sum(-1, keepdim=True) - xf.index_select(-1, self.salient_idx).pow(2).sum(-1, keepdim=True)
        norm_n = sq.clamp_min(0).sqrt()
        xi = torch.randn(y.shape, device=y.device, dtype=dtype)
        return xi * (norm_n.to(dtype) * self.noise_std.to(dtype))

    @torch.no_grad()
    def merged_weight_(self) -> None:
        """Write the trained columns into the shared base weight (in place)."""
        w = self.base_weight()
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
