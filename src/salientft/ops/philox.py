"""N(0, 1) numbers from Philox4x32-10 and Box-Muller: 2.6x faster than ``torch.normal_`` on CPU.

Why. GIFT-SW's weight noise draws out x in Gaussians per layer, twice per step (docs/methods.md#gift-noise),
and torch's CPU generator (MT19937) costs about 3.4 ns per number per thread, which made the
noise, not the matmuls, the cost of a step (``ops/noise.py``). This module draws the
same distribution at about 1.3 ns per number per thread.

What. A counter-based generator: the number at position i of a block is a pure function of
(key, i), so blocks can be drawn in any order by any thread. Philox4x32-10 (Salmon et al., SC'11;
the generator of cuRAND, JAX and torch's CUDA RNG) turns counter q and a 64-bit key into four
32-bit words; Box-Muller turns each pair of words into two Gaussians. Numbers come in groups of
``GROUP`` = 4096: group g uses counters g*1024 ... g*1024+1023, and its four planes of 1024 are
r01*cos, r01*sin (words 0, 1) and r23*cos, r23*sin (words 2, 3).

Transform. A uniform u = (w >> 8 + 1) * 2^-24 in (0, 1] (24 bits, as torch's fp32 draws),
r = sqrt(-2 ln u) and angle 2 pi v with v = (w' >> 8) * 2^-24. ln, sin and cos are evaluated by
short polynomials in fp32 (ln m for m in [sqrt(1/2), sqrt(2)) by the atanh series to t^9;
sin/cos of the half angle in [-pi/2, pi/2) by Taylor to degree 13/12, then the double-angle
formulas), all within a few fp32 ulps of the exact values (tested against float64). Every step
is one IEEE fp32 operation, no fused multiply-add, no library call: the numbers are bit-identical
on every x86 CPU, for any thread count, and between the two implementations:

- the kernel (``_philox_numba.py``), compiled by numba (a dependency of salientft; LLVM, no C
  compiler needed) and cached on disk after the first compile (about 5 s once per machine, then
  0.6 s per process to import numba and load it); its loops vectorise to SIMD;
- a pure-torch fallback with the same operations in the same order, used when numba cannot be
  imported or ``SALIENTFT_PHILOX=torch``: 17-24 ns per number (int64 passes over memory, 15x the
  kernel, 6x ``normal_``), so a warning names the fix once. It exists so that a seed means the
  same noise on every install, and it is the tests' reference for the kernel.

Known answers: the Philox rounds reproduce Random123's published test vectors (tests/test_philox.py).
Why not the alternatives (one thread, 6.3M numbers, this AMD EPYC): numpy's ziggurat 8.0-8.5 ns;
torch ops on uniforms 4.3 ns; a ``torch.compile``d hash needs a C++ compiler and 18 s per process.

Largest |z| is sqrt(2 * 24 ln 2) = 5.77, as for any 24-bit uniform source.
"""
from __future__ import annotations

import logging
import math
import os
import threading

import torch

from ._philox_constants import (  # shared with the kernel (_philox_numba.py)
    _COS_C, _LN2, _LOG_C, _M32, _MUL0, _MUL1, _ROUNDS, _SIN_C, _SQRT2, _U24, _WEYL0, _WEYL1, COUNTERS, GROUP,
)

log = logging.getLogger(__name__)

_kernel = None
_kernel_lock = threading.Lock()
_kernel_failed: str | None = None


def split_key(key: int) -> tuple[int, int]:
    """The two 32-bit Philox key words of a non-negative 64-bit key."""
    if not 0 <= key < 1 << 64:
        raise ValueError(f"Philox key must be in [0, 2**64), got {key}")
    return key & _M32, key >> 32


def _build_kernel():
    """Compile (or load from numba's on-disk cache) the fill kernel and run it once."""
    import numpy as np

    from ._philox_numba import fill

    fill(np.empty(GROUP + 3, np.float32), 1, 2)  # compile or load now, not inside a training step
    return fill


def kernel():
    """The compiled fill kernel, or None (numba missing or failing: the torch fallback is used)."""
    global _kernel, _kernel_failed
    if _kernel is not None or _kernel_failed is not None:
        return _kernel
    with _kernel_lock:
        if _kernel is None and _kernel_failed is None:
            if os.environ.get("SALIENTFT_PHILOX", "").strip().lower() == "torch":
                _kernel_failed = "SALIENTFT_PHILOX=torch"
            else:
                try:
                    _kernel = _build_kernel()
                except Exception as exc:  # ImportError, or a numba/LLVM failure on this platform
                    _kernel_failed = f"{type(exc).__name__}: {exc}"
                    log.warning("numba is unavailable (%s): GIFT-SW's weight noise uses the pure-torch "
                                "Philox fallback, about 15x slower to draw (same numbers). Fix: "
                                "pip install 'numba>=0.59'", _kernel_failed)
    return _kernel


def backend() -> str:
    """"numba" or "torch": which implementation :func:`philox_normal_` uses in this process."""
    return "numba" if kernel() is not None else "torch"


def philox_normal_(out: torch.Tensor, key: int) -> torch.Tensor:
    """Fill ``out`` (CPU, fp32, contiguous) with the N(0, 1) numbers of ``key``, in place.

    Releases the GIL (numba kernel), so threads can fill different blocks at once.
    """
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"philox_normal_ fills a contiguous CPU fp32 tensor, got {out.dtype} on "
                         f"{out.device} (contiguous={out.is_contiguous()})")
    k0, k1 = split_key(key)
    if out.numel() == 0:
        return out
    fill = kernel()
    if fill is not None:
        fill(out.detach().view(-1).numpy(), k0, k1)
    else:
        out.view(-1).copy_(philox_normal_torch(out.numel(), key))
    return out


