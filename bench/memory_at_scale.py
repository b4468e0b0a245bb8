"""A memory plan from 7B to 70B: the peak bytes of each salientft phase, counted on one and two
decoder blocks of the real Llama shapes, extrapolated to the whole model and to N GPUs.

    .venv/bin/python bench/memory_at_scale.py              # the plan: docs/results/scale.{json,md,png}
    .venv/bin/python bench/memory_at_scale.py --update --only gmt checkpoint   # re-measure some phases, keep the rest
    .venv/bin/python bench/memory_at_scale.py --smoke --out /tmp/scale   # tiny shapes, seconds (the test)
    PYTHONPATH=src .venv/bin/python scripts/render_docs.py  # docs/scale.md quotes the report's tables

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
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from _machine import machine_info  # bench/_machine.py
from lib.models import llama_built_in  # bench/lib
from lib.provenance import git_state
from lib.report import write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


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
    "gmt strict": ("gmt", False, {"mask": {"mode": "strict"}}),
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
# (the RNG states saved by checkpointing, a lifted constant): every phase measured equal (0 bytes) at a86b746
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

    def forget(self, tensors) -> None:
        """Stop counting the storages of ``tensors`` (moved off the device, or dropped by their owner)."""
        self._sweep()
        for t in tensors:
            key = t.untyped_storage()._cdata
            if key in self.live:
                self.now -= self.live.pop(key)[1]
                self._made_by.pop(key, None)

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
    import salientft.gift.adapter as adapter
    import salientft.gmt.strategies as gmt
    import salientft.quant.gptq as gptq

    import salientft.ops.grid as grid

    cpu_budget = grid.SEARCH_CHUNK_ELEMS["cpu"]
    grid.SEARCH_CHUNK_ELEMS["cpu"] = grid.DEVICE_SEARCH_CHUNK_ELEMS  # the clip search's GPU chunks (fewer ops)
    saved.append((gmt, "_shards", gmt._shards))
    gptq.range = _first_iterations  # GPTQ's column loops: the first iterations hold the largest temporaries
    saved.append((gptq, "range", range))
    gmt._shards = _unsharded_or(gmt._shards)
    # the base fingerprint hashes each weight's bytes on the host (a GPU weight is copied there one
    # at a time: host memory, and a bf16 weight on the host is read in place): no data to hash here
    saved.append((adapter, "fingerprint_of", adapter.fingerprint_of))
    adapter.fingerprint_of = lambda names, weight: "fake"
    # transformers takes a fake tensor for a trace, and cannot read that the attention mask is all
    # ones, so it would build the T x T causal mask that a real run skips (SDPA's is_causal): here
    # fake tensors follow the real path (the plan's batches have no padding)
    import transformers.masking_utils as masking

    saved.append((masking, "is_tracing", masking.is_tracing))
    masking.is_tracing = lambda tensor=None, _real=masking.is_tracing: _real(None)
    saved.append((masking, "fast_all", masking.fast_all))
    masking.fast_all = lambda tensor: True
    import salientft.gmt.strict as strict  # strict mode reads how many entries each tensor masked

    saved.append((strict.StrictSnapshot, "__init__", strict.StrictSnapshot.__init__))
    strict.StrictSnapshot.__init__ = _fake_strict_snapshot_init
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


STRICT_RATIO = {"ratio": None}  # the GMT mask ratio of the step being planned (set by prepared)


def _fake_strict_snapshot_init(self, masked, optimizer, host=True):
    """``gmt.strict.StrictSnapshot.__init__`` on fake tensors: the masked count of each tensor read
    as a real run reads it (per-tensor granularity: round(ratio x numel) entries, random values
    having no ties), the same entries gathered."""
    from salientft.gmt.strict import _Positions, _targets

    self.entries = []
    for p, m in masked:
        c = round(STRICT_RATIO["ratio"] * m.numel())
        pos = _Positions(m, c)
        if c:
            self.entries.append((m, c, [(t, pos.gather(t)) for t in _targets(p, optimizer.state)]))


def _first_iterations(*args):
    """``range`` for GPTQ's loops on fake tensors: the first block of columns (whose update of the
    remaining columns is the largest temporary) and the first two columns of a block. Every later
    iteration allocates the same shapes or smaller ones and the allocations after the loops do not
    depend on it, so the peak is the same while a 70B layer's 28672 columns cost no time; the
    real-against-fake check runs the full loops on real tensors."""
    r = range(*args)
    return r[:1] if len(args) == 3 else r[:2]


def _unsharded_or(shards):
    """GMT's ``salientft.gmt.strategies._shards`` (which tells plain tensors by their exact type) for fake tensors."""
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
    import salientft.gmt.strategies as gmt
    import salientft.ops.noise as noise

    gmt._HOST_ENGINE_DEVICES = ()
    noise._HOST_NOISE_DEVICES = ()
    os.environ["SALIENTFT_NOISE_GENERATOR"] = "torch"  # the GPU default: normal_ in blocks of up to 16M


