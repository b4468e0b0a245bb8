"""GMT's strict mode: masked entries get no update of any kind in a step, whatever the optimizer.

Before ``optimizer.step()`` the masked entries of each masked parameter and of each optimizer
state tensor shaped like it (AdamW's ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, SGD's
``momentum_buffer``, ...) are copied out, compacted: only the masked entries, as raw bits. After
the step they are written back at the same positions, bit for bit. So the memory held across the
step is what the mask restores (the masked entries' bytes) plus the boolean mask itself, not a
copy of every masked tensor and its moments; the kept entries get the optimizer's own update
(its plain, foreach or fused kernel, untouched), which is exact for every optimizer whose update
of an entry depends on that entry alone (AdamW, Adam, SGD, ...) and for any other (the masked
entries are put back whatever the step did to them).

The masked positions are found with ``nonzero`` on the host. On an accelerator that would stall
the device once per tensor, so there the masked counts of every tensor are read at once (one
transfer per step) and the positions found with ``nonzero_static`` (a static shape); the gathers
and scatters (``index_select``, ``index_copy_``) add no host sync (docs/gmt.md).
"""
from __future__ import annotations

import torch

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage); a plain tensor itself."""
    return t if type(t) is torch.Tensor or not hasattr(t, "to_local") else t.to_local()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s storage as integers of its element size (bit-exact copies: -0.0, NaN payloads)."""
    return t.view(_INT[t.element_size()])


class _Positions:
    """Where the masked entries of one tensor are, addressable in tensors of its shape whatever
    their strides: flat indices for contiguous tensors, unraveled ones for the others."""

    def __init__(self, masked: torch.Tensor, count: int | None):
        flat = masked.reshape(-1)
        # count None (host): nonzero, twice as fast as nonzero_static on CPU but a sync elsewhere
        self.flat = (flat.nonzero() if count is None else torch.nonzero_static(flat, size=count)).view(-1)
        self.shape = masked.shape

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        b = _bits(t)
        if t.is_contiguous():
            return b.view(-1).index_select(0, self.flat)
        return b[torch.unravel_index(self.flat, self.shape)]

    def scatter_(self, t: torch.Tensor, saved: torch.Tensor) -> None:
        b = _bits(t)
        if t.is_contiguous():
            b.view(-1).index_copy_(0, self.flat, saved)
        else:
            b.index_put_(torch.unravel_index(self.flat, self.shape), saved)


def _targets(p: torch.Tensor, state) -> list[torch.Tensor]:
    """The tensors strict mode restores for parameter ``p``: itself and its per-entry optimizer
    state (this rank's part when sharded, like the mask)."""
    out = [_local(p.detach())]
    st = state.get(p, {}) if hasattr(state, "get") else {}
    out += [_local(v) for v in st.values() if torch.is_tensor(v) and v.shape == p.shape]
    return out


class StrictSnapshot:
    """The masked entries of the masked parameters and of their optimizer state, taken before a
    step and put back after it (``restore``). ``masked``: (parameter, boolean mask of its masked
    entries) pairs; ``host``: the tensors live where a host read costs nothing (the CPU).
    ``nbytes``: what it holds (the masks included)."""

    def __init__(self, masked: list[tuple[torch.Tensor, torch.Tensor]], optimizer, host: bool = True):
        state = optimizer.state
        if host or not masked:
            counts = [None] * len(masked)
        else:  # one transfer for every tensor's count
            counts = torch.stack([m.sum() for _, m in masked]).tolist()
        # per tensor: (masked bool, count or None, [(target, its masked entries' bits)])
        self.entries: list[tuple[torch.Tensor, int | None, list]] = []
        for (p, m), c in zip(masked, counts):
            pos = _Positions(m, c)
            if pos.flat.numel():
                self.entries.append((m, c, [(t, pos.gather(t)) for t in _targets(p, state)]))

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() + sum(s.numel() * s.element_size() for _, s in pairs)
                   for m, _, pairs in self.entries)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved bits back at the masked positions (bit-exact), then let them go."""
        entries, self.entries = self.entries, []
        for m, c, pairs in entries:
            pos = _Positions(m, c)
            for t, saved in pairs:
                pos.scatter_(t, saved)
