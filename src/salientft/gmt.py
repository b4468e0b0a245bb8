"""Gradient-Mask Tuning (GMT, docs/methods.md#gmt): before each optimizer step keep only the largest
accumulated gradient entries and zero the rest.

The threshold is the K-th largest |g| (K = n - floor(ratio * n)), found exactly by a radix select
on the float bits instead of ``torch.kthvalue``: |g| of an fp32/bf16 number orders like its bit
pattern, so one histogram of the top 16 bits (one cheap pass, ``bincount``) locates the bin that
holds the K-th value, and a second histogram of the low 16 bits of the few entries in that bin
pins it exactly. This is ~10x faster than ``kthvalue`` on CPU, needs no sort and no copy of
the gradient, and works the same for one tensor or for a global threshold over the whole model
(histograms add up; nothing is ever concatenated). Ties at the threshold are broken by position
(parameter order, then flat index), so exactly K entries are kept and every rank of a DDP job,
which holds the same all-reduced gradient, keeps the same entries. Zero gradients are never kept.
Under FSDP2 (DTensor gradients sharded on dim 0) the histograms are all-reduced across the shards
and the ties split in rank order, so the kept set is the one of a single process holding the
full gradients (``GradientMask._apply_sharded``, docs/gmt.md). On an accelerator the same
selection runs without host syncs (``GradientMask._apply_device``: histograms by ``index_add_``,
bins by ``searchsorted``, ties by block counts, statistics read once), since every ``int()`` or
``nonzero`` of the CPU path would stall the device; docs/gmt.md "Host syncs".

Usage in a plain loop (mask after accumulation, before clipping and the step)::

    mask = GradientMask(model, ratio=0.5)
    loss.backward()                    # x gradient-accumulation steps
    mask.apply_()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    mask.step(optimizer)               # == optimizer.step() in "paper" mode
    optimizer.zero_grad()

With the Hugging Face Trainer use ``GradientMaskCallback`` (imported lazily, so a plain loop
does not pay for importing transformers).
"""
from __future__ import annotations

import fnmatch
import logging
import statistics
import struct
import sys
from typing import Iterable

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .config_base import GMT_DEFAULT_RATIO, ConfigMixin, check_choice, coerce_fields

# Embeddings and the output head are not masked by default; docs/gmt.md says why. They are found by
# role, not by name (GPT-NeoX's embed_in, OPT's embed_positions have names of their own):
#   "@embeddings": model.get_input_embeddings() and every nn.Embedding (learned positions: GPT-2's wpe,
#                  OPT's embed_positions; token types), all lookup tables with row-sparse gradients;
#   "@output":     model.get_output_embeddings() (lm_head, GPT-NeoX's embed_out, ...).
# Given parameters instead of a model, a role falls back to the usual names of its modules.
ROLES = {"@embeddings": ("embed_tokens", "embed_in", "wte", "wpe", "embed_positions", "word_embeddings"),
         "@output": ("lm_head", "embed_out", "output_layer")}
GMT_DEFAULT_EXCLUDE = ("@embeddings", "@output")


@dataclass
class GMTConfig(ConfigMixin):
    """GMT: before each optimizer step, zero the smallest accumulated gradients (docs/methods.md#gmt).

    ``ratio`` is the fraction of gradient entries zeroed (the paper's mask ratio), in [0, 1).
    ``granularity``: "tensor" (one threshold per parameter tensor) or "global" (one threshold over
    every masked parameter). ``mode``: "paper" (zero the gradient, optimizer untouched) or
    "strict" (masked entries get no update of any kind in that step, see docs/gmt.md).
    ``exclude``: what is left unmasked (trained densely): the roles "@embeddings" (input and
    position embeddings) and "@output" (the output head), found by role (the default); a plain
    entry matches a dotted component path of the name ("lm_head" matches "lm_head.weight"), an
    entry with ``* ? [`` is a glob over the full name. ``global_cache_mb``: memory the global threshold may
    use to keep the top 16 bits of the gradients between its passes (2 bytes per entry); above
    it they are recomputed (one more read of the gradients). Nothing is ever concatenated.
    """

    GRANULARITIES: ClassVar[tuple[str, ...]] = ("tensor", "global")
    MODES: ClassVar[tuple[str, ...]] = ("paper", "strict")

    ratio: float = GMT_DEFAULT_RATIO
    granularity: str = "tensor"
    mode: str = "paper"
    exclude: list[str] = field(default_factory=lambda: list(GMT_DEFAULT_EXCLUDE))
    global_cache_mb: int = 256

    def __post_init__(self):
        n = type(self).__name__
        if self.exclude is None:
            self.exclude = []
        coerce_fields(self)  # every field as its declared type (config_base)
        c = self.global_cache_mb
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"{n}.global_cache_mb must be a non-negative integer (MiB), got {c!r}")
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(
                f"{n}.ratio is the fraction of gradient entries zeroed and must be in [0, 1), got {r!r}"
            )
        self.ratio = float(r)
        check_choice(n, "granularity", self.granularity, self.GRANULARITIES)
        check_choice(n, "mode", self.mode, self.MODES)
        if self.exclude is None:
            self.exclude = []
        if isinstance(self.exclude, str) or not isinstance(self.exclude, (list, tuple)):
            raise ValueError(f"{n}.exclude must be a list of parameter-name patterns, got {self.exclude!r}")
        if not all(isinstance(p, str) and p for p in self.exclude):
            raise ValueError(f"{n}.exclude entries must be non-empty strings, got {self.exclude!r}")
        unknown = [p for p in self.exclude if p.startswith("@") and p not in ROLES]
        if unknown:
            raise ValueError(f"{n}.exclude: unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
        self.exclude = list(self.exclude)


log = logging.getLogger(__name__)

_HI_BINS = 1 << 15  # |x| has the sign bit clear: the top 16 bits are < 2**15
_LO_BINS = 1 << 16
# Global granularity: the entries of the boundary bin are cached between passes (their index and
# low bits) when there are at most this many; beyond, they are recomputed (bounded memory).
_BOUNDARY_CACHE_NUMEL = 1 << 22
_LITTLE_ENDIAN = sys.byteorder == "little"


def _role_params(model: nn.Module, roles: Iterable[str]) -> set[int]:
    """ids of the parameters of the modules that play ``roles`` in ``model`` (see ROLES)."""
    modules = []
    for role in roles:
        if role == "@embeddings":
            get = getattr(model, "get_input_embeddings", None)
            modules += [m for m in model.modules() if isinstance(m, nn.Embedding)]
        else:
            get = getattr(model, "get_output_embeddings", None)
        try:
            found = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, nn.Module):
            modules.append(found)
        elif role == "@output":  # not a transformers model: its head by name
            modules += [m for n, m in model.named_modules() if n.rpartition(".")[2] in ROLES[role]]
    return {id(p) for m in modules for p in m.parameters()}