def _bytes_of(tensors) -> int:
    """Bytes of ``tensors``, each storage counted once."""
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
    kw = {k: v for k, v in shape.items() if k != "layers"}
    return llama_built_in({**kw, "num_hidden_layers": layers, "max_position_embeddings": 4096}, dtype, seed=SEED)


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

    cfg = QuantizeConfig(bits=bits, n_salient=n_salient, group_size=group_size, quantizer="rtn")
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
    if cfg.mask is not None:  # GMT's mask, in the order GradientMaskCallback runs it around the step
        from salientft.gmt import GradientMask

        mask, held = GradientMask.from_config(model, cfg.mask), {}
        STRICT_RATIO["ratio"] = cfg.mask.ratio

        def mask_and_snapshot(*_):  # a step hook must return None
            held["stats"] = mask._apply_pending()  # kept until the next log, as the callback does
            held["snapshot"] = mask.snapshot_(opt)  # strict mode: the masked entries only

        def restore(*_):
            mask.restore_(held.pop("snapshot"))

        opt.register_step_pre_hook(mask_and_snapshot)
        opt.register_step_post_hook(restore)
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
        weights = _bytes_of(list(model.parameters()) + list(model.buffers()))
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


def _whole_model_phase(work, shape, layers, tokens, batch, fake) -> dict:
    """Bytes resident and at peak while ``work(model, batches)`` runs on the whole bf16 model,
    resident on the device, with the calibration batches (what it returns is dropped at once)."""
    with fake_mode(fake):
        model = build_model(shape, layers, torch.bfloat16)
        batches = _calibration_batches(shape, tokens, batch)
        tr = _tracked(model, fake)
        resident = tr.live_bytes()
        with tr:
            work(model, batches)
        return {"resident": resident, "peak": tr.peak}


def phase_calibration(shape, layers, tokens, batch, fake) -> dict:
    """GIFT-SW's calibration: activation statistics of every target over the batches."""
    from salientft.calibration import collect_activation_stats

    return _whole_model_phase(lambda model, batches: collect_activation_stats(model, batches, progress=False),
                              shape, layers, tokens, batch, fake)


def phase_gptq(bits, shape, layers, tokens, batch, fake) -> dict:
    """``salientft.quantize`` with GPTQ (salient columns last, scores from the calibration)."""
    from salientft.quant.model import quantize

    return _whole_model_phase(
        lambda model, batches: quantize(model, bits, quantizer="gptq", calibration=batches, progress=False),
        shape, layers, tokens, batch, fake)


