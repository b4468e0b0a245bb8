"""GIFT-SW's weight noise, drawn block by block from a seed (METHODS.md §1.3).

One N(0, 1) draw of shape (out, in) per forward, scaled per row by ``noise_std`` (Delta_i / 2)
and added to the non-salient columns, shared by all tokens. By default the draw is never kept,
nor even built whole: forward and backward run over row blocks, each drawn from a generator
seeded by (seed, block start row), so backward regenerates the identical noise from a saved
64-bit seed. The seed itself comes from torch's global RNG (:func:`draw_seed`), so seeding torch
makes runs reproducible, and gradient checkpointing (which restores the RNG state before
recomputing) recomputes the same noise. ``keep=True`` (``keep_noise`` in the configs) trades
memory for time: forward writes the noisy weight of the layer whole, in the compute dtype, and
backward multiplies by it instead of drawing again (one (out, in) tensor per layer held from
forward to backward; freed by backward).

Numbers. N(0, 1) is always drawn in fp32 (torch's vectorised Box-Muller; a bf16 draw is slower)
and the noisy weight ``W + noise_std * z`` is computed in fp32 and rounded once to the compute
dtype, so a seed means the same ``z`` whatever the compute dtype.

Parallel drawing (CPU). torch's CPU generator is sequential: one ``normal_`` call uses one core.
Because every block has its own seed, blocks can be drawn in any order by any thread, each with
its own generator (``normal_`` releases the GIL), and the noise stays bit-identical whatever the
thread count. :func:`noisy_row_blocks` keeps ``noise_threads()`` blocks in flight in a small
thread pool, ahead of the block the caller is using (a ring of ``threads + 1`` fp32 buffers of
about 1 MB each): while the main thread adds block i to W and multiplies it (torch's intra-op
threads), the pool draws blocks i+1, i+2, ... The split: the pool threads only call ``normal_``
(serial, no OpenMP team of their own); the scale-and-add, the salient columns and the matmul
stay in the main thread.

Devices. On CPU the blocks are ~256K weights (1 MB fp32: drawn, added and multiplied while in
cache). On CUDA (any non-CPU device) a block is up to 16M weights, so most layers take one draw
with the device's generator (small blocks would be dominated by kernel launches) and no threads
are used. The noise of a seed therefore differs between CPU and CUDA (different generators and
blocks), as it does between torch's CPU and CUDA RNGs in general; on one device type it depends
only on the seed and the layer shape.

Both ``gift.SalientLinear`` and ``quant.QuantizedSalientLinear`` draw their noise here, so a
seed means the same noise in either.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait

import torch

# Row blocks of about this many weights on CPU (1 MB in fp32): the block is drawn, scaled, added
# to W and multiplied while it is still in cache, and no (out, in) temporary is ever allocated.
# The block size depends only on the layer shape, so the noise of a given seed is the same
# whatever the thread count.
NOISE_BLOCK_ELEMS = 1 << 18  # measured: 1<<16..1<<20 within 10%, smaller blocks much slower
# On CUDA (and any other non-CPU device): one draw per layer up to 16M weights (64 MB fp32).
DEVICE_NOISE_BLOCK_ELEMS = 1 << 24
SEED_MIX = 0x9E3779B97F4A7C15
NOISE_DTYPE = torch.float32  # the dtype z ~ N(0, 1) is drawn in, whatever the compute dtype
# How much lower the drawing threads' scheduling priority is than the caller's (Linux nice
# increments; 0: the same). See the module docstring for what was measured.
DRAW_THREAD_NICE = 0
WAVE_BLOCKS = 0

_local = threading.local()  # per-thread generators: a torch.Generator is not thread-safe to re-seed
_noise_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size: tuple[int, int] | None = None
_pool_lock = threading.Lock()


def noise_generator(device: torch.device) -> torch.Generator:
    """This thread's cached generator of ``device`` (re-seeded for every block)."""
    gens = getattr(_local, "generators", None)
    if gens is None:
        gens = _local.generators = {}
    device = torch.device(device)
    g = gens.get(device)
    if g is None:
        g = gens[device] = torch.Generator(device=device)
    return g


def draw_seed() -> int:
    """A 62-bit noise seed from the global CPU RNG: reproducible under ``torch.manual_seed`` and
    restored by gradient checkpointing."""
    return int(torch.randint(0, 2**62, (1,)).item())


