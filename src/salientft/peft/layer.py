"""The GIFT-SW tuner layers: PEFT's view of a SalientLinear and of fused MoE experts.

Per adapter: ``giftsw_weight`` (out, k), the trainable columns; ``giftsw_idx`` (k,) and
``giftsw_noise_std`` (out,), persistent buffers that travel in the adapter. The forward is
``salientft.gift.layer.salient_linear`` on the base layer's own frozen weight: no weight copy,
no (out, in) weight gradient, the weight noise regenerated from a seed in backward (or, with the
config's ``keep_noise``, kept from forward). :class:`Experts` does the same per expert of each
fused projection of an MoE experts module, with a leading expert dimension on each tensor.
"""
from __future__ import annotations

import warnings
from operator import attrgetter
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..gift.experts import expert_matmul, gather_columns, scatter_columns_, select_expert_columns
from ..gift.layer import output_noise, salient_linear
from ..gift.model import expert_noise_std, noise_std_for
from ..ops.experts import (expert_bias, expert_projections, expert_weight, frozen_projection,
                           routed_experts_forward, routing_args)
from ..ops.noise import draw_seed
from ..saliency import select_salient


def check_adapter_tensors(state_dict: dict, prefix: str) -> None:
    """Refuse a saved adapter that lists a column twice (per expert, for fused experts) or holds
    NaN/inf under ``prefix``, as salientft's own loader does (columns in any order are fine here:
    each index travels with its column)."""
    for key, t in state_dict.items():
        if not key.startswith(prefix) or not torch.is_tensor(t):
            continue
        rest = key[len(prefix):]
        kind = next((part for part in rest.split(".") if part.startswith("giftsw_")), None)
        if kind is None:
            continue
        where = (prefix + rest[:rest.index(kind)]).rstrip(".")
        if kind == "giftsw_idx" and t.numel() > 1:
            ordered = t.sort(dim=-1).values
            if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
                raise ValueError(f"GIFT-SW adapter: {where} lists a salient column twice; the adapter is corrupt")
        finite = not t.is_floating_point() or bool(torch.isfinite(t).all())
        if kind in ("giftsw_weight", "giftsw_noise_std") and not finite:
            raise ValueError(f"GIFT-SW adapter: {where}'s {kind} holds NaN or infinite values "
                             "(a diverged training?); the adapter is refused")


class GiftSWLayer(BaseTunerLayer):
    """What every GIFT-SW tuner layer shares: per-adapter noise settings, and merging as column
    replacement. A subclass lists an adapter's column sets in :meth:`column_sets`, each as 3-D
    views ([experts, out, in] weight, [experts, k] indices, [experts, out, k] columns; one expert
    for a linear layer), and names its frozen weights in :meth:`base_weights`."""

    adapter_layer_names = ("giftsw_weight",)
    other_param_names = ("giftsw_idx", "giftsw_noise_std", "giftsw_noise", "giftsw_keep_noise")

    def _init_giftsw(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.giftsw_noise: dict[str, str] = {}
        self.giftsw_keep_noise: dict[str, bool] = {}
        self._giftsw_original: dict[tuple[str, str], torch.Tensor] = {}  # columns overwritten by merge
        self._disable_adapters = False
        self.merged_adapters = []

    def _set_noise(self, adapter_name: str, config) -> None:
        self.giftsw_noise[adapter_name] = config.noise
        self.giftsw_keep_noise[adapter_name] = bool(getattr(config, "keep_noise", False))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @staticmethod
    def _param_dtype(config, w: torch.Tensor) -> torch.dtype:
        return torch.float32 if config.fp32_salient and w.dtype in (torch.bfloat16, torch.float16) else w.dtype

    def column_sets(self, adapter_name: str) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(key, weight [experts, out, in], idx [experts, k], columns [experts, out, k]) of each weight
        the adapter trains columns of; views of the layer's own tensors."""
        raise NotImplementedError

    def base_weights(self, name: str, adapter_name: str) -> dict[str, torch.Tensor]:
        """The frozen weights this adapter covers, by target name (``name``: this layer's module name),
        as salientft's base fingerprint names and shapes them."""
        raise NotImplementedError

    def covered(self, name: str) -> list[str]:
        """What this layer covers, as ``targets.uncovered_weights`` reads target names."""
        return [name]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write each adapter's trained columns into the base weight (the originals are kept for unmerge).

        Adapters replace columns: two merged adapters that share a column keep the later one's values.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            sets = self.column_sets(name)
            if not sets:
                continue
            for key, w, idx, columns in sets:
                new = columns.detach()
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"NaNs detected in the trained columns of adapter {name!r}: the adapter is broken")
                with torch.no_grad():
                    self._giftsw_original[(name, key)] = gather_columns(w, idx).clone()
                    scatter_columns_(w, idx, new)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            for key, w, idx, _ in self.column_sets(name):
                original = self._giftsw_original.pop((name, key), None)
                if original is not None:
                    with torch.no_grad():
                        scatter_columns_(w, idx, original)


