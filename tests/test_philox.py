"""The Philox Gaussian generator of the weight noise (ops/philox.py).

The numbers are a fixed function of (key, position), so these checks are deterministic: the
statistics below are computed on fixed numbers and either hold on every machine or on none
(every operation is one IEEE fp32 or integer operation; no test here depends on the CPU).
"""
import logging
import math

import pytest
import torch

import salientft.ops.philox as P


pytestmark = pytest.mark.cpu_only("the CPU noise generator: the numba Philox kernel and its torch fallback")


def test_philox_matches_the_published_known_answers():
    """Random123's kat_vectors for philox4x32-10 (counter words, key words -> output words)."""
    cases = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, 0xFFFFFFFF_FFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0x299F31D0 << 32) | 0xA4093822,
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for words, key, want in cases:
        got = P.philox4x32(*(torch.tensor([w], dtype=torch.int64) for w in words), key)
        assert tuple(int(w) for w in got) == want


@pytest.mark.parametrize("n", [1, 3, 4095, 4096, 4097, 3 * 4096, 50_001])
@pytest.mark.parametrize("key", [0, 7, (1 << 63) - 1, (1 << 64) - 1])
def test_kernel_and_torch_fallback_give_the_same_bits(n, key):
    if P.kernel() is None:
        pytest.fail("numba is a dependency of salientft: the compiled kernel must load here")
    a = P.philox_normal_(torch.empty(n), key)
    b = P.philox_normal_torch(n, key)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_a_prefix_is_the_same_numbers_and_keys_differ():
    long = P.philox_normal_(torch.empty(10_000), 5)
    assert torch.equal(P.philox_normal_(torch.empty(5_000), 5), long[:5_000])
    other = P.philox_normal_(torch.empty(10_000), 6)
    assert (other == long).float().mean() < 1e-3


def test_group_layout_is_the_documented_one():
    """Group 0: planes r01*cos, r01*sin, r23*cos, r23*sin of counters 0..1023."""
    z = P.philox_normal_(torch.empty(P.GROUP), 11)
    w = P.philox_bits_torch(torch.arange(P.COUNTERS), 11)
    c01, s01 = P._gaussians_torch(w[0], w[1])
    c23, s23 = P._gaussians_torch(w[2], w[3])
    assert torch.equal(z, torch.cat([c01, s01, c23, s23]))


def test_box_muller_is_within_a_few_ulps_of_float64():
    """The fp32 polynomials for ln, sin and cos against float64 libm, on 2^20 pairs."""
    w = P.philox_bits_torch(torch.arange(1 << 20), 2024)
    zc, zs = P._gaussians_torch(w[0], w[1])
    u = ((w[0] >> 8) + 1).double() * 2.0 ** -24
    v = (w[1] >> 8).double() * 2.0 ** -24
    r, a = torch.sqrt(-2 * torch.log(u)), 2 * math.pi * (v - 0.5)
    err = torch.maximum((zc.double() - r * torch.cos(a)).abs(), (zs.double() - r * torch.sin(a)).abs())
    # measured 4.3e-7 * r (about 4 ulps of fp32); 1e-6 * r + 1e-7 leaves room without hiding a wrong term
    assert (err <= 1e-6 * r + 1e-7).all()


def test_numbers_are_standard_normal_and_uncorrelated():
    n = 1 << 21
    z = P.philox_normal_(torch.empty(n), 123).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs((z ** 3).mean()) < 5 * math.sqrt(15) * se  # skewness
    assert abs((z ** 4).mean() - 3) < 5 * math.sqrt(96) * se  # kurtosis
    # Kolmogorov-Smirnov distance to N(0, 1); 1.95 / sqrt(n) is the 0.1 % critical value
    s, _ = z.sort()
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()
    assert d < 1.95 * se
    g = z.view(-1, P.GROUP)
    for a, b in [(z[:-1], z[1:]), (g[:, :1024], g[:, 1024:2048]), (g[:, :1024], g[:, 2048:3072]),
                 (g[:-1], g[1:])]:  # neighbours, the cos/sin planes of a pair, the two pairs, next groups
        assert abs(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1]) < 5 / math.sqrt(a.numel())
    assert z.abs().max() <= math.sqrt(2 * 24 * math.log(2)) + 1e-5


def test_refuses_what_it_cannot_fill():
    for bad in (torch.empty(4, dtype=torch.float64), torch.empty(4, 4).t(), torch.empty(4, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="contiguous CPU fp32"):
            P.philox_normal_(bad, 1)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
        P.philox_normal_(torch.empty(4), -1)


def test_without_numba_the_fallback_gives_the_same_numbers_and_says_how_to_fix(monkeypatch, caplog):
    want = P.philox_normal_(torch.empty(9000), 77)

    def broken():
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(P, "_kernel", None)
    monkeypatch.setattr(P, "_kernel_failed", None)
    monkeypatch.setattr(P, "_build_kernel", broken)
    with caplog.at_level(logging.WARNING, logger="salientft.ops.philox"):
        got = P.philox_normal_(torch.empty(9000), 77)
        P.philox_normal_(torch.empty(10), 1)
    assert torch.equal(got, want)
    assert P.backend() == "torch"
    warnings = [r for r in caplog.records if "numba" in r.getMessage()]
    assert len(warnings) == 1 and "pip install" in warnings[0].getMessage()


def test_environment_can_force_the_fallback(monkeypatch):
    monkeypatch.setattr(P, "_kernel", None)
    monkeypatch.setattr(P, "_kernel_failed", None)
    monkeypatch.setenv("SALIENTFT_PHILOX", "torch")
    assert P.backend() == "torch"
