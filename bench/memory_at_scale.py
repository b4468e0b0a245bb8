"""A memory plan from 7B to 70B: the peak bytes of each salientft phase, counted on one and two
decoder blocks of the real Llama shapes, extrapolated to the whole model and to N GPUs.

    .venv/bin/python bench/memory_at_scale.py              # the plan: docs/results/scale.{json,png}, docs/scale.md
    .venv/bin/python bench/memory_at_scale.py --render     # docs/scale.md again from the JSON
    .venv/bin/python bench/memory_at_scale.py --smoke --out /tmp/scale   # tiny shapes, seconds (the test)

How bytes are counted. Not the process's RSS (noisy): ``ByteTracker``, a ``TorchDispatchMode``,
sees every aten op, records each new storage its outputs hold (by storage identity, so views and
in-place results count once) with its size, and holds a weak reference to it; before each
allocation it drops the storages that died. ``peak`` is the largest sum of live storages, counted
from the tensors adopted at the start (the model's weights) plus everything allocated since.
The count is the same on every machine and thread count.

Where the shapes are too large for this CPU, the same code runs on *fake* tensors
(``torch._subclasses.FakeTensorMode``: CPU tensors with shapes, dtypes and storages but no data),
so a 70B block's training step costs milliseconds and no memory. Autocast, autograd, AdamW and
salientft's own code run unchanged. Where the code reads a value on the host (a few checks of
GPTQ and calibration), the tracker answers it as an ordinary run on real data would (see
``ByteTracker._scalar``). Fake and real counts are compared on a small shape by every run
(``verify``) and by tests/test_memory_plan.py: they must be equal.

Accelerator paths are forced (GMT's device engine, the weight noise drawn by torch ops), as in
tests/test_host_syncs.py, because the plan is for GPUs. Assumptions are written in docs/scale.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from _machine import machine_info  # bench/_machine.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from salientft._io import atomic_path, write_json  # noqa: E402

aten = torch.ops.aten
GB = 1e9
GIB = 2**30

# The real shapes (the models' config.json); vocab and layer counts as published.
SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32000, layers=32),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, layers=32),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                        vocab_size=32000, layers=80),
}
# --smoke (the test): a tiny Llama with the same structure
TINY = {"tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=512, layers=4)}

# Training workflows: (salientft method, quantized base?, TrainConfig overrides)
STEPS = {
    "gift-sw": ("salient", False, {}),
    "gift-sw weight noise": ("gift-sw", False, {"noise": "weight"}),
    "gift-sw output noise": ("gift-sw", False, {"noise": "output"}),
    "lora": ("lora", False, {}),
    "full": ("full", False, {}),
    "gmt": ("gmt", False, {}),
    "recovery gift-sw (4-bit)": ("gift-sw", True, {"noise": "weight"}),
    "qlora (4-bit lora)": ("lora", True, {}),
}
GPTQ_BITS = (4, 3, 2)
CARDS_GB = (24, 40, 80)  # GiB of one GPU
USABLE = 0.9  # of a card's memory: CUDA context, allocator fragmentation
DEVICE_COUNTS = (1, 2, 4, 8)
SEQ = 2048
MICRO_BATCHES = (1, 4)
CALIB = (128, 2048)  # calibration: 128 sequences of 2048 tokens (GPTQ's usual set), batches of 1 sequence
FIT_TOKENS = (64, 128, 256)
CALIB_FIT_TOKENS = (64, 256)  # GPTQ walks every column in Python: two token counts suffice for its slope
# fake and real counts agree within this: fake runs make a few small host-side tensors differently
# (the RNG states saved by checkpointing, a lifted constant): 16, 1024 or 7168 bytes measured
VERIFY_TOLERANCE = 16384
SEED = 0
FAILED: dict[str, str] = {}  # phases that could not be measured, with the error (in the JSON)


# ----------------------------------------------------------------------------------------------
# Counting bytes
# ----------------------------------------------------------------------------------------------
class ByteTracker(TorchDispatchMode):
    """Live bytes of tensor storages and their peak, counted at every aten op.

    ``adopt`` registers tensors that exist before (the model); ``reset_peak`` sets the peak to
    what is live now. On fake tensors a host read (``.item()``, ``bool(t)``) cannot be answered
    from data, so ``_scalar`` answers it as a run on real, finite data does: ``all`` true,
    ``any`` false (no dead Hessian column, no non-finite value), an info code 0 (Cholesky
    succeeded), a sum or count 1 (some token present).
    """

    def __init__(self, fake: bool = False):
        super().__init__()
        self.fake = fake
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = 0
        self.peak = 0
        self._made_by: dict[int, str] = {}
        self.guessed: list[str] = []

    def _sweep(self) -> None:
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(k)[1]
            self._made_by.pop(k, None)

    def _add(self, t: torch.Tensor) -> int | None:
        s = t.untyped_storage()
        key = s._cdata
        if key in self.live:
            return None
        n = s.nbytes()
        self.live[key] = (StorageWeakRef(s), n)
        self.now += n
        return key

    def adopt(self, tensors) -> None:
        self._sweep()
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.now)

    def reset_peak(self) -> None:
        self._sweep()
        self.peak = self.now

    def live_bytes(self) -> int:
        self._sweep()
        return self.now

    def _scalar(self, func, t):
        made = self._made_by.get(t.untyped_storage()._cdata, "")
        if getattr(t, "constant", None) is not None:  # a lifted constant: fake mode knows its value
            return func(t)
        if t.dtype == torch.bool:  # checks look for what is wrong: comparisons and any() false, all() true
            return made not in ("any", "lt", "gt", "le", "ge", "ne", "eq", "isnan", "isinf")
        if made in ("sum", "count_nonzero", "randint", "random"):  # a token present; a noise seed
            return 1
        if made in ("min", "max", "amin", "amax"):  # index range checks: 0 is in range
            return 0
        if made in ("linalg_cholesky_ex", "linalg_ldl_factor_ex", "linalg_inv_ex"):
            return 0
        # anything else (statistics, counts read for a log): 0, noted; the fake-vs-real check guards it
        self.guessed.append(made or "?")
        return 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fake and func is aten._local_scalar_dense.default:
            return self._scalar(func, args[0])
        if self.fake and func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            # boolean selection with an all-true mask (calibration without padding): a copy
            func, args, kwargs = aten.clone.default, (args[0],), {}
        out = func(*args, **kwargs)
        new = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if new:
            self._sweep()
            for t in new:
                key = self._add(t)
                if key is not None and self.fake:
                    self._made_by[key] = func.overloadpacket.__name__
            self.peak = max(self.peak, self.now)
        return out


@contextlib.contextmanager
def fake_mode(fake: bool):
    """Fake tensors (shapes, no data) when ``fake``; nothing otherwise."""
    if not fake:
        yield
        return
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensorMode

    import importlib

    original = nn.Module._apply
    nn.Module._apply = _apply_set_data  # torch swaps fake parameters, which fails (weak references)
    saved = []
    for mod in _INDEX_USERS:  # index checks read values; fake indices have none (same bytes without them)
        m = importlib.import_module(mod)
        for name, fn in (("salient_indices", _fake_salient_indices), ("complement", _fake_complement)):
            if hasattr(m, name):
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, fn)
    import salientft.gmt as gmt
    import salientft.quant.gptq as gptq

    import salientft.ops.grid as grid

    cpu_budget = grid.SEARCH_CHUNK_ELEMS["cpu"]
    grid.SEARCH_CHUNK_ELEMS["cpu"] = grid.DEVICE_SEARCH_CHUNK_ELEMS  # the clip search's GPU chunks (fewer ops)
    saved.append((gmt, "_shards", gmt._shards))
    gptq.range = _first_iterations  # GPTQ's column loops: the first iterations hold the largest temporaries
    saved.append((gptq, "range", range))
    gmt._shards = _unsharded_or(gmt._shards)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        nn.Module._apply = original
        grid.SEARCH_CHUNK_ELEMS["cpu"] = cpu_budget
        for m, name, fn in saved:
            if fn is range:
                delattr(m, name)
            else:
                setattr(m, name, fn)


def _first_iterations(*args):
    """``range`` for GPTQ's loops on fake tensors: the first block of columns (whose update of the
    remaining columns is the largest temporary) and the first two columns of a block. Every later
    iteration allocates the same shapes or smaller ones and the allocations after the loops do not
    depend on it, so the peak is the same while a 70B layer's 28672 columns cost no time; the
    real-against-fake check runs the full loops on real tensors."""
    r = range(*args)
    return r[:1] if len(args) == 3 else r[:2]


def _unsharded_or(shards):
    """GMT's ``_shards`` (which tells plain tensors by their exact type) for fake tensors."""
    def fake_shards(live):
        from torch.distributed.tensor import DTensor

        return shards(live) if any(isinstance(g, DTensor) for _, _, g in live) else None
    return fake_shards


