"""Quantize a whole model (GPTQ or RTN, salient columns kept in 16 bits), save it, load it.

The GPTQ driver works block by block so that memory stays bounded: the inputs of the first
transformer block are captured once (a pre-hook stores them and raises to stop the forward);
then for each block l, one pass over the calibration inputs accumulates, per target layer,
the activation statistics (X^T X, max |x_j|, sums; padding excluded with the attention mask),
the layers are quantized, and a second pass through the *quantized* block produces the inputs
of block l+1. Only one block's Hessians and the block inputs are alive at any time.

Salience: unless ``scores`` are given, they are computed by ``salientft.saliency_scores`` from
the statistics of the block inputs seen by the driver (i.e. on the model quantized up to that
block, the same activations GPTQ's Hessian sees), at the quantization bit width.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..outputs import output_dir
from ..config_base import ConfigMixin, accept_old_names, coerce_fields, renamed_arguments, salient_count
from ..ops.salient import complement
from ..targets import block_list_name, find_target_modules, linear_weight, set_module
from .gptq import gptq_quantize, rtn_quantize
from .layer import QuantizedSalientLinear
from .packing import SUPPORTED_BITS

log = logging.getLogger(__name__)

FORMAT = "salientft.quantized"
FORMAT_VERSION = 1
QUANT_CONFIG_NAME = "quantization_config.json"
WEIGHTS_NAME = "model.safetensors"
QUANTIZERS = ("gptq", "rtn")
_BUFFER_PREFIX = "__buffer__."


@accept_old_names
@dataclass
class QuantizeConfig(ConfigMixin):
    """How a model was (or is to be) quantized. ``n_salient=0`` / ``salient_fraction=0`` means
    no 16-bit columns; with neither given, the paper's ratio 128/4096 is used."""

    bits: int = 4
    quantizer: str = field(default="gptq", metadata={"old_names": ("method",)})  # files before the rename say "method"
    n_salient: int | None = None
    salient_fraction: float | None = None
    group_size: int | None = None
    metric: str = "gift"
    damp: float = 0.01
    block_size: int = 64  # GPTQ's lazy-update batch; 64 beats the paper's 128 on CPU (same result)
    target_modules: list[str] | str | None = None

    def __post_init__(self):
        n = type(self).__name__
        coerce_fields(self)  # every field as its declared type (config_base)
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"{n}.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"{n}.quantizer must be one of {list(QUANTIZERS)}, got {self.quantizer!r}")
        if self.n_salient is not None and self.salient_fraction is not None:
            raise ValueError(f"{n}: give n_salient or salient_fraction, not both")
        if self.n_salient is not None and (
            isinstance(self.n_salient, bool) or not isinstance(self.n_salient, int) or self.n_salient < 0
        ):
            raise ValueError(f"{n}.n_salient must be an integer >= 0, got {self.n_salient!r}")
        if self.salient_fraction is not None:
            f = self.salient_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
                raise ValueError(f"{n}.salient_fraction must be in [0, 1), got {f!r}")
            self.salient_fraction = float(f)
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"{n}.group_size must be a positive integer or None, got {self.group_size!r}")
        if not isinstance(self.damp, (int, float)) or not self.damp > 0:
            raise ValueError(f"{n}.damp must be > 0, got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"{n}.block_size must be a positive integer, got {self.block_size!r}")

    def k_for(self, in_features: int, name: str = "layer") -> int:
        return salient_count(in_features, self.n_salient, self.salient_fraction, name=name, quantized=True)


def _normalise_batches(calibration) -> list[dict[str, torch.Tensor]]:
    from ..calibration import normalise_batches

    if calibration is None:
        return []
    if isinstance(calibration, (dict, torch.Tensor)):
        calibration = [calibration]
    out = normalise_batches({"input_ids": b} if isinstance(b, torch.Tensor) else b for b in calibration)
    if not out or sum(int(b["attention_mask"].sum()) for b in out) == 0:
        raise ValueError(
            "calibration holds no tokens (no batch, or every attention_mask is 0): pass batches of "
            "token ids, e.g. salientft.calibration.calibration_batches(tokenizer, 'embedded')"
        )
    return out


class _Stats:
    """Per-layer running X^T X (fp32) and column statistics over unmasked tokens."""

    def __init__(self, n: int, device, hessian: bool):
        self.max_abs = torch.zeros(n, dtype=torch.float32, device=device)
        self.sum_sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.sum_abs = torch.zeros(n, dtype=torch.float64, device=device)
        self.hessian = torch.zeros(n, n, dtype=torch.float32, device=device) if hessian else None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        xf = x.float()
        a = xf.abs()
        torch.maximum(self.max_abs, a.amax(0), out=self.max_abs)
        self.sum_sq += (xf * xf).sum(0, dtype=torch.float64)
        self.sum_abs += a.sum(0, dtype=torch.float64)
        if self.hessian is not None:
            self.hessian.addmm_(xf.T, xf)
        self.count += x.shape[0]

    def activation_stats(self):
        from ..calibration import ActivationStats

        return ActivationStats(self.max_abs, self.sum_sq, self.sum_abs, self.count, self.hessian)


def _layer_scores(model, name, st: _Stats | None, cfg: QuantizeConfig, seed: int):
    from ..saliency import STATLESS_METRICS, saliency_scores

    stats = None if cfg.metric in STATLESS_METRICS else {name: st.activation_stats()}
    return saliency_scores(model, stats, metric=cfg.metric, bits=cfg.bits, seed=seed, target_modules=[name])[name]


def _quantize_layer(model, name, module, cfg, k, score, H):
    W = linear_weight(module).detach()
    idx = torch.zeros(0, dtype=torch.long)
    if k > 0:
        from ..saliency import select_salient

        idx = select_salient(score.float(), k)
    idx = idx.to(W.device)
    if cfg.quantizer == "gptq":
        q, scale, sal = gptq_quantize(W, H, cfg.bits, idx, score, group_size=cfg.group_size,
                                      damp=cfg.damp, block_size=cfg.block_size)
    else:
        q, scale, sal = rtn_quantize(W, cfg.bits, idx, group_size=cfg.group_size)
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return QuantizedSalientLinear.from_integers(q, scale, idx, sal.to(W.dtype), bias, cfg.bits,
                                                cfg.group_size, dtype=W.dtype)


@renamed_arguments(method="quantizer")
@torch.no_grad()
def quantize(
    model: nn.Module,
    bits: int,
    n_salient: int | None = None,
    salient_fraction: float | None = None,
    quantizer: str = "gptq",
    calibration=None,
    group_size: int | None = None,
    metric: str = "gift",
    scores: Mapping[str, torch.Tensor] | None = None,
    *,
    target_modules=None,
    damp: float = 0.01,
    block_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    blocks=None,
) -> nn.Module:
    """Replace every target linear layer by a :class:`QuantizedSalientLinear` (in place).

    ``calibration``: batches (dicts with ``input_ids`` and ``attention_mask``, or id tensors);
    required for GPTQ, and for RTN when salient columns are chosen by a data-dependent metric.
    ``scores`` (module name -> (in,) salience) skip computing the metric. Returns the model,
    with all parameters frozen and ``model.salientft_quantization`` set to the config.

    ``blocks``: where the decoder blocks come from, one at a time (a block source of
    ``salientft.calibration``: ``ResidentBlocks``, the default, ``HostBlocks``, or
    ``salientft.models.DiskBlocks`` for a model opened by ``salientft.models.open_blockwise``
    whose blocks are still on disk); each block is released, quantized, to host memory. The
    result is the same bit for bit whatever the source (docs/quantization.md#block-by-block).
    """
    cfg = QuantizeConfig(bits=bits, quantizer=quantizer, n_salient=n_salient, salient_fraction=salient_fraction,
                         group_size=group_size, metric=metric, damp=damp, block_size=block_size,
                         target_modules=target_modules)
    if any(isinstance(m, QuantizedSalientLinear) for m in model.modules()):
        raise ValueError("this model is already quantized; load a fresh base model")
    targets, ks = _targets_and_k(model, cfg, scores)
    batches = _needed_batches(cfg, calibration, scores, ks)
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    if batches or blocks is not None:
        _quantize_blockwise(model, targets, ks, cfg, batches, scores, seed, blocks, progress)
    else:
        from tqdm.auto import tqdm

        for n, m in tqdm(targets.items(), desc=f"quantize {quantizer} {bits}-bit", unit="layer", disable=not progress):
            score = None
            if ks[n] > 0:
                score = scores[n] if scores is not None else _layer_scores(model, n, None, cfg, seed)
            set_module(model, n, _quantize_layer(model, n, m, cfg, ks[n], score, None))
    model.train(was_training)
    model.salientft_quantization = cfg
    return model


def _targets_and_k(model, cfg: QuantizeConfig, scores):
    """The target layers, k per layer, and the check that given scores cover them."""
    from ..saliency import resolve_metric

    resolve_metric(cfg.metric)
    targets = find_target_modules(model, cfg.target_modules)
    if cfg.target_modules is None:
        from ..gift.model import warn_uncovered

        warn_uncovered(model, targets, who="quantize", fate="they stay in their 16-bit dtype")
    ks = {n: cfg.k_for(linear_weight(m).shape[1], n) for n, m in targets.items()}
    if scores is not None:
        missing = [n for n in targets if ks[n] > 0 and n not in scores]
        if missing:
            raise ValueError(f"no scores for target {missing[0]!r}; scores cover {len(scores)} modules")
    return targets, ks


def _needed_batches(cfg: QuantizeConfig, calibration, scores, ks) -> list:
    """The calibration batches when the quantizer or the metric needs data (GPTQ's Hessian, or a
    data-dependent salience), else none."""
    from ..saliency import STATLESS_METRICS

    need_data = cfg.quantizer == "gptq" or (
        scores is None and cfg.metric not in STATLESS_METRICS and any(k > 0 for k in ks.values())
    )
    batches = _normalise_batches(calibration) if need_data else []
    if need_data and not batches:
        raise ValueError(f"quantizer={cfg.quantizer!r} with metric={cfg.metric!r} needs calibration batches")
    return batches


def _quantize_blockwise(model, targets, ks, cfg, batches, scores, seed, blocks, progress) -> None:
    """The block driver: block i is loaded, its targets' statistics gathered from its inputs (the
    outputs of the blocks quantized before it), its targets quantized, the quantized block run to
    give block i+1's inputs, and the block released (kept, quantized, in host memory)."""
    from tqdm.auto import tqdm

    from ..calibration import ResidentBlocks, block_targets, capture_block_inputs, run_block

    blocks_name = block_list_name(model)
    n_blocks = len(model.get_submodule(blocks_name))
    source = blocks if blocks is not None else ResidentBlocks(model.get_submodule(blocks_name))
    ordered = block_targets(targets, blocks_name, n_blocks, "GPTQ's block driver")
    hidden, calls = capture_block_inputs(model, blocks_name, batches, source.device) if batches else ([], [])
    masks = [b["attention_mask"].bool() for b in batches]
    last = max(ordered) if batches else n_blocks - 1  # blocks after the last targeted one need not run
    for i in tqdm(range(n_blocks), desc=f"quantize {cfg.quantizer} {cfg.bits}-bit", unit="block",
                  disable=not progress):
        block = source.load(i)
        names = ordered.get(i, [])
        targets.update({n: model.get_submodule(n) for n in names})  # the loaded modules
        if names:
            cache = list(zip(hidden, calls[i])) if batches else []
            _quantize_block(model, block, names, targets, ks, cfg, cache, masks, scores, seed)
            for n in names:  # the replaced dense layers: no reference left, their memory freed
                del targets[n]
        if batches and i < last:
            hidden = run_block(block, hidden, calls[i])
        source.release(i, block, keep=True)


def _quantize_block(model, block, names, targets, ks, cfg, cache, masks, scores, seed):
    stats: dict[str, _Stats] = {}
    state = {"mask": None, "last": None, "last_flat": None}

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            if state["last"] is not x:
                flat = x.detach().reshape(-1, x.shape[-1])
                state["last"], state["last_flat"] = x, flat[state["mask"].reshape(-1).to(flat.device)]
            stats[name].add(state["last_flat"])
        return hook

    handles = []
    for n in names:
        m = targets[n]
        stats[n] = _Stats(linear_weight(m).shape[1], linear_weight(m).device, cfg.quantizer == "gptq")
        handles.append(m.register_forward_pre_hook(make_hook(n)))
    try:
        for (hs, (args, kw)), mask in zip(cache, masks):
            state["mask"], state["last"] = mask, None
            block(hs, *args, **kw)
    finally:
        for h in handles:
            h.remove()
        state["last"] = state["last_flat"] = None
    for n in names:
        score = None
        if ks[n] > 0 or (cfg.quantizer == "gptq" and scores is not None and n in scores):
            score = scores[n] if scores is not None and n in scores else _layer_scores(model, n, stats[n], cfg, seed)
        H = stats[n].hessian
        new = _quantize_layer(model, n, targets[n], cfg, ks[n], score, H)
        stats[n] = None
        set_module(model, n, new)


def prepare_gift_recovery(model: nn.Module, noise: str = "weight", noise_bits: int = 4) -> nn.Module:
    """GIFT-SW recovery of a quantized model: only the 16-bit salient columns train, with
    Gaussian noise of std Delta_i/2 (``noise_bits``-bit step of the dequantized rest) on the
    integer columns in training mode (``noise="none"`` to disable). Returns the model."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no quantized layers: call salientft.quantize or load_quantized first")
    if all(l.k == 0 for l in layers.values()):
        raise ValueError("the quantized model has no salient columns to train (quantized with n_salient=0)")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.set_noise(noise, noise_bits)
        layer.salient_weight.requires_grad_(layer.k > 0)
    return model


# ---- sizes --------------------------------------------------------------------------------
def _unique_tensors(model: nn.Module):
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        yield t


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def target_bytes(model: nn.Module, target_modules=None) -> int:
    """Bytes of the target layers: quantized layers count what they store."""
    q = quantized_layers(model)
    if q:
        return sum(m.storage_bytes() for m in q.values())
    total = 0
    for m in find_target_modules(model, target_modules).values():
        total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


def quantized_layers(model: nn.Module) -> dict[str, QuantizedSalientLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedSalientLinear)}


# ---- save / load ----------------------------------------------------------------------------
def save_quantized(model: nn.Module, path, tokenizer=None, base_model: str | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (every tensor of the model, shared ones once), the HF
    ``config.json``, ``quantization_config.json`` and optionally the tokenizer, atomically."""
    from safetensors.torch import save_file

    cfg: QuantizeConfig | None = getattr(model, "salientft_quantization", None)
    layers = quantized_layers(model)
    if cfg is None or not layers:
        raise ValueError("model is not quantized: call salientft.quantize(model, ...) first")
    tensors, tied, seen = {}, {}, {}
    sd = model.state_dict()
    for k, t in sd.items():
        key = (t.data_ptr(), t.numel(), t.dtype, tuple(t.shape))
        if key in seen and t.numel():
            tied[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = t.detach().contiguous().cpu()
    for name, buf in model.named_buffers():
        if name not in sd:  # non-persistent (e.g. rotary inv_freq): saved so loading is exact
            tensors[_BUFFER_PREFIX + name] = buf.detach().contiguous().cpu()
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "base_model": base_model or getattr(getattr(model, "config", None), "_name_or_path", None),
        "quantization": cfg.to_dict(),
        "dtype": str(next(iter(layers.values())).salient_weight.dtype).replace("torch.", ""),
        "tied": tied,
        "layers": {
            n: {"in_features": m.in_features, "out_features": m.out_features, "k": m.k,
                "bias": m.bias is not None, "bits": m.bits, "group_size": m.group_size}
            for n, m in layers.items()
        },
        "target_bytes": target_bytes(model),
        "model_bytes": model_bytes(model),
    }
    meta.update(extra or {})
    path = Path(path)
    with output_dir(path) as tmp:  # atomic, with the manifest of a salientft output folder
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        model.config.to_json_file(str(tmp / "config.json"))
        (tmp / QUANT_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return path


def load_quantized(path, device="cpu", return_tokenizer: bool = False):
    """Rebuild a model saved by :func:`save_quantized` (architecture from its config.json).

    The model is built on the meta device (no full-precision weights are ever allocated), its
    target layers replaced by empty quantized layers, then every tensor is loaded from the file.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qfile = path / QUANT_CONFIG_NAME
    if not qfile.is_file():
        raise FileNotFoundError(f"{path} holds no {QUANT_CONFIG_NAME}: not a model saved by salientft quantize")
    meta = json.loads(qfile.read_text())
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{qfile} has format {meta.get('format')!r} v{meta.get('version')}; expected {FORMAT} v<={FORMAT_VERSION}")
    cfg = QuantizeConfig.from_dict(meta["quantization"])
    dtype = getattr(torch, meta["dtype"])
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for n, spec in meta["layers"].items():
        layer = QuantizedSalientLinear(
            spec["in_features"], spec["out_features"], spec["bits"], torch.arange(spec["k"]),
            group_size=spec["group_size"], bias=spec["bias"], dtype=dtype, device="meta",
        )
        set_module(model, n, layer)
    model = model.to_empty(device=device)
    with safe_open(str(path / WEIGHTS_NAME), framework="pt", device=str(device)) as f:
        keys = set(f.keys())
        state = {k: f.get_tensor(k) for k in keys if not k.startswith(_BUFFER_PREFIX)}
        buffers = {k[len(_BUFFER_PREFIX):]: f.get_tensor(k) for k in keys if k.startswith(_BUFFER_PREFIX)}
    for k, src in meta.get("tied", {}).items():
        state[k] = state[src]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ValueError(f"{path / WEIGHTS_NAME} does not match the architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, t in buffers.items():
        mod, _, b = name.rpartition(".")
        owner = model.get_submodule(mod) if mod else model
        owner._buffers[b] = t
    for n in meta["layers"]:  # non-persistent index buffer follows the loaded salient_idx
        layer = model.get_submodule(n)
        layer.int_idx = complement(layer.salient_idx, layer.in_features)
    if meta.get("tied") and hasattr(model, "tie_weights"):
        model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    model.salientft_quantization = cfg
    if return_tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path)) if (path / "tokenizer_config.json").is_file() else None
        return model, tok
    return model
