"""GPTQ and round-to-nearest for one weight matrix, with k salient columns kept in 16 bits.

docs/methods.md#quantization-recovery: columns are processed in ascending salience with the k salient columns last,
so GPTQ's error feedback flows into the 16-bit columns, which are never rounded. The scales
(per row, or per row and group) are fitted once, before GPTQ, by the MSE clip search of docs/methods.md#row-quantizer on
the integer columns only (``quantize_rows``); groups are runs of ``group_size`` consecutive
non-salient columns in their original order, so the stored layout does not depend on the order
GPTQ visited them in.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch

from ..ops.grid import quantize_rows
from ..ops.salient import complement, salient_indices
from .packing import check_bits

log = logging.getLogger(__name__)


def group_scales(W: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Delta per row (out, 1) or per row and group (out, ceil(n/group_size)) via quantize_rows.

    A thin wrapper: full groups are reshaped into rows of length group_size, the last partial
    group (if any) is quantized as rows of its own length.
    """
    out_f, n = W.shape
    if group_size is None or group_size >= n:
        _, delta, _ = quantize_rows(W, bits)
        return delta.view(out_f, 1)
    full = n // group_size
    parts = []
    if full:
        _, d, _ = quantize_rows(W[:, : full * group_size].reshape(out_f * full, group_size), bits)
        parts.append(d.view(out_f, full))
    if n % group_size:
        _, d, _ = quantize_rows(W[:, full * group_size :], bits)
        parts.append(d.view(out_f, 1))
    return torch.cat(parts, dim=1)