def _block_source(blocks, tracker: ByteTracker):
    """A block source (``salientft.calibration``'s protocol) standing for
    ``salientft.models.DiskBlocks``: ``load(i)`` gives block i new storages (read from the files onto
    the device), ``release`` takes them off the device (dropped, or kept in host memory once
    quantized), so the tracker counts what the GPU holds: one block at a time."""
    from salientft.calibration import ResidentBlocks

    class PlanBlocks(ResidentBlocks):
        def load(self, i):
            block = self.blocks[i]
            with torch.no_grad():
                for m in block.modules():
                    for k, p in list(m._parameters.items()):
                        if p is not None:
                            m._parameters[k] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
            return block

        def release(self, i, block, keep=True):
            tracker.forget(list(block.parameters()) + list(block.buffers()))

    return PlanBlocks(blocks)


def _outside_blocks(model) -> list:
    """The tensors of the modules outside the decoder blocks (what a block-by-block run keeps on the device)."""
    inside = {id(t) for t in (*model.model.layers.parameters(), *model.model.layers.buffers())}
    return [t for t in (*model.parameters(), *model.buffers()) if id(t) not in inside]


def phase_blockwise(quantize_bits, shape, layers, tokens, batch, fake) -> dict:
    """Block by block (``open_blockwise``'s way): calibration (``sequential_activation_stats``) or,
    given ``quantize_bits``, ``quantize(..., blocks=...)`` with GPTQ; the blocks start off the device."""
    from salientft.calibration import sequential_activation_stats
    from salientft.quant.model import quantize

    with fake_mode(fake):
        model = build_model(shape, layers, torch.bfloat16)
        batches = _calibration_batches(shape, tokens, batch)
        tr = ByteTracker(fake)
        tr.adopt(_outside_blocks(model))
        resident = tr.live_bytes()
        with tr:
            source = _block_source(model.model.layers, tr)
            if quantize_bits is None:
                stats = sequential_activation_stats(model, batches, blocks=source, progress=False)
                del stats
            else:
                quantize(model, quantize_bits, quantizer="gptq", calibration=batches, blocks=source, progress=False)
        return {"resident": resident, "peak": tr.peak}


# Checkpoints under FSDP2: the workflows whose save differs (GIFT-SW gathers its trained columns;
# full and GMT go through the Trainer's FULL_STATE_DICT)
CHECKPOINT_WORKFLOWS = ("gift-sw", "full", "gmt")


def phase_fsdp_checkpoint(workflow, shape, layers, tokens, batch, fake) -> dict:
    """What a checkpoint gathers, after one optimizer step (the optimizer state exists) with the
    gradients released. GIFT-SW (``Method.gather_trained`` overridden: ``save_checkpoint`` runs
    inside ``methods.sharding.gathered(model, trainable_only=True)``): every trainable parameter's
    full tensor at once on each rank's GPU; rank 0's host receives the same. The others (full,
    GMT): the Trainer's FULL_STATE_DICT, gathered parameter by parameter and offloaded to rank 0's
    host (accelerate's FSDP2 ``cpu_offload``): the GPU holds the largest parameter at once, the host
    the whole state dict. The sets of tensors are the prepared model's own, so a change of what a
    method trains changes the count; the gathering itself needs a process group and is not run."""
    from salientft import methods
    from salientft.methods.base import Method

    name, quantized, _ = STEPS[workflow]
    spec = methods.get(name, quantized=quantized)
    trained_only = type(spec).gather_trained is not Method.gather_trained
    with fake_mode(fake), ByteTracker(fake) as tr:
        torch.manual_seed(SEED)
        model, opt, trainable = prepared(workflow, shape, layers)
        ids = torch.randint(3, shape["vocab_size"], (batch, tokens))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
        state = tr.live_bytes()  # weights + optimizer state: what FSDP shards between steps
        params = [p for p in model.parameters() if p.requires_grad or not trained_only]
        sizes = [_bytes_of([p]) for p in params]
        gpu = sum(sizes) if trained_only else max(sizes)
        optimizer = _bytes_of([t for st in opt.state.values() for t in st.values()
                               if isinstance(t, torch.Tensor) and t.dim() > 0])
        return {"resident": state, "state_after": state, "peak": state + gpu, "gathered_gpu": gpu,
                "host_rank0": sum(sizes) + optimizer, "trained_only": trained_only, "trainable": trainable}


