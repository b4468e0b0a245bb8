"""quantize_rows against docs/methods.md#row-quantizer, checked by a slow per-row, per-candidate loop."""
import pytest
import torch

from conftest import suite_device
from salientft.ops import grid
from salientft.ops.grid import clip_grid, quantize_rows

DEVICE = suite_device()


def _ref_row_errors(row: torch.Tensor, bits: int) -> tuple[list[float], list[float]]:
    """Every candidate alpha of one row and its squared error, written out one by one."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    rmax = row.abs().max()
    alphas, errs = [], []
    for i in range(80):
        p = torch.tensor(1.0 - i / 100, dtype=torch.float64, device=row.device).to(row.dtype)
        alpha = rmax * p
        delta = alpha / qmax
        e = 0.0
        q = torch.clamp(torch.round(row / delta), qmin, qmax) * delta
        for w, qw in zip(row.tolist(), q.tolist()):
            e += (w - qw) ** 2
        alphas.append(float(alpha))
        errs.append(e)
    return alphas, errs


def _weights(seed=0, out=24, inp=40):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)).to(DEVICE)
    W[2, 5] = 8.0  # an outlier: the clip search must shrink the range
    W[3] = torch.randn(inp, generator=g).to(DEVICE).round()  # few distinct values: near-ties
    W[4] = 0.0
    W[5] = torch.zeros(inp, device=DEVICE)
    W[5, 0] = -0.5  # a single non-zero: exact at p = 1
    W[6] = torch.rand(inp, generator=g).to(DEVICE) * 1e-30  # tiny but non-zero
    return W


def test_grid_is_the_80_point_grid():
    g = clip_grid(dtype=torch.float64)
    assert g.numel() == 80
    assert g[0].item() == 1.0 and abs(g[-1].item() - 0.21) < 1e-12
    assert torch.allclose(g[:-1] - g[1:], torch.full((79,), 0.01, dtype=torch.float64))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.numerics
def test_alpha_is_the_grid_argmin(bits):
    W = _weights(seed=bits)
    alpha, delta, w_q = quantize_rows(W, bits)
    qmax = 2 ** (bits - 1) - 1
    exact = 0
    for i in range(W.shape[0]):
        if W[i].abs().max() == 0:
            continue
        alphas, errs = _ref_row_errors(W[i], bits)
        best = min(range(80), key=lambda j: (errs[j], j))  # first minimum = largest clip
        got = min(range(80), key=lambda j: abs(alphas[j] - alpha[i].item()))
        assert alphas[got] == pytest.approx(alpha[i].item(), rel=1e-6)
        # the chosen candidate's error is the minimum (float summation order may break exact ties)
        assert errs[got] <= errs[best] * (1 + 1e-5) + 1e-30
        exact += got == best
    assert exact >= W.shape[0] - 3  # all rows but exact float ties pick the same grid point
    assert torch.allclose(delta, alpha / qmax)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.numerics
def test_w_q_is_the_rounded_grid(bits):
    W = _weights(seed=10 + bits)
    alpha, delta, w_q = quantize_rows(W, bits)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    levels = w_q / delta[:, None]
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.min() >= qmin - 1e-4 and levels.max() <= qmax + 1e-4
    expected = torch.clamp(torch.round(W / delta[:, None]), qmin, qmax) * delta[:, None]
    assert torch.equal(w_q, expected)


def test_zero_rows_get_alpha_one(device):
    W = torch.zeros(3, 7, device=device)
    W[1, 2] = 0.3
    alpha, delta, w_q = quantize_rows(W, 4)
    assert alpha[0].item() == 1.0 and alpha[2].item() == 1.0
    assert delta[0].item() == pytest.approx(1 / 7)
    assert torch.equal(w_q[0], torch.zeros(7, device=device)) and torch.equal(w_q[2], torch.zeros(7, device=device))
    assert alpha[1].item() == pytest.approx(0.3)  # a single value is exact at p = 1
    assert w_q[1, 2].item() == pytest.approx(0.3)


@pytest.mark.numerics
def test_chunking_changes_nothing():
    W = _weights(seed=3, out=37, inp=50)
    ref = quantize_rows(W, 4, chunk_elems=1 << 30)
    for ce in (1, 80 * 50, 80 * 50 * 3 + 7, 1 << 20):
        got = quantize_rows(W, 4, chunk_elems=ce)
        for a, b in zip(ref, got):
            assert torch.equal(a, b), ce


def test_search_memory_is_bounded_by_chunk_elems(monkeypatch):
    """The (rows x 80 x in) search buffer never exceeds chunk_elems (one row at minimum)."""
    sizes = []
    real_empty = torch.empty

    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*shape, **kw):
            t = real_empty(*shape, **kw)
            if t.dim() == 3:
                sizes.append(t.numel())
            return t

    monkeypatch.setattr(grid, "torch", _Torch())
    W = torch.randn(100, 64)  # the CPU's chunking
    quantize_rows(W, 4, chunk_elems=80 * 64 * 7)
    assert sizes and max(sizes) <= 80 * 64 * 7
    sizes.clear()
    quantize_rows(W, 4, chunk_elems=10)  # smaller than one row: one row at a time
    assert max(sizes) == 80 * 64


def test_dtypes():
    W = _weights(seed=5)
    a32, d32, q32 = quantize_rows(W, 4)
    ab, db, qb = quantize_rows(W.to(torch.bfloat16), 4)
    assert qb.dtype == torch.bfloat16 and ab.dtype == torch.float32 and db.dtype == torch.float32
    a64, d64, q64 = quantize_rows(W.double(), 4)
    assert q64.dtype == torch.float64 and a64.dtype == torch.float32
    assert q32.shape == W.shape


def test_bad_inputs(device):
    with pytest.raises(ValueError, match="bits"):
        quantize_rows(torch.randn(2, 3, device=device), 1)
    with pytest.raises(ValueError, match="bits"):
        quantize_rows(torch.randn(2, 3, device=device), 4.0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rows(torch.randn(2, 3, 4, device=device), 4)
    with pytest.raises(ValueError, match="floating-point"):
        quantize_rows(torch.ones(2, 3, dtype=torch.int64, device=device), 4)


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096), (28672, 8192)])
def test_row_chunks_by_device_few_on_accelerators_balanced_everywhere(shape):
    """7B/70B-sized layers: CPU chunks keep the cache-sized budget; "cuda" ones are a few large
    launches; every plan covers the rows once, in chunks within one row of each other."""
    out_f, in_f = shape
    assert grid.search_chunk_elems("cpu") == 1 << 20
    assert grid.search_chunk_elems("cuda") == grid.search_chunk_elems("mps") == grid.DEVICE_SEARCH_CHUNK_ELEMS
    for dev in ("cpu", "cuda"):
        budget = grid.search_chunk_elems(dev)
        chunks = grid.row_chunks(out_f, in_f, budget)
        rows = [r1 - r0 for r0, r1 in chunks]
        assert chunks[0][0] == 0 and chunks[-1][1] == out_f and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert max(rows) - min(rows) <= 1  # no small tail chunk
        assert max(rows) * grid.GRID_POINTS * in_f <= max(budget, grid.GRID_POINTS * in_f)
        # the fewest chunks the budget allows
        assert len(chunks) == -(-out_f // max(1, budget // (grid.GRID_POINTS * in_f)))
    assert len(grid.row_chunks(out_f, in_f, grid.search_chunk_elems("cuda"))) <= 150  # was up to 11008 on CPU sizes
    assert len(grid.row_chunks(11008, 4096, grid.search_chunk_elems("cuda"))) == 27
    assert grid.row_chunks(10, 3, 1) == [(i, i + 1) for i in range(10)]  # below one row: one row at a time
    assert grid.row_chunks(7, 5, 1 << 30) == [(0, 7)]