_INDEX_USERS = ("salientft.ops.salient", "salientft.gift.experts", "salientft.gift.layer", "salientft.quant.model",
                "salientft.quant.gptq", "salientft.quant.layer", "salientft.quant.ste")


def _fake_salient_indices(salient_idx, in_features, *, allow_empty=False, keep_one=False, device=None):
    """``ops.salient.salient_indices`` without its value checks (a sorted long tensor, same size)."""
    return torch.sort(torch.as_tensor(salient_idx, dtype=torch.long, device=device).flatten())[0]


def _fake_complement(idx, in_features):
    """``ops.salient.complement``: in_features - k long indices (their values unknown, their bytes not)."""
    return torch.arange(in_features - idx.numel(), device=idx.device)


def _apply_set_data(self, fn, recurse=True):  # noqa: C901
    """``nn.Module._apply`` as it is for ordinary tensors: ``param.data = fn(param)`` (same bytes)."""
    if recurse:
        for m in self.children():
            m._apply(fn)
    with torch.no_grad():
        for k, p in list(self._parameters.items()):
            if p is not None:
                new = fn(p)
                try:
                    p.data = new
                except RuntimeError:  # a real tensor met in fake mode: replace the parameter
                    self._parameters[k] = torch.nn.Parameter(new, requires_grad=p.requires_grad)
        for k, b in self._buffers.items():
            if b is not None:
                self._buffers[k] = fn(b)
    return self