def phases() -> dict:
    """Phase name -> (function(shape, layers, tokens, batch, fake), its token counts: 'train' or 'calib')."""
    out = {"load": (phase_load, "none"), "calibration": (phase_calibration, "calib")}  # calib: 2 token counts
    for b in GPTQ_BITS:
        out[f"gptq {b}-bit"] = (lambda *a, b=b: phase_gptq(b, *a), "calib")
    out["calibration, block by block"] = (lambda *a: phase_blockwise(None, *a), "calib")
    out["gptq 4-bit, block by block"] = (lambda *a: phase_blockwise(4, *a), "calib")
    for w in STEPS:
        out[w] = (lambda *a, w=w: phase_step(w, False, *a), "train")
        out[f"{w} +ckpt"] = (lambda *a, w=w: phase_step(w, True, *a), "train")
    for w in CHECKPOINT_WORKFLOWS:
        out[f"{w} checkpoint (FSDP)"] = (lambda *a, w=w: phase_fsdp_checkpoint(w, *a), "ckpt")
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
            toks = {"none": tokens_list[:1], "ckpt": tokens_list[:1], "calib": tokens_list[:: len(tokens_list) - 1]}.get(kind, tokens_list)
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
    for key in ("resident", "state_after", "gathered_gpu", "host_rank0"):
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
    # max(., 0): a step whose peak is its state after the step (the optimizer's new states are the
    # last thing allocated) has no transient part
    return state / n + max(total - state, 0) + gathered


def checkpoint_per_device(model: dict, layers: int, n: int) -> float:
    """Peak per GPU while an FSDP checkpoint is written over ``n`` GPUs: the sharded state plus
    what the save gathers at once (one process: nothing is gathered)."""
    state = model["state_after"]["fixed"] + layers * model["state_after"]["block"]
    if n == 1:
        return state
    return state / n + model["gathered_gpu"]["fixed"] + layers * model["gathered_gpu"]["block"]


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
        if kind == "ckpt":
            host = pm["host_rank0"]["fixed"] + L * pm["host_rank0"]["block"]
            gpu = pm["gathered_gpu"]["fixed"] + L * pm["gathered_gpu"]["block"]
            row["checkpoint"] = {"per_device_bytes": {n: checkpoint_per_device(pm, L, n) for n in DEVICE_COUNTS},
                                 "gathered_gpu_bytes": gpu, "host_rank0_bytes": host,
                                 "fits": smallest_setup(lambda n: checkpoint_per_device(pm, L, n))}
        elif kind == "train":
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
    only = set(args.only) if args.only is not None else None
    names = [n for n in table if only is None or n in only or n.removesuffix(" +ckpt") in only
             or (table[n][1] == "ckpt" and "checkpoint" in only)]
    kinds = {n: table[n][1] for n in names}
    commit = (git_state()[0] or "unknown")[:7]
    result = {"machine": machine_info("cpu_model", "transformers", "peft"),
              "assumptions": {"seq_len": SEQ, "micro_batches": list(MICRO_BATCHES), "calibration": list(CALIB),
                              "cards_gib": list(CARDS_GB), "usable_fraction": USABLE,
                              "devices": list(DEVICE_COUNTS), "fit_tokens": list(FIT_TOKENS)},
              "verify": verify(names if args.smoke else [n for n in names if "+ckpt" not in n], log),
              "models": {}, "phase_commits": {n: commit for n in names}}
    fit_tokens = (64, 128, 192) if args.smoke else FIT_TOKENS
    for name, shape in shapes.items():
        log(f"{name}:")
        meas = measure_shape(shape, names, True, fit_tokens, log=log)
        train = [n for n in names if kinds[n] == "train" and n in meas]
        targets = tuple(SEQ * mb for mb in MICRO_BATCHES) if not args.smoke else (96, 160)
        direct = measure_shape(shape, train, True, targets, log=log)
        result["models"][name] = {"shape": shape, "measured": _jsonable(meas), "measured_at_targets": _jsonable(direct),
                                  "plan": _jsonable(plan_for(name, shape, meas, kinds, direct))}
    result["whole_model_check"] = whole_model_check(args, [n for n in names if kinds[n] != "ckpt"], kinds, log)
    result["failed"] = dict(FAILED)
    return result


