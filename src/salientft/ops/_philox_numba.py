"""The numba kernel of :mod:`.philox` (imported only when first needed: numba takes ~0.5 s to import).

Module-level functions, so numba's on-disk cache (``cache=True``) is reused by later processes;
every constant is an fp32 or uint32 of :mod:`.philox`, every operation one IEEE operation (no
fastmath, hence no fused multiply-add), so the numbers equal the pure-torch fallback's bit for bit.
``error_model="numpy"`` drops the Python zero-division check that would stop the loops from
vectorising (2.5x slower without it).
"""
import math

import numpy as np
from numba import float32, int32, njit, uint32, uint64

from ._philox_constants import _COS_C, _LN2, _LOG_C, _SIN_C, _SQRT2, _U24, COUNTERS, GROUP

_f = np.float32
LN2, SQRT2, U24, PI = _f(_LN2), _f(_SQRT2), _f(_U24), _f(math.pi)
LC0, LC1, LC2, LC3 = (_f(c) for c in _LOG_C)
SC0, SC1, SC2, SC3, SC4, SC5 = (_f(c) for c in _SIN_C)
CC0, CC1, CC2, CC3, CC4, CC5 = (_f(c) for c in _COS_C)
ONE, TWO, HALF, MINUS_TWO = _f(1.0), _f(2.0), _f(0.5), _f(-2.0)


@njit(inline="always", error_model="numpy", cache=True)
def rounds(c0, c1, c2, c3, k0, k1, base):
    """Philox4x32-10 of counters base ... base + COUNTERS - 1, in place (c0..c3: the four words)."""
    n = c0.size
    for i in range(n):
        q = base + uint64(i)
        c0[i] = uint32(q & uint64(0xFFFFFFFF))
        c1[i] = uint32(q >> uint64(32))
        c2[i] = uint32(0)
        c3[i] = uint32(0)
    for _ in range(10):
        for i in range(n):
            p0 = uint64(c0[i]) * uint64(0xD2511F53)
            p1 = uint64(c2[i]) * uint64(0xCD9E8D57)
            a = uint32(p1 >> uint64(32)) ^ c1[i] ^ k0
            b = uint32(p0 >> uint64(32)) ^ c3[i] ^ k1
            c1[i] = uint32(p1 & uint64(0xFFFFFFFF))
            c3[i] = uint32(p0 & uint64(0xFFFFFFFF))
            c0[i] = a
            c2[i] = b
        k0 = uint32(k0 + uint32(0x9E3779B9))
        k1 = uint32(k1 + uint32(0xBB67AE85))


@njit(inline="always", error_model="numpy", cache=True)
def gaussians(wa, wb, zc, zs, fb, fbi):
    """zc, zs = r cos, r sin of the word pairs (wa[i], wb[i]); fb/fbi: one fp32 scratch, two views."""
    n = wa.size
    for i in range(n):
        fb[i] = float32((wa[i] >> uint32(8)) + uint32(1)) * U24
    for i in range(n):  # u = 2^e * m, m in [1, 2)
        bits = fbi[i]
        zc[i] = float32(int32(bits >> uint32(23)) - int32(127))
        fbi[i] = (bits & uint32(0x007FFFFF)) | uint32(0x3F800000)
    for i in range(n):
        m = fb[i]
        e = zc[i]
        big = m > SQRT2
        m = m * HALF if big else m
        e = e + ONE if big else e
        t = (m - ONE) / (m + ONE)
        t2 = t * t
        lg = TWO * t * (ONE + t2 * (LC0 + t2 * (LC1 + t2 * (LC2 + t2 * LC3))))
        fb[i] = math.sqrt(MINUS_TWO * (e * LN2 + lg))
    for i in range(n):
        h = PI * (float32(wb[i] >> uint32(8)) * U24 - HALF)
        h2 = h * h
        s = h * (ONE - h2 * (SC0 - h2 * (SC1 - h2 * (SC2 - h2 * (SC3 - h2 * (SC4 - h2 * SC5))))))
        c = ONE - h2 * (CC0 - h2 * (CC1 - h2 * (CC2 - h2 * (CC3 - h2 * (CC4 - h2 * CC5)))))
        r = fb[i]
        zc[i] = r * (c * c - s * s)
        zs[i] = r * (TWO * s * c)


@njit(inline="always", error_model="numpy", cache=True)
def group(g, k0, k1, c0, c1, c2, c3, fb, fbi, dst):
    """The GROUP numbers of group g into dst (planes r01 cos, r01 sin, r23 cos, r23 sin)."""
    rounds(c0, c1, c2, c3, uint32(k0), uint32(k1), uint64(g) * uint64(COUNTERS))
    gaussians(c0, c1, dst[:COUNTERS], dst[COUNTERS: 2 * COUNTERS], fb, fbi)
    gaussians(c2, c3, dst[2 * COUNTERS: 3 * COUNTERS], dst[3 * COUNTERS:], fb, fbi)


@njit(nogil=True, error_model="numpy", cache=True)
def fill(out, k0, k1):
    """out (1-D fp32) = the first out.size numbers of key (k0, k1)."""
    n = out.size
    c0 = np.empty(COUNTERS, np.uint32)
    c1 = np.empty(COUNTERS, np.uint32)
    c2 = np.empty(COUNTERS, np.uint32)
    c3 = np.empty(COUNTERS, np.uint32)
    fb = np.empty(COUNTERS, np.float32)
    fbi = fb.view(np.uint32)
    z = np.empty(GROUP, np.float32)
    full = n // GROUP
    for g in range(full):
        group(g, k0, k1, c0, c1, c2, c3, fb, fbi, out[g * GROUP: (g + 1) * GROUP])
    if n % GROUP:  # the last, partial group: via z
        group(full, k0, k1, c0, c1, c2, c3, fb, fbi, z)
        out[full * GROUP:] = z[: n % GROUP]
