"""Which modules a method targets: by default every linear layer inside the transformer blocks.

Embeddings, norms and ``lm_head`` are never default targets (docs/methods.md#gift-targets). A user list is
matched like PEFT's ``target_modules``: an entry matches a module whose full name equals it or
ends with ``.<entry>``; a single string is a regular expression matched against full names.
"""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from .ops.experts import expert_projections, expert_weight, is_fused_experts

_EXCLUDED_NAMES = ("lm_head", "embed_tokens", "wte", "wpe", "embed_out", "output_layer")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2 family, weight stored transposed)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def block_list_name(model: nn.Module) -> str:
    """Name of the ModuleList that holds the transformer blocks (the longest such list)."""
    best, best_len = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best_len:
            if any(is_linear_like(m) for m in mod.modules()):
                best, best_len = name, len(mod)
    if best is None:
        raise ValueError(
            "could not find the transformer blocks (an nn.ModuleList of layers) in this model; "
            "pass target_modules explicitly"
        )
    return best


def compile_target_regex(pattern: str) -> re.Pattern:
    """``target_modules`` given as a regular expression, compiled; a ValueError naming it otherwise."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"target_modules regex {pattern!r} is not a valid regular expression ({e}); "
                         "fix it, or give module names as 'q_proj,v_proj'") from None


def find_target_modules(
    model: nn.Module, target_modules: str | Iterable[str] | None = None, *, experts: bool = False
) -> dict[str, nn.Module]:
    """Map full module name -> module for every targeted linear layer, in model order.

    Raises ValueError naming the problem when an entry matches nothing or matches a module that
    is not linear. ``experts=True`` (a caller that also handles :func:`find_expert_weights`):
    entries naming fused experts modules or their projections are accepted and left out here.
    """
    named = dict(model.named_modules())
    expert_keys = find_expert_weights(model, target_modules) if experts else {}
    if target_modules is None:
        prefix = block_list_name(model) + "."
        out = {
            n: m for n, m in named.items()
            if n.startswith(prefix) and is_linear_like(m)
            and not any(x in n.split(".") for x in _EXCLUDED_NAMES)
        }
        if not out and not expert_keys:
            raise ValueError("no linear layer found inside the transformer blocks")
        return out
    if isinstance(target_modules, str):
        pattern = compile_target_regex(target_modules)
        matched = {n: m for n, m in named.items() if n and pattern.fullmatch(n)}
        if not matched and not expert_keys:
            raise ValueError(f"target_modules regex {target_modules!r} matches no module name")
        entries = {target_modules: list(matched)}
    else:
        entries, matched = {}, {}
        for t in target_modules:
            hits = [n for n in named if n and (n == t or n.endswith("." + t))]
            if not hits and any(k == t or k.endswith("." + t) for k in expert_keys):
                continue  # a fused expert projection (find_expert_weights)
            if not hits:
                suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in named.items() if is_linear_like(m)})
                raise ValueError(
                    f"target module {t!r} matches no module in the model; "
                    f"linear layer names here: {', '.join(suffixes)}"
                )
            entries[t] = hits
            matched.update({n: named[n] for n in hits})
    if experts:
        matched = {n: m for n, m in matched.items() if not is_fused_experts(m)}
    bad = [n for n, m in matched.items() if not is_linear_like(m)]
    if bad:
        hint = ("; fused MoE experts are trained by GIFT-SW (apply_gift), not by this method"
                if is_fused_experts(matched[bad[0]]) else "")
        raise ValueError(
            f"target {bad[0]!r} is a {type(matched[bad[0]]).__name__}, not a linear layer; "
            f"only nn.Linear (and transformers' Conv1D) can be targeted{hint}"
        )
    return {n: named[n] for n in named if n in matched}


def find_expert_weights(model: nn.Module, target_modules: str | Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Map ``<experts module>.<projection>`` (the fused 3-D parameter's full name) -> its experts
    module, for every targeted fused expert weight (``ops.experts.is_fused_experts``), in model order.

    None: every one inside the transformer blocks. A list entry matches a projection's full name
    or its suffix (``gate_up_proj``, ``experts.down_proj``), or an experts module (both projections);
    a regex string is matched against both. Matching nothing is not an error here (linear targets
    are checked by :func:`find_target_modules`).
    """
    found = {f"{n}.{p}": m for n, m in model.named_modules() if is_fused_experts(m) for p in expert_projections(m)}
    if not found:
        return {}
    if target_modules is None:
        prefix = block_list_name(model) + "."
        return {k: m for k, m in found.items() if k.startswith(prefix)}

    def hit(entry_matches) -> dict[str, nn.Module]:
        return {k: m for k, m in found.items() if entry_matches(k) or entry_matches(k.rsplit(".", 1)[0])}

    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return hit(lambda name: pattern.fullmatch(name) is not None)
    entries = list(target_modules)
    return hit(lambda name: any(name == t or name.endswith("." + t) for t in entries))