def _excluded(names: list[str], patterns: Iterable[str]) -> bool:
    """True when any alias of a parameter matches any pattern (see GMTConfig.exclude; a role
    matches the usual names of its modules here, for parameters given without their model)."""
    patterns = [q for p in patterns for q in (ROLES.get(p, (p,)))]
    for name in names:
        for pat in patterns:
            if any(c in pat for c in "*?["):
                if fnmatch.fnmatchcase(name, pat):
                    return True
            elif f".{pat}." in f".{name}.":
                return True
    return False


def _work_view(g: torch.Tensor) -> torch.Tensor:
    """A flat fp32 or bf16 tensor holding g's values (g itself when it already is one)."""
    if g.dtype in (torch.float32, torch.bfloat16) and g.is_contiguous():
        return g.view(-1)
    # fp16 bits do not order like fp32 bits; fp64 is thresholded at fp32 precision (ties break
    # by position, so the kept count stays exact).
    return g.detach().reshape(-1).to(torch.float32)


def _hi_bits(w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Top 16 bits of |w| as int16 (fp32: the bf16 truncation; bf16: all of it)."""
    if w.dtype == torch.float32:
        v = w.view(torch.int16)[1::2] if _LITTLE_ENDIAN else w.view(torch.int16)[0::2]
    else:
        v = w.view(torch.int16)
    return torch.bitwise_and(v, 0x7FFF, out=out)


def _lo_bits(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Low 16 bits of the entries at ``idx`` (zero for bf16, whose value is all in the top bits)."""
    if w.dtype != torch.float32:
        return torch.zeros(idx.numel(), dtype=torch.int32, device=idx.device)
    return w.view(torch.int32).index_select(0, idx).bitwise_and_(0xFFFF)


def _top_k_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest entry, number of entries in higher bins)."""
    c = hist.cumsum(0)
    total = int(c[-1])
    b = int(torch.searchsorted(c, total - k, right=True))
    return b, total - int(c[b])


def _top_k_small(lo: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(k-th largest value of a small 1-D tensor, count above it, count equal to it)."""
    l = int(torch.kthvalue(lo, lo.numel() - k + 1).values)
    return l, int((lo > l).sum()), int((lo == l).sum())


def _positions(eq: torch.Tensor) -> torch.Tensor:
    """``eq.nonzero()`` for a sparse bool vector, ~2.5x faster: scan 8 bools at a time as one
    int64 word, then look inside the few nonzero words only."""
    m = eq.numel() // 8 * 8
    if m == 0 or eq.data_ptr() % 8:
        return eq.nonzero().view(-1)
    words = eq[:m].view(torch.int64).nonzero().view(-1)
    cand = (words.unsqueeze(1) * 8 + torch.arange(8, device=eq.device)).view(-1)
    idx = cand[eq[cand]]
    if m < eq.numel():
        idx = torch.cat([idx, eq[m:].nonzero().view(-1) + m])
    return idx


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage); a plain tensor itself."""
    return t if type(t) is torch.Tensor or not hasattr(t, "to_local") else t.to_local()


def _bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _below(t_bits: int, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` strictly below the threshold (0 for a zero threshold).

    ``hardshrink(x, that)`` keeps exactly the entries with |x| >= threshold, in one fused pass.
    """
    if t_bits == 0:
        return 0.0
    bits = t_bits - 1
    if dtype == torch.bfloat16:
        bits = (bits >> 16) << 16
    return _bits_to_float(bits)


def _shrink_(g: torch.Tensor, w: torch.Tensor, t_bits: int, tie_idx: torch.Tensor | None) -> None:
    """Zero the entries of g below the threshold; keep ties only at ``tie_idx`` (if given).

    ``tie_idx`` (flat positions of the tied entries to keep) is None when every tie is kept.
    """
    if w.data_ptr() == g.data_ptr() and w.dtype == g.dtype:
        flat = g.view(-1)
        if tie_idx is None:
            torch.ops.aten.hardshrink.out(flat, _below(t_bits, g.dtype), out=flat)
        else:  # drop every tie (|g| > t), then put back the chosen ones
            saved = flat.index_select(0, tie_idx)
            torch.ops.aten.hardshrink.out(flat, _bits_to_float(t_bits), out=flat)
            flat.index_copy_(0, tie_idx, saved)
        return
    # g is fp16/fp64 or not contiguous (rare): mask through a boolean over the fp32 copy w
    a = w.abs()
    t = _bits_to_float(t_bits)
    keep = a > t
    if tie_idx is None:
        keep |= (a == t) & (t > 0)
    else:
        keep[tie_idx] = True
    g.mul_(keep.view(g.shape))


