"""GIFT-SW on fused MoE experts: k salient input columns per expert of every 3-D projection.

transformers 5 stores an MoE layer's experts as one module with 3-D parameters
(``ops.experts``): ``gate_up_proj`` / ``down_proj`` of shape [experts, out, in] (or
[experts, in, out]). Each expert e computes ``x W_e^T`` on its own routed tokens, so GIFT-SW
treats every expert's (out, in) matrix as one layer: its own k salient columns (chosen from its
own routed tokens' statistics, or from its weights for the data-free metrics), its own noise
scale Delta_i / 2 over its non-salient columns, and the same salient matmul as ``SalientLinear``
(``gift.layer.salient_linear``: only the (out, k) gradient, noise drawn in row blocks from a seed).

:class:`SalientExperts` replaces the experts module. It registers the original module's own
Parameters, buffers and submodules under their own names (shared, frozen: the state dict keeps
the base's names) and one :class:`ExpertColumns` per projection under ``salient.<proj>``
(``salient_idx`` [experts, k], ``salient_weight`` [experts, out, k], ``noise_std`` [experts, out]).
Its forward is transformers' eager per-expert loop (``ops.experts.routed_experts_forward``) with
the salient matmul per expert, whatever ``experts_implementation`` the model was loaded with:
grouped or batched matmul kernels cannot take the salient columns. Outside this module a target is
named by the 3-D parameter's full name (``model.layers.0.mlp.experts.gate_up_proj``), as PEFT's
``target_parameters`` does; scores for it are [experts, in].
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config_base import NOISE_MODES
from ..ops.experts import expert_bias, expert_projections, expert_weight, routed_experts_forward, routing_args
from ..ops.noise import SEED_MIX
from ..ops.salient import SalientLayer, noise_scale, salient_indices
from .layer import output_noise, salient_linear

log = logging.getLogger(__name__)


class ExpertColumns(SalientLayer):
    """The trainable salient columns of one fused projection, k per expert.

    ``salient_idx`` [experts, k] (each row sorted), ``salient_weight`` [experts, out, k],
    ``noise_std`` [experts, out]. The frozen 3-D weight stays a Parameter of the experts module;
    this module only reads it (``base_weight``).
    """

    def __init__(self, experts: nn.Module, proj: str, salient_idx, noise_std=None, noise: str = "weight",
                 fp32_salient: bool = False, keep_noise: bool = False):
        super().__init__()
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        object.__setattr__(self, "_experts", experts)  # not a submodule: its Parameters are registered once
        self.proj = proj
        w = self.base_weight()
        self.num_experts, self.out_features, self.in_features = w.shape
        idx = torch.as_tensor(salient_idx, dtype=torch.long, device=w.device)
        if idx.dim() != 2 or idx.shape[0] != self.num_experts:
            raise ValueError(f"salient_idx of {proj} must be [experts={self.num_experts}, k], got {tuple(idx.shape)}")
        idx = torch.stack([salient_indices(row, self.in_features, device=w.device) for row in idx])
        self.register_buffer("salient_idx", idx)
        std = torch.zeros(self.num_experts, self.out_features) if noise_std is None else torch.as_tensor(noise_std)
        if std.dim() != 2 or std.shape[0] != self.num_experts:
            raise ValueError(f"noise_std of {proj} must be [experts={self.num_experts}, out], got {tuple(std.shape)}")
        std = torch.stack([noise_scale(s, self.out_features, w.device) for s in std])
        self.register_buffer("noise_std", std)
        self.noise = noise
        self.keep_noise = bool(keep_noise)
        p_dtype = torch.float32 if fp32_salient and w.dtype in (torch.bfloat16, torch.float16) else w.dtype
        with torch.no_grad():
            init = gather_columns(w, idx).to(p_dtype).clone()
        self.salient_weight = nn.Parameter(init)

    @property
    def k(self) -> int:
        return self.salient_idx.shape[1]

    @property
    def bias(self):
        return expert_bias(self._experts, self.proj)

    def _repr_extra(self) -> dict:
        return {"experts": self.num_experts}

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as an [experts, out, in] view."""
        return expert_weight(self._experts, self.proj)

    def project(self, e: int, x: torch.Tensor, seed: int | None, salient_weight: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Expert ``e``'s output for its tokens ``x``: GIFT-SW's salient matmul on its (out, in) matrix.
        ``salient_weight``: expert e's (out, k) columns, e.g. from one ``unbind`` per forward (its backward
        stacks the experts' gradients once, where indexing would add a zero-filled [experts, out, k] per expert)."""
        sw = self.salient_weight[e] if salient_weight is None else salient_weight
        return expert_matmul(x, e, self.base_weight(), sw, self.bias, self.salient_idx, self.noise_std, seed,
                             self.keep_noise, self.training and self.noise == "output")

    @torch.no_grad()
    def merged_weight_(self) -> None:
        """Write the trained columns into the shared 3-D base weight (in place)."""
        scatter_columns_(self.base_weight(), self.salient_idx, self.salient_weight)


def expert_matmul(x: torch.Tensor, e: int, weight: torch.Tensor, salient_weight: torch.Tensor, bias, salient_idx,
                  noise_std, seed: int | None, keep_noise: bool = False, add_output_noise: bool = False
                  ) -> torch.Tensor:
    """Expert ``e``'s GIFT-SW matmul on its routed tokens ``x``: ``gift.layer.salient_linear`` on its (out, in)
    matrix of ``weight`` [experts, out, in], with its (out, k) ``salient_weight``, its row of ``bias``
    [experts, out] (or None), ``salient_idx`` [experts, k] and ``noise_std`` [experts, out]. ``seed``: the
    projection's weight-noise seed of this forward (None: no weight noise); each expert draws its own noise
    from it. ``add_output_noise``: add the output-noise mode's noise (training only). Shared by
    :class:`ExpertColumns` and the PEFT route's experts layer."""
    s = None if seed is None else (seed + (e + 1) * SEED_MIX) % (1 << 62)  # one noise draw per expert
    idx, std = salient_idx[e], noise_std[e]
    y = salient_linear(x, weight[e], salient_weight, None if bias is None else bias[e], idx, std, s, keep_noise)
    if add_output_noise:
        y = y + output_noise(x, y, idx, std)
    return y


class SalientExperts(nn.Module):
    """A fused experts module whose every expert trains k salient input columns per projection.

    Holds the original module's Parameters/buffers/submodules under their own names and the
    :class:`ExpertColumns` of each targeted projection in ``salient``; a projection that is not
    targeted runs frozen. ``to_base()`` gives back the original module (sharing the weights).
    """

    def __init__(self, base: nn.Module, columns: dict[str, ExpertColumns]):
        super().__init__()
        object.__setattr__(self, "_base", base)
        for name, p in base.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in base.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in base._non_persistent_buffers_set)
        for name, child in base.named_children():
            self.add_module(name, child)
        # the weights are read from here (if a conversion replaced a Parameter, this module has the new one)
        self.is_transposed, self.has_bias = base.is_transposed, base.has_bias
        for col in columns.values():
            object.__setattr__(col, "_experts", self)
        self.salient = nn.ModuleDict(columns)
        self.train(base.training)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        hidden_states, top_k_index, top_k_weights = routing_args(args, kwargs)
        seeds = {p: c.weight_noise_seed() for p, c in self.salient.items()}
        columns = {p: c.salient_weight.unbind(0) for p, c in self.salient.items()}
        base = self._base

        def project(proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
            if proj in self.salient:
                return self.salient[proj].project(e, x, seeds[proj], columns[proj][e])
            b = expert_bias(self, proj)
            return torch.nn.functional.linear(x, expert_weight(self, proj)[e], None if b is None else b[e])

        return routed_experts_forward(base, hidden_states, top_k_index, top_k_weights, project)

    def extra_repr(self) -> str:
        return f"base={type(self._base).__name__}"

    def to_base(self) -> nn.Module:
        """The original experts module (its weights are this module's, merged or not)."""
        base = self._base
        for name, p in self._parameters.items():
            base._parameters[name] = p
        for col in self.salient.values():
            object.__setattr__(col, "_experts", base)
        base.train(self.training)
        return base


def expert_layers(model: nn.Module) -> dict[str, ExpertColumns]:
    """Every :class:`ExpertColumns` of ``model`` by target name (``<experts>.<proj>``)."""
    return {f"{n}.{p}": c for n, m in model.named_modules() if isinstance(m, SalientExperts)
            for p, c in m.salient.items()}


def expert_scores(model: nn.Module | None, names, metric: str, stats=None, *, bits: int = 4, seed: int = 0,
                  weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """[experts, in] salience of every fused expert projection in ``names`` (``<experts>.<proj>``).

    Each expert is scored as its own layer by ``saliency.layer_scores`` from its own routed
    tokens' statistics (``stats["<experts>.<proj>.<e>"]``, see ``calibration``); the data-free
    metrics read only the weights. An expert that no calibration token reached has all-zero
    statistics: its columns are scored by weight magnitude instead (logged). ``weights``: the
    [experts, out, in] weight of each name, for a caller whose model no longer holds the experts
    module under that name (then ``model`` may be None).
    """
    from ..saliency import STATLESS_METRICS, layer_scores, resolve_metric

    spec = resolve_metric(metric) if isinstance(metric, str) else metric
    out, unrouted = {}, []
    for name in names:
        module, _, proj = name.rpartition(".")
        w = weights[name] if weights is not None else expert_weight(model.get_submodule(module), proj)
        rows = []
        for e in range(w.shape[0]):
            st = None if spec["name"] in STATLESS_METRICS else stats.get(f"{name}.{e}")
            if spec["name"] not in STATLESS_METRICS and st is None:
                raise ValueError(f"no activation statistics for expert {e} of {name!r}; recollect them")
            if st is not None and st.count == 0:
                unrouted.append(f"{name}.{e}")
                rows.append(layer_scores(f"{name}.{e}", w[e], "magnitude"))
            else:
                rows.append(layer_scores(f"{name}.{e}", w[e], spec, st, bits=bits, seed=seed))
        out[name] = torch.stack(rows)
    if unrouted:
        log.warning("%d experts received no calibration token; their salient columns are chosen by weight "
                    "magnitude: %s", len(unrouted), ", ".join(unrouted[:8]) + (" ..." if len(unrouted) > 8 else ""))
    return out


def select_expert_columns(score: torch.Tensor, k: int) -> torch.Tensor:
    """[experts, k] top-k columns of each expert's scores (``saliency.select_salient`` per row)."""
    from ..saliency import select_salient

    return torch.stack([select_salient(row, k) for row in score])


def wrap_experts(model: nn.Module, columns: dict[str, ExpertColumns]) -> None:
    """Replace each experts module that ``columns`` (target name -> ExpertColumns) covers by a
    :class:`SalientExperts` holding them, in place."""
    from ..targets import set_module

    by_module: dict[str, dict[str, ExpertColumns]] = {}
    for name, col in columns.items():
        module, _, proj = name.rpartition(".")
        by_module.setdefault(module, {})[proj] = col
    for module, cols in by_module.items():
        base = model.get_submodule(module)
        order = [p for p in expert_projections(base) if p in cols]
        set_module(model, module, SalientExperts(base, {p: cols[p] for p in order}))


def gather_columns(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[experts, out, k]: the columns ``idx`` [experts, k] of each expert of ``weight`` [experts, out, in]."""
    return torch.gather(weight, 2, idx[:, None, :].expand(-1, weight.shape[1], -1))


def scatter_columns_(weight: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` [experts, out, k] into the columns ``idx`` of ``weight`` (in place)."""
    weight.scatter_(2, idx[:, None, :].expand(-1, weight.shape[1], -1), values.to(weight.dtype))
