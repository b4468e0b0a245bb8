"""The GIFT-SW tuner layer: PEFT's view of a SalientLinear.

Per adapter: ``giftsw_weight`` (out, k), the trainable columns; ``giftsw_idx`` (k,) and
``giftsw_noise_std`` (out,), persistent buffers that travel in the adapter. The forward is
``salientft.gift.layer.salient_linear`` on the base layer's own frozen weight: no weight copy,
no (out, in) weight gradient, the weight noise regenerated from a seed in backward (or, with the
config's ``keep_noise``, kept from forward).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..gift.layer import output_noise, salient_linear
from ..gift.model import noise_std_for
from ..ops.noise import draw_seed
from ..saliency import select_salient


class GiftSWLayer(BaseTunerLayer):
    adapter_layer_names = ("giftsw_weight",)
    other_param_names = ("giftsw_idx", "giftsw_noise_std", "giftsw_noise", "giftsw_keep_noise")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.giftsw_weight = nn.ParameterDict({})
        self.giftsw_idx = BufferDict(persistent=True)
        self.giftsw_noise_std = BufferDict(persistent=True)
        self.giftsw_noise: dict[str, str] = {}
        self.giftsw_keep_noise: dict[str, bool] = {}
        self._giftsw_original: dict[str, torch.Tensor] = {}  # columns overwritten by merge, for unmerge
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # transformers' Conv1D stores (in, out)
        self.out_features, self.in_features = self.base_weight().shape

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
        dtype = torch.float32 if config.fp32_salient and w.dtype in (torch.bfloat16, torch.float16) else w.dtype
        self.giftsw_idx[adapter_name] = idx
        self.giftsw_noise_std[adapter_name] = std.float()
        self.giftsw_weight[adapter_name] = nn.Parameter(w.index_select(1, idx).to(dtype).clone())
        self.giftsw_noise[adapter_name] = config.noise
        self.giftsw_keep_noise[adapter_name] = bool(getattr(config, "keep_noise", False))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense (out, in) update of an adapter: its trained columns minus the base's."""
        w = self.base_weight()
        idx = self.giftsw_idx[adapter_name]
        delta = torch.zeros_like(w)
        delta.index_copy_(1, idx, self.giftsw_weight[adapter_name].detach().to(w.dtype) - w.index_select(1, idx))
        return delta.t() if self.fan_in_fan_out else delta


class Linear(nn.Module, GiftSWLayer):
    """GIFT-SW on an ``nn.Linear`` (or transformers' ``Conv1D``) base layer."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str, **kwargs) -> None:
        super().__init__()
        GiftSWLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write each adapter's trained columns into the base weight (the originals are kept for unmerge).

        Adapters replace columns: two merged adapters that share a column keep the later one's values.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        w = self.base_weight()
        for name in adapter_names:
            if name not in self.giftsw_weight:
                continue
            idx = self.giftsw_idx[name]
            new = self.giftsw_weight[name].detach().to(w.dtype)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"NaNs detected in the trained columns of adapter {name!r}: the adapter is broken")
            with torch.no_grad():
                self._giftsw_original[name] = w.index_select(1, idx).clone()
                w.index_copy_(1, idx, new)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        w = self.base_weight()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._giftsw_original:
                with torch.no_grad():
                    w.index_copy_(1, self.giftsw_idx[name], self._giftsw_original.pop(name))

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
        """Refuse a saved adapter that lists a column twice or holds NaN/inf, as salientft's own
        loader does (columns in any order are fine here: each index travels with its column)."""
        for key, t in state_dict.items():
            if not key.startswith(prefix + "giftsw_") or not torch.is_tensor(t):
                continue
            kind = key[len(prefix):].split(".")[0]
            if kind == "giftsw_idx" and torch.unique(t).numel() != t.numel():
                raise ValueError(f"GIFT-SW adapter: {prefix.rstrip('.')} lists a salient column twice; "
                                 "the adapter is corrupt")
            finite = not t.is_floating_point() or bool(torch.isfinite(t).all())
            if kind in ("giftsw_weight", "giftsw_noise_std") and not finite:
                raise ValueError(f"GIFT-SW adapter: {prefix.rstrip('.')}'s {kind} holds NaN or infinite values "
                                 "(a diverged training?); the adapter is refused")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __repr__(self) -> str:
        return "giftsw." + super().__repr__()