def accelerator_paths() -> None:
    """GMT's device engine and the weight noise of a GPU (torch's generator, large blocks): the plan's target."""
    import salientft.gmt as gmt
    import salientft.ops.noise as noise

    gmt._HOST_ENGINE_DEVICES = ()
    noise._HOST_NOISE_DEVICES = ()
    os.environ["SALIENTFT_NOISE_GENERATOR"] = "torch"  # the GPU default: normal_ in blocks of up to 16M


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s._cdata not in seen:
            seen.add(s._cdata)
            total += s.nbytes()
    return total


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def build_model(shape: dict, layers: int, dtype: torch.dtype):
    """A random Llama with ``shape``'s widths and ``layers`` blocks, built in ``dtype`` (no copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {k: v for k, v in shape.items() if k != "layers"}
    config = LlamaConfig(**kw, num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    return model


def magnitude_scores(model):
    from salientft.targets import find_target_modules, linear_weight

    return {n: linear_weight(m).detach().float().norm(dim=0) for n, m in find_target_modules(model).items()}


def lora_rank(model) -> int:
    """LoRA's rank at GIFT-SW's trainable count (paper ratio k = in/32 on every target)."""
    from salientft.gift.config import GiftConfig
    from salientft.targets import find_target_modules, linear_weight

    cfg, kout, io = GiftConfig(), 0, 0
    for name, m in find_target_modules(model).items():
        out_f, in_f = linear_weight(m).shape
        kout += cfg.k_for(in_f, name) * out_f
        io += in_f + out_f
    return max(1, round(kout / io))


def quantized_model(shape: dict, layers: int, bits: int, n_salient: int | None, group_size: int | None):
    """A model as ``salientft quantize`` leaves it (``QuantizedSalientLinear`` in every target, the
    same tensors and bytes), built from zeros: quantizing would only change values."""
    from salientft.quant.gptq import n_groups
    from salientft.quant.layer import QuantizedSalientLinear
    from salientft.quant.model import QuantizeConfig
    from salientft.targets import find_target_modules, linear_weight, set_module

    cfg = QuantizeConfig(bits=bits, n_salient=n_salient, group_size=group_size, method="rtn")
    model = build_model(shape, layers, torch.bfloat16)
    for name, m in find_target_modules(model).items():
        out_f, in_f = linear_weight(m).shape
        k = cfg.k_for(in_f, name)
        q = torch.zeros(out_f, in_f - k, dtype=torch.int8)
        scale = torch.ones(out_f, n_groups(in_f - k, group_size))
        idx = torch.arange(k) * (in_f // max(k, 1))
        sal = torch.zeros(out_f, k, dtype=torch.bfloat16)
        set_module(model, name, QuantizedSalientLinear.from_integers(q, scale, idx, sal, None, bits, group_size,
                                                                     dtype=torch.bfloat16))
        del m
    for p in model.parameters():
        p.requires_grad_(False)
    model.salientft_quantization = cfg
    return model


def prepared(workflow: str, shape: dict, layers: int):
    """(model ready to train, optimizer, its step pre-hook mask or None, trainable count)."""
    from salientft import methods
    from salientft.config import TrainConfig

    name, quantized, overrides = STEPS[workflow]
    spec = methods.get(name, quantized=quantized)
    if quantized:
        k0 = workflow.startswith("qlora")  # QLoRA-style: 4-bit groups of 64, no 16-bit columns
        model = quantized_model(shape, layers, 4, 0 if k0 else None, 64 if k0 else None)
        r = lora_rank(build_model(shape, 1, torch.bfloat16).to("meta"))
    else:
        model = build_model(shape, layers, torch.float32 if spec.dense else torch.bfloat16)
        r = lora_rank(model)
    cfg = TrainConfig(**spec.only_used(dict(method=name, dtype="bf16", lora_r=r, lora_alpha=2 * r)), **overrides)
    scores = None if quantized else magnitude_scores(model)
    model = spec.prepare(model, cfg, scores=scores, noise_std=cheap_noise_std(model, scores))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    mask_config = spec.mask_config(cfg)
    if mask_config is not None:
        from salientft.gmt import build_gradient_mask

        mask = build_gradient_mask(model, mask_config)

        def apply_mask(*_):  # a step pre-hook must return None
            mask.apply_()

        opt.register_step_pre_hook(apply_mask)
    return model, opt, sum(p.numel() for p in params)


def cheap_noise_std(model, scores):
    """The noise scale's stand-in (its value changes no byte): max|W_i| / 7 / 2."""
    if scores is None:
        return None
    from salientft.targets import find_target_modules, linear_weight

    return {n: linear_weight(m).detach().float().abs().amax(dim=1) / 14 for n, m in find_target_modules(model).items()}


