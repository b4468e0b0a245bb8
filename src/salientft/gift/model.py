"""Apply GIFT-SW to a model, count what trains, merge the trained columns back."""
from __future__ import annotations

import logging
import types
from typing import Mapping

import torch
from torch import nn

from ..ops.grid import quantize_rows
from ..saliency import STATLESS_METRICS, select_salient
from ..targets import find_target_modules, linear_weight, set_module
from .config import GiftConfig
from .layer import SalientLinear

log = logging.getLogger(__name__)


def noise_std_for(weight: torch.Tensor, salient_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Delta_i / 2 per row, from the §1.4 quantizer at ``bits`` over the non-salient columns only."""
    keep = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    keep[salient_idx] = False
    if not keep.any():
        return torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    _, delta, _ = quantize_rows(weight[:, keep], bits)
    return (delta / 2).float()


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
    if any(isinstance(m, SalientLinear) for m in model.modules()):
        raise ValueError("this model already has GIFT-SW layers; merge_gift() it or load a fresh base")
    targets = find_target_modules(model, config.target_modules)
    if salient_idx is None and scores is None:
        scores = _compute_scores(model, config, calibration, targets)
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
    model.salientft_gift_config = config
    if hasattr(type(model), "save_pretrained") and "save_pretrained" not in vars(model):
        model.save_pretrained = types.MethodType(_save_pretrained_refused, model)
    counts = trainable_parameters(model)
    log.info(
        "GIFT-SW on %d layers: %s trainable of %s parameters (%.3f%%)",
        len(targets), f"{counts['trainable']:,}", f"{counts['total']:,}", 100 * counts["fraction"],
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


def _compute_scores(model, config, calibration, targets):
    from ..saliency import saliency_scores

    if config.metric in STATLESS_METRICS:
        stats = None
    else:
        if calibration is None:
            raise ValueError(
                f"metric {config.metric!r} needs calibration data: pass calibration=batches, "
                "precomputed scores=..., or use metric='magnitude' or 'random'"
            )
        from ..calibration import collect_activation_stats

        stats = collect_activation_stats(model, calibration, target_modules=list(targets))
    return saliency_scores(model, stats, metric=config.metric, bits=4, seed=config.seed,
                           target_modules=list(targets))


def gift_layers(model: nn.Module) -> dict[str, SalientLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SalientLinear)}


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
        if keep_original:
            saved[name] = {
                "idx": layer.salient_idx.clone(),
                "original": layer.base_weight().index_select(1, layer.salient_idx).clone(),
                "noise_std": layer.noise_std.clone(),
                "noise": layer.noise,
                "fp32": layer.salient_weight.dtype != layer.weight.dtype,
            }
        layer.merged_weight_()
        set_module(model, name, layer.to_base())
    if keep_original:
        model.salientft_unmerge = saved
    elif hasattr(model, "salientft_unmerge"):
        del model.salientft_unmerge
    if hasattr(model, "salientft_gift_config"):
        model.salientft_merged_config = model.salientft_gift_config
        del model.salientft_gift_config
    return model


@torch.no_grad()
def unmerge_gift(model: nn.Module) -> nn.Module:
    """Undo ``merge_gift(..., keep_original=True)``: trainable layers back, base weights restored."""
    saved = getattr(model, "salientft_unmerge", None)
    if not saved:
        raise ValueError("nothing to unmerge: call merge_gift(model, keep_original=True) first")
    for name, s in saved.items():
        base = model.get_submodule(name)
        w = linear_weight(base)
        trained = w.index_select(1, s["idx"]).clone()
        w.index_copy_(1, s["idx"], s["original"].to(w.dtype))
        layer = SalientLinear(base, s["idx"], s["noise_std"], noise=s["noise"], fp32_salient=s["fp32"])
        layer.salient_weight.data.copy_(trained.to(layer.salient_weight.dtype))
        set_module(model, name, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in gift_layers(model).values():
        layer.salient_weight.requires_grad_(True)
    del model.salientft_unmerge
    if hasattr(model, "salientft_merged_config"):
        model.salientft_gift_config = model.salientft_merged_config
    return model
