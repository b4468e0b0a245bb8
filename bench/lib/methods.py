"""Every benchmarked method prepared as ``salientft train`` prepares it, the authors' approach
re-implemented, the training step, and the per-method peak memory.

Variants -> (registered salientft method, TrainConfig overrides); ``authors`` is the
re-implementation below (docs/methods.md#authors-code), not a salientft method. Parameter budget:
GIFT-SW uses the paper's ratio k = round(in * 128/4096) columns per layer; LoRA/DoRA get the rank
r = round(sum(k*out) / sum(in+out)) over the same targets, so their trainable counts are about
equal. GMT (``gmt``) is full fine-tuning whose gradients are masked in an optimizer step pre-hook,
so ``train_step`` is the same for every method and the masking time is part of the optimizer's.
"""
from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F
from torch import nn

from salientft.config_base import GMT_DEFAULT_RATIO
from salientft.gift.config import GiftConfig
from salientft.gift.model import noise_std_for
from salientft.saliency import select_salient
from salientft.targets import find_target_modules, linear_weight, set_module

from .models import load_base, make_batch, storage_bytes

VARIANTS = {
    "gift-weight": ("gift-sw", {"noise": "weight"}),
    "gift-weight-kept": ("gift-sw", {"noise": "weight", "keep_noise": True}),
    "gift-output": ("gift-sw", {"noise": "output"}),
    "gift-none": ("salient", {}),
    "lora": ("lora", {}),
    "dora": ("dora", {}),
    "full": ("full", {}),
    "gmt": ("gmt", {}),
}
METHODS = (*VARIANTS, "authors")
GMT_RATIO = GMT_DEFAULT_RATIO
LR = 1e-5


class AuthorsSalientLinear(nn.Module):
    """The public reference code's training layer, as described in docs/methods.md#authors-code.

    The original layer stays alive (its weight is kept), and two pieces are stored next to it:
    the trainable salient columns and a frozen copy of the non-salient columns. Every forward
    rebuilds the whole (out, in) weight by concatenating the two pieces and permuting the
    columns back into place, then adds noise drawn over the full (out, in) shape (masked to
    the non-salient columns). Autograd therefore saves the rebuilt weight for the input
    gradient and computes the full (out, in) weight gradient, which the permutation and
    concatenation backward finally slice down to the k salient columns.
    """

    def __init__(self, base: nn.Linear, idx: torch.Tensor, noise_std: torch.Tensor, noise: str = "weight"):
        super().__init__()
        w = base.weight.detach()
        out_f, in_f = w.shape
        keep = torch.ones(in_f, dtype=torch.bool, device=w.device)
        keep[idx] = False
        rest = torch.nonzero(keep).flatten()
        order = torch.cat([idx, rest])  # salient first, then the rest
        self.original = base  # kept: the original weight stays in memory
        self.register_buffer("inverse_order", torch.argsort(order))
        self.salient = nn.Parameter(w[:, idx].clone())
        self.register_buffer("frozen", w[:, rest].clone())  # masked copy of the weight
        self.register_buffer("noise_mask", keep.to(w.dtype).view(1, -1))
        self.register_buffer("noise_std", noise_std.to(w.dtype).view(-1, 1))
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cat([self.salient, self.frozen], dim=1)[:, self.inverse_order]
        if self.training and self.noise == "weight":
            w = w + torch.randn_like(w) * self.noise_std * self.noise_mask
        return F.linear(x, w, self.original.bias)


def apply_authors(model: nn.Module, config: GiftConfig, scores, noise_std=None) -> nn.Module:
    targets = find_target_modules(model, config.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in targets.items():
        w = linear_weight(mod).detach()
        idx = select_salient(scores[name], config.k_for(w.shape[1], name)).to(w.device)
        std = noise_std[name] if noise_std is not None else noise_std_for(w, idx, config.noise_bits)
        set_module(model, name, AuthorsSalientLinear(mod, idx, std, noise=config.noise))
    return model


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: linear_weight(m).detach().float().norm(dim=0) for n, m in find_target_modules(model).items()}


def cheap_noise_std(model: nn.Module, bits: int = 4) -> dict[str, torch.Tensor]:
    """Delta_i / 2 without the clip search: max|W_i| / (2^(b-1)-1) / 2 (the p = 1 grid point).

    The MSE clip search of docs/methods.md#row-quantizer (``noise_std_for``) costs seconds per layer
    on a shared CPU (minutes per model); the noise scale's value does not change the step time, so
    the benchmarks use this stand-in for every noisy method alike.
    """
    qmax = 2 ** (bits - 1) - 1
    return {n: (linear_weight(m).detach().float().abs().amax(dim=1) / qmax / 2)
            for n, m in find_target_modules(model).items()}


def gift_budget(model: nn.Module, config: GiftConfig) -> tuple[int, int, int]:
    """(sum k*out, sum (in+out), LoRA rank r matching GIFT-SW's trainable count)."""
    kout = io = 0
    for name, m in find_target_modules(model).items():
        out_f, in_f = linear_weight(m).shape
        kout += config.k_for(in_f, name) * out_f
        io += in_f + out_f
    return kout, io, max(1, round(kout / io))


