"""GMT's threshold strategies: one object per way of computing the exact mask, chosen once.

- ``HostTensor``: one threshold per tensor, host kernels (CPU).
- ``HostGlobal``: one threshold over every masked entry, memory-bounded (top bits cached up to
  ``global_cache_mb``, boundary entries up to ``_BOUNDARY_CACHE_NUMEL``), host kernels (CPU).
- ``DeviceEngine``: either granularity without a host sync (accelerators); its statistics stay on
  the device (``_PendingStats``) until read.
- ``Sharded``: either granularity over FSDP2's dim-0 sharded DTensor gradients; the histograms
  are all-reduced, so the kept set is the one of a single process holding the full gradients.

Every strategy keeps exactly the same entries for the same gradients (ties by position: parameter
order, then flat index; zero gradients never kept). ``on_masked(param, grad)`` is called after each
tensor is masked (strict mode records the masked set there). docs/gmt.md explains each.
"""
from __future__ import annotations

import torch

from .config import GMTConfig
from .select import (
    _HI_BINS, _LO_BINS, _abs_bits, _bits_to_float, _const, _hi_bits, _hist_, _keep_first_ties, _kth_bin,
    _select_in_bin, _top_k_bin, _top_k_small, _work_view, boundary, keep_count, mask_one_, tie_buffer,
)
from .stats import _PendingStats, make_stats

_HOST_ENGINE_DEVICES = ("cpu",)  # the host kernels are faster there; tests empty it to run DeviceEngine
# Global granularity: the entries of the boundary bin are cached between passes (their index and
# low bits) when there are at most this many; beyond, they are recomputed (bounded memory).
_BOUNDARY_CACHE_NUMEL = 1 << 22


def kind_of(tensors) -> str:
    """Which strategy family serves these parameters or gradients: "sharded" (DTensors), "device"
    (an accelerator) or "host"."""
    tensors = list(tensors)
    if any(type(t) is not torch.Tensor and hasattr(t, "to_local") for t in tensors):
        return "sharded"
    return "host" if tensors[0].device.type in _HOST_ENGINE_DEVICES else "device"


def make_strategy(config: GMTConfig, kind: str):
    """The strategy of ``kind`` for ``config``'s granularity."""
    if kind == "sharded":
        return Sharded(config)
    if kind == "device":
        return DeviceEngine(config)
    return HostTensor(config) if config.granularity == "tensor" else HostGlobal(config)


class _Strategy:
    kind = "host"

    def __init__(self, config: GMTConfig):
        self.config = config

    def keep_count(self, n: int) -> int:
        return keep_count(self.config.ratio, n)

    @staticmethod
    def buffers(works):
        """int16 top-bits and bool work buffers for the largest tensor, reused by every tensor
        (large fresh allocations cost page faults on every step)."""
        n = max(w.numel() for *_, w in works)
        dev = works[0][-1].device
        return torch.empty(n, dtype=torch.int16, device=dev), torch.empty(n, dtype=torch.bool, device=dev)


class HostTensor(_Strategy):
    """One exact threshold per tensor (host kernels)."""

    def apply(self, live, step: int, on_masked) -> dict:
        works = [(name, p, g, _work_view(g)) for name, p, g in live]
        hi_buf, eq_buf = self.buffers(works)
        thresholds, kept_per = {}, {}
        for name, p, g, w in works:
            n = w.numel()
            k = self.keep_count(n)
            hi = _hi_bits(w, hi_buf[:n])
            b, above = _top_k_bin(torch.bincount(hi, minlength=_HI_BINS), k)
            idx, lo = boundary(w, hi, b, eq_buf[:n])
            l, above2, ties = _top_k_small(lo, k - above)
            t_bits = (b << 16) | l
            gt = above + above2
            take = 0 if t_bits == 0 else k - gt  # zero gradients are never kept
            mask_one_(g, w, t_bits, idx, lo, l, take, ties)
            on_masked(p, g)
            thresholds[name] = _bits_to_float(t_bits)
            kept_per[name] = gt + take
        return make_stats(step, kept_per, sum(w.numel() for *_, w in works), thresholds)


