"""GIFT-SW's weight noise, drawn in seeded row blocks (docs/methods.md#gift-noise).

One N(0, 1) draw of shape (out, in) per forward, scaled per row by ``noise_std`` (Delta_i / 2)
and added to the non-salient columns, shared by all tokens. The draw is made of row blocks,
each from a generator seeded by (seed, block start row), so it can be regenerated exactly:
by default backward draws the identical noise again from the saved 64-bit seed instead of
keeping it. The seed itself comes from torch's global RNG (:func:`draw_seed`), so seeding torch
makes runs reproducible, and gradient checkpointing (which restores the RNG state before
recomputing) recomputes the same noise. ``keep=True`` (``keep_noise`` in the configs) trades
memory for time: forward writes the layer's whole noisy weight, in the compute dtype, and
backward multiplies by it instead of drawing again (one (out, in) tensor per layer held from
forward to backward, freed by backward; outputs and gradients bit-identical to regenerating).

Blocks and chunks. CPU blocks are ~256K weights (``NOISE_BLOCK_ELEMS``, 1 MB in fp32): the
unit of seeding, each drawn by one thread. Consecutive blocks form chunks of up to
``WAVE_ELEMS`` = 8M weights (:func:`noise_chunks`; a whole layer up to 4096 x 2048): a chunk is
drawn, scaled and added to W, multiplied with one matmul, and dropped, so no more than 32 MB of
fp32 scratch exists at a time, whatever the layer. Blocks and chunks depend only on the layer
shape and the device type, never on the thread count, so neither do the outputs and gradients.

Numbers. N(0, 1) is always drawn in fp32 and the noisy weight ``W + noise_std * z`` is computed in
fp32 and rounded once to the compute dtype, so a seed means the same ``z`` whatever the compute
dtype. On CPU the numbers come from :mod:`.philox` (Philox4x32-10 + Box-Muller, keyed by the
block seed; compiled by numba, 1.3 ns per number per thread against 3.4 ns for torch's
``normal_``; a bit-identical pure-torch fallback), so they are also the same on every x86 CPU.

Parallel drawing (CPU). Every block has its own seed, so blocks can be drawn in any order by any
thread with bit-identical results. With ``noise_threads()`` > 1 (default
``torch.get_num_threads()``; :func:`set_noise_threads`, ``$SALIENTFT_NOISE_THREADS``) a pool
draws the blocks of a chunk, one block per task (the kernel releases the GIL), while the main
thread waits; then the main thread scales, adds and multiplies the chunk with torch's intra-op
threads while the pool waits. Drawing and multiplying take turns instead of overlapping because
that measured fastest. One 4096 x 1536 layer, 256 tokens, forward + backward, fp32, 2 cores,
torch 2.13, torch's ``normal_`` as the generator (before Philox), medians of 10-12 interleaved
rounds (no noise 44.5-51 ms; one draw of the layer alone 21.6 ms in one thread, 12.2 ms in two):

=================================================================  =========  ==========
noise drawn ...                                                     drawn      kept
=================================================================  =========  ==========
in the calling thread, 1 MB block by block                          89 ms      65 ms
2 threads, pipelined: blocks i+1, i+2 drawn while block i is used   92 ms      68 ms
2 threads, taking turns with the matmuls every 8 blocks             91 ms      66 ms
2 threads, taking turns every 24 blocks                             80 ms
2 threads, the whole layer drawn, then used (this module)           76 ms      60.5 ms
=================================================================  =========  ==========

The pipeline gains nothing: while block i is multiplied, torch's two OpenMP threads and the two
drawing threads share two cores. Spinning threads. Between parallel regions libgomp's idle
threads spin-wait (its default when ``OMP_WAIT_POLICY`` is unset), so while the pool draws, torch's
idle OpenMP worker competes with it for the cores: two drawing threads ran 1.4x faster than one
instead of 2x. Starting the process with ``OMP_WAIT_POLICY=PASSIVE`` (read once, when torch loads
libgomp; this module cannot change it) removes that: weight-noise steps 1.1-1.2x faster (wide
model, SmolLM2), while the no-noise / LoRA ratios moved by at most 0.08
(``docs/results/noise_speed.md``); the first parallel draw logs this hint once. Each switch
between drawing and multiplying costs about 2 ms of spinning, hence chunks as large as the
scratch allows. One matmul per chunk instead of one per 1 MB block
matters at many tokens: at 2048 tokens the same layer took 434 ms with one matmul per block, 362
ms per chunk (no noise 356 ms; kept 331 ms). Making the blocks entirely in the pool threads
(draw, scale and add in each thread's cache) measured no faster, with either generator: with
``normal_`` the extra op calls contend for the GIL; with Philox, a numba kernel that also scaled
and added (one pass, no z scratch) gave the same step time (0.99-1.01x) while moving the adds out
of torch's efficient threads, so it was dropped.

Devices. On CUDA (any non-CPU device) the default, ``SALIENTFT_NOISE_GENERATOR=torch``, draws each
block with the device's ``normal_``, in the fewest balanced blocks of up to
``DEVICE_NOISE_BLOCK_ELEMS``: torch's CUDA generator derives each element's counter from the
launch grid, which depends on the SM count, so that noise depends on the seed, the layer shape,
the device type and the GPU model (an A100, an H100 SXM and an H100 PCIe differ). With
``SALIENTFT_NOISE_GENERATOR=philox`` the blocks are the CPU's and so are the numbers: a chunk's
blocks are drawn together by :func:`.philox.philox_normal_keys` in torch ops on the device (keys
computed there, passes of ``DEVICE_PHILOX_PASS`` numbers), chunks are up to ``DEVICE_WAVE_ELEMS``,
and no threads are used; the noise then depends only on the seed and the layer shape, on every
device and GPU model. Why torch's generator is the default: the project's rule is that the
counter-based draw may cost at most 5 % of a GPU step, and by estimate (about 250 memory-bound
integer passes per number, ~30 ms per draw of a 45M-weight layer on an H100 against ~1 ms for its
matmul at 8K tokens) Philox in plain torch ops costs far more; not yet measured on a GPU
(``scripts/gpu_check.sh`` times both, docs/gpu.md), and a fused kernel would change the verdict.

Both ``gift.SalientLinear`` and ``quant.QuantizedSalientLinear`` draw their noise here, so a
seed means the same noise in either.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from .philox import philox_normal_, philox_normal_keys

# Row blocks of about this many weights on CPU (1 MB in fp32), each drawn from its own seed by
# one thread. The block size depends only on the layer shape, so the noise of a given seed is the
# same whatever the thread count.
NOISE_BLOCK_ELEMS = 1 << 18
# Blocks are grouped into chunks of at most this many weights (32 MB of fp32 scratch; a whole
# layer up to 4096 x 2048): a chunk is drawn (in parallel), added and multiplied at once, so
# fewer chunks mean fewer switches between drawing and multiplying (module docstring).
WAVE_ELEMS = 1 << 23
# On CUDA (and any other non-CPU device) with SALIENTFT_NOISE_GENERATOR=torch: blocks of up to
# 16M weights (64 MB fp32), one normal_ each, balanced (equal rows).
DEVICE_NOISE_BLOCK_ELEMS = 1 << 24
# Chunks on an accelerator: up to 64M weights (256 MB of fp32 scratch), so one chunk (one set of
# launches and one matmul) per layer up to 8192 x 8192 and a few, balanced, beyond.
DEVICE_WAVE_ELEMS = 1 << 26
# Numbers per pass of the device Philox (bounds its int64 temporaries, about 40 bytes per number).
DEVICE_PHILOX_PASS = 1 << 23
SEED_MIX = 0x9E3779B97F4A7C15
_SEED_MIX_I64 = SEED_MIX - (1 << 64)  # the same multiplier as a wrapping int64
NOISE_GENERATORS = ("philox", "torch")
# Devices whose noise the numba kernel draws (host memory); any other draws with torch ops on it.
_HOST_NOISE_DEVICES = ("cpu",)
NOISE_DTYPE = torch.float32  # the dtype z ~ N(0, 1) is drawn in, whatever the compute dtype

_local = threading.local()  # per-thread generators: a torch.Generator is not thread-safe to re-seed
_noise_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_hinted = False
log = logging.getLogger(__name__)


def _hint_wait_policy() -> None:
    """Once per process: say that spinning OpenMP threads slow the parallel draws (module docstring)."""
    global _hinted
    if not _hinted and not os.environ.get("OMP_WAIT_POLICY") and not os.environ.get("GOMP_SPINCOUNT"):
        log.info("GIFT-SW weight noise on CPU: torch's OpenMP threads spin between matmuls and slow the parallel "
                 "noise draws; starting the process with OMP_WAIT_POLICY=PASSIVE made weight-noise steps "
                 "1.1-1.2x faster on a 2-core CPU (docs/results/noise_speed.md)")
    _hinted = True


def noise_generator_kind() -> str:
    """The accelerators' noise generator, ``$SALIENTFT_NOISE_GENERATOR``: "torch" (default: the
    device's ``normal_``, fast, depends on the GPU model) or "philox" (the CPU's counter-based
    numbers, the same on every GPU model, slower by estimate; see the module docstring)."""
    v = os.environ.get("SALIENTFT_NOISE_GENERATOR", "").strip().lower() or "torch"
    if v not in NOISE_GENERATORS:
        raise ValueError(f"SALIENTFT_NOISE_GENERATOR={v!r}: choose one of {', '.join(NOISE_GENERATORS)} "
                         "(or unset it for torch)")
    return v


def _torch_seeded(device_type: str) -> bool:
    """Whether the noise on ``device_type`` comes from torch's generator (in large blocks)."""
    return device_type not in _HOST_NOISE_DEVICES and noise_generator_kind() == "torch"


