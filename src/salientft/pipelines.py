"""The end-to-end steps behind ``salientft calibrate`` and ``salientft quantize``.

Each pipeline chains public functions of the lower layers (load a model, calibration batches,
statistics, scores, quantization, files) and is what the command line calls; the steps
themselves live in ``calibration``, ``saliency``, ``quant`` and ``models``.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .calibration import (
    calibration_batches,
    collect_activation_stats,
    describe_source,
    save_stats,
)
from . import deps
from .devices import resolve_device
from .models import FIT_MARGIN, free_memory, needs_blockwise  # noqa: F401 (the fit rule lives in models)
from .outputs import claim_dir, claim_file, prepare_file
from .config_base import renamed_arguments, salient_count
from .saliency import STATLESS_METRICS, load_scores, plot_scores, resolve_metric, save_scores, saliency_scores
from .targets import find_expert_weights, in_features_of, resolve_targets

log = logging.getLogger(__name__)
# --------------------------------------------------------------------------------------------
# Opening a model whole or block by block
# --------------------------------------------------------------------------------------------
def open_model(model_name: str, dtype="bf16", device="auto", *, sequential: bool = False):
    """``(model, tokenizer, blocks)``: the whole model on ``device`` (``blocks`` None), or, when
    asked (``sequential``) or when it does not fit (:func:`needs_blockwise`), the model opened by
    ``models.open_blockwise`` with its decoder blocks left on disk (``blocks``: their source)."""
    from .models import load_model, open_blockwise

    device = resolve_device(device)
    if sequential or needs_blockwise(model_name, dtype, device):
        return open_blockwise(model_name, dtype=dtype, device=device)
    model, tok = load_model(model_name, dtype=dtype, device=device)
    return model, tok, None


# --------------------------------------------------------------------------------------------
# calibrate: model + data -> scores file (+ plot)
# --------------------------------------------------------------------------------------------
@renamed_arguments(n_samples="calib_samples")
def calibrate(
    model: nn.Module,
    tokenizer,
    data="embedded",
    *,
    metric: str = "gift",
    bits: int = 4,
    tau=None,
    rho=None,
    gamma=None,
    calib_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    target_modules=None,
    n_salient: int | None = None,
    salient_fraction: float | None = None,
    output=None,
    plot=None,
    stats_output=None,
    progress: bool = True,
    metadata: dict | None = None,
    blocks=None,
) -> dict[str, torch.Tensor]:
    """Calibrate ``model`` on ``data`` and score every target layer's columns.

    Writes the scores to ``output`` (safetensors, see :func:`salientft.saliency.save_scores`),
    optionally the statistics to ``stats_output`` and a PNG to ``plot`` (top-k with k from
    ``n_salient`` / ``salient_fraction``, default the paper's 128/4096 ratio). Metrics that need
    no activations ("magnitude", "random") skip the forward pass. Returns the scores.

    ``blocks``: a block source (``open_model(..., sequential=True)``): statistics and scores are
    computed one decoder block at a time, each block loaded for its turn; the same scores and
    statistics bit for bit (docs/quantization.md#block-by-block).
    """
    if plot is not None:
        deps.require("calibrate", plot=plot)  # an asked-for plot needs matplotlib: refuse before any work
    spec = resolve_metric(metric, tau=tau, rho=rho, gamma=gamma)  # fail before any work
    for flag, path in (("--output", output), ("--plot", plot), ("--stats-output", stats_output)):
        if path is not None:
            claim_file(path, flag=flag)  # writable, and not a file salientft did not write
    targets = resolve_targets(model, target_modules, experts=True)
    experts = find_expert_weights(model, target_modules)
    ks = {n: salient_count(in_features_of(m), n_salient, salient_fraction, name=n) for n, m in targets.items()}
    stats, n_tokens = None, 0
    batches = None if spec["name"] in STATLESS_METRICS else calibration_batches(
        tokenizer, data, calib_samples, seq_len, batch_size, seed)
    score = dict(metric=metric, bits=bits, tau=tau, rho=rho, gamma=gamma, seed=seed)
    if blocks is not None:
        stats, scores = _blockwise_scores(model, blocks, batches, targets, experts, spec, score, progress)
    else:
        if batches is not None:
            stats = collect_activation_stats(model, batches, list(targets), progress=progress, experts=list(experts))
        scores = saliency_scores(model, stats, target_modules=list(targets), progress=progress,
                                 **score) if targets else {}
        scores.update(_expert_rows(model, experts, spec, stats, bits, seed))
    if stats is not None:
        n_tokens = max(s.count for n, s in stats.items() if n in targets) if targets else 0
        if stats_output is not None:
            save_stats(stats, prepare_file(stats_output))
    for name, row in scores.items():
        if name not in ks:  # an expert's row, "<experts>.<proj>.<e>": apply_gift stacks them
            ks[name] = salient_count(row.numel(), n_salient, salient_fraction, name=name.rpartition(".")[0])
    meta = {
        "metric": spec["name"], "tau": spec["tau"], "rho": spec["rho"], "gamma": spec["gamma"], "bits": bits,
        "data": describe_source(data) if not isinstance(data, str) else data, "calib_samples": calib_samples,
        "seq_len": seq_len, "tokens": n_tokens, "seed": seed,
        "n_salient": n_salient, "salient_fraction": salient_fraction,
    }
    meta.update(metadata or {})
    if output is not None:
        save_scores(scores, prepare_file(output), meta)
    if plot is not None:
        plot_scores(scores, ks, prepare_file(plot), title=f"{spec['name']} salience ({n_tokens} tokens)")
    return scores


def _expert_rows(model, experts, spec, stats, bits, seed) -> dict[str, torch.Tensor]:
    """One (in,) row per expert of each fused projection, "<experts>.<proj>.<e>"."""
    if not experts:
        return {}
    from .gift.experts import expert_scores

    rows = expert_scores(model, list(experts), spec, stats, bits=bits, seed=seed)
    return {f"{name}.{e}": row for name, per in rows.items() for e, row in enumerate(per)}


def _blockwise_scores(model, blocks, batches, targets, experts, spec, score, progress):
    """Statistics and scores one block at a time: each block's layers are scored while it is loaded."""
    from .calibration import sequential_activation_stats

    scores: dict[str, torch.Tensor] = {}

    def visit(i, block, stats):
        names = [n for n in stats if n in targets]
        if names:
            scores.update(saliency_scores(model, stats if batches is not None else None, target_modules=names,
                                          **score))
        mine = [e for e in experts if e in block_experts.get(i, ())]
        scores.update(_expert_rows(model, mine, spec, stats, score["bits"], score["seed"]))

    from .calibration import block_targets
    from .targets import block_list_name

    blocks_name = block_list_name(model)
    block_experts = block_targets(experts, blocks_name, len(model.get_submodule(blocks_name)),
                                  "block-by-block calibration")
    if batches is None:  # data-free metric: no forward pass, one block at a time for its weights
        for i in range(len(blocks)):
            names = {n: None for n in targets if n.startswith(f"{blocks_name}.{i}.")}
            if names or i in block_experts:
                block = blocks.load(i)
                visit(i, block, names)
                blocks.release(i, block, keep=False)
        return None, scores
    stats = sequential_activation_stats(model, batches, list(targets), blocks=blocks, visit=visit,
                                        progress=progress, experts=list(experts))
    return stats, scores


# --------------------------------------------------------------------------------------------
# quantize: model name -> calibrate -> quantize -> folder
# --------------------------------------------------------------------------------------------
@renamed_arguments(n_samples="calib_samples", scores_path="scores", method="quantizer")
def quantize_pretrained(
    model_name: str,
    output,
    bits: int,
    *,
    n_salient: int | None = None,
    salient_fraction: float | None = None,
    quantizer: str = "gptq",
    group_size: int | None = None,
    metric: str = "gift",
    data="embedded",
    calib_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    dtype="bf16",
    scores=None,
    target_modules=None,
    progress: bool = True,
    device="auto",
    overwrite: bool = False,
    sequential: bool = False,
) -> dict:
    """Load ``model_name``, calibrate, quantize, save to ``output``; return a size summary.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``): the model loads there and calibration,
    the metric and GPTQ run there. ``output`` is refused before any work when it holds anything
    salientft did not write, and when it holds an earlier salientft output unless ``overwrite``
    (``salientft.outputs``). ``sequential``: quantize block by block, the decoder blocks read from
    disk one at a time (also chosen when the weights do not fit the device: :func:`open_model`).
    ``scores``: a scores file of ``salientft calibrate`` (or its mapping, as :func:`salientft.load_scores`
    returns it) instead of computing the metric."""
    from .quant.model import QuantizeConfig, model_bytes, quantize, save_quantized, target_bytes

    cfg = QuantizeConfig(bits=bits, quantizer=quantizer, n_salient=n_salient, salient_fraction=salient_fraction,
                         group_size=group_size, metric=metric, target_modules=target_modules)  # validate first
    device = resolve_device(device)
    claim_dir(output, flag="--output", overwrite=overwrite)
    from .preflight import check_model_settings

    check_model_settings(model_name, target_modules, n_salient=cfg.n_salient, salient_fraction=cfg.salient_fraction,
                         quantized=True)  # targets and k on the model's skeleton, before the weights load
    model, tok, blocks = open_model(model_name, dtype=dtype, device=device, sequential=sequential)
    before = {"target_bytes": target_bytes(model, target_modules), "model_bytes": model_bytes(model)}
    if scores is not None and not isinstance(scores, dict):
        scores = load_scores(scores)
    batches = calibration_batches(tok, data, calib_samples, seq_len, batch_size, seed)
    quantize(model, bits, n_salient=cfg.n_salient, salient_fraction=cfg.salient_fraction, quantizer=quantizer,
             calibration=batches, group_size=group_size, metric=metric, scores=scores, seed=seed,
             target_modules=target_modules, progress=progress, blocks=blocks)
    after = {"target_bytes": target_bytes(model), "model_bytes": model_bytes(model)}
    summary = {
        "model": model_name, "output": str(output), "bits": bits, "quantizer": quantizer, "group_size": group_size,
        "n_salient": n_salient, "salient_fraction": salient_fraction, "metric": metric,
        "blockwise": blocks is not None,
        "calibration": {"data": data if isinstance(data, str) else "custom", "calib_samples": calib_samples,
                        "seq_len": seq_len, "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches))},
        "before": before, "after": after,
        "target_ratio": after["target_bytes"] / max(before["target_bytes"], 1),
        "model_ratio": after["model_bytes"] / max(before["model_bytes"], 1),
    }
    save_quantized(model, output, tokenizer=tok, base_model=model_name, extra={"summary": summary})
    return summary