class HostGlobal(_Strategy):
    """One exact threshold over every masked entry (host kernels), in three passes whose memory is
    bounded: the top 16 bits (2 bytes per entry) are kept between passes only within
    ``global_cache_mb``, the boundary entries only up to ``_BOUNDARY_CACHE_NUMEL``."""

    def __init__(self, config: GMTConfig):
        super().__init__(config)
        self._hi_cache: torch.Tensor | None = None  # kept across steps: a fresh one would page-fault

    def _cached_hi(self, total: int, device) -> torch.Tensor | None:
        if 2 * total > self.config.global_cache_mb * 2**20:
            return None
        c = self._hi_cache
        if c is None or c.numel() < total or c.device != device:
            self._hi_cache = c = torch.empty(total, dtype=torch.int16, device=device)
        return c

    def _histograms(self, works, hi_buf):
        """Pass 1: per-tensor top-16-bit histograms (and their top bits, when cached)."""
        total = sum(w.numel() for *_, w in works)
        cached = self._cached_hi(total, hi_buf.device)
        his, hists, start = [], [], 0
        for *_, w in works:
            n = w.numel()
            hi = _hi_bits(w, cached[start:start + n] if cached is not None else hi_buf[:n])
            his.append(hi if cached is not None else None)
            hists.append(torch.bincount(hi, minlength=_HI_BINS))
            start += n
        return his, hists

    def apply(self, live, step: int, on_masked) -> dict:
        works = [(name, p, g, _work_view(g)) for name, p, g in live]
        hi_buf, eq_buf = self.buffers(works)
        total = sum(w.numel() for *_, w in works)
        k = self.keep_count(total)
        his, hists = self._histograms(works, hi_buf)
        hist = hists[0].clone()
        for h in hists[1:]:
            hist += h
        b, above = _top_k_bin(hist, k)

        def bounds(i, w):  # the boundary bin's entries of tensor i (positions, low bits)
            hi = his[i] if his[i] is not None else _hi_bits(w, hi_buf[:w.numel()])
            return boundary(w, hi, b, eq_buf[:w.numel()])

        # pass 2: the boundary bin's entries pin the exact value; their positions are cached
        # unless there are very many (then recomputed in pass 3)
        cache = [bounds(i, w) for i, (*_, w) in enumerate(works)] if int(hist[b]) <= _BOUNDARY_CACHE_NUMEL \
            else None
        if cache is not None:  # few boundary entries: select among them directly
            l, above2, _ = _top_k_small(torch.cat([lo for _, lo in cache]), k - above)
        else:
            hist2 = torch.zeros(_LO_BINS, dtype=torch.int64, device=hi_buf.device)
            for i, (*_, w) in enumerate(works):
                lo = bounds(i, w)[1]
                if lo.numel():
                    hist2 += torch.bincount(lo, minlength=_LO_BINS)
            l, above2 = _top_k_bin(hist2, k - above)
        t_bits = (b << 16) | l
        remaining = 0 if t_bits == 0 else k - above - above2
        # pass 3: mask; ties go to the earliest entries in parameter order
        kept_per = {}
        for i, (name, p, g, w) in enumerate(works):
            idx, lo = cache[i] if cache is not None else bounds(i, w)
            ties = int((lo == l).sum()) if lo.numel() else 0
            take = min(remaining, ties)
            remaining -= take
            mask_one_(g, w, t_bits, idx, lo, l, take, ties)
            on_masked(p, g)
            kept_per[name] = int(hists[i][b + 1:].sum()) + int((lo > l).sum()) + take
        return make_stats(step, kept_per, total, _bits_to_float(t_bits))