def _balanced(n: int, most: int) -> list[int]:
    """``n`` split into the fewest parts of at most ``most``, sizes differing by at most one."""
    parts = -(-n // max(1, most))
    q, r = divmod(n, parts)
    return [q + (i < r) for i in range(parts)]


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
    """Rows per noise block (the unit of seeding) of an (out, in) layer on ``device_type``:
    ~1 MB blocks (``NOISE_BLOCK_ELEMS``) wherever the Philox numbers are drawn (CPU, and every
    device by default), so a seed means the same noise everywhere; with the "torch" generator on
    an accelerator, the fewest balanced blocks of at most ``DEVICE_NOISE_BLOCK_ELEMS``."""
    if _torch_seeded(device_type):
        most = max(1, min(out_features, DEVICE_NOISE_BLOCK_ELEMS // max(1, in_features)))
        return _balanced(out_features, most)[0]
    return max(1, min(out_features, NOISE_BLOCK_ELEMS // max(1, in_features)))


def noise_blocks(out_features: int, in_features: int, device_type: str = "cpu") -> list[tuple[int, int]]:
    """Row ranges [r0, r1) in which the weight noise of a layer is drawn."""
    rows = noise_block_rows(out_features, in_features, device_type)
    return [(r0, min(out_features, r0 + rows)) for r0 in range(0, out_features, rows)]


def noise_chunks(out_features: int, in_features: int, device_type: str = "cpu") -> list[list[tuple[int, int]]]:
    """The noise blocks grouped into chunks of consecutive blocks: the unit that is drawn (in
    parallel on CPU, in one set of launches elsewhere), added to W and multiplied at once.

    At most ``WAVE_ELEMS`` weights per chunk on CPU, ``DEVICE_WAVE_ELEMS`` elsewhere (at least one
    block), in the fewest chunks, balanced: their block counts differ by at most one, so no chunk
    is a small tail. Depends only on the layer shape and the device type (and the accelerators'
    generator), so results do not depend on the thread count."""
    blocks = noise_blocks(out_features, in_features, device_type)
    budget = WAVE_ELEMS if device_type == "cpu" else DEVICE_WAVE_ELEMS
    per = max(1, budget // ((blocks[0][1] - blocks[0][0]) * max(1, in_features)))
    chunks, i = [], 0
    for size in _balanced(len(blocks), per):
        chunks.append(blocks[i: i + size])
        i += size
    return chunks


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
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="salientft-noise"), n
        return _pool


def _forget_pool_after_fork() -> None:  # a forked child (e.g. a DataLoader worker) has no pool threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def draw_noise(out: torch.Tensor, seed: int, r0: int) -> torch.Tensor:
    """Fill ``out`` (the noise rows of the block starting at row ``r0``) with N(0, 1) for (seed, r0):
    the Philox numbers of the block's key (numba kernel on CPU, torch ops on other devices), or
    with ``SALIENTFT_NOISE_GENERATOR=torch`` on an accelerator this thread's device generator."""
    if out.device.type in _HOST_NOISE_DEVICES:
        return philox_normal_(out, block_seed(seed, r0))
    if _torch_seeded(out.device.type):
        g = noise_generator(out.device).manual_seed(block_seed(seed, r0))
        return out.normal_(generator=g)
    return _draw_philox_blocks(out, seed, [(r0, r0 + out.shape[0])])


def _draw_philox_blocks(z: torch.Tensor, seed: int, blocks: list[tuple[int, int]]) -> torch.Tensor:
    """Fill ``z`` (the rows of consecutive ``blocks``) with their Philox numbers, in torch ops on
    z's device: blocks of equal size together, keys computed there (no host-to-device copy)."""
    r_first, width = blocks[0][0], z[0].numel() if z.shape[0] else 0
    rows = blocks[0][1] - blocks[0][0]
    full = sum(1 for b0, b1 in blocks if b1 - b0 == rows)  # all but possibly the layer's last block
    runs = [(0, full, rows)] + ([(full, len(blocks), blocks[-1][1] - blocks[-1][0])] if full < len(blocks) else [])
    flat = z.view(z.shape[0], -1)
    for j0, j1, r in runs:
        n = r * width
        per = max(1, DEVICE_PHILOX_PASS // max(1, n))
        for a in range(j0, j1, per):
            b = min(j1, a + per)
            starts = torch.arange(a, b, dtype=torch.int64, device=z.device) * rows + r_first
            keys = (starts * _SEED_MIX_I64 + seed) & ((1 << 63) - 1)  # block_seed, wrapping int64
            row0 = blocks[a][0] - r_first
            flat[row0: row0 + (b - a) * r].view(b - a, n).copy_(philox_normal_keys(keys, n))
    return z


def drawn_chunks(seed: int, chunks: list[list[tuple[int, int]]], in_features: int, device, threads: int = 1,
                 into: torch.Tensor | None = None):
    """Yield (r0, r1, z) for each chunk in order: z (r1-r0, in) fp32, each of its blocks N(0, 1)
    from a generator seeded by (seed, block start).

    ``threads`` > 1 (CPU): the pool draws the blocks of a chunk, one block per task, while the
    caller waits; else they are drawn in the calling thread. ``into`` (fp32, C-contiguous, at
    least out x in numbers, not the weight): draw row r into ``into``'s row r instead of a
    reused scratch buffer. A yielded z is valid until the next chunk is drawn.
    """
    device = torch.device(device)
    parallel = threads > 1 and device.type == "cpu"
    if parallel:
        _hint_wait_policy()
    scratch = None
    if into is None:
        scratch = torch.empty(max(c[-1][1] - c[0][0] for c in chunks) * in_features, dtype=NOISE_DTYPE,
                              device=device)
    for chunk in chunks:
        r0, r1 = chunk[0][0], chunk[-1][1]
        if into is not None:
            z = into.view(-1)[r0 * in_features: r1 * in_features].view(r1 - r0, in_features)
        else:
            z = scratch[: (r1 - r0) * in_features].view(r1 - r0, in_features)
        parts = [(z[b0 - r0: b1 - r0], b0) for b0, b1 in chunk]
        if device.type not in _HOST_NOISE_DEVICES and not _torch_seeded(device.type):
            _draw_philox_blocks(z, seed, chunk)  # the whole chunk in one set of launches
        elif parallel and len(parts) > 1:
            pool = _thread_pool(threads)
            futures = [pool.submit(draw_noise, part, seed, b0) for part, b0 in parts]
            try:
                for f in futures:
                    f.result()
            finally:  # a failed draw: no other may outlive this call
                wait(futures)
        else:
            for part, b0 in parts:
                draw_noise(part, seed, b0)
        yield r0, r1, z


def noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype, out=None, draw_into_out=False):
    """Yield (r0, r1, rows r0:r1 of the noisy weight in ``dtype``) for each chunk of noise blocks
    (:func:`noise_chunks`) in order.

    Rows are ``W + noise_std * z`` (computed in fp32, rounded once to ``dtype``) with the
    columns ``idx`` replaced by ``salient_weight``. With ``out`` ((out, in), ``dtype``; it may be
    ``weight`` itself) each chunk is written into ``out[r0:r1]``; without, chunks live in scratch
    buffers and a yielded chunk is valid until the next one is drawn: consume it before advancing.
    ``draw_into_out``: ``out`` is an fp32 tensor of the caller's (not ``weight``): draw straight into
    it, without scratch.
    """
    out_f, in_f = weight.shape
    device = weight.device
    chunks = noise_chunks(out_f, in_f, device.type)
    threads = noise_threads() if device.type == "cpu" else 1
    std = noise_std.view(-1, 1)
    scratch = None
    into = out if draw_into_out and out is not None and out.dtype == NOISE_DTYPE else None
    for r0, r1, z in drawn_chunks(seed, chunks, in_f, device, threads, into=into):
        if out is not None:
            blk = out[r0:r1]
        elif dtype == NOISE_DTYPE:
            blk = z  # in place: z is not needed after this
        else:
            if scratch is None:
                scratch = torch.empty(max(c[-1][1] - c[0][0] for c in chunks) * in_f, dtype=dtype, device=device)
            blk = scratch[: (r1 - r0) * in_f].view(r1 - r0, in_f)
        torch.addcmul(weight[r0:r1], z, std[r0:r1], out=blk)
        blk.index_copy_(1, idx, salient_weight[r0:r1].detach().to(dtype))
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


def noisy_forward(x, weight, salient_weight, idx, noise_std, seed, dtype, keep=False):
    """(x (..., in) @ (W + noise)^T, kept), one chunk of rows of the noisy weight at a time.

    The output (..., out) is allocated in its final shape, never a view of a flat buffer: an
    autograd Function that returned a view could not be modified in place by the model (Falcon
    adds the attention output into the MLP output with ``+=``).
    ``kept`` is None, or with ``keep`` the whole (out, in) noisy weight in ``dtype``, to pass to
    :func:`noisy_input_grad` instead of drawing the noise again.
    """
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.empty(*x.shape[:-1], weight.shape[0], device=x.device, dtype=dtype)
    y2 = y.view(-1, weight.shape[0])
    kept = torch.empty(weight.shape, device=weight.device, dtype=dtype) if keep else None
    for r0, r1, blk in noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype, out=kept,
                                        draw_into_out=True):
        torch.mm(x2, blk.t(), out=y2[:, r0:r1])
    return y, kept


def noisy_input_grad(g2, weight, salient_weight, idx, noise_std, seed, dtype, kept=None):
    """g2 (tokens, out) @ (W + noise): from ``kept`` (see :func:`noisy_forward`) or regenerating
    the same noise chunk by chunk. Both sum the same chunks in the same order: bit-identical."""
    gx = torch.empty(g2.shape[0], weight.shape[1], device=g2.device, dtype=dtype)
    if kept is not None:
        chunks = ((c[0][0], c[-1][1], kept[c[0][0]: c[-1][1]]) for c in noise_chunks(*weight.shape, weight.device.type))
    else:
        chunks = noisy_row_blocks(weight, salient_weight, idx, noise_std, seed, dtype)
    for r0, r1, blk in chunks:
        if r0 == 0:
            torch.mm(g2[:, r0:r1], blk, out=gx)
        else:
            gx.addmm_(g2[:, r0:r1], blk)
    return gx


def output_noise_z(seed: int, tokens: int, out_features: int, device) -> torch.Tensor:
    """The whole (tokens, out) N(0, 1) draw of the output noise of ``seed`` (for references and
    tests; the layers never build it whole: :class:`OutputNoise` draws it chunk by chunk)."""
    z = torch.empty(tokens, out_features, dtype=NOISE_DTYPE, device=device)
    for r0, r1, chunk in drawn_chunks(seed, noise_chunks(tokens, out_features, torch.device(device).type),
                                      out_features, device):
        z[r0:r1].copy_(chunk)
    return z


def _output_chunks(seed: int, tokens: int, out_features: int, device: torch.device):
    """(r0, r1, z) of the output noise's seeded (tokens, out) draw, one chunk of token rows at a
    time (the weight noise's blocks and chunks with tokens as rows; z valid until the next)."""
    threads = noise_threads() if device.type == "cpu" else 1
    return drawn_chunks(seed, noise_chunks(tokens, out_features, device.type), out_features, device, threads)


class OutputNoise(torch.autograd.Function):
    """GIFT-SW's output noise (Delta_i / 2) * ||x_{t,N}||_2 * xi_{t,i} of input x (..., in), with
    xi (tokens, out) drawn in seeded chunks and drawn again in backward (docs/methods.md#gift-noise).

    Saved for backward: x itself (the layer's input, no copy) and the (tokens,) fp32 norms
    ||x_N||; never the (tokens, out) noise. Backward: d noise / d x_t = (sum_i g_{t,i} std_i
    xi_{t,i}) / ||x_{t,N}|| * x_{t,N}, 0 on the salient columns and where ||x_N|| = 0.
    """

    @staticmethod
    def forward(ctx, x, idx, noise_std, seed, dtype, out_features):
        x2 = x.reshape(-1, x.shape[-1])
        xf = x2.float()
        sq = xf.pow(2).sum(-1) - xf.index_select(-1, idx).pow(2).sum(-1)
        norm = sq.clamp_min(0).sqrt()  # (tokens,) fp32
        del xf, sq
        noise = torch.empty(*x.shape[:-1], out_features, dtype=dtype, device=x.device)
        n2 = noise.view(-1, out_features)
        std = noise_std.float().view(1, -1)
        for r0, r1, z in _output_chunks(seed, x2.shape[0], out_features, x.device):
            z.mul_(norm[r0:r1, None] * std)  # xi * (||x_N|| * std): the product in fp32, rounded once
            n2[r0:r1].copy_(z)
        ctx.save_for_backward(x, idx, noise_std, norm)
        ctx.seed, ctx.out_features = seed, out_features
        return noise

    @staticmethod
    def backward(ctx, grad):
        x, idx, noise_std, norm = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        g2 = grad.reshape(-1, ctx.out_features)
        c = torch.empty(g2.shape[0], dtype=NOISE_DTYPE, device=g2.device)
        std = noise_std.float()
        for r0, r1, z in _output_chunks(ctx.seed, g2.shape[0], ctx.out_features, g2.device):
            torch.mv(z.mul_(g2[r0:r1]), std, out=c[r0:r1])  # sum_i g * xi * std per token
        scale = torch.where(norm > 0, c / norm.clamp_min(torch.finfo(NOISE_DTYPE).tiny), 0.0)
        gx = x.reshape(-1, x.shape[-1]).float() * scale[:, None]
        gx.index_fill_(-1, idx, 0.0)
        return gx.to(x.dtype).view(x.shape), None, None, None, None, None
