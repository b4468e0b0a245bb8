"""The one symmetric per-row quantizer of docs/methods.md#row-quantizer.

It serves three purposes, which is why it lives alone: the quantization error D of the
sensitivity metric, the noise step Delta of GIFT-SW, and weight quantization itself.
"""
from __future__ import annotations

import torch

# Candidate clip fractions p = 1.00, 0.99, ..., 0.21: an 80-point grid over at most 0.8 of the range.
GRID_POINTS = 80
GRID_STEP = 0.01
# Elements of the (rows x 80 x in) clip-search buffer per chunk, by device type. CPU: 1M (4 MB),
# cache-resident and reused (tuned: >10x faster than 16M on a 16384 x 4096 layer). Accelerators:
# 128M (512 MB fp32), so a 7B layer takes a few dozen chunks of ~15 launches each instead of
# thousands (15 million launches per pass over Llama-2-7B with the CPU's size).
SEARCH_CHUNK_ELEMS = {"cpu": 1 << 20}
DEVICE_SEARCH_CHUNK_ELEMS = 1 << 27


def clip_grid(device=None, dtype=torch.float32) -> torch.Tensor:
    """The 80 clip fractions 1.00, 0.99, ..., 0.21 (computed exactly as 1 - i/100)."""
    i = torch.arange(GRID_POINTS, device=device, dtype=torch.float64)
    return (1.0 - i * GRID_STEP).to(dtype)


def check_grid_bits(bits: int) -> int:
    """Validate the bit width of the row quantizer (an integer in [2, 16]) and return it.

    Any width works for the metric and the noise scale; storing integers is narrower
    (``quant.packing.check_bits``: 2, 3, 4 or 8).
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}")
    return bits


def search_chunk_elems(device_type: str) -> int:
    """The clip search's buffer budget (elements) on ``device_type`` (``SEARCH_CHUNK_ELEMS``)."""
    return SEARCH_CHUNK_ELEMS.get(device_type, DEVICE_SEARCH_CHUNK_ELEMS)


def row_chunks(out_features: int, in_features: int, chunk_elems: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of the clip search: the fewest chunks whose (rows x 80 x in) buffer
    fits ``chunk_elems`` (one row at least), balanced (row counts differ by at most one), so no
    chunk is a small tail. A pure function of the shape and the budget."""
    most = max(1, int(chunk_elems) // max(1, GRID_POINTS * in_features))
    parts = max(1, -(-out_features // most))
    q, r = divmod(out_features, parts)
    out, r0 = [], 0
    for i in range(parts):
        r1 = r0 + q + (i < r)
        out.append((r0, r1))
        r0 = r1
    return out


def quantize_rows(
    W: torch.Tensor, bits: int, *, chunk_elems: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization with an MSE clip search.

    For each row i, alpha_i = p * max_j |W_ij| with p on the 80-point grid is chosen to minimise
    sum_j (W_ij - Q(W_ij))^2, where Q(w) = Delta * clamp(round(w / Delta), -2^(b-1), 2^(b-1)-1)
    and Delta = alpha / (2^(b-1) - 1). Ties go to the larger clip (the first grid point).
    All-zero rows get alpha = 1.

    Vectorised over rows and grid points; rows are processed in balanced chunks
    (:func:`row_chunks`) so that the temporary (rows x 80 x in) search tensor stays below
    ``chunk_elems`` elements whatever the layer size. The default depends on W's device type
    (:func:`search_chunk_elems`): on CPU 1M elements (4 MB) keep the search buffer cache-resident
    and reused (on a 16384 x 4096 layer >10x faster than 16M-element chunks); on an accelerator
    128M elements make a few large launches per layer. Results are bit-identical for any chunking
    (the per-element arithmetic and the per-row reduction are unchanged by it).

    Returns ``(alpha, delta, w_q)``: alpha and delta of shape (out,) in float32, and the
    dequantized weight in W's dtype and shape. Computation is in float32 (float64 for fp64 input).
    """
    check_grid_bits(bits)
    if W.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D (out, in) weight, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"quantize_rows expects a floating-point weight, got {W.dtype}")
    if chunk_elems is None:
        chunk_elems = search_chunk_elems(W.device.type)
    if int(chunk_elems) < 1:
        raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems!r}")
    W = W.detach()
    out_f, in_f = W.shape
    work_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    qmax = 2 ** (bits - 1) - 1
    qmin = -(2 ** (bits - 1))
    grid = clip_grid(W.device, work_dtype)  # (G,)
    alpha = torch.empty(out_f, device=W.device, dtype=work_dtype)
    w_q = torch.empty_like(W)
    chunks = row_chunks(out_f, in_f, chunk_elems)
    # one (r, G, in) search buffer for the largest chunk, reused by every chunk
    buf = torch.empty((max(r1 - r0 for r0, r1 in chunks), GRID_POINTS, in_f), device=W.device, dtype=work_dtype)
    for start, stop in chunks:
        w = W[start:stop].to(work_dtype)  # (r, in)
        r = w.shape[0]
        rmax = w.abs().amax(dim=1)  # (r,)
        cand = rmax[:, None] * grid[None, :]  # (r, G)
        delta = cand / qmax
        safe = torch.where(delta > 0, delta, torch.ones_like(delta))[:, :, None]
        b = buf[:r]
        wb = w[:, None, :]
        # In place, one pass per op over a cache-sized buffer: q - w = clamp(round(w/d)) * d - w.
        torch.div(wb, safe, out=b)
        b.round_().clamp_(qmin, qmax).mul_(safe).sub_(wb)
        err = b.pow_(2).sum(dim=2)  # (r, G)
        best = err.argmin(dim=1)  # first minimum: the largest clip among ties
        a = cand.gather(1, best[:, None]).squeeze(1)
        a = torch.where(rmax > 0, a, torch.ones_like(a))
        alpha[start : start + r] = a
        d = a / qmax
        w_q[start : start + r] = (
            torch.clamp(torch.round(w / d[:, None]), qmin, qmax) * d[:, None]
        ).to(W.dtype)
    return alpha.to(torch.float32), (alpha / qmax).to(torch.float32), w_q