def merged(old: dict, new: dict) -> dict:
    """``old`` (an earlier scale.json) with every phase ``new`` measured replaced, phase by phase,
    and each phase's commit kept in ``phase_commits`` (an old file without it: its provenance's)."""
    redone = set(new["phase_commits"])
    first = (old.get("provenance") or {}).get("commit") or "unknown"
    out = {**old, "machine": new["machine"], "assumptions": new["assumptions"], "seconds": new.get("seconds")}
    out["phase_commits"] = {**{n: first for m in old["models"].values() for n in m["plan"]},
                            **old.get("phase_commits", {}), **new["phase_commits"]}
    out["verify"] = {**old["verify"], **new["verify"]}
    out["failed"] = {**{k: v for k, v in old.get("failed", {}).items() if k not in redone}, **new["failed"]}
    for name, m in new["models"].items():
        o = old["models"].setdefault(name, {"shape": m["shape"], "measured": {}, "measured_at_targets": {}, "plan": {}})
        for key in ("measured", "measured_at_targets", "plan"):
            keep = {k: v for k, v in o[key].items() if k not in redone}
            o[key] = {k: (m[key].get(k) if k in m[key] else keep.get(k)) for k in _phase_order(keep, m[key])}
            o[key] = {k: v for k, v in o[key].items() if v is not None}
    out["models"] = old["models"]
    wc_old, wc_new = old.get("whole_model_check") or {}, new["whole_model_check"]
    out["whole_model_check"] = {**wc_new, "phases": {**{k: v for k, v in (wc_old.get("phases") or {}).items()
                                                        if k not in redone}, **wc_new["phases"]}}
    out.pop("provenance", None)
    return out