def block_seed(seed: int, r0: int) -> int:
    """The generator seed of the block that starts at row ``r0``."""
    return (seed + r0 * SEED_MIX) % (1 << 63)


def noise_block_rows(out_features: int, in_features: int, device_type: str = "cpu") -> int:
    """Rows per noise block of an (out, in) layer on ``device_type``: ~1 MB blocks on "cpu",
    one block (up to ``DEVICE_NOISE_BLOCK_ELEMS`` weights) on "cuda" and other devices."""
    elems = NOISE_BLOCK_ELEMS if device_type == "cpu" else DEVICE_NOISE_BLOCK_ELEMS
    return max(1, min(out_features, elems // max(1, in_features)))


def noise_blocks(out_features: int, in_features: int, device_type: str = "cpu") -> list[tuple[int, int]]:
    """Row ranges [r0, r1) in which the weight noise of a layer is drawn."""
    rows = noise_block_rows(out_features, in_features, device_type)
    return [(r0, min(out_features, r0 + rows)) for r0 in range(0, out_features, rows)]


def set_noise_threads(n: int | None) -> None:
    """Threads that draw CPU noise blocks (None: ``$SALIENTFT_NOISE_THREADS``, else
    ``torch.get_num_threads()``). 1 draws in the calling thread. The noise is the same for any value."""
    global _noise_threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"noise threads must be a positive integer or None, got {n!r}")
    _noise_threads = n


def noise_threads() -> int:
    """How many threads draw CPU noise blocks (see :func:`set_noise_threads`)."""
    if _noise_threads is not None:
        return _noise_threads
    env = os.environ.get("SALIENTFT_NOISE_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"SALIENTFT_NOISE_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"SALIENTFT_NOISE_THREADS must be a positive integer, got {env!r}")
        return n
    return max(1, torch.get_num_threads())


def _thread_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != (n, DRAW_THREAD_NICE):
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="salientft-noise",
                                       initializer=_lower_priority, initargs=(DRAW_THREAD_NICE,))
            _pool_size = (n, DRAW_THREAD_NICE)
        return _pool


def _lower_priority(nice: int) -> None:
    """Run this (drawing) thread ``nice`` steps below the process's priority (Linux: per thread)."""
    if nice <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:  # not permitted here: keep the priority
        pass


def _forget_pool_after_fork() -> None:  # a forked child (e.g. a DataLoader worker) has no pool threads
    global _pool, _pool_size
    _pool, _pool_size = None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def draw_noise(out: torch.Tensor, seed: int, r0: int) -> torch.Tensor:
    """Fill ``out`` (the noise rows of the block starting at row ``r0``) with N(0, 1) from this
    thread's generator seeded by (seed, r0)."""
    g = noise_generator(out.device).manual_seed(block_seed(seed, r0))
    return out.normal_(generator=g)


def drawn_blocks(seed: int, blocks: list[tuple[int, int]], in_features: int, device, threads: int = 1):
    """Yield (r0, r1, z) for each block in order, z (r1-r0, in) fp32 N(0, 1) from (seed, r0).

    With ``threads`` > 1 (CPU only) a pool draws the next ``threads`` blocks while the caller
    uses the current one. A yielded z is valid until the generator advances.
    """
    device = torch.device(device)
    rows = blocks[0][1] - blocks[0][0]

    def view(buf, r0, r1):
        return buf[: (r1 - r0) * in_features].view(r1 - r0, in_features)

    if threads <= 1 or len(blocks) == 1 or device.type != "cpu":
        buf = torch.empty(rows * in_features, dtype=NOISE_DTYPE, device=device)
        for r0, r1 in blocks:
            yield r0, r1, draw_noise(view(buf, r0, r1), seed, r0)
        return
    if WAVE_BLOCKS:  # experiment: draw WAVE_BLOCKS blocks, wait for all, hand them out, repeat
        wave = min(len(blocks), max(threads, WAVE_BLOCKS))
        bufs = [torch.empty(rows * in_features, dtype=NOISE_DTYPE) for _ in range(wave)]
        pool = _thread_pool(threads)
        for w0 in range(0, len(blocks), wave):
            part = blocks[w0:w0 + wave]
            futs = [pool.submit(draw_noise, view(bufs[j], r0, r1), seed, r0) for j, (r0, r1) in enumerate(part)]
            wait(futs)
            for (r0, r1), f in zip(part, futs):
                yield r0, r1, f.result()
        return
    depth = min(len(blocks), threads + 1)  # `threads` blocks drawn while the caller uses one
    bufs = [torch.empty(rows * in_features, dtype=NOISE_DTYPE) for _ in range(depth)]
    pool = _thread_pool(threads)
    pending = deque()

    def submit(i):
        r0, r1 = blocks[i]
        pending.append(pool.submit(draw_noise, view(bufs[i % depth], r0, r1), seed, r0))

    for i in range(depth):
        submit(i)
    try:
        for i, (r0, r1) in enumerate(blocks):
            z = pending.popleft().result()
            yield r0, r1, z
            if i + depth < len(blocks):
                submit(i + depth)  # into the buffer the caller just released
    finally:  # the caller stopped early (or failed): no draw may outlive this call
        for f in pending:
            f.cancel()
        wait(pending)


def noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype, out=None):
    """Yield (r0, r1, rows r0:r1 of the noisy weight in ``dtype``) for each noise block in order.

    Rows are ``W + noise_std * z`` (computed in fp32, rounded once to ``dtype``) with the
    columns ``idx`` replaced by ``salient_weight``. With ``out`` ((out, in), ``dtype``; it may be
    ``weight`` itself) each block is written into ``out[r0:r1]``; without, blocks live in scratch
    buffers and a yielded block is valid until the next one is drawn: consume it before advancing.
    """
    out_f, in_f = weight.shape
    device = weight.device
    blocks = noise_blocks(out_f, in_f, device.type)
    threads = noise_threads() if device.type == "cpu" else 1
    std = noise_std.view(-1, 1)
    scratch = None
    for r0, r1, z in drawn_blocks(seed, blocks, in_f, device, threads):
        if out is not None:
            blk = out[r0:r1]
        elif dtype == NOISE_DTYPE:
            blk = z  # in place: z is not needed after this
        else:
            if scratch is None:
                scratch = torch.empty((blocks[0][1] - blocks[0][0]) * in_f, dtype=dtype, device=device)
            blk = scratch[: (r1 - r0) * in_f].view(r1 - r0, in_f)
        torch.addcmul(weight[r0:r1], z, std[r0:r1], out=blk)
        blk.index_copy_(1, idx, salient_weight[r0:r1].to(dtype))
        yield r0, r1, blk


def noisy_weight(weight, salient_weight, idx, noise_std, seed, dtype, out=None):
    """The full (out, in) noisy weight with columns idx replaced (same noise as the blocked path).

    ``out`` may be ``weight`` itself (a temporary the caller owns) to add the noise in place.
    Used by references, by layers that need the whole matrix, and by ``keep=True``.
    """
    if out is None:
        out = torch.empty(weight.shape, device=weight.device, dtype=dtype)
    for _ in noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype, out=out):
        pass
    return out


def noisy_forward(x2, weight, salient_weight, idx, noise_std, seed, dtype, keep=False):
    """(x2 (tokens, in) @ (W + noise)^T, kept), one row block of the noisy weight at a time.

    ``kept`` is None, or with ``keep`` the whole (out, in) noisy weight in ``dtype``, to pass to
    :func:`noisy_input_grad` instead of drawing the noise again.
    """
    y = torch.empty(x2.shape[0], weight.shape[0], device=x2.device, dtype=dtype)
    kept = torch.empty(weight.shape, device=weight.device, dtype=dtype) if keep else None
    for r0, r1, blk in noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype, out=kept):
        torch.mm(x2, blk.t(), out=y[:, r0:r1])
    return y, kept


def noisy_input_grad(g2, weight, salient_weight, idx, noise_std, seed, dtype, kept=None):
    """g2 (tokens, out) @ (W + noise): from ``kept`` (see :func:`noisy_forward`) or regenerating
    the same noise block by block. Both sum the same blocks in the same order: bit-identical."""
    gx = torch.zeros(g2.shape[0], weight.shape[1], device=g2.device, dtype=dtype)
    if kept is not None:
        blocks = ((r0, r1, kept[r0:r1]) for r0, r1 in noise_blocks(*weight.shape, weight.device.type))
    else:
        blocks = noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype)
    for r0, r1, blk in blocks:
        gx.addmm_(g2[:, r0:r1], blk)
    return gx