# ----------------------------------------------------------------------------------------------
# Phases: each returns {"resident": bytes before the phase, "peak": peak bytes, ...}
# ----------------------------------------------------------------------------------------------
def _tracked(model, fake: bool) -> ByteTracker:
    tr = ByteTracker(fake)
    tr.adopt(list(model.parameters()) + list(model.buffers()))
    return tr


def phase_load(shape, layers, tokens, batch, fake) -> dict:
    with fake_mode(fake):
        tr = ByteTracker(fake)
        with tr:
            model = build_model(shape, layers, torch.bfloat16)
        weights = storage_bytes(list(model.parameters()) + list(model.buffers()))
        return {"resident": 0, "peak": weights, "weights": weights}


def phase_step(workflow, checkpointing, shape, layers, tokens, batch, fake) -> dict:
    """One optimizer step (zero_grad, forward + loss under bf16 autocast, backward, AdamW)."""
    with fake_mode(fake), ByteTracker(fake) as tr:
        torch.manual_seed(SEED)
        model, opt, trainable = prepared(workflow, shape, layers)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        ids = torch.randint(3, shape["vocab_size"], (batch, tokens))
        tr.adopt(list(model.parameters()) + list(model.buffers()))
        resident = tr.live_bytes()
        tr.reset_peak()
        if True:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            del loss
        state = tr.live_bytes()  # weights + gradients + optimizer state after the step
        return {"resident": resident, "peak": tr.peak, "state_after": state, "trainable": trainable}


def _calibration_batches(shape, tokens, batch):
    ids = torch.randint(3, shape["vocab_size"], (batch, tokens))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def phase_calibration(shape, layers, tokens, batch, fake) -> dict:
    """GIFT-SW's calibration: activation statistics of every target over the batches."""
    from salientft.calibration import collect_activation_stats

    with fake_mode(fake):
        model = build_model(shape, layers, torch.bfloat16)
        batches = _calibration_batches(shape, tokens, batch)
        tr = _tracked(model, fake)
        resident = tr.live_bytes()
        with tr:
            stats = collect_activation_stats(model, batches, progress=False)
            del stats
        return {"resident": resident, "peak": tr.peak}


def phase_gptq(bits, shape, layers, tokens, batch, fake) -> dict:
    """``salientft.quantize`` with GPTQ (salient columns last, scores from the calibration)."""
    from salientft.quant.model import quantize

    with fake_mode(fake):
        model = build_model(shape, layers, torch.bfloat16)
        batches = _calibration_batches(shape, tokens, batch)
        tr = _tracked(model, fake)
        resident = tr.live_bytes()
        with tr:
            quantize(model, bits, method="gptq", calibration=batches, progress=False)
        return {"resident": resident, "peak": tr.peak}