def target_weight(model: nn.Module, name: str):
    """The weight of a target by name: (out, in) of a linear layer, [experts, out, in] of a fused
    expert projection (``<experts>.<proj>``); views, no copy."""
    module, _, proj = name.rpartition(".")
    try:
        owner = model.get_submodule(module) if module else model
    except AttributeError:
        owner = None
    if owner is not None and is_fused_experts(owner) and proj in expert_projections(owner):
        return expert_weight(owner, proj)
    return linear_weight(model.get_submodule(name))


def uncovered_weights(model: nn.Module, targets: Iterable[str]) -> dict[str, tuple[str, int]]:
    """Weights inside the transformer blocks that none of ``targets`` holds: parameter name ->
    (its module's type, its number of entries). ``targets`` are module names (everything inside
    them counts as covered) and fused expert projections (the parameter itself). Only parameters with two or
    more dimensions count: norms' scales and biases (any name ending in ``bias``) are not weights
    that compute x W^T; embeddings are never targets."""
    covered = set(targets)
    prefix = block_list_name(model) + "."
    out = {}
    for mod_name, module in model.named_modules():
        if not mod_name.startswith(prefix) or isinstance(module, nn.Embedding):
            continue
        inside = mod_name in covered or any(mod_name.startswith(t + ".") for t in covered)  # a target's own tensors
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}"
            if p.dim() >= 2 and not inside and full not in covered and not p_name.endswith("bias"):
                out[full] = (type(module).__name__, p.numel())
    return out


def resolve_targets(model: nn.Module, target_modules=None, *, experts: bool = False) -> dict[str, nn.Module]:
    """Target layers by name. Exact full module names are taken as they are (they need only an
    input width, :func:`in_features_of`, so layers already replaced by another module type still work);
    anything else goes through :func:`find_target_modules`."""
    if target_modules is not None and not isinstance(target_modules, str):
        names = list(target_modules)
        named = dict(model.named_modules())
        if names and all(n in named for n in names):
            out = {}
            for n in names:
                try:
                    in_features_of(named[n])  # nn.Linear, transformers' Conv1D, or a layer that replaced one
                except ValueError:
                    raise ValueError(f"target {n!r} ({type(named[n]).__name__}) has no integer in_features") from None
                out[n] = named[n]
            return out
        target_modules = names
    return find_target_modules(model, target_modules, experts=experts)


def in_features_of(module: nn.Module) -> int:
    """The input width of a target layer (its ``in_features``, or a Conv1D's weight rows)."""
    n = getattr(module, "in_features", None)
    if isinstance(n, int):
        return n
    if type(module).__name__ == "Conv1D":  # transformers' Conv1D: weight (in, out)
        return int(module.weight.shape[0])
    raise ValueError(f"cannot tell the input width of {type(module).__name__}")


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (a full dotted name) of ``root`` by ``new``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def linear_weight(module: nn.Module):
    """The weight as (out, in), a view: Conv1D stores (in, out)."""
    w = module.weight
    return w if isinstance(module, nn.Linear) else w.t()