def _phase_order(a: dict, b: dict) -> list:
    """The phases of ``a`` and ``b`` in phases()' order (unknown ones last)."""
    order = list(phases())
    return sorted(set(a) | set(b), key=lambda k: order.index(k) if k in order else len(order))


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
    ap.add_argument("--only", nargs="*", help="phases by name (each with its +ckpt variant; 'checkpoint': the FSDP saves)")
    ap.add_argument("--update", action="store_true",
                    help="keep the phases of the existing scale.json that --only does not re-measure (each "
                         "phase's commit is recorded)")
    ap.add_argument("--check", nargs="*", help="phases of the whole-model check (default: every phase but +ckpt)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args(argv)
    stem = args.out / "scale"
    t0 = time.perf_counter()
    result = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.update and stem.with_suffix(".json").exists():
        result = merged(json.loads(stem.with_suffix(".json").read_text()), result)
    write_report(stem, result, tables(result), lambda: figure(result), dtype="bf16", seed=SEED, threads=args.threads)
    return 0


# ----------------------------------------------------------------------------------------------
# The report (docs/results/scale.md; docs/scale.md quotes its tables through scripts/render_docs.py)
# ----------------------------------------------------------------------------------------------
def _gb(b) -> str:
    return "-" if b is None else f"{b / GIB:,.1f}"


def _training_table(plan: dict) -> list[str]:
    lines = ["| workflow | per block GiB (+ per 1K tokens) | fixed GiB | 1 GPU, mb 1 | 1 GPU, mb 4 | "
             "8 GPUs FSDP, mb 1 | smallest setup, mb 1 | smallest setup, mb 4 | 64-256 token fit at mb 4 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w, row in plan.items():
        if "checkpoint" in row:
            continue
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
    return lines


def _checkpoint_table(result: dict) -> list[str]:
    lines = ["| model | checkpoint | gathered at once per GPU GiB | rank 0 host GiB | per GPU while saving, 2 GPUs | "
             "8 GPUs | smallest setup |", "|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        for w, row in m["plan"].items():
            if "checkpoint" in row:
                c = row["checkpoint"]
                d = c["per_device_bytes"]
                lines.append(f"| {name} | {w.removesuffix(' checkpoint (FSDP)')} | {_gb(c['gathered_gpu_bytes'])} | "
                             f"{_gb(c['host_rank0_bytes'])} | {_gb(d['2'])} | {_gb(d['8'])} | "
                             f"{c['fits'] or 'none of these'} |")
    return lines if len(lines) > 2 else []


def tables(result: dict) -> list[str]:
    """docs/results/scale.md's lines, from the JSON. Its tables, in order: one per model (training,
    calibration, GPTQ), the FSDP checkpoints, the whole-model check, the commit of each phase."""
    lines = ["# Memory plan (bench/memory_at_scale.py)", "",
             f"CPU {result['machine'].get('cpu_model')}, transformers {result['machine'].get('transformers')}; "
             f"{result.get('seconds', '?')} s (the last run). GiB = 2^30 bytes.", ""]
    for name, m in result["models"].items():
        sh = m["shape"]
        lines += [f"## {name} ({sh['layers']} layers, hidden {sh['hidden_size']}, intermediate "
                  f"{sh['intermediate_size']}, heads {sh['num_attention_heads']}/{sh['num_key_value_heads']}, "
                  f"vocab {sh['vocab_size']})", "", *_training_table(m["plan"]), ""]
    ck = _checkpoint_table(result)
    if ck:
        lines += ["## Checkpoints under FSDP2", "", *ck, ""]
    fits = [r.get("small_token_fit", r["model"]) for m in result["models"].values() for r in m["plan"].values()
            if "checkpoint" not in r]
    worst = max((max(r["fixed"]["max_residual_rel"], r["block"]["max_residual_rel"]) for r in fits), default=0)
    lines.append(f"Affine fits in tokens (64, 128, 256; calibration and GPTQ 64, 256): largest residual {worst:.2e} "
                 "of the fitted part. The last column of the training tables: the whole-model peak that fit predicts "
                 "at 8192 tokens against the blocks measured at 8192 tokens (what the plan uses).\n")
    if result.get("failed"):
        lines.append("**Not measured** (failed): " + "; ".join(f"{k}: {v}" for k, v in result["failed"].items()) + "\n")
    v = result["verify"]
    lines.append("**Fake against real** (tiny shape, 2 blocks, 32 tokens; equal within "
                 f"{VERIFY_TOLERANCE} bytes): " + ", ".join(
                     f"{k} {'equal' if x['equal'] else 'DIFFERENT'} ({x['fake_peak'] - x['real_peak']:+d} B)"
                     for k, x in v.items()) + ".\n")
    wc = result.get("whole_model_check") or {}
    if wc.get("phases"):
        lines += [f"**Whole model check**: a {wc['layers']}-layer model at {wc['shape']['hidden_size']}/"
                  f"{wc['shape']['intermediate_size']} widths, {wc['tokens']} tokens, real tensors, against "
                  "the per-block extrapolation:", "", "| phase | predicted GiB | measured GiB | error |",
                  "|---|---|---|---|"]
        for ph, x in wc["phases"].items():
            lines.append(f"| {ph} | {x['predicted'] / GIB:.3f} | {x['measured'] / GIB:.3f} | {x['rel_error']:+.2%} |")
        lines.append("")
    commits = result.get("phase_commits") or {}
    if commits:
        lines += ["**Code measured**: each phase was measured on the code of the commit named (the provenance "
                  "line below names the last run's).", "", "| phase | commit |", "|---|---|",
                  *(f"| {k} | `{c}` |" for k, c in commits.items()), ""]
    return lines


def figure(result):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    first = next(iter(result["models"].values()))["plan"]
    work = [w for w in first if "mb1" in first[w] and "+ckpt" not in w]
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
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