def phase_checkpoint(shape, layers, tokens, batch, fake) -> dict:
    """A GIFT-SW checkpoint (``Method.save_checkpoint``) of one process; real tensors only (it writes
    files). Under FSDP2 today's code first gathers every parameter (docs/scale.md adds that)."""
    from salientft import methods

    spec = methods.get("salient")
    with fake_mode(False):
        torch.manual_seed(SEED)
        model, _, _ = prepared("gift-sw", shape, layers)
        tr = _tracked(model, False)
        resident = tr.live_bytes()
        with tempfile.TemporaryDirectory() as d, tr:
            spec.save_checkpoint(model, Path(d))
        return {"resident": resident, "peak": tr.peak}


def phases() -> dict:
    """Phase name -> (function(shape, layers, tokens, batch, fake), its token counts: 'train' or 'calib')."""
    out = {"load": (phase_load, "none"), "calibration": (phase_calibration, "calib")}  # calib: 2 token counts
    for b in GPTQ_BITS:
        out[f"gptq {b}-bit"] = (lambda *a, b=b: phase_gptq(b, *a), "calib")
    for w in STEPS:
        out[w] = (lambda *a, w=w: phase_step(w, False, *a), "train")
        out[f"{w} +ckpt"] = (lambda *a, w=w: phase_step(w, True, *a), "train")
    return out


# ----------------------------------------------------------------------------------------------
# Fits and extrapolation
# ----------------------------------------------------------------------------------------------
def affine_fit(xs, ys) -> dict:
    """Least-squares y = a + b x, with the largest residual (bytes) and relative to the largest y."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    res = max(abs(y - (a + b * x)) for x, y in zip(xs, ys))
    return {"intercept": a, "slope": b, "max_residual": res, "max_residual_rel": res / max(max(ys), 1)}


def measure_shape(shape, names, fake, tokens_list, layers_list=(1, 2), batch=1, log=print) -> dict:
    """peak[phase][L][T] for L blocks and T tokens (one sequence of T tokens)."""
    table = phases()
    res, failed = {}, {}
    for name in names:
        fn, kind = table[name]
        if name in failed:
            continue
        res[name] = {}
        for L in layers_list:
            if name in failed:
                break
            toks = {"none": tokens_list[:1], "calib": tokens_list[:: len(tokens_list) - 1]}.get(kind, tokens_list)
            res[name][L] = {}
            for T in toks:
                t0 = time.perf_counter()
                try:
                    res[name][L][T] = fn(shape, L, T, batch, fake)
                except Exception as e:  # noqa: BLE001 -- recorded in the JSON and the report, the plan goes on
                    log(f"  {name} L={L} T={T} failed: {e!r}"[:300])
                    res.pop(name)
                    failed[name] = FAILED[name] = repr(e)[:300]
                    break
                log(f"  {name:34s} L={L} T={T:5d} peak {res[name][L][T]['peak'] / GB:8.3f} GB "
                    f"({time.perf_counter() - t0:.1f} s)")
    return res


def per_block_model(meas: dict, kind: str) -> dict:
    """Peak(L, T) = fixed(T) + L * block(T), each affine in T, from L = 1, 2 and the token counts.

    Returns the four coefficients and the fits' residuals."""
    out = {}
    L1, L2 = meas[1], meas[2]
    Ts = sorted(L1)
    fixed = [2 * L1[T]["peak"] - L2[T]["peak"] for T in Ts]
    block = [L2[T]["peak"] - L1[T]["peak"] for T in Ts]
    rf, rb = (affine_fit(Ts, fixed), affine_fit(Ts, block)) if len(Ts) > 1 else (
        {"intercept": fixed[0], "slope": 0.0, "max_residual": 0.0, "max_residual_rel": 0.0},
        {"intercept": block[0], "slope": 0.0, "max_residual": 0.0, "max_residual_rel": 0.0})
    out.update(fixed=rf, block=rb)
    for key in ("resident", "state_after"):
        if key in L1[Ts[0]]:
            out[key] = {"fixed": 2 * L1[Ts[0]][key] - L2[Ts[0]][key], "block": L2[Ts[0]][key] - L1[Ts[0]][key]}
    if "trainable" in L1[Ts[0]]:
        out["trainable_per_block"] = L2[Ts[0]]["trainable"] - L1[Ts[0]]["trainable"]
        out["trainable_fixed"] = 2 * L1[Ts[0]]["trainable"] - L2[Ts[0]]["trainable"]
    return out