class Linear(nn.Module, GiftSWLayer):
    """GIFT-SW on an ``nn.Linear`` (or transformers' ``Conv1D``) base layer."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str, **kwargs) -> None:
        super().__init__()
        self._init_giftsw(base_layer)
        self.giftsw_weight = nn.ParameterDict({})
        self.giftsw_idx = BufferDict(persistent=True)
        self.giftsw_noise_std = BufferDict(persistent=True)
        base = self.get_base_layer()
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # transformers' Conv1D stores (in, out)
        self.out_features, self.in_features = self.base_weight().shape
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as an (out, in) view."""
        w = self.get_base_layer().weight
        return w.t() if self.fan_in_fan_out else w

    def update_layer(self, adapter_name: str, config, module_name: str) -> None:
        w = self.base_weight().detach()
        k = config.k_for(module_name, self.in_features)
        if config.salient_indices_in_adapter:  # loading a saved adapter: its buffers overwrite these
            idx = torch.arange(k, device=w.device)
            std = torch.zeros(self.out_features, dtype=torch.float32, device=w.device)
        else:
            idx = select_salient(config.scores_for(module_name, w), k).to(w.device)
            std = (noise_std_for(w, idx, config.noise_bits) if config.noise != "none"
                   else torch.zeros(self.out_features, dtype=torch.float32, device=w.device))
        self.giftsw_idx[adapter_name] = idx
        self.giftsw_noise_std[adapter_name] = std.float()
        self.giftsw_weight[adapter_name] = nn.Parameter(w.index_select(1, idx).to(self._param_dtype(config, w)).clone())
        self._set_noise(adapter_name, config)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense (out, in) update of an adapter: its trained columns minus the base's."""
        w = self.base_weight()
        idx = self.giftsw_idx[adapter_name]
        delta = torch.zeros_like(w)
        delta.index_copy_(1, idx, self.giftsw_weight[adapter_name].detach().to(w.dtype) - w.index_select(1, idx))
        return delta.t() if self.fan_in_fan_out else delta

    def column_sets(self, adapter_name: str):
        if adapter_name not in self.giftsw_weight:
            return []
        return [("weight", self.base_weight()[None], self.giftsw_idx[adapter_name][None],
                 self.giftsw_weight[adapter_name][None])]

    def base_weights(self, name: str, adapter_name: str) -> dict[str, torch.Tensor]:
        return {name: self.base_weight()} if adapter_name in self.giftsw_weight else {}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.giftsw_weight]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        bias = self.get_base_layer().bias
        if len(active) == 1:
            name = active[0]
            idx, std = self.giftsw_idx[name], self.giftsw_noise_std[name]
            noise = self.giftsw_noise[name] if self.training else "none"
            seed = draw_seed() if noise == "weight" else None
            y = salient_linear(x, self.base_weight(), self.giftsw_weight[name], bias, idx, std, seed,
                               self.giftsw_keep_noise.get(name, False))
            if noise == "output":
                y = y + output_noise(x, y, idx, std)
            return y
        # Several active adapters: the base output plus each adapter's column correction (no noise).
        y = self.base_layer(x, *args, **kwargs)
        w = self.base_weight()
        for name in active:
            idx = self.giftsw_idx[name]
            delta = self.giftsw_weight[name].to(y.dtype) - w.index_select(1, idx).to(y.dtype)
            y = y + F.linear(x.index_select(-1, idx).to(y.dtype), delta)
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        check_adapter_tensors(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __repr__(self) -> str:
        return "giftsw." + super().__repr__()


class ExpertsProjection(nn.Module):
    """One fused projection's GIFT-SW adapters inside :class:`Experts`, which registers it under the
    projection's name: ``giftsw_weight`` [experts, out, k] (trainable), ``giftsw_idx`` [experts, k] and
    ``giftsw_noise_std`` [experts, out] per adapter, so that their state-dict keys are
    ``<experts>.<proj>.giftsw_weight`` (plus the adapter name): the 3-D parameter's name, as the
    adapter file names a fused target."""

    def __init__(self) -> None:
        super().__init__()
        self.giftsw_weight = nn.ParameterDict({})
        self.giftsw_idx = BufferDict(persistent=True)
        self.giftsw_noise_std = BufferDict(persistent=True)


class Experts(nn.Module, GiftSWLayer):
    """GIFT-SW on a fused MoE experts module (``ops.experts.is_fused_experts``): k salient input
    columns per expert of each targeted projection, as ``salientft.apply_gift`` trains them
    (``gift.experts``), as a PEFT tuner layer.

    It replaces the experts module (kept as ``base_layer``) and holds one :class:`ExpertsProjection`
    per projection of the module (``gate_up_proj``/``up_proj``, ``down_proj``; a projection no adapter
    targets stays empty). PEFT's per-adapter machinery (``set_adapter``, ``delete_adapter``,
    ``enable_adapters``, the layer status) reads the holders' dicts through dotted names in
    ``adapter_layer_names`` / ``other_param_names`` (``"down_proj.giftsw_weight"``), resolved by
    :meth:`__getattr__`. The forward is transformers' eager per-expert loop
    (``ops.experts.routed_experts_forward``) with ``gift.experts.expert_matmul`` per expert, whatever
    ``experts_implementation`` the model was loaded with; with adapters disabled or merged, the
    experts module's own forward.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str,
                 projections: list[str], **kwargs) -> None:
        super().__init__()
        self._init_giftsw(base_layer)
        self.projections = expert_projections(base_layer)
        for proj in self.projections:
            self.add_module(proj, ExpertsProjection())
        self.adapter_layer_names = tuple(f"{p}.giftsw_weight" for p in self.projections)
        self.other_param_names = (*(f"{p}.{kind}" for p in self.projections
                                    for kind in ("giftsw_idx", "giftsw_noise_std")),
                                  "giftsw_noise", "giftsw_keep_noise")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name, projections)

    def __getattr__(self, name: str):
        if "." in name:  # a holder's dict, e.g. "down_proj.giftsw_weight" (see the class docstring)
            return attrgetter(name)(self)
        return super().__getattr__(name)

    def holders(self) -> dict[str, ExpertsProjection]:
        return {p: self._modules[p] for p in self.projections}

    def update_layer(self, adapter_name: str, config, module_name: str, projections: list[str]) -> None:
        base = self.get_base_layer()
        for proj in projections:
            name = f"{module_name}.{proj}"
            w = expert_weight(base, proj).detach()
            n_experts, out_features, in_features = w.shape
            k = config.k_for(name, in_features)
            if config.salient_indices_in_adapter:  # loading a saved adapter: its buffers overwrite these
                idx = torch.arange(k, device=w.device).expand(n_experts, k).clone()
                std = torch.zeros(n_experts, out_features, dtype=torch.float32, device=w.device)
            else:
                idx = select_expert_columns(config.expert_scores_for(name, w), k).to(w.device)
                std = (expert_noise_std(w, idx, config.noise_bits) if config.noise != "none"
                       else torch.zeros(n_experts, out_features, dtype=torch.float32, device=w.device))
            holder = self.holders()[proj]
            holder.giftsw_idx[adapter_name] = idx
            holder.giftsw_noise_std[adapter_name] = std.float()
            holder.giftsw_weight[adapter_name] = nn.Parameter(
                gather_columns(w, idx).to(self._param_dtype(config, w)).clone())
        self._set_noise(adapter_name, config)

    def column_sets(self, adapter_name: str):
        base = self.get_base_layer()
        return [(p, expert_weight(base, p), h.giftsw_idx[adapter_name], h.giftsw_weight[adapter_name])
                for p, h in self.holders().items() if adapter_name in h.giftsw_weight]

    def base_weights(self, name: str, adapter_name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.{p}": w for p, w, _, _ in self.column_sets(adapter_name)}

    def covered(self, name: str) -> list[str]:
        return [c for p, h in self.holders().items() if len(h.giftsw_weight) for c in (f"{name}.{p}",
                                                                                   f"{name}.base_layer.{p}")]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        holders = self.holders()
        active = [a for a in self.active_adapters if any(a in h.giftsw_weight for h in holders.values())]
        if self.merged or not active:
            return self.base_layer(*args, **kwargs)
        base = self.get_base_layer()
        hidden_states, top_k_index, top_k_weights = routing_args(args, kwargs)
        frozen = frozen_projection(base)
        if len(active) == 1:
            name = active[0]
            noise = self.giftsw_noise[name] if self.training else "none"
            keep = self.giftsw_keep_noise.get(name, False)
            trained = {p: h for p, h in holders.items() if name in h.giftsw_weight}
            seeds = {p: draw_seed() if noise == "weight" else None for p in trained}
            # one unbind per forward: its backward stacks the experts' gradients once (see ExpertColumns.project)
            columns = {p: h.giftsw_weight[name].unbind(0) for p, h in trained.items()}

            def project(proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
                if proj not in trained:
                    return frozen(proj, e, x)
                h = trained[proj]
                return expert_matmul(x, e, expert_weight(base, proj), columns[proj][e], expert_bias(base, proj),
                                     h.giftsw_idx[name], h.giftsw_noise_std[name], seeds[proj], keep,
                                     noise == "output")
        else:
            # Several active adapters: the frozen output plus each adapter's column correction (no noise).
            def project(proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
                y = frozen(proj, e, x)
                w = expert_weight(base, proj)[e]
                for name in active:
                    h = holders[proj]
                    if name not in h.giftsw_weight:
                        continue
                    idx = h.giftsw_idx[name][e]
                    delta = h.giftsw_weight[name][e].to(y.dtype) - w.index_select(1, idx).to(y.dtype)
                    y = y + F.linear(x.index_select(-1, idx).to(y.dtype), delta)
                return y

        return routed_experts_forward(base, hidden_states, top_k_index, top_k_weights, project)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        check_adapter_tensors(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __repr__(self) -> str:
        return "giftsw." + super().__repr__()
