"""GIFT-SW's weight noise, drawn block by block from a seed (METHODS.md §1.3).

One N(0, 1) draw of shape (out, in) per forward, scaled per row by ``noise_std`` (Delta_i / 2)
and added to the non-salient columns, shared by all tokens. The draw is never kept, nor even
built whole: forward and backward run over row blocks of about 256K weights, each drawn from a
generator seeded by (seed, block), so backward regenerates the identical noise from a saved
64-bit seed. The seed itself comes from torch's global RNG (:func:`draw_seed`), so seeding torch
makes runs reproducible, and gradient checkpointing (which restores the RNG state before
recomputing) recomputes the same noise.

Both ``gift.SalientLinear`` and ``quant.QuantizedSalientLinear`` draw their noise here, so a
seed means the same noise in either.
"""
from __future__ import annotations

import torch

_GENERATORS: dict[torch.device, torch.Generator] = {}
# Noise is drawn in row blocks of about this many elements (1 MB in fp32): the block is
# drawn, scaled, added to W and multiplied while it is still in cache, and no (out, in)
# temporary is ever allocated. The block size depends only on the layer shape, so the noise of
# a given seed is the same whatever the thread count.
NOISE_BLOCK_ELEMS = 1 << 18  # measured: 1<<16..1<<20 within 10%, smaller blocks much slower
SEED_MIX = 0x9E3779B97F4A7C15


def noise_generator(device: torch.device) -> torch.Generator:
    """The one cached generator of ``device`` (re-seeded for every block)."""
    g = _GENERATORS.get(device)
    if g is None:
        g = _GENERATORS[device] = torch.Generator(device=device)
    return g


def draw_seed() -> int:
    """A 62-bit noise seed from the global CPU RNG: reproducible under ``torch.manual_seed`` and
    restored by gradient checkpointing."""
    return int(torch.randint(0, 2**62, (1,)).item())


def noise_blocks(out_features: int, in_features: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) in which the weight noise of a layer is drawn."""
    rows = max(1, min(out_features, NOISE_BLOCK_ELEMS // max(1, in_features)))
    return [(r0, min(out_features, r0 + rows)) for r0 in range(0, out_features, rows)]


def noisy_rows(weight, salient_weight, idx, noise_std, seed, r0, r1, dtype, buf):
    """Rows r0:r1 of W + noise, with the salient columns replaced, written into ``buf``."""
    g = noise_generator(weight.device).manual_seed((seed + r0 * SEED_MIX) % (1 << 63))
    blk = buf[: (r1 - r0) * weight.shape[1]].view(r1 - r0, weight.shape[1])
    blk.normal_(generator=g)
    torch.addcmul(weight[r0:r1].to(dtype), blk, noise_std[r0:r1].to(dtype).view(-1, 1), out=blk)
    blk.index_copy_(1, idx, salient_weight[r0:r1].to(dtype))
    return blk


def noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype):
    """Yield (r0, r1, rows r0:r1 of the noisy weight), all blocks sharing one scratch buffer.

    A yielded block is valid until the next one is drawn: consume it before advancing.
    """
    blocks = noise_blocks(*weight.shape)
    r0, r1 = blocks[0]
    buf = torch.empty((r1 - r0) * weight.shape[1], device=weight.device, dtype=dtype)
    for r0, r1 in blocks:
        yield r0, r1, noisy_rows(weight, salient_weight, idx, noise_std, seed, r0, r1, dtype, buf)


def noisy_weight(weight, salient_weight, idx, noise_std, seed, dtype, out=None):
    """The full (out, in) noisy weight with columns idx replaced (same noise as the blocked path).

    ``out`` may be ``weight`` itself (a temporary the caller owns) to add the noise in place.
    Used by references and by layers that need the whole matrix; the training path never builds it.
    """
    if out is None:
        out = torch.empty(weight.shape, device=weight.device, dtype=dtype)
    for r0, r1, blk in noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype):
        out[r0:r1] = blk
    return out


def noisy_forward(x2, weight, salient_weight, idx, noise_std, seed, dtype):
    """x2 (tokens, in) @ (W + noise)^T, one row block of the noisy weight at a time."""
    y = torch.empty(x2.shape[0], weight.shape[0], device=x2.device, dtype=dtype)
    for r0, r1, blk in noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype):
        y[:, r0:r1] = x2 @ blk.t()
    return y


def noisy_input_grad(g2, weight, salient_weight, idx, noise_std, seed, dtype):
    """g2 (tokens, out) @ (W + noise), regenerating the same noise block by block."""
    gx = torch.zeros(g2.shape[0], weight.shape[1], device=g2.device, dtype=dtype)
    for r0, r1, blk in noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype):
        gx.addmm_(g2[:, r0:r1], blk)
    return gx