def predict(model: dict, layers: int, tokens: float) -> float:
    f, b = model["fixed"], model["block"]
    return f["intercept"] + f["slope"] * tokens + layers * (b["intercept"] + b["slope"] * tokens)


def per_device(model: dict, layers: int, tokens: float, n: int) -> float:
    """Peak per GPU with FSDP over ``n`` GPUs: what stays between steps (weights, gradients, optimizer
    state: ``state_after``) is sharded n ways; the rest (activations, temporaries) is not; each GPU
    also holds two gathered blocks of the resident weights (the one computing, the one prefetched)."""
    total = predict(model, layers, tokens)
    if n == 1:
        return total
    st = model.get("state_after") or model.get("resident")
    state = st["fixed"] + layers * st["block"]
    gathered = 2 * model["resident"]["block"]
    return state / n + (total - state) + gathered


def smallest_setup(bytes_per_device) -> str | None:
    """The first (GPUs, card) in order of total memory whose per-device peak fits."""
    options = sorted(((n, c) for n in DEVICE_COUNTS for c in CARDS_GB), key=lambda nc: (nc[0] * nc[1], nc[0]))
    for n, c in options:
        if bytes_per_device(n) <= USABLE * c * GIB:
            return f"{n} x {c} GB" if n > 1 else f"1 x {c} GB"
    return None


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def verify(names, log=print) -> dict:
    """Fake and real counts on the tiny shape, phase by phase: they must be equal."""
    shape = TINY["tiny"]
    out = {}
    for name in names:
        fn, kind = phases()[name]
        T = 32
        real = fn(shape, 2, T, 1, False)
        fake = fn(shape, 2, T, 1, True)
        out[name] = {"real_peak": real["peak"], "fake_peak": fake["peak"], "equal": abs(real["peak"] - fake["peak"]) <= VERIFY_TOLERANCE}
        log(f"  verify {name:34s} real {real['peak']} fake {fake['peak']} {'OK' if out[name]['equal'] else 'DIFFER'}")
    return out


def plan_for(name, shape, meas, kinds, direct=None) -> dict:
    """Per-block models, whole-model peaks and the smallest setup of each workflow.

    Training phases use the blocks measured at the target token counts themselves (``direct``: fake
    tensors make that cheap), because a peak is the largest of several moments (activations at the
    loss, the optimizer's states) and the moment that wins can change between 256 and 8192 tokens;
    the fit from small token counts is kept and its error at the targets reported."""
    L = shape["layers"]
    rows = {}
    for ph, m in meas.items():
        kind = kinds[ph]
        pm = per_block_model(m, kind)
        row = {"model": pm}
        if kind == "train" and direct and ph in direct:
            small = pm
            pm = row["model"] = per_block_model(direct[ph], kind)
            row["small_token_fit"] = small
            row["small_token_fit_error"] = {
                str(t): (predict(small, L, t) - predict(pm, L, t)) / predict(pm, L, t) for t in sorted(direct[ph][1])}
        if kind == "train":
            for mb in MICRO_BATCHES:
                t = SEQ * mb
                row[f"mb{mb}"] = {
                    "tokens": t,
                    "per_device_bytes": {n: per_device(pm, L, t, n) for n in DEVICE_COUNTS},
                    "fits": smallest_setup(lambda n, t=t: per_device(pm, L, t, n)),
                }
        else:
            t = CALIB[1] if kind == "calib" else 0  # one batch of one 2048-token sequence at a time
            total = predict(pm, L, t)
            row["single"] = {"tokens": t, "bytes": total,
                             "fits": smallest_setup(lambda n, total=total: total if n == 1 else math.inf)}
        rows[ph] = row
    return rows