class DeviceEngine(_Strategy):
    """The host strategies' thresholds and kept set, without a host sync (accelerators).

    Per tensor (sequentially, in shared buffers): histogram of the top 16 bits of |g|
    (``index_add_``), the boundary bin by ``searchsorted`` over its cumulative counts, a second
    histogram of the low 16 bits of that bin's entries (the others are counted in spare bins),
    the exact K-th value the same way, then the mask with ties kept in position order
    (``_keep_first_ties``). Global: the histograms are summed over tensors (rows of one
    (tensors, 32768) table), and the tie budget flows through the tensors in parameter order as a
    device scalar. Memory: 9 bytes per entry of the largest tensor plus its temporaries; nothing
    the size of the model, and nothing is concatenated.
    """

    kind = "device"

    def apply(self, live, step: int, on_masked) -> _PendingStats:
        n_max = max(g.numel() for _, _, g in live)
        dev = live[0][2].device
        self._a_buf = torch.empty(n_max, dtype=torch.int32, device=dev)
        self._hi_buf = torch.empty(n_max, dtype=torch.int32, device=dev)
        self._eq_buf = tie_buffer(n_max, dev)
        works = [(name, p, g, _work_view(g)) for name, p, g in live]
        sizes = [w.numel() for *_, w in works]
        per_tensor = self.config.granularity == "tensor"
        out = (self._per_tensor if per_tensor else self._global)(works, sizes, on_masked)
        self._a_buf = self._hi_buf = self._eq_buf = None
        return _PendingStats(step, [x[0] for x in works], sizes, torch.cat(out), per_tensor)

    def _bits(self, w):
        n = w.numel()
        a = _abs_bits(w, self._a_buf[:n])
        return a, torch.bitwise_right_shift(a, 16, out=self._hi_buf[:n])

    @staticmethod
    def _threshold(lo_hist, b, above, k):
        cum = lo_hist[:_LO_BINS].cumsum(0)
        l, above2 = _kth_bin(cum, cum[-1:] - (k - above))
        return (b << 16) | l, above + above2

    def _mask(self, p, g, w, a, t, take, on_masked):
        keep = _keep_first_ties(a, t, take, w.numel(), self._eq_buf)
        kept = keep.sum().view(1)
        g.masked_fill_(keep.logical_not_().view(g.shape), 0)
        on_masked(p, g)
        return kept

    def _per_tensor(self, works, sizes, on_masked) -> list:
        out = []
        for (name, p, g, w), n in zip(works, sizes):
            dev = w.device
            k = self.keep_count(n)
            a, hi = self._bits(w)
            hist = torch.zeros(_HI_BINS, dtype=torch.int64, device=dev)
            _hist_(hist, hi)
            b, above = _kth_bin(hist.cumsum(0), _const(n - k, dev))
            lo_hist = torch.zeros(2 * _LO_BINS, dtype=torch.int64, device=dev)
            _select_in_bin(w, a, hi, b, lo_hist, hist.index_select(0, b))
            t, gt = self._threshold(lo_hist, b, above, k)
            take = torch.where(t == 0, 0, k - gt)  # zero gradients are never kept
            self._mask(p, g, w, a, t, take, on_masked)
            out += [t, gt + take]
        return out

    def _global(self, works, sizes, on_masked) -> list:
        dev = works[0][-1].device
        total = sum(sizes)
        k = self.keep_count(total)
        hists = torch.zeros(len(works), _HI_BINS, dtype=torch.int64, device=dev)
        for i, (*_, w) in enumerate(works):
            _hist_(hists[i], self._bits(w)[1])
        b, above = _kth_bin(hists.sum(0).cumsum(0), _const(total - k, dev))
        lo_hist = torch.zeros(2 * _LO_BINS, dtype=torch.int64, device=dev)
        for i, (*_, w) in enumerate(works):
            a, hi = self._bits(w)
            _select_in_bin(w, a, hi, b, lo_hist, hists[i].index_select(0, b))
        t, gt = self._threshold(lo_hist, b, above, k)
        remaining = torch.where(t == 0, 0, k - gt)  # ties still to keep, in parameter order
        out = [t]
        for name, p, g, w in works:
            a, _ = self._bits(w)
            out.append(self._mask(p, g, w, a, t, remaining, on_masked))
            n = w.numel()
            remaining = (remaining - self._eq_buf[:n].sum()).clamp_(min=0)  # eq_buf: this tensor's ties
        return out


