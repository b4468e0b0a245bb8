"""Fused MoE experts as transformers 5 stores them: one 3-D parameter per projection.

Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, gpt-oss and most other MoE families hold
their experts in one module decorated with transformers' ``@use_experts_implementation``:
``gate_up_proj`` (or ``up_proj`` when ``has_gate`` is False) and ``down_proj``, each
``[experts, out, in]``, or ``[experts, in, out]`` when ``is_transposed`` (gpt-oss), optional
biases ``<proj>_bias`` ``[experts, out]`` (``has_bias``), an ``_apply_gate`` (or ``act_fn``) between
the two, and an optional ``post_expert_norm``. The decorator records these as attributes, which is
what :func:`is_fused_experts` recognises: every such module computes ``x W_e^T (+ b_e)`` per
expert and can be run by :func:`routed_experts_forward` with any per-expert projection (the frozen
weight for calibration, GIFT-SW's salient matmul for training).

Experts modules without the decorator (a family's own forward) are not recognised: their weights
are reported as unsupported (``targets.uncovered_weights``), never silently handled wrong.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The attributes transformers' @use_experts_implementation sets on an experts module.
_DECORATOR_ATTRS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")


def expert_projections(module: nn.Module) -> tuple[str, ...]:
    """The names of the fused projections of an experts module, in compute order (up, then down)."""
    up = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    return up, "down_proj"


def is_fused_experts(module: nn.Module) -> bool:
    """An experts module of transformers' ``@use_experts_implementation`` kind, with 3-D projections."""
    if not all(hasattr(module, a) for a in _DECORATOR_ATTRS) or getattr(module, "_is_expert_parallel", False):
        return False
    params = dict(module.named_parameters(recurse=False))
    return all(isinstance(params.get(p), torch.Tensor) and params[p].dim() == 3 for p in expert_projections(module))


def expert_weight(module: nn.Module, proj: str) -> torch.Tensor:
    """The projection's weight as an [experts, out, in] view (a transposed view for ``is_transposed``)."""
    w = getattr(module, proj)
    return w.transpose(1, 2) if module.is_transposed else w


def expert_bias(module: nn.Module, proj: str) -> torch.Tensor | None:
    """The projection's [experts, out] bias, or None."""
    return getattr(module, f"{proj}_bias", None) if module.has_bias else None


def routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states, top_k_index, top_k_weights) of an experts module's call, however it was called."""
    names = (("hidden_states",), ("top_k_index", "router_indices", "topk_indices", "selected_experts"),
             ("top_k_weights", "routing_weights", "topk_weights", "router_scores"))
    args = list(args)
    out = []
    for aliases in names:
        if args:
            out.append(args.pop(0))
            continue
        hit = next((kwargs[a] for a in aliases if a in kwargs), None)
        if hit is None:
            raise TypeError(f"experts module called without {aliases[0]}")
        out.append(hit)
    return tuple(out)


def frozen_projection(module: nn.Module) -> Callable[[str, int, torch.Tensor], torch.Tensor]:
    """``project(proj, e, x)`` = x W_e^T + b_e with the module's own weights (no copy)."""
    def project(proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        b = expert_bias(module, proj)
        return F.linear(x, expert_weight(module, proj)[e], None if b is None else b[e])
    return project


def routed_experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor,
                           project: Callable[[str, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """transformers' eager experts loop with ``project(proj, e, x)`` doing each projection.

    For every expert e that receives tokens: x_e = its routed tokens, up = project(up, e, x_e),
    h = ``_apply_gate(up)`` (or ``act_fn(up)`` without a gate), out = project("down_proj", e, h)
    (then ``post_expert_norm``), weighted by the routing weights and added to the tokens' outputs.
    Index values >= the number of experts (expert-parallel sentinels) are skipped.
    """
    up_name, down_name = expert_projections(module)
    n_experts = getattr(module, up_name).shape[0]
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        hit = torch.unique(top_k_index[top_k_index < n_experts]).tolist()
    for e in hit:
        top_k_pos, token_idx = torch.where(top_k_index.t() == e)  # transformers' order: by slot, then token
        x = hidden_states[token_idx]
        h = project(up_name, e, x)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        out = project(down_name, e, h)
        if module.has_post_expert_norm:
            out = module.post_expert_norm(out)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final
