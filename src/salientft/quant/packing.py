"""Bit packing of small signed integers (2, 3, 4 or 8 bits) into uint8, row by row.

Why row-aligned: each row is packed on its own (padded to a multiple of 8 values), so a layer
can dequantize any row range without touching the rest, and a row of n b-bit values always takes
ceil(n / 8) * b bytes: exactly b/16 of its 16-bit size whenever n is a multiple of 8.

Layout: 8 consecutive values form one little-endian word of 8*b bits (value i at bits
[b*i, b*(i+1))), stored as b bytes. Values are offset by 2^(b-1) so they are unsigned on disk.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of n values takes."""
    return -(-n // 8) * bits


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [-2^(b-1), 2^(b-1)-1] of shape (rows, n) (or (n,)) into uint8 (rows, bytes).

    Raises ValueError for values outside the b-bit range (never silently wraps).
    """
    bits = check_bits(bits)
    if q.is_floating_point() or q.is_complex():
        raise ValueError(f"pack expects an integer tensor, got {q.dtype}")
    if q.dim() == 1:
        q = q[None]
    if q.dim() != 2:
        raise ValueError(f"pack expects a 1-D or 2-D tensor, got shape {tuple(q.shape)}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows, n = q.shape
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"values must lie in [{lo}, {hi}] for {bits}-bit packing, got [{int(q.min())}, {int(q.max())}]")
    groups = -(-n // 8)
    u = torch.zeros(rows, groups * 8, dtype=torch.int64, device=q.device)
    u[:, :n] = q.to(torch.int64) - lo
    if bits == 8:
        return u.to(torch.uint8)
    u = u.view(rows, groups, 8)
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * bits
    word = (u << shifts).sum(-1)  # (rows, groups): at most 24 bits (3-bit) / 32 bits (4-bit)
    byte_shifts = torch.arange(bits, device=q.device, dtype=torch.int64) * 8
    out = (word[..., None] >> byte_shifts) & 0xFF  # (rows, groups, bits)
    return out.reshape(rows, groups * bits).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of ``pack``: (rows, bytes) uint8 -> (rows, n) signed integers in ``dtype``.

    ``dtype`` may be floating point (values are small integers, exact in any float type), which
    saves a conversion when dequantizing.
    """
    bits = check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows, nbytes = packed.shape
    groups = -(-n // 8)
    if nbytes != groups * bits:
        raise ValueError(f"{nbytes} bytes per row do not hold {n} values at {bits} bits (expected {groups * bits})")
    lo = -(2 ** (bits - 1))
    if bits == 8:
        u = packed[:, :n].to(torch.int16)
    else:
        p = packed.view(rows, groups, bits).to(torch.int32)
        byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int32) * 8
        word = (p << byte_shifts).sum(-1, dtype=torch.int32)  # 8*bits <= 32 bits; 4-bit may set the sign bit
        shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * bits
        u = ((word[..., None] >> shifts) & ((1 << bits) - 1)).reshape(rows, groups * 8)[:, :n]
    return (u + lo).to(dtype)