def run(args, log=print) -> dict:
    torch.set_num_threads(args.threads)
    accelerator_paths()
    shapes = TINY if args.smoke else SHAPES
    table = phases()
    names = [n for n in table if args.only is None or n in args.only or n.removesuffix(" +ckpt") in args.only]
    kinds = {n: table[n][1] for n in names}
    result = {"provenance": {**machine_info("commit", "cpu_model", "torch", "transformers", "peft", "threads"),
                             "dtype": "bf16 weights, fp32 trainable values, bf16 autocast", "seed": SEED},
              "assumptions": {"seq_len": SEQ, "micro_batches": list(MICRO_BATCHES), "calibration": list(CALIB),
                              "cards_gib": list(CARDS_GB), "usable_fraction": USABLE,
                              "devices": list(DEVICE_COUNTS), "fit_tokens": list(FIT_TOKENS)},
              "verify": verify(names if args.smoke else [n for n in names if "+ckpt" not in n], log),
              "models": {}}
    fit_tokens = (64, 128, 192) if args.smoke else FIT_TOKENS
    for name, shape in shapes.items():
        log(f"{name}:")
        meas = measure_shape(shape, names, True, fit_tokens, log=log)
        train = [n for n in names if kinds[n] == "train" and n in meas]
        targets = tuple(SEQ * mb for mb in MICRO_BATCHES) if not args.smoke else (96, 160)
        direct = measure_shape(shape, train, True, targets, log=log)
        result["models"][name] = {"shape": shape, "measured": _jsonable(meas), "measured_at_targets": _jsonable(direct),
                                  "plan": _jsonable(plan_for(name, shape, meas, kinds, direct))}
    result["whole_model_check"] = whole_model_check(args, names, kinds, log)
    result["failed"] = dict(FAILED)
    return result