def _gradient_mask_hook(model, opt, mask_config) -> float:
    from salientft.gmt import build_gradient_mask

    mask = build_gradient_mask(model, mask_config)

    def apply_mask(*_):  # paper mode: mask, then a stock optimizer.step()
        mask.apply_()  # (a pre-hook must return None: its return value replaces the args)

    opt.register_step_pre_hook(apply_mask)
    opt.gradient_mask = mask  # for inspection (tests, last_stats)
    return mask_config.ratio


def build(method: str, model_name: str, dtype: torch.dtype, device: str, base=None, train_dtype: str = "fp32"):
    """(model in train mode, tokenizer, optimizer, info) for one method on a freshly loaded base model.

    Every method but the authors' re-implementation is prepared by ``salientft.methods``, as
    ``salientft train`` prepares it, with the benchmark's stand-ins for the costly parts
    (magnitude scores, ``cheap_noise_std``) and LoRA/DoRA at GIFT-SW's trainable count.
    ``base``: an already built (model, tokenizer) to prepare instead of loading ``model_name``
    (bench/gpu_step.py builds its large random models once, on the GPU); ``train_dtype``: the
    TrainConfig dtype the method is prepared for ("bf16": fp32 salient columns, as ``salientft
    train --dtype bf16``).
    """
    from salientft import methods
    from salientft.config import TrainConfig

    model, tok = base if base is not None else load_base(model_name, dtype)
    model.to(device)
    info = {}
    _, _, r = gift_budget(model, GiftConfig())  # paper ratio k = 128/4096 of in_features
    info["lora_rank"] = r
    mask_config = None
    if method == "authors":
        apply_authors(model, GiftConfig(noise="weight"), magnitude_scores(model), cheap_noise_std(model))
    elif method in VARIANTS:
        name, overrides = VARIANTS[method]
        spec = methods.get(name)
        cfg = TrainConfig(**spec.only_used(dict(method=name, dtype=train_dtype, lora_r=r, lora_alpha=2 * r)),
                          **overrides)
        model = spec.prepare(model, cfg, scores=magnitude_scores(model), noise_std=cheap_noise_std(model))
        mask_config = cfg.mask  # the run's gradient mask (GMT's add-on), None without one
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    if mask_config is not None:
        info["gmt_ratio"] = _gradient_mask_hook(model, opt, mask_config)
    seen = set()
    info["trainable"] = sum(p.numel() for p in params if not (id(p) in seen or seen.add(id(p))))
    info["train_state_mb"] = sum(p.numel() * (2 * p.element_size() + 8) for p in params) / 2**20
    return model, tok, opt, info


def train_step(model, opt, batch) -> tuple[float, float, float]:
    """One optimizer step (zero_grad, forward + loss, backward, AdamW step); returns its
    (forward, backward, optimizer) seconds."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def step_summary(ts) -> dict:
    """Of ``train_step``'s readings over rounds: the median step time (ms), its quartiles, every
    step's time (``step_ms``) and the median forward/backward/optimizer parts."""
    from .stats import median, summarize

    out = summarize([sum(t) * 1000 for t in ts])
    for i, part in enumerate(("forward_ms", "backward_ms", "optimizer_ms")):
        out[part] = median(t[i] * 1000 for t in ts)
    return out


def peak_memory(method: str, model_name: str, dtype: torch.dtype, device: str, batch_shape: tuple[int, int],
                steps: int) -> dict:
    """What ``method`` adds to a loaded base model's memory over ``steps`` training steps, in THIS
    process (run it in a fresh one: bench/step.py spawns, bench/scaling.py forks).

    CPU: the increase of the process's peak resident set (VmHWM, reset after the method is built)
    over the resident set with the base model loaded (bench/_memory.py); CUDA:
    ``torch.cuda.max_memory_allocated`` likewise. The method's extra weights (storage beyond the
    base model's) are counted in the peak.
    """
    from _memory import peak_rss_bytes, reset_peak_rss, rss_bytes

    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    base, _ = load_base(model_name, dtype)
    base_bytes = storage_bytes(base)
    del base
    gc.collect()
    model, tok, opt, info = build(method, model_name, dtype, device)
    batch = make_batch(tok, *batch_shape).to(device)
    extra_weights = storage_bytes(model) - base_bytes
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base_alloc = torch.cuda.memory_allocated() - extra_weights
        torch.cuda.reset_peak_memory_stats()
    else:
        base_rss = rss_bytes() - extra_weights
        reset_peak_rss()  # the high-water mark VmHWM
    for _ in range(steps):
        train_step(model, opt, batch)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base_alloc
    else:
        peak = peak_rss_bytes() - base_rss
    return {"peak_mb": peak / 2**20, "extra_weights_mb": extra_weights / 2**20, **info}
