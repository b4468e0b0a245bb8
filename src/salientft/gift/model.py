"""Apply GIFT-SW to a model, count what trains, merge the trained columns back."""
from __future__ import annotations

import logging
import re
import types
from typing import Mapping

import torch
from torch import nn

from ..ops.grid import quantize_rows
from ..saliency import STATLESS_METRICS, select_salient
from ..targets import (find_expert_weights, find_target_modules, linear_weight, set_module, target_weight,
                       uncovered_weights)
from .config import GiftConfig
from .experts import (ExpertColumns, SalientExperts, expert_scores, gather_columns, scatter_columns_,
                      select_expert_columns, wrap_experts)
from .layer import SalientLinear

log = logging.getLogger(__name__)


def noise_std_for(weight: torch.Tensor, salient_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Delta_i / 2 per row, from the quantizer of docs/methods.md#row-quantizer at ``bits`` over the
    non-salient columns only."""
    keep = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    keep[salient_idx] = False
    if not keep.any():
        return torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    _, delta, _ = quantize_rows(weight[:, keep], bits)
    return (delta / 2).float()


def expert_noise_std(weight: torch.Tensor, salient_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """[experts, out]: :func:`noise_std_for` of each expert of ``weight`` [experts, out, in] with its own
    columns ``salient_idx`` [experts, k]."""
    return torch.stack([noise_std_for(weight[e].detach(), salient_idx[e], bits) for e in range(weight.shape[0])])


def expert_score_matrix(name: str, scores: Mapping[str, torch.Tensor], n_experts: int, in_features: int
                        ) -> torch.Tensor:
    """The [experts, in] scores of the fused projection ``name``: ``scores[name]`` itself, or the
    per-expert rows ``scores["<name>.<e>"]`` of a scores file stacked; shape and finiteness checked."""
    if name not in scores and f"{name}.0" in scores:  # a scores file: one (in,) row per expert
        rows = [scores.get(f"{name}.{e}") for e in range(n_experts)]
        if any(r is None for r in rows):
            raise ValueError(f"the scores lack some experts of {name!r}; recompute them for this model")
        score = torch.stack([torch.as_tensor(r).detach().float().flatten() for r in rows])
    elif name not in scores:
        raise ValueError(f"no scores for target {name!r}; scores cover {len(scores)} modules")
    else:
        score = torch.as_tensor(scores[name]).detach().float()
    if tuple(score.shape) != (n_experts, in_features):
        raise ValueError(f"scores for {name!r} have shape {tuple(score.shape)}, the fused experts need "
                         f"[experts={n_experts}, in={in_features}]; recompute the scores for this model")
    if not torch.isfinite(score).all():
        raise ValueError(f"scores for {name!r} contain NaN or infinite values")
    return score


def _check_scores(name: str, score: torch.Tensor, in_features: int) -> torch.Tensor:
    score = torch.as_tensor(score).detach().flatten().float()
    if score.numel() != in_features:
        raise ValueError(
            f"scores for {name!r} have {score.numel()} entries but the layer has {in_features} "
            "input features; recompute the scores for this model"
        )
    if not torch.isfinite(score).all():
        raise ValueError(f"scores for {name!r} contain NaN or infinite values")
    return score


def apply_gift(
    model: nn.Module,
    config: GiftConfig | None = None,
    scores: Mapping[str, torch.Tensor] | None = None,
    *,
    calibration=None,
    salient_idx: Mapping[str, torch.Tensor] | None = None,
    noise_std: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Replace every target linear layer by a SalientLinear in place and freeze the rest.

    Columns come from ``salient_idx`` (explicit indices, e.g. from an adapter), else from the
    top-k of ``scores`` (module name -> (in,) tensor), else from ``config.metric`` computed on
    ``calibration`` batches (data-free metrics "random" and "magnitude" need none).
    ``noise_std`` (module name -> (out,)) skips recomputing the noise scale, e.g. from an adapter.
    Returns the model.
    """
    config = config or GiftConfig()
    if any(isinstance(m, (SalientLinear, SalientExperts)) for m in model.modules()):
        raise ValueError("this model already has GIFT-SW layers; merge_gift() it or load a fresh base")
    targets = find_target_modules(model, config.target_modules, experts=True)
    expert_targets = find_expert_weights(model, config.target_modules)
    if config.target_modules is None:
        warn_uncovered(model, [*targets, *expert_targets])
    if salient_idx is None and scores is None:
        scores = compute_scores(model, config, calibration, targets, expert_targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets.items():
        w = linear_weight(module)
        out_f, in_f = w.shape
        if salient_idx is not None:
            if name not in salient_idx:
                raise ValueError(f"no salient indices given for target {name!r}")
            idx = torch.as_tensor(salient_idx[name], dtype=torch.long)
        else:
            if name not in scores:
                raise ValueError(f"no scores for target {name!r}; scores cover {len(scores)} modules")
            score = _check_scores(name, scores[name], in_f)
            idx = select_salient(score, config.k_for(in_f, name))
        idx = idx.to(w.device)
        if noise_std is not None and name in noise_std:
            std = torch.as_tensor(noise_std[name], dtype=torch.float32, device=w.device)
        else:
            std = noise_std_for(w.detach(), idx, config.noise_bits)
        layer = SalientLinear(module, idx, std, noise=config.noise, fp32_salient=config.fp32_salient,
                              keep_noise=config.keep_noise)
        set_module(model, name, layer)
    wrap_experts(model, {name: _expert_columns(model, name, config, scores, salient_idx, noise_std)
                         for name in expert_targets})
    model.salientft_gift_config = config
    if hasattr(type(model), "save_pretrained") and "save_pretrained" not in vars(model):
        model.save_pretrained = types.MethodType(_save_pretrained_refused, model)
    counts = trainable_parameters(model)
    log.info(
        "GIFT-SW on %d layers%s: %s trainable of %s parameters (%.3f%%)",
        len(targets), f" and {len(expert_targets)} fused expert projections" if expert_targets else "",
        f"{counts['trainable']:,}", f"{counts['total']:,}", 100 * counts["fraction"],
    )
    return model


SAVE_REFUSED = (
    "this model has GIFT-SW layers: save_pretrained (and a Trainer's save_model) would write the frozen base, "
    "since transformers' from_pretrained ignores the trained salient_weight columns. Save the adapter with "
    "salientft.save_adapter(model, folder) (reload: salientft.load_adapter, or peft.PeftModel.from_pretrained "
    "after `import salientft`), or salientft.merge_gift(model) first to save a plain trained model; to train "
    "with the HF Trainer and its checkpoints, use the PEFT route (get_peft_model with salientft.peft.GiftSWConfig)"
)


def _save_pretrained_refused(model, *args, **kwargs):
    """A GIFT-SW model's ``save_pretrained``: refused while GIFT-SW layers are in (never the base in
    silence); transformers' own once ``merge_gift`` made the model plain again."""
    if gift_layers(model):
        raise ValueError(SAVE_REFUSED)
    return type(model).save_pretrained(model, *args, **kwargs)


def _expert_columns(model, name, config, scores, salient_idx, noise_std) -> ExpertColumns:
    """The ExpertColumns of the fused projection ``name``: [experts, k] columns from ``salient_idx``
    or the per-expert top-k of ``scores`` ([experts, in]), the noise scale per expert."""
    module_name, _, proj = name.rpartition(".")
    module = model.get_submodule(module_name)
    w = target_weight(model, name)
    n_exp, _, in_f = w.shape
    if salient_idx is not None:
        if name not in salient_idx:
            raise ValueError(f"no salient indices given for target {name!r}")
        idx = torch.as_tensor(salient_idx[name], dtype=torch.long)
    else:
        idx = select_expert_columns(expert_score_matrix(name, scores, n_exp, in_f), config.k_for(in_f, name))
    idx = idx.to(w.device)
    if noise_std is not None and name in noise_std:
        std = torch.as_tensor(noise_std[name], dtype=torch.float32, device=w.device)
    else:
        std = expert_noise_std(w, idx, config.noise_bits)
    return ExpertColumns(module, proj, idx, std, noise=config.noise, fp32_salient=config.fp32_salient,
                         keep_noise=config.keep_noise)


def warn_uncovered(model: nn.Module, targets, hint: str = "", who: str = "GIFT-SW", fate: str = "they stay frozen"
                   ) -> None:
    """Log, never skip silently, the weights inside the blocks that no GIFT-SW layer covers (module
    types salientft cannot wrap: a custom router, a convolution, ...), grouped by name pattern."""
    try:
        left = uncovered_weights(model, targets)
    except ValueError:  # no transformer blocks found: nothing to compare against
        return
    if not left:
        return
    groups: dict[tuple[str, str], list[int]] = {}
    for name, (kind, numel) in left.items():
        groups.setdefault((re.sub(r"\.\d+\.", ".*.", name), kind), []).append(numel)
    total = sum(p.numel() for p in model.parameters())
    lines = [f"{pattern} ({kind}): {len(sizes)} x {sizes[0]:,} parameters" for (pattern, kind), sizes in groups.items()]
    log.warning(
        "%s cannot wrap %d weight tensors inside the transformer blocks (%s parameters, %.2f%% of the model); "
        "%s%s: %s", who, len(left), f"{sum(n for _, n in left.values()):,}",
        100 * sum(n for _, n in left.values()) / max(total, 1), fate, f" ({hint})" if hint else "", "; ".join(lines),
    )


def compute_scores(model, config, calibration, targets, expert_targets=(), blocks=None):
    """Scores of ``config.metric`` (any config with ``metric`` and ``seed``) for the linear layers
    ``targets`` ((in,) each) and the fused expert projections ``expert_targets`` ([experts, in]
    each), collecting the statistics from ``calibration`` when the metric needs them; with
    ``blocks`` (a block source of ``salientft.calibration``), one decoder block at a time."""
    from ..saliency import saliency_scores

    if config.metric in STATLESS_METRICS:
        stats = None
    else:
        if calibration is None:
            raise ValueError(
                f"metric {config.metric!r} needs calibration data: pass calibration=batches, "
                "precomputed scores=..., or use metric='magnitude' or 'random'"
            )
        if blocks is not None:
            return _sequential_scores(model, config, calibration, targets, expert_targets, blocks)
        from ..calibration import collect_activation_stats

        stats = collect_activation_stats(model, calibration, target_modules=list(targets),
                                         experts=list(expert_targets))
    scores = saliency_scores(model, stats, metric=config.metric, bits=4, seed=config.seed,
                             target_modules=list(targets)) if targets else {}
    if expert_targets:
        scores.update(expert_scores(model, list(expert_targets), config.metric, stats, bits=4, seed=config.seed))
    return scores


def _sequential_scores(model, config, calibration, targets, expert_targets, blocks) -> dict[str, torch.Tensor]:
    """:func:`compute_scores` block by block (``calibration.sequential_activation_stats``): each
    block's layers are scored while the block is loaded (the metric reads its weights); the same
    scores bit for bit."""
    from ..calibration import sequential_activation_stats
    from ..saliency import saliency_scores

    scores: dict[str, torch.Tensor] = {}

    def visit(i, block, stats):
        names = [n for n in targets if n in stats]
        if names:
            scores.update(saliency_scores(model, stats, metric=config.metric, bits=4, seed=config.seed,
                                          target_modules=names, progress=False))
        mine = [e for e in expert_targets if f"{e}.0" in stats]
        if mine:
            scores.update(expert_scores(model, mine, config.metric, stats, bits=4, seed=config.seed))

    sequential_activation_stats(model, calibration, list(targets), blocks=blocks, visit=visit,
                                experts=list(expert_targets))
    return scores


def gift_scores(model: nn.Module, config: GiftConfig, calibration=None, blocks=None) -> dict[str, torch.Tensor]:
    """The salience scores ``apply_gift`` would compute for ``model`` (its targets under ``config``,
    fused expert projections included), e.g. to compute them once and hand them to other processes.
    ``blocks``: a block source (``salientft.calibration.HostBlocks``, ``models.blocks_on_host``,
    ``models.DiskBlocks``): calibrated one decoder block at a time, the same scores bit for bit
    (docs/quantization.md#block-by-block)."""
    return compute_scores(model, config, calibration, find_target_modules(model, config.target_modules, experts=True),
                          find_expert_weights(model, config.target_modules), blocks=blocks)


def gift_layers(model: nn.Module) -> dict[str, SalientLinear | ExpertColumns]:
    """Every GIFT-SW layer by target name, in model order: SalientLinear by module name, fused
    expert projections (ExpertColumns) by ``<experts module>.<proj>``."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, SalientLinear):
            out[n] = m
        elif isinstance(m, SalientExperts):
            out.update({f"{n}.{p}": c for p, c in m.salient.items()})
    return out


def trainable_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts (shared tensors counted once)."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    # The salient columns duplicate entries of the frozen weights: do not count them twice.
    total -= sum(m.salient_weight.numel() for m in gift_layers(model).values())
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


@torch.no_grad()
def merge_gift(model: nn.Module, keep_original: bool = False) -> nn.Module:
    """Write every trained W[:, S] into its base weight and restore plain linear layers.

    The result is an ordinary transformers model (``save_pretrained`` works). With
    ``keep_original=True`` the original columns are kept (k per layer) so ``unmerge_gift`` can
    restore the trainable model.
    """
    layers = gift_layers(model)
    if not layers:
        raise ValueError("model has no GIFT-SW layers to merge")
    saved = {}
    for name, layer in layers.items():
        expert = isinstance(layer, ExpertColumns)
        if keep_original:
            saved[name] = {
                "idx": layer.salient_idx.clone(),
                "original": (gather_columns(layer.base_weight(), layer.salient_idx) if expert
                             else layer.base_weight().index_select(1, layer.salient_idx)).clone(),
                "noise_std": layer.noise_std.clone(),
                "noise": layer.noise,
                "fp32": layer.salient_weight.dtype != layer.base_weight().dtype,
                "experts": expert,
            }
        layer.merged_weight_()
        if not expert:
            set_module(model, name, layer.to_base())
    for name, m in list(model.named_modules()):
        if isinstance(m, SalientExperts):
            set_module(model, name, m.to_base())
    if keep_original:
        model.salientft_unmerge = saved
    elif hasattr(model, "salientft_unmerge"):
        del model.salientft_unmerge
    if hasattr(model, "salientft_gift_config"):
        model.salientft_merged_config = model.salientft_gift_config
        del model.salientft_gift_config
    if hasattr(model, "salientft_base_fingerprint"):  # the base weights now hold the trained columns
        del model.salientft_base_fingerprint
    return model


@torch.no_grad()
def unmerge_gift(model: nn.Module) -> nn.Module:
    """Undo ``merge_gift(..., keep_original=True)``: trainable layers back, base weights restored."""
    saved = getattr(model, "salientft_unmerge", None)
    if not saved:
        raise ValueError("nothing to unmerge: call merge_gift(model, keep_original=True) first")
    columns = {}
    for name, s in saved.items():
        if s.get("experts"):
            w = target_weight(model, name)
            trained = gather_columns(w, s["idx"]).clone()
            scatter_columns_(w, s["idx"], s["original"])
            module_name, _, proj = name.rpartition(".")
            col = ExpertColumns(model.get_submodule(module_name), proj, s["idx"], s["noise_std"], noise=s["noise"],
                                fp32_salient=s["fp32"])
            col.salient_weight.data.copy_(trained.to(col.salient_weight.dtype))
            columns[name] = col
            continue
        base = model.get_submodule(name)
        w = linear_weight(base)
        trained = w.index_select(1, s["idx"]).clone()
        w.index_copy_(1, s["idx"], s["original"].to(w.dtype))
        layer = SalientLinear(base, s["idx"], s["noise_std"], noise=s["noise"], fp32_salient=s["fp32"])
        layer.salient_weight.data.copy_(trained.to(layer.salient_weight.dtype))
        set_module(model, name, layer)
    wrap_experts(model, columns)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in gift_layers(model).values():
        layer.salient_weight.requires_grad_(True)
    del model.salientft_unmerge
    if hasattr(model, "salientft_merged_config"):
        model.salientft_gift_config = model.salientft_merged_config
    return model