# -- the device engine: thresholds without host syncs (CUDA and other accelerators) -------------
# On an accelerator every ``int(...)``, ``nonzero`` or ``bincount`` of the host engine above
# stops the device until the queue drains (about 10 per masked tensor). The device engine computes
# the same thresholds and the same kept set with device-side ops only (histograms by
# ``index_add_``, bins by ``searchsorted``, ties by block counts); its statistics stay on the
# device until read (one transfer). See docs/gmt.md "Host syncs".
_HOST_ENGINE_DEVICES = ("cpu",)  # the host engine is faster there; tests force the device engine
_TIE_BLOCK = 1 << 12  # tie breaking: ties counted per block of this many entries
_DETERMINISTIC_HIST_CHUNK = 1 << 22  # bounds index_add_'s sort-based temporaries (deterministic mode)


def _use_device_engine(device: torch.device) -> bool:
    return device.type not in _HOST_ENGINE_DEVICES


def _const(v: int, device) -> torch.Tensor:
    """A (1,) int64 device tensor (a fill, not a host-to-device copy, so no sync)."""
    return torch.full((1,), v, dtype=torch.int64, device=device)


def _abs_bits(w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """|w| as ordered int32 bits: fp32's own bits, bf16's bits shifted into the top half."""
    if w.dtype == torch.float32:
        return torch.bitwise_and(w.view(torch.int32), 0x7FFFFFFF, out=out)
    out.copy_(w.view(torch.int16))
    return out.bitwise_and_(0x7FFF).bitwise_left_shift_(16)


def _hist_(hist: torch.Tensor, idx: torch.Tensor) -> None:
    """``hist += bincount(idx)`` without a host sync (CUDA's bincount reads idx's min and max).

    ``index_add_`` of int64 ones: integer atomics, so the counts are exact in any order. Under
    deterministic algorithms torch runs it through a sort; chunks bound that sort's temporaries."""
    n = idx.numel()
    step = _DETERMINISTIC_HIST_CHUNK if torch.are_deterministic_algorithms_enabled() else max(n, 1)
    one = torch.ones((), dtype=hist.dtype, device=hist.device)
    for s in range(0, n, step):
        part = idx[s:s + step]
        hist.index_add_(0, part, one.expand(part.numel()))


def _kth_bin(cum: torch.Tensor, below: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bin b holding the k-th largest entry, entries in bins above b), as (1,) device tensors,
    from a histogram's cumulative counts and ``below`` = total - k."""
    b = torch.searchsorted(cum, below, right=True)
    return b, cum[-1:] - cum.index_select(0, b)


def _select_in_bin(w, a, hi, b, lo_hist, bin_count):
    """Add to ``lo_hist`` (131072 bins) the low 16 bits of w's entries in top bin ``b``; entries
    outside go to bins 65536+ (spread by their own low bits: no contention on one counter).
    bf16 entries have no low bits: the bin's count goes to low value 0."""
    if w.dtype == torch.float32:
        lo = torch.bitwise_and(a, 0xFFFF)
        _hist_(lo_hist, torch.where(hi == b, lo, lo + 0x10000))
    else:
        lo_hist[:1] += bin_count


def _keep_first_ties(a, t, take, n, eq_buf) -> torch.Tensor:
    """Boolean keep mask of a flat tensor of |bits| ``a``: every entry above ``t``, and of the
    entries equal to ``t`` the first ``take`` (rank < take, in flat order); all on the device.

    Ties are counted per block of ``_TIE_BLOCK`` entries; the block holding the cut is found by
    ``searchsorted`` over the blocks' cumulative counts, and only that block is scanned."""
    nb = -(-n // _TIE_BLOCK)
    eq = eq_buf[: nb * _TIE_BLOCK]
    torch.eq(a, t, out=eq[:n])
    eq[n:] = False
    blocks = eq.view(nb, _TIE_BLOCK)
    cum = blocks.sum(1).cumsum(0)
    j = torch.searchsorted(cum, take, right=True).clamp_(max=nb - 1)  # the block where the cut falls
    before = cum.index_select(0, j) - blocks.index_select(0, j).sum(1)
    row = blocks.index_select(0, j)
    row &= row.cumsum(1) <= (take - before)
    ties = blocks & (torch.arange(nb, device=a.device) < j).unsqueeze(1)
    ties.index_copy_(0, j, row)
    keep = torch.gt(a, t)
    keep |= ties.view(-1)[:n]
    return keep


class _PendingStats:
    """GMT statistics still on the device: ``packed`` (int64) is read with one transfer."""

    def __init__(self, step, names, sizes, packed, per_tensor):
        self.step, self.names, self.sizes, self.packed, self.per_tensor = step, names, sizes, packed, per_tensor

    def resolve(self, values: list[int] | None = None) -> dict:
        v = self.packed.tolist() if values is None else values
        m = len(self.names)
        if self.per_tensor:  # (threshold bits, kept) per tensor
            ts, kept = v[0::2], v[1::2]
            threshold = {n: _bits_to_float(t) for n, t in zip(self.names, ts)}
        else:  # threshold bits, then kept per tensor
            kept = v[1:1 + m]
            threshold = _bits_to_float(v[0])
        total = sum(self.sizes)
        k = sum(kept)
        return {"step": self.step, "kept": k, "total": total, "kept_fraction": k / total,
                "threshold": threshold, "kept_per_tensor": dict(zip(self.names, kept))}


def resolve_all(pending: list) -> list[dict]:
    """Resolve several statistics (dicts pass through) with one device-to-host transfer."""
    lazy = [p for p in pending if isinstance(p, _PendingStats)]
    if not lazy:
        return list(pending)
    flat = torch.cat([p.packed for p in lazy]).tolist()
    out, at = [], 0
    for p in pending:
        if isinstance(p, _PendingStats):
            n = p.packed.numel()
            out.append(p.resolve(flat[at:at + n]))
            at += n
        else:
            out.append(p)
    return out


def _shards(live) -> list | None:
    """For gradients sharded across ranks (FSDP2 DTensors): per gradient (local shard, process
    group, shard rank, number of shards); None when no gradient is a DTensor.

    Supported: a DTensor sharded on dim 0 along one mesh dimension (FSDP2's ``fully_shard``;
    other mesh dimensions replicated, as in HSDP), every masked gradient on the same group.
    """
    if all(type(g) is torch.Tensor for _, _, g in live):
        return None
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


class GradientMask:
    """Keep the largest accumulated gradients of a model's trainable parameters (GMT).

    ``model_or_params``: an ``nn.Module`` (its trainable parameters, names from
    ``named_parameters``), or an iterable of parameters or of ``(name, parameter)`` pairs.
    Only parameters with ``requires_grad`` are considered, and of those only the ones holding a
    gradient at ``apply_()`` time are masked. See ``GMTConfig`` for the other arguments.

    After every ``apply_()``, ``last_stats`` holds the threshold(s), kept count and
    ``kept_fraction`` (kept / entries considered, zero gradients never kept).
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable,
        ratio: float,
        granularity: str = "tensor",
        mode: str = "paper",
        exclude: Iterable[str] | None = GMT_DEFAULT_EXCLUDE,
        global_cache_mb: int = 256,
    ):
        self.config = GMTConfig(
            ratio=ratio, granularity=granularity, mode=mode,
            exclude=list(exclude) if exclude is not None else [], global_cache_mb=global_cache_mb,
        )
        self.params, self.excluded = self._select(model_or_params)
        if not self.params:
            raise ValueError(
                "GradientMask: no parameter to mask: every parameter is frozen or excluded "
                f"(exclude={self.config.exclude}); unfreeze some or narrow exclude"
            )
        self.step_count = 0
        self._last: dict | _PendingStats | None = None
        self._applied = False
        self._masked: list[tuple[torch.Tensor, torch.Tensor]] = []  # strict: (param, masked bool)
        self._hi_cache: torch.Tensor | None = None  # global: top 16 bits kept between passes
        log.info(
            "GMT: masking %d tensors (%d entries) at ratio %.3f, %s granularity, %s mode; unmasked: %s",
            len(self.params), sum(p.numel() for _, p in self.params), self.config.ratio,
            self.config.granularity, self.config.mode, ", ".join(self.excluded) or "none",
        )

    @classmethod
    def from_config(cls, model_or_params, config: GMTConfig) -> "GradientMask":
        return cls(model_or_params, config.ratio, config.granularity, config.mode, config.exclude,
                   config.global_cache_mb)

    # -- selection ---------------------------------------------------------------------------
    def _select(self, src) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
        if isinstance(src, nn.Module):
            aliases: dict[int, tuple[torch.Tensor, list[str]]] = {}
            for name, p in src.named_parameters(remove_duplicate=False):
                aliases.setdefault(id(p), (p, []))[1].append(name)
            items = [(names, p) for p, names in aliases.values()]
        else:
            items = []
            for i, x in enumerate(src):
                if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str):
                    items.append(([x[0]], x[1]))
                elif isinstance(x, torch.Tensor):
                    items.append(([f"param{i}"], x))
                else:
                    raise TypeError(
                        "GradientMask expects an nn.Module, or an iterable of tensors or of "
                        f"(name, tensor) pairs; got an item of type {type(x).__name__}"
                    )
        roles = [p for p in self.config.exclude if p in ROLES]
        by_role = _role_params(src, roles) if isinstance(src, nn.Module) and roles else set()
        patterns = [p for p in self.config.exclude if p not in ROLES] if isinstance(src, nn.Module) \
            else self.config.exclude
        keep, excluded = [], []
        for names, p in items:
            if not p.requires_grad:
                continue
            if id(p) in by_role or _excluded(names, patterns):
                excluded.append(names[0])
            elif not p.is_floating_point():
                raise TypeError(f"parameter {names[0]} is {p.dtype}; GMT masks floating-point gradients")
            else:
                keep.append((names[0], p))
        return keep, excluded

    # -- masking -----------------------------------------------------------------------------
    @property
    def last_stats(self) -> dict | None:
        """The statistics of the last ``apply_()`` (read from the device on first access)."""
        if isinstance(self._last, _PendingStats):
            self._last = self._last.resolve()
        return self._last

    def apply_(self) -> dict:
        """Mask the current gradients in place; returns (and stores in ``last_stats``) the stats.

        On an accelerator, reading the statistics is this call's one host sync; the Trainer
        callback defers it to the logging step (``_apply_pending``)."""
        self._apply_pending()
        stats = self.last_stats
        if log.isEnabledFor(logging.DEBUG):
            th = stats["threshold"]
            th = f"{th:.3e}" if isinstance(th, float) else (
                f"median {statistics.median(th.values()):.3e}" if th else "-")
            log.debug("GMT step %d: kept %.4f of %d entries, threshold %s",
                      stats["step"], stats["kept_fraction"], stats["total"], th)
        return stats

    @torch.no_grad()
    def _apply_pending(self) -> "dict | _PendingStats":
        """Mask the gradients in place; the stats as a dict, or still on the device (device engine)."""
        live = []
        for name, p in self.params:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise TypeError(f"{name} has a sparse gradient; GMT needs dense gradients")
            live.append((name, p, g))
        self._masked = []
        shards = _shards(live)
        if not live:
            stats = {"step": self.step_count, "kept": 0, "total": 0, "kept_fraction": 0.0, "threshold": None}
        elif shards is not None:
            stats = self._apply_sharded(live, shards)
        elif _use_device_engine(live[0][2].device):
            stats = self._apply_device(live)
        elif self.config.granularity == "tensor":
            stats = self._apply_tensor(live)
        else:
            stats = self._apply_global(live)
        self.step_count += 1
        self._applied = True
        self._last = stats
        return stats

    def _keep_count(self, n: int) -> int:
        return n - int(self.config.ratio * n + 1e-9)  # n - floor(ratio * n) >= 1

    def _buffers(self, live):
        # reused by every tensor: large fresh allocations cost page faults on every step
        n = max(g.numel() for _, _, g in live)
        dev = live[0][2].device
        return torch.empty(n, dtype=torch.int16, device=dev), torch.empty(n, dtype=torch.bool, device=dev)

    @staticmethod
    def _boundary(w, hi, b: int, eq_buf) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions and low 16 bits of the entries whose top 16 bits equal ``b``."""
        idx = _positions(torch.eq(hi, b, out=eq_buf))
        return idx, _lo_bits(w, idx)

    def _mask_one(self, p, g, w, t_bits, idx, lo, l, take, ties):
        """Apply the threshold to one tensor; ``take`` of its ``ties`` tied entries are kept."""
        tie_idx = None
        if t_bits != 0 and take < ties:
            tie_idx = idx[lo == l][:take]
        _shrink_(g, w, t_bits, tie_idx)
        if self.config.mode == "strict":
            self._masked.append((p, g == 0))

    def _apply_tensor(self, live) -> dict:
        hi_buf, eq_buf = self._buffers(live)
        thresholds, kept_per, kept, total = {}, {}, 0, 0
        for name, p, g in live:
            w = _work_view(g)
            n = w.numel()
            k = self._keep_count(n)
            hi = _hi_bits(w, hi_buf[:n])
            b, above = _top_k_bin(torch.bincount(hi, minlength=_HI_BINS), k)
            idx, lo = self._boundary(w, hi, b, eq_buf[:n])
            l, above2, ties = _top_k_small(lo, k - above)
            t_bits = (b << 16) | l
            gt = above + above2
            take = 0 if t_bits == 0 else k - gt  # zero gradients are never kept
            self._mask_one(p, g, w, t_bits, idx, lo, l, take, ties)
            thresholds[name] = _bits_to_float(t_bits)
            kept_per[name] = gt + take
            kept += gt + take
            total += n
        return {
            "step": self.step_count, "kept": kept, "total": total, "kept_fraction": kept / total,
            "threshold": thresholds, "kept_per_tensor": kept_per,
        }

    def _apply_global(self, live) -> dict:
        hi_buf, eq_buf = self._buffers(live)
        works = [(name, p, g, _work_view(g)) for name, p, g in live]
        total = sum(w.numel() for *_, w in works)
        k = self._keep_count(total)
        # pass 1: histogram of the top 16 bits, per tensor (kept for the per-tensor counts) and
        # summed. The top bits (2 bytes per entry) are kept for pass 2 if global_cache_mb allows.
        cached_hi = None
        if 2 * total <= self.config.global_cache_mb * 2**20:
            # kept across steps: a fresh buffer would page-fault in on every step
            c = self._hi_cache
            if c is None or c.numel() < total or c.device != hi_buf.device:
                self._hi_cache = c = torch.empty(total, dtype=torch.int16, device=hi_buf.device)
            cached_hi = c
        his, start = [], 0
        hists, hist = [], torch.zeros(_HI_BINS, dtype=torch.int64, device=hi_buf.device)
        for *_, w in works:
            n = w.numel()
            hi = _hi_bits(w, cached_hi[start:start + n] if cached_hi is not None else hi_buf[:n])
            his.append(hi if cached_hi is not None else None)
            start += n
            hists.append(torch.bincount(hi, minlength=_HI_BINS))
            hist += hists[-1]
        b, above = _top_k_bin(hist, k)
        # pass 2: the boundary bin's entries pin the exact value (low-bit histogram); their
        # positions are cached unless there are very many (then recomputed where needed)
        cache = [] if int(hist[b]) <= _BOUNDARY_CACHE_NUMEL else None
        hist2 = torch.zeros(_LO_BINS, dtype=torch.int64, device=hi_buf.device)
        for i, (*_, w) in enumerate(works):
            n = w.numel()
            hi = his[i] if his[i] is not None else _hi_bits(w, hi_buf[:n])
            idx, lo = self._boundary(w, hi, b, eq_buf[:n])
            if cache is not None:
                cache.append((idx, lo))
            elif lo.numel():
                hist2 += torch.bincount(lo, minlength=_LO_BINS)
        if cache is not None:  # few boundary entries: select among them directly
            l, above2, _ = _top_k_small(torch.cat([lo for _, lo in cache]), k - above)
        else:
            l, above2 = _top_k_bin(hist2, k - above)
        t_bits = (b << 16) | l
        gt = above + above2
        remaining = 0 if t_bits == 0 else k - gt
        kept_total = gt + remaining
        # pass 3: mask; ties go to the earliest entries in parameter order
        kept_per = {}
        for i, (name, p, g, w) in enumerate(works):
            if cache is not None:
                idx, lo = cache[i]
            else:
                n = w.numel()
                hi = his[i] if his[i] is not None else _hi_bits(w, hi_buf[:n])
                idx, lo = self._boundary(w, hi, b, eq_buf[:n])
            ties = int((lo == l).sum()) if lo.numel() else 0
            take = min(remaining, ties)
            remaining -= take
            self._mask_one(p, g, w, t_bits, idx, lo, l, take, ties)
            kept_per[name] = int(hists[i][b + 1:].sum()) + int((lo > l).sum()) + take
        return {
            "step": self.step_count, "kept": kept_total, "total": total,
            "kept_fraction": kept_total / total, "threshold": _bits_to_float(t_bits),
            "kept_per_tensor": kept_per,
        }

    def _apply_device(self, live) -> _PendingStats:
        """The device engine: the host engines' thresholds and kept set, without a host sync.

        Per tensor (sequentially, in shared buffers): histogram of the top 16 bits of |g|
        (``index_add_``), the boundary bin by ``searchsorted`` over its cumulative counts, a
        second histogram of the low 16 bits of that bin's entries (the others are counted in
        spare bins), the exact K-th value the same way, then the mask with ties kept in position
        order (``_keep_first_ties``). Global: the histograms are summed over tensors (rows of one
        (tensors, 32768) table), and the tie budget flows through the tensors in parameter order
        as a device scalar. Memory: 9 bytes per entry of the largest tensor plus its temporaries;
        nothing the size of the model, and nothing is concatenated.
        """
        n_max = max(g.numel() for _, _, g in live)
        dev = live[0][2].device
        a_buf = torch.empty(n_max, dtype=torch.int32, device=dev)
        hi_buf = torch.empty(n_max, dtype=torch.int32, device=dev)
        eq_buf = torch.empty(-(-n_max // _TIE_BLOCK) * _TIE_BLOCK, dtype=torch.bool, device=dev)
        works = [(name, p, g, _work_view(g)) for name, p, g in live]
        sizes = [w.numel() for *_, w in works]
        strict = self.config.mode == "strict"

        def bits(w):
            n = w.numel()
            a = _abs_bits(w, a_buf[:n])
            return a, torch.bitwise_right_shift(a, 16, out=hi_buf[:n])

        def threshold(lo_hist, b, above, k):
            cum = lo_hist[:_LO_BINS].cumsum(0)
            l, above2 = _kth_bin(cum, cum[-1:] - (k - above))
            return (b << 16) | l, above + above2

        def mask(p, g, w, a, t, take):
            keep = _keep_first_ties(a, t, take, w.numel(), eq_buf)
            kept = keep.sum().view(1)
            g.masked_fill_(keep.logical_not_().view(g.shape), 0)
            if strict:
                self._masked.append((p, g == 0))
            return kept

        if self.config.granularity == "tensor":
            out = []
            for (name, p, g, w), n in zip(works, sizes):
                k = self._keep_count(n)
                a, hi = bits(w)
                hist = torch.zeros(_HI_BINS, dtype=torch.int64, device=dev)
                _hist_(hist, hi)
                b, above = _kth_bin(hist.cumsum(0), _const(n - k, dev))
                lo_hist = torch.zeros(2 * _LO_BINS, dtype=torch.int64, device=dev)
                _select_in_bin(w, a, hi, b, lo_hist, hist.index_select(0, b))
                t, gt = threshold(lo_hist, b, above, k)
                take = torch.where(t == 0, 0, k - gt)  # zero gradients are never kept
                mask(p, g, w, a, t, take)
                out += [t, gt + take]
            return _PendingStats(self.step_count, [x[0] for x in works], sizes, torch.cat(out), True)
        total = sum(sizes)
        k = self._keep_count(total)
        hists = torch.zeros(len(works), _HI_BINS, dtype=torch.int64, device=dev)
        for i, (*_, w) in enumerate(works):
            _hist_(hists[i], bits(w)[1])
        b, above = _kth_bin(hists.sum(0).cumsum(0), _const(total - k, dev))
        lo_hist = torch.zeros(2 * _LO_BINS, dtype=torch.int64, device=dev)
        for i, (*_, w) in enumerate(works):
            a, hi = bits(w)
            _select_in_bin(w, a, hi, b, lo_hist, hists[i].index_select(0, b))
        t, gt = threshold(lo_hist, b, above, k)
        remaining = torch.where(t == 0, 0, k - gt)  # ties still to keep, in parameter order
        out = [t]
        for name, p, g, w in works:
            a, _ = bits(w)
            out.append(mask(p, g, w, a, t, remaining))
            n = w.numel()
            remaining = (remaining - eq_buf[:n].sum()).clamp_(min=0)  # eq_buf: this tensor's ties
        return _PendingStats(self.step_count, [x[0] for x in works], sizes, torch.cat(out), False)

    def _apply_sharded(self, live, shards) -> dict:
        """Exact thresholds over gradients sharded on dim 0 across ranks (FSDP2), see docs/gmt.md.

        Every rank histograms its own shards; the histograms are summed across the process group
        (two all-reduces), so every rank finds the same threshold as one process holding the full
        gradients. Ties are broken in the unsharded order (parameter order, then shard rank, then
        index within the shard: the full flat order for contiguous dim-0 shards) from the tie
        counts of every rank (one all-gather). Nothing the size of a gradient is communicated.
        """
        import torch.distributed as dist

        group, rank, world = shards[0][1:]
        per_tensor = self.config.granularity == "tensor"
        works = [(name, p, loc, _work_view(loc)) for (name, p, _), (loc, *_) in zip(live, shards)]
        hi_buf, eq_buf = self._buffers([(None, None, w) for *_, w in works])
        dev = hi_buf.device
        m = len(works)
        ns = [g.numel() for _, _, g in live]  # global sizes
        hists = torch.empty(m, _HI_BINS, dtype=torch.int64, device=dev)
        for i, (*_, w) in enumerate(works):
            n = w.numel()
            hists[i] = torch.bincount(_hi_bits(w, hi_buf[:n]), minlength=_HI_BINS)
        dist.all_reduce(hists, group=group)
        if per_tensor:
            ks = [self._keep_count(n) for n in ns]
            bins = [_top_k_bin(hists[i], ks[i]) for i in range(m)]
        else:
            k = self._keep_count(sum(ns))
            b, above = _top_k_bin(hists.sum(0), k)
            bins = [(b, above)] * m
        # the boundary entries of this rank (few), and their low-bit histograms summed across ranks
        bounds = []
        lo_hists = torch.zeros(m if per_tensor else 1, _LO_BINS, dtype=torch.int64, device=dev)
        for i, (*_, w) in enumerate(works):
            n = w.numel()
            idx, lo = self._boundary(w, _hi_bits(w, hi_buf[:n]), bins[i][0], eq_buf[:n])
            bounds.append((idx, lo))
            if lo.numel():
                lo_hists[i if per_tensor else 0] += torch.bincount(lo, minlength=_LO_BINS)
        dist.all_reduce(lo_hists, group=group)
        if per_tensor:
            sel = []
            for i in range(m):
                l, above2 = _top_k_bin(lo_hists[i], ks[i] - bins[i][1])
                sel.append(((bins[i][0] << 16) | l, l, ks[i], bins[i][1] + above2))
        else:
            l, above2 = _top_k_bin(lo_hists[0], k - above)
            sel = [((b << 16) | l, l, k, above + above2)] * m
        # per tensor and rank: entries equal to the threshold, and above it within the boundary bin
        counts = torch.tensor(
            [[int((lo == s[1]).sum()), int((lo > s[1]).sum())] for (_, lo), s in zip(bounds, sel)],
            dtype=torch.int64, device=dev,
        ).view(m, 2)
        gathered = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(gathered, counts, group=group)
        every = torch.stack(gathered)  # (world, m, 2), indexed by shard rank
        ties_before, ties_all = every[:rank, :, 0].sum(0).tolist(), every[:, :, 0].sum(0).tolist()
        remaining = 0 if sel[0][0] == 0 else sel[0][2] - sel[0][3]  # global: shared budget of ties
        thresholds, kept_per = {}, {}
        for i, (name, p, loc, w) in enumerate(works):
            t_bits, l, k_i, gt = sel[i]
            if per_tensor:
                take = 0 if t_bits == 0 else k_i - gt
            else:
                take = min(remaining, ties_all[i])
                remaining -= take
            local_ties = int(counts[i, 0])
            local_take = min(max(take - ties_before[i], 0), local_ties)
            idx, lo = bounds[i]
            self._mask_one(p, loc, w, t_bits, idx, lo, l, local_take, local_ties)
            thresholds[name] = _bits_to_float(t_bits)
            kept_per[name] = int(hists[i][(t_bits >> 16) + 1:].sum()) + int(every[:, i, 1].sum()) + take
        kept, total = sum(kept_per.values()), sum(ns)
        return {
            "step": self.step_count, "kept": kept, "total": total, "kept_fraction": kept / total,
            "threshold": thresholds if per_tensor else _bits_to_float(sel[0][0]),
            "kept_per_tensor": kept_per, "ranks": world,
        }

    # -- stepping ----------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer, closure=None):
        """Mask (unless ``apply_()`` already ran since the last step) and step the optimizer.

        In "strict" mode the masked entries of every parameter and of its per-entry optimizer
        state are restored bit for bit after the step, so they receive no update at all.
        """
        if not self._applied:
            self.apply_()
        snapshot = self.snapshot_(optimizer)
        try:
            return optimizer.step(closure) if closure is not None else optimizer.step()
        finally:
            self.restore_(snapshot)

    def snapshot_(self, optimizer) -> list | None:
        """Strict mode: copy the masked parameters and their per-entry optimizer state.

        Returns None in paper mode. Cost while the step runs: one copy of each masked parameter
        and of each of its state tensors shaped like it, plus an integer mask of the same size.
        """
        self._applied = False
        if self.config.mode != "strict":
            return None
        snap = []
        state = optimizer.state
        for p, masked in self._masked:
            entries = [_local(p.detach())]
            st = state.get(p, {}) if hasattr(state, "get") else {}
            for v in st.values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    entries.append(_local(v))  # sharded: this rank's part, like masked
            snap.append((masked, [(t, t.detach().clone()) for t in entries]))
        self._masked = []
        return snap

    @staticmethod
    @torch.no_grad()
    def restore_(snapshot: list | None) -> None:
        """Strict mode: put back the masked entries saved by ``snapshot_`` (bit-exact)."""
        if not snapshot:
            return
        for masked, pairs in snapshot:
            int_masks = {}
            for cur, old in pairs:
                size = cur.element_size()
                itype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
                if size not in int_masks:
                    int_masks[size] = masked.to(itype).neg_()  # all ones where masked
                m = int_masks[size]
                c, o = cur.view(itype), old.view(itype)
                # cur ^= (cur ^ old) & m: the old bits where masked, the new bits elsewhere
                o.bitwise_xor_(c).bitwise_and_(m)
                c.bitwise_xor_(o)


def build_gradient_mask(model: nn.Module, config: GMTConfig) -> GradientMask:
    """The GradientMask a GMTConfig describes, over ``model``'s trainable parameters."""
    return GradientMask.from_config(model, config)


def _refuse_unsupported_sharding(args, model) -> None:
    """GMT's thresholds are exact across the shards of FSDP2 (DTensor gradients); DeepSpeed and
    FSDP1 hand the optimizer flat per-rank shards without the layout the selection needs."""
    if getattr(args, "deepspeed", None):
        raise NotImplementedError(
            "GMT does not support DeepSpeed (its gradients are flat per-rank partitions, so the "
            "threshold would be per shard); use FSDP2 (fsdp_version: 2), DDP or a single process"
        )
    fsdp1 = bool(getattr(args, "fsdp", None)) and int((getattr(args, "fsdp_config", None) or {}).get("version", 2)) != 2
    if not fsdp1 and model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    if fsdp1:
        raise NotImplementedError(
            "GMT does not support FSDP1 (flat parameters: the threshold would be per shard); "
            "use FSDP2 (fsdp_version: 2 in the accelerate config, or --fsdp), DDP or a single process"
        )


def _make_callback_class():
    from transformers import TrainerCallback

    class GradientMaskCallback(TrainerCallback):
        """Hugging Face Trainer integration of GMT: mask after accumulation, then clip, then step.

        The Trainer clips gradients *before* ``on_pre_optimizer_step``, but the mask must come
        first so that clipping acts on what is applied. So at train begin the callback takes over
        clipping: it sets ``args.max_grad_norm`` to 0 (the Trainer then only measures the
        pre-mask norm, logged as ``grad_norm``), and in ``on_pre_optimizer_step`` masks and clips
        with the original max norm (restored at train end). Per optimizer step it records the
        stats in ``history``; every Trainer log gets ``kept_fraction`` (mean since the last log)
        and ``mask_threshold`` (global) or ``mask_threshold_median`` (per tensor). On an
        accelerator the statistics and norms stay on the device until the next log (or train
        end), then are read at once: ``history`` is complete at each log, not at each step.

        Give a GradientMask, or a GMTConfig (the mask is then built on the Trainer's model when
        training starts).
        """

        def __init__(self, mask_or_config: GradientMask | GMTConfig):
            if not isinstance(mask_or_config, (GradientMask, GMTConfig)):
                raise TypeError("GradientMaskCallback needs a GradientMask or a GMTConfig")
            self.mask = mask_or_config if isinstance(mask_or_config, GradientMask) else None
            self.config = mask_or_config.config if self.mask is not None else mask_or_config
            self.history: list[dict] = []
            self._since_log: list[dict] = []
            self._unread: list[tuple[dict, object, object]] = []  # (record, stats, norm) on the device
            self._max_grad_norm = 0.0
            self._snapshot = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            _refuse_unsupported_sharding(args, model)
            if self.mask is None:
                self.mask = GradientMask.from_config(model, self.config)
            self._max_grad_norm = float(args.max_grad_norm or 0.0)
            if self._max_grad_norm > 0:
                args.max_grad_norm = 0.0

        def on_train_end(self, args, state, control, **kwargs):
            self._read()
            if self._max_grad_norm > 0:
                args.max_grad_norm = self._max_grad_norm

        def _read(self) -> None:
            """Complete the records of the steps since the last read: one transfer for all stats
            (and one for the clipping norms), however many steps and tensors."""
            if not self._unread:
                return
            unread, self._unread = self._unread, []
            norms = [n for _, _, n in unread if n is not None]
            norms = iter(torch.stack([n.float() for n in norms]).tolist() if norms else [])
            for (record, _, norm), stats in zip(unread, resolve_all([s for _, s, _ in unread])):
                record["kept_fraction"] = stats["kept_fraction"]
                th = stats["threshold"]
                if isinstance(th, dict):
                    record["mask_threshold_median"] = statistics.median(th.values()) if th else 0.0
                elif th is not None:
                    record["mask_threshold"] = th
                if norm is not None:
                    record["masked_grad_norm"] = next(norms)
                self.history.append(record)
                self._since_log.append(record)

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            stats = self.mask._apply_pending()  # no host sync on an accelerator: read at the next log
            norm = None
            if self._max_grad_norm > 0:
                params = [p for p in model.parameters() if p.grad is not None]
                norm = torch.nn.utils.clip_grad_norm_(params, self._max_grad_norm)
                if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a (replicated) DTensor
                    norm = norm.full_tensor()
                norm = norm.detach()
            self._snapshot = self.mask.snapshot_(optimizer)
            self._unread.append(({"step": state.global_step + 1}, stats, norm))

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.mask.restore_(self._snapshot)
            self._snapshot = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs:
                return
            self._read()
            if not self._since_log:
                return
            recs, self._since_log = self._since_log, []
            extra = {}
            for key in recs[-1]:
                if key != "step":
                    vals = [r[key] for r in recs if key in r]
                    extra[key] = sum(vals) / len(vals)
            logs.update(extra)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(extra)

    GradientMaskCallback.__module__ = __name__
    GradientMaskCallback.__qualname__ = "GradientMaskCallback"
    return GradientMaskCallback


def __getattr__(name):
    # The Trainer callback is built on first use so that importing salientft.gmt (and a plain
    # PyTorch loop) does not import transformers.
    if name == "GradientMaskCallback":
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