def n_groups(n_int: int, group_size: int | None) -> int:
    """Scale groups of a row of ``n_int`` integer columns (1 without groups)."""
    return 1 if group_size is None else -(-n_int // group_size)


def expand_groups(scale: torch.Tensor, n_int: int, group_size: int | None) -> torch.Tensor:
    """(out, groups) scale -> (out, n_int) per-column scale (a view when there are no groups)."""
    if group_size is None:
        return scale.expand(-1, n_int)
    return scale.repeat_interleave(group_size, dim=1)[:, :n_int]


def _split(in_features: int, salient_idx, device):
    """(sorted salient columns, the integer columns) of a layer with ``in_features`` inputs."""
    idx = salient_indices(salient_idx, in_features, allow_empty=True, device=device)
    return idx, complement(idx, in_features)


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """LAPACK's Cholesky on the CPU blocks its work by the thread count, so its last bits (and, at
    2 bits, GPTQ's integers) change with ``torch.set_num_threads``; run it on one thread. A no-op
    on an accelerator (cuSOLVER does not depend on the host's threads)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _mean_diag(H: torch.Tensor) -> float:
    """mean(diag H) summed exactly (``math.fsum``): a torch mean of more than 32768 entries splits
    its sum by the thread count."""
    return math.fsum(torch.diagonal(H).double().tolist()) / H.shape[0]


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor U of (H + d*mean(diag H)*I)^-1 that GPTQ's column loop uses (fp32),
    the same bits for any CPU thread count.

    With R the order reversal, chol(R H R) = R V R gives an upper V with H = V V^T, and
    U = V^-1 satisfies U^T U = H^-1: one Cholesky (on one thread, ``_one_thread``) and one
    triangular solve, whose BLAS work is split over independent right-hand sides (each entry keeps
    its summation order whatever the threads). Dampening starts at ``damp`` and grows tenfold while
    H is not positive definite (6 tries).
    """
    n = H.shape[0]
    mean_diag = _mean_diag(H)
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    flipped = H.flip(0, 1)
    d = damp
    for _ in range(6):
        with _one_thread(H.device):
            L, info = torch.linalg.cholesky_ex(flipped + (d * mean_diag) * eye)
        if int(info) == 0:
            V = L.flip(0, 1)  # upper, H + d*mean*I = V V^T
            U = torch.linalg.solve_triangular(V, eye, upper=True)
            if torch.isfinite(U).all():
                return U
        log.warning("Hessian not positive definite with dampening %g; retrying with %g", d, d * 10)
        d *= 10
    raise ValueError("the calibration Hessian is singular even with strong dampening; use more calibration data")


@torch.no_grad()
def rtn_quantize(W: torch.Tensor, bits: int, salient_idx, group_size: int | None = None):
    """Round to nearest with MSE-searched scales; the salient columns are kept unchanged.

    Returns ``(q, scale, salient_weight)``: int8 (out, in-k) in original column order, float32
    (out, groups), and the salient columns (out, k) in fp32.
    """
    check_bits(bits)
    W = W.detach().float()
    idx, int_idx = _split(W.shape[1], salient_idx, W.device)
    w_int = W[:, int_idx]
    scale = group_scales(w_int, bits, group_size)
    s = expand_groups(scale, int_idx.numel(), group_size)
    q = torch.clamp(torch.round(w_int / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q.to(torch.int8), scale, W[:, idx].clone()


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    salient_idx,
    scores: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    damp: float = 0.01,
    block_size: int = 64,
):
    """GPTQ (Frantar et al. 2023) with the salient columns last and kept in 16 bits.

    ``H`` is the (in, in) sum of x^T x over calibration tokens. Non-salient columns are visited in
    ascending ``scores`` (natural order when None), then the salient ones; quantization stops
    before the salient columns, which keep their error-compensated values. Dampening adds
    ``damp * mean(diag H)`` to the diagonal. Columns never activated (H_jj = 0) that are not
    salient are set to 0, as in GPTQ.

    Returns ``(q, scale, salient_weight)`` as ``rtn_quantize``.
    """
    check_bits(bits)
    W = W.detach().float().clone()
    out_f, in_f = W.shape
    if tuple(H.shape) != (in_f, in_f):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected ({in_f}, {in_f})")
    H = H.detach().to(torch.float64).clone()
    idx, int_idx = _split(in_f, salient_idx, W.device)
    n_int, k = int_idx.numel(), idx.numel()
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    dead = torch.diagonal(H) == 0
    if dead.any():
        H[dead, dead] = 1.0
        dead_int = dead.clone()
        dead_int[idx] = False
        W[:, dead_int] = 0.0

    scale = group_scales(W[:, int_idx], bits, group_size)  # fitted on the integer columns only
    col_scale = expand_groups(scale, n_int, group_size)  # (out, n_int), original int order

    if scores is None:
        order_int, order_sal = int_idx, idx
    else:
        scores = torch.as_tensor(scores, dtype=torch.float64, device=W.device).flatten()
        if scores.numel() != in_f:
            raise ValueError(f"scores have {scores.numel()} entries, the layer has {in_f} columns")
        order_int = int_idx[torch.sort(scores[int_idx], stable=True).indices]
        order_sal = idx[torch.sort(scores[idx], stable=True).indices]
    perm = torch.cat([order_int, order_sal])
    pos_in_int = torch.full((in_f,), -1, dtype=torch.long, device=W.device)
    pos_in_int[int_idx] = torch.arange(n_int, device=W.device)
    S = col_scale[:, pos_in_int[order_int]]  # scales in visiting order

    Wp = W[:, perm]
    U = inverse_hessian_factor(H[perm][:, perm].float(), damp)
    Q = torch.empty(n_int, out_f, dtype=torch.float32, device=W.device)  # rows = columns: contiguous writes
    S_t = S.t().contiguous()
    for i1 in range(0, n_int, block_size):
        i2 = min(i1 + block_size, n_int)
        W1 = Wp[:, i1:i2].t().contiguous()  # (cols, out): each column a contiguous row
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        inv_d = 1.0 / torch.diagonal(U1)
        for i in range(i2 - i1):
            w = W1[i]
            # exactly the rounding of docs/methods.md#row-quantizer
            q = torch.div(w, S_t[i1 + i]).round_().clamp_(qmin, qmax)
            Q[i1 + i] = q
            err = Err1[i]
            torch.mul(w - q * S_t[i1 + i], inv_d[i], out=err)
            if i + 1 < i2 - i1:
                W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1.0)
        Wp[:, i2:] -= Err1.t().matmul(U[i1:i2, i2:])
    Q = Q.t()
    q_int = torch.empty_like(Q)
    q_int[:, pos_in_int[order_int]] = Q
    sal = torch.empty(out_f, k, dtype=torch.float32, device=W.device)
    pos_in_sal = torch.searchsorted(idx, order_sal)
    sal[:, pos_in_sal] = Wp[:, n_int:]
    return q_int.to(torch.int8), scale, sal
