"""``GradientMask``: keep the largest accumulated gradients of a model's trainable parameters (GMT).

Usage in a plain loop (mask after accumulation, before clipping and the step)::

    mask = GradientMask(model, ratio=0.5)
    loss.backward()                    # x gradient-accumulation steps
    mask.apply_()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    mask.step(optimizer)               # == optimizer.step() in "paper" mode
    optimizer.zero_grad()

The mask picks which parameters it masks (roles and patterns of ``GMTConfig.exclude``), hands the
thresholds to a strategy chosen once (``strategies.py``) and, in strict mode, puts the masked
entries back after the step (``strict.py``).
"""
from __future__ import annotations

import fnmatch
import logging
import statistics
from typing import Iterable

import torch
from torch import nn

from .config import GMT_DEFAULT_EXCLUDE, ROLES, GMTConfig
from .stats import _PendingStats
from .strategies import kind_of, make_strategy
from .strict import StrictSnapshot

log = logging.getLogger(__package__)  # "salientft.gmt"


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
        # chosen once, from where the parameters live (again only if the gradients turn out to
        # live elsewhere, e.g. a model moved or sharded after the mask was built)
        self.strategy = make_strategy(self.config, kind_of(p for _, p in self.params))
        log.info(
            "GMT: masking %d tensors (%d entries) at ratio %.3f, %s granularity, %s mode; unmasked: %s",
            len(self.params), sum(p.numel() for _, p in self.params), self.config.ratio,
            self.config.granularity, self.config.mode, ", ".join(self.excluded) or "none",
        )

    @classmethod
    def from_config(cls, model_or_params, config: GMTConfig) -> "GradientMask":
        return cls(model_or_params, config.ratio, config.granularity, config.mode, config.exclude,
                   config.global_cache_mb)

    # -- which parameters ----------------------------------------------------------------------
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
        if not live:
            stats = {"step": self.step_count, "kept": 0, "total": 0, "kept_fraction": 0.0, "threshold": None}
        else:
            kind = kind_of(g for _, _, g in live)
            if kind != self.strategy.kind:
                self.strategy = make_strategy(self.config, kind)
            stats = self.strategy.apply(live, self.step_count, self._on_masked)
        self.step_count += 1
        self._applied = True
        self._last = stats
        return stats

    def _on_masked(self, p: torch.Tensor, g: torch.Tensor) -> None:
        if self.config.mode == "strict":
            self._masked.append((p, g == 0))

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

    def snapshot_(self, optimizer) -> StrictSnapshot | None:
        """Strict mode: save the masked entries of the masked parameters and of their per-entry
        optimizer state (``strict.StrictSnapshot``: only those entries); None in paper mode."""
        self._applied = False
        if self.config.mode != "strict":
            return None
        masked, self._masked = self._masked, []
        return StrictSnapshot(masked, optimizer, host=self.strategy.kind == "host")

    @staticmethod
    def restore_(snapshot: StrictSnapshot | None) -> None:
        """Strict mode: put back the masked entries saved by ``snapshot_`` (bit-exact)."""
        if snapshot is not None:
            snapshot.restore()


def build_gradient_mask(model: nn.Module, config: GMTConfig) -> GradientMask:
    """The GradientMask a GMTConfig describes, over ``model``'s trainable parameters."""
    return GradientMask.from_config(model, config)