def _shards(live) -> list:
    """Per gradient sharded across ranks (FSDP2 DTensors): (local shard, process group, shard rank,
    number of shards).

    Supported: a DTensor sharded on dim 0 along one mesh dimension (FSDP2's ``fully_shard``;
    other mesh dimensions replicated, as in HSDP), every masked gradient on the same group.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    out = []
    for name, _, g in live:
        if not isinstance(g, DTensor):
            raise NotImplementedError(
                f"GMT: {name} has an unsharded gradient while others are DTensors; shard every "
                "masked parameter (fully_shard the whole model) or exclude it"
            )
        dims = [d for d, pl in enumerate(g.placements) if isinstance(pl, Shard)]
        if (len(dims) != 1 or g.placements[dims[0]].dim != 0
                or not all(isinstance(pl, (Shard, Replicate)) for pl in g.placements)):
            raise NotImplementedError(
                f"GMT: {name}'s gradient is placed as {g.placements}; the distributed threshold "
                "supports dim-0 sharding along one mesh dimension (FSDP2's fully_shard)"
            )
        mesh, d = g.device_mesh, dims[0]
        out.append((g.to_local(), mesh.get_group(d), mesh.get_local_rank(d), mesh.size(d)))
    if any(o[1] is not out[0][1] for o in out):
        raise NotImplementedError("GMT: the masked gradients are sharded over different process groups")
    import torch.distributed as dist

    if dist.get_rank(out[0][1]) != out[0][2]:
        raise NotImplementedError("GMT: shard rank differs from the process-group rank")
    return out


class Sharded(_Strategy):
    """Exact thresholds over gradients sharded on dim 0 across ranks (FSDP2), see docs/gmt.md.

    Every rank histograms its own shards; the histograms are summed across the process group
    (two all-reduces), so every rank finds the same threshold as one process holding the full
    gradients. Ties are broken in the unsharded order (parameter order, then shard rank, then
    index within the shard: the full flat order for contiguous dim-0 shards) from the tie
    counts of every rank (one all-gather). Nothing the size of a gradient is communicated.
    """

    kind = "sharded"

    def apply(self, live, step: int, on_masked) -> dict:
        import torch.distributed as dist

        shards = _shards(live)
        group, rank, world = shards[0][1:]
        per_tensor = self.config.granularity == "tensor"
        works = [(name, p, loc, _work_view(loc)) for (name, p, _), (loc, *_) in zip(live, shards)]
        hi_buf, eq_buf = self.buffers(works)
        ns = [g.numel() for _, _, g in live]  # global sizes
        hists = torch.stack([torch.bincount(_hi_bits(w, hi_buf[:w.numel()]), minlength=_HI_BINS)
                             for *_, w in works])
        dist.all_reduce(hists, group=group)
        ks, bins = self._bins(hists, ns, per_tensor)
        bounds = [boundary(w, _hi_bits(w, hi_buf[:w.numel()]), bins[i][0], eq_buf[:w.numel()])
                  for i, (*_, w) in enumerate(works)]
        sel = self._select(bounds, bins, ks, per_tensor, group, hists.device)
        # per tensor and rank: entries equal to the threshold, and above it within the boundary bin
        counts = torch.tensor(
            [[int((lo == s[1]).sum()), int((lo > s[1]).sum())] for (_, lo), s in zip(bounds, sel)],
            dtype=torch.int64, device=hists.device,
        ).view(len(works), 2)
        gathered = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(gathered, counts, group=group)
        every = torch.stack(gathered)  # (world, m, 2), indexed by shard rank
        takes = self._takes(sel, every, per_tensor)
        ties_before = every[:rank, :, 0].sum(0).tolist()
        thresholds, kept_per = {}, {}
        for i, (name, p, loc, w) in enumerate(works):
            t_bits, l = sel[i][:2]
            local_ties = int(counts[i, 0])
            local_take = min(max(takes[i] - ties_before[i], 0), local_ties)
            idx, lo = bounds[i]
            mask_one_(loc, w, t_bits, idx, lo, l, local_take, local_ties)
            on_masked(p, loc)
            thresholds[name] = _bits_to_float(t_bits)
            kept_per[name] = int(hists[i][(t_bits >> 16) + 1:].sum()) + int(every[:, i, 1].sum()) + takes[i]
        threshold = thresholds if per_tensor else _bits_to_float(sel[0][0])
        return make_stats(step, kept_per, sum(ns), threshold, ranks=world)

    def _bins(self, hists, ns, per_tensor):
        """Keep counts and (boundary bin, entries above it), per tensor or one shared (global)."""
        if per_tensor:
            ks = [self.keep_count(n) for n in ns]
            return ks, [_top_k_bin(hists[i], ks[i]) for i in range(len(ns))]
        k = self.keep_count(sum(ns))
        return [k] * len(ns), [_top_k_bin(hists.sum(0), k)] * len(ns)

    @staticmethod
    def _select(bounds, bins, ks, per_tensor, group, dev) -> list:
        """The exact thresholds: the boundary entries' low-bit histograms summed across ranks.
        Per tensor: (threshold bits, low bits, keep count, entries above the threshold)."""
        import torch.distributed as dist

        m = len(bounds)
        lo_hists = torch.zeros(m if per_tensor else 1, _LO_BINS, dtype=torch.int64, device=dev)
        for i, (_, lo) in enumerate(bounds):
            if lo.numel():
                lo_hists[i if per_tensor else 0] += torch.bincount(lo, minlength=_LO_BINS)
        dist.all_reduce(lo_hists, group=group)
        sel = []
        for i in range(m if per_tensor else 1):
            (b, above), k = bins[i], ks[i]
            l, above2 = _top_k_bin(lo_hists[i], k - above)
            sel.append(((b << 16) | l, l, k, above + above2))
        return sel if per_tensor else sel * m

    @staticmethod
    def _takes(sel, every, per_tensor) -> list[int]:
        """Tied entries each tensor keeps over all ranks: per tensor its own budget; global, the
        shared budget spent in parameter order."""
        ties_all = every[:, :, 0].sum(0).tolist()
        if per_tensor:
            return [0 if t_bits == 0 else k - gt for t_bits, _, k, gt in sel]
        remaining = 0 if sel[0][0] == 0 else sel[0][2] - sel[0][3]
        takes = []
        for ties in ties_all:
            takes.append(min(remaining, ties))
            remaining -= takes[-1]
        return takes