def philox4x32(c0, c1, c2, c3, key: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of the counter words c0..c3 (int64 tensors holding uint32), in torch ops.

    Products of two 32-bit values wrap in int64; ``>> 32`` then ``& 0xFFFFFFFF`` still gives their
    high word (two's complement), so this matches the kernel's uint64 arithmetic bit for bit."""
    return _rounds(c0, c1, c2, c3, *split_key(key))


def _rounds(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """The ten Philox rounds; the key words may be ints or int64 tensors (one key per row)."""
    for _ in range(_ROUNDS):
        p0, p1 = c0 * _MUL0, c2 * _MUL1
        c0, c1, c2, c3 = ((p1 >> 32) & _M32) ^ c1 ^ k0, p1 & _M32, ((p0 >> 32) & _M32) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + _WEYL0) & _M32, (k1 + _WEYL1) & _M32
    return c0, c1, c2, c3


def philox_bits_torch(counters: torch.Tensor, key: int) -> tuple[torch.Tensor, ...]:
    """The four words of int64 counters q (words: q's low and high 32 bits, 0, 0), as the kernel."""
    zero = torch.zeros_like(counters)
    return philox4x32(counters & _M32, counters >> 32, zero, zero, key)


def _gaussians_torch(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller of word pairs, the kernel's fp32 operations in the same order."""
    f = torch.float32
    c = lambda v: torch.tensor(v, dtype=f)  # noqa: E731 - an fp32 scalar, as the kernel's constants
    one, two, half = c(1.0), c(2.0), c(0.5)
    u = ((wa >> 8) + 1).to(f) * c(_U24)
    bits = u.view(torch.int32)
    e = ((bits >> 23) - 127).to(f)
    m = ((bits & 0x007FFFFF) | 0x3F800000).view(f)
    big = m > c(_SQRT2)
    m = torch.where(big, m * half, m)
    e = torch.where(big, e + one, e)
    t = (m - one) / (m + one)
    t2 = t * t
    lc = [c(v) for v in _LOG_C]
    lg = two * t * (one + t2 * (lc[0] + t2 * (lc[1] + t2 * (lc[2] + t2 * lc[3]))))
    # torch's fp32 sqrt is not correctly rounded (SIMD approximation); sqrt in fp64 rounded to fp32 is
    r = (c(-2.0) * (e * c(_LN2) + lg)).double().sqrt().float()
    h = c(math.pi) * ((wb >> 8).to(f) * c(_U24) - half)
    h2 = h * h
    sc, cc = [c(v) for v in _SIN_C], [c(v) for v in _COS_C]
    s = h * (one - h2 * (sc[0] - h2 * (sc[1] - h2 * (sc[2] - h2 * (sc[3] - h2 * (sc[4] - h2 * sc[5]))))))
    co = one - h2 * (cc[0] - h2 * (cc[1] - h2 * (cc[2] - h2 * (cc[3] - h2 * (cc[4] - h2 * cc[5])))))
    return r * (co * co - s * s), r * (two * s * co)


def philox_normal_torch(n: int, key: int, groups_per_pass: int = 64) -> torch.Tensor:
    """The first ``n`` numbers of ``key`` in pure torch (the fallback and the tests' reference)."""
    out = torch.empty(n, dtype=torch.float32)
    groups = -(-n // GROUP)
    for g0 in range(0, groups, groups_per_pass):
        g1 = min(groups, g0 + groups_per_pass)
        q = torch.arange(g0 * COUNTERS, g1 * COUNTERS, dtype=torch.int64)
        w0, w1, w2, w3 = philox_bits_torch(q, key)
        planes = [*_gaussians_torch(w0, w1), *_gaussians_torch(w2, w3)]
        z = torch.stack([p.view(g1 - g0, COUNTERS) for p in planes], dim=1).reshape(-1)
        s0 = g0 * GROUP
        out[s0: min(n, s0 + z.numel())] = z[: n - s0]
    return out


def philox_normal_keys(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(len(keys), n): row j holds the first ``n`` numbers of key ``keys[j]``, in torch ops on
    ``keys``' device: the numba kernel's numbers bit for bit, on any device.

    This is how an accelerator draws GIFT-SW's weight noise (``ops/noise.py``): many blocks in one
    set of launches, keys computed on the device (no host-to-device copy, so no sync). Every step
    is an integer op or one IEEE fp32 op (no fused multiply-add across ops; the square root in
    fp64), so the numbers do not depend on the GPU model, its SM count or the launch grid.
    ``keys``: int64, values in [0, 2**63)."""
    k = keys.view(-1, 1)
    groups = -(-n // GROUP)
    q = torch.arange(groups * COUNTERS, dtype=torch.int64, device=keys.device).view(1, -1)
    zero = torch.zeros((), dtype=torch.int64, device=keys.device)
    w0, w1, w2, w3 = _rounds(q & _M32, q >> 32, zero, zero, k & _M32, k >> 32)
    planes = [*_gaussians_torch(w0, w1), *_gaussians_torch(w2, w3)]
    z = torch.stack([p.view(k.shape[0], groups, COUNTERS) for p in planes], dim=2)
    return z.view(k.shape[0], groups * GROUP)[:, :n]