def whole_model_check(args, names, kinds, log) -> dict:
    """Extrapolation from L = 1, 2 blocks against a whole model measured directly (real tensors)."""
    shape = dict(TINY["tiny"] if args.smoke else SHAPES["llama-2-7b"])
    L = 4 if args.smoke else 8
    fit_tokens = (64, 128, 192) if args.smoke else FIT_TOKENS
    T = 160 if args.smoke else 96
    out = {"shape": shape, "layers": L, "tokens": T, "phases": {}}
    check = [n for n in names if n in args.check] if args.check else [n for n in names if "+ckpt" not in n]
    for ph in check:
        fn, kind = phases()[ph]
        meas = measure_shape(shape, [ph], True, fit_tokens, log=lambda *_: None)
        pm = per_block_model(meas[ph], kind)
        t = T if kind != "none" else 0
        pred = predict(pm, L, t)
        t0 = time.perf_counter()
        real = fn(shape, L, T, 1, False)["peak"]
        out["phases"][ph] = {"predicted": pred, "measured": real, "rel_error": (pred - real) / real}
        log(f"  whole {L}-layer {ph:30s} predicted {pred / GB:.3f} GB measured {real / GB:.3f} GB "
            f"({(pred - real) / real:+.2%}, {time.perf_counter() - t0:.0f} s)")
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isinf(x):
        return None
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes only (seconds): the test's mode")
    ap.add_argument("--render", action="store_true", help="write docs/scale.md from the JSON and exit")
    ap.add_argument("--only", nargs="*", help="phases by name (each with its +ckpt variant)")
    ap.add_argument("--check", nargs="*", help="phases of the whole-model check (default: every phase but +ckpt)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "scale.md")
    args = ap.parse_args(argv)
    json_path = args.out / "scale.json"
    if not args.render:
        args.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
        result["provenance"]["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(json_path, result)
        plot(result, args.out / "scale.png")
    render(json.loads(json_path.read_text()), args.doc)
    return 0


# ----------------------------------------------------------------------------------------------
# docs/scale.md: the text around the generated tables is kept; the tables are rewritten
# ----------------------------------------------------------------------------------------------
BEGIN = "<!-- generated by bench/memory_at_scale.py --render: do not edit below -->"
END = "<!-- end of generated part -->"


def _gb(b) -> str:
    return "-" if b is None else f"{b / GIB:,.1f}"


def tables(result: dict) -> str:
    """The generated part of docs/scale.md, from the JSON."""
    lines = []
    p = result["provenance"]
    lines.append(f"Measured at commit `{p.get('commit')}` on {p.get('cpu_model')}, torch {p.get('torch')}, "
                 f"transformers {p.get('transformers')}, {p.get('threads')} thread(s), seed {p.get('seed')}; "
                 f"{p.get('seconds', '?')} s. GiB = 2^30 bytes.\n")
    for name, m in result["models"].items():
        plan, sh = m["plan"], m["shape"]
        lines.append(f"### {name} ({sh['layers']} layers, hidden {sh['hidden_size']}, intermediate "
                     f"{sh['intermediate_size']}, heads {sh['num_attention_heads']}/{sh['num_key_value_heads']}, "
                     f"vocab {sh['vocab_size']})\n")
        lines.append("| workflow | per block GiB (+ per 1K tokens) | fixed GiB | 1 GPU, mb 1 | 1 GPU, mb 4 | "
                     "8 GPUs FSDP, mb 1 | smallest setup, mb 1 | smallest setup, mb 4 | 64-256 token fit at mb 4 |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for w, row in plan.items():
            mod = row["model"]
            blk = f"{_gb(mod['block']['intercept'])} (+{_gb(mod['block']['slope'] * 1000)})"
            fix = _gb(mod["fixed"]["intercept"])
            if "mb1" in row:
                d1, d4 = row["mb1"]["per_device_bytes"], row["mb4"]["per_device_bytes"]
                err = (row.get("small_token_fit_error") or {}).get(str(row["mb4"]["tokens"]))
                lines.append(f"| {w} | {blk} | {fix} | {_gb(d1['1'])} | {_gb(d4['1'])} | {_gb(d1['8'])} | "
                             f"{row['mb1']['fits'] or 'none of these'} | {row['mb4']['fits'] or 'none of these'} | "
                             f"{'-' if err is None else f'{err:+.1%}'} |")
            else:
                one = row["single"]
                lines.append(f"| {w} | {blk} | {fix} | {_gb(one['bytes'])} | | | "
                             f"{one['fits'] or 'more than one 80 GB GPU'} (one device only) | | |")
        lines.append("")
    fits = [r.get("small_token_fit", r["model"]) for m in result["models"].values() for r in m["plan"].values()]
    worst = max((max(r["fixed"]["max_residual_rel"], r["block"]["max_residual_rel"]) for r in fits), default=0)
    lines.append(f"Affine fits in tokens (64, 128, 256; calibration and GPTQ 64, 256): largest residual {worst:.2e} "
                 "of the fitted part. The last column: the whole-model peak that fit predicts at 8192 tokens against "
                 "the blocks measured at 8192 tokens (what the plan uses).\n")
    if result.get("failed"):
        lines.append("**Not measured** (failed): " + "; ".join(f"{k}: {v}" for k, v in result["failed"].items()) + "\n")
    v = result["verify"]
    lines.append("**Fake against real** (tiny shape, 2 blocks, 32 tokens; equal within "
                 f"{VERIFY_TOLERANCE} bytes): " + ", ".join(
                     f"{k} {'equal' if x['equal'] else 'DIFFERENT'} ({x['fake_peak'] - x['real_peak']:+d} B)"
                     for k, x in v.items()) + ".\n")
    wc = result.get("whole_model_check") or {}
    if wc.get("phases"):
        lines.append(f"**Whole model check**: a {wc['layers']}-layer model at {wc['shape']['hidden_size']}/"
                     f"{wc['shape']['intermediate_size']} widths, {wc['tokens']} tokens, real tensors, against "
                     "the per-block extrapolation:\n")
        lines.append("| phase | predicted GiB | measured GiB | error |")
        lines.append("|---|---|---|---|")
        for ph, x in wc["phases"].items():
            lines.append(f"| {ph} | {x['predicted'] / GIB:.3f} | {x['measured'] / GIB:.3f} | {x['rel_error']:+.2%} |")
        lines.append("")
    return "\n".join(lines)


def render(result: dict, doc: Path) -> None:
    """Rewrite the generated part of ``doc`` (between BEGIN and END; appended when absent)."""
    text = doc.read_text() if doc.exists() else "# Memory at scale\n\n"
    body = f"{BEGIN}\n\n{tables(result)}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + body + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    with atomic_path(doc) as tmp:
        Path(tmp).write_text(text)


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    work = [w for w in next(iter(result["models"].values()))["plan"] if "mb1" in
            next(iter(result["models"].values()))["plan"][w] and "+ckpt" not in w]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    x = range(len(models))
    for w in work:
        ys = [result["models"][m]["plan"][w]["mb1"]["per_device_bytes"]["1"] / GIB for m in models]
        ax.plot(x, ys, marker="o", label=w)
    for c in CARDS_GB:
        ax.axhline(c * USABLE, color="grey", lw=0.8, ls="--")
        ax.text(len(models) - 1, c * USABLE, f" {c} GB card", va="bottom", ha="right", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_xticks(list(x), models)
    ax.set_ylabel("peak GiB on one GPU (seq 2048, micro-batch 1, no checkpointing)")
    ax.set_title("salientft memory per workflow (measured per block, extrapolated)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
