"""Host syncs per optimizer step: every method holds to a bound that does not grow with the model.

On an accelerator an op whose result size or value the host needs (``.item()``, ``nonzero``,
boolean-mask indexing, ``bincount``, ``unique``, ...) waits for the device's queue to drain; one
such op per layer or per tensor turns a step into hundreds of stalls. This test runs one
optimizer step of each registered method through the code path ``salientft train`` uses
(``train()``: the method's preparation, the SalientTrainer, its callbacks and optimizer) on CPU,
and counts, with a ``TorchDispatchMode`` (aten ops) and a ``TorchFunctionMode`` (``tolist``,
``numpy``, ``cpu``), the operations that would synchronise on CUDA. Counting is on the CPU, so no
GPU is needed. Where the code picks its path by device, the test runs the accelerator's on CPU
tensors: GMT's device engine (``gmt.strategies._HOST_ENGINE_DEVICES`` emptied) and the weight noise's
device Philox (``noise._HOST_NOISE_DEVICES`` emptied). Host-only reads are not syncs and are
allowed by name (``HOST_ONLY``). The count must be the same with 2 and 4 layers, and at most
``BEYOND_LORA`` above LoRA's in the same settings (the target: 1, must: 4; docs/gpu.md).
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from salientft import methods
from salientft.config import TrainConfig
from salientft.models import tiny_random_llama, tiny_tokenizer
from salientft.train import train

aten = torch.ops.aten
# aten ops that read a device value on the host (or size their output by one) on CUDA
_SYNC_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.nonzero.out, aten.masked_select.default,
    aten.bincount.default, aten._unique.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.equal.default, aten.is_nonzero.default,
    aten.repeat_interleave.Tensor, aten.allclose.default, aten.nonzero_numpy.default,
}
_BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                 aten._index_put_impl_.default}
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__array__}
BEYOND_LORA = 1
GRAD_ACCUM = 2
# LoRA's own: transformers' Llama checks once per forward whether the causal mask can be skipped
# (``padding_mask.all()`` read on the host); the training loop adds none (checks at the log step).
LORA_BOUND = GRAD_ACCUM
# (module, function): reads of tensors that live on the CPU on every device, so no device sync
HOST_ONLY = {
    ("salientft.ops.noise", "draw_seed"),  # the noise seed: torch's CPU generator, as checkpointing restores it
}


def _host_only() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if (f.f_globals.get("__name__"), f.f_code.co_name) in HOST_ONLY:
            return True
        f = f.f_back
    return False


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that would synchronise on CUDA, by name."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def _add(self, name):
        if not _host_only():
            self.counts[name] = self.counts.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            self._add(str(func.overloadpacket.__name__))
        elif func in _BOOL_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self._add(f"{func.overloadpacket.__name__}[bool]")
        return func(*args, **kwargs)


class HostReads(TorchFunctionMode):
    """Counts the Python-level reads of a whole tensor on the host (a device-to-host copy on CUDA)."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.counter._add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _step_counter():
    """A TrainerCallback counting the syncs of each optimizer step (step begin to step end)."""
    from transformers import TrainerCallback

    class Count(TrainerCallback):
        def __init__(self):
            self.steps: list[dict[str, int]] = []
            self._modes = None

        def on_step_begin(self, args, state, control, **kw):
            counter = SyncCounter()
            self._modes = (counter, HostReads(counter))
            for m in self._modes:
                m.__enter__()

        def on_step_end(self, args, state, control, **kw):
            for m in reversed(self._modes):
                m.__exit__(None, None, None)
            self.steps.append(self._modes[0].counts)
            self._modes = None

    return Count()


# every registered method with its defaults, then the settings that take other code paths
CASES = [(n, {}) for n in methods.names()] + [
    ("gmt", {"mask_granularity": "global", "mask_mode": "strict"}),
    ("gift-sw", {"noise": "output"}), ("gift-sw", {"noise": "none"}), ("gift-sw", {"keep_noise": True}),
]


def _syncs(tmp_path, name, layers, extra) -> dict[str, int]:
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(16)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(model="tiny-random-llama", data=str(data), output=str(tmp_path / f"{name}-{layers}"), method=name,
                    max_steps=2, batch_size=2, grad_accum=GRAD_ACCUM, max_length=64, dtype="fp32", lr=1e-3,
                    warmup_ratio=0.0, metric="magnitude", n_salient=4, lora_r=2, eval_before=False,
                    logging_steps=100, save_steps=0)
    cfg = TrainConfig(**methods.get(name).only_used(settings), **extra)
    counter = _step_counter()
    train(cfg, model=tiny_random_llama(seed=0, num_hidden_layers=layers), tokenizer=tiny_tokenizer(),
          callbacks=[counter])
    assert len(counter.steps) == 2
    return counter.steps[-1]  # the second step: optimizer state exists, nothing is first-time


@pytest.fixture(scope="module")
def lora_syncs(tmp_path_factory):
    counts = _syncs(tmp_path_factory.mktemp("lora"), "lora", 2, {})
    assert sum(counts.values()) <= LORA_BOUND, f"LoRA: {counts} host syncs per optimizer step"
    return sum(counts.values())


@pytest.mark.parametrize("name,extra", CASES, ids=[f"{n}{'-' + '-'.join(map(str, e.values())) if e else ''}"
                                                   for n, e in CASES])
def test_host_syncs_per_step_do_not_grow_with_layers(tmp_path, monkeypatch, lora_syncs, name, extra):
    import salientft.gmt.strategies as gmt
    import salientft.ops.noise as noise

    monkeypatch.setattr(gmt, "_HOST_ENGINE_DEVICES", ())  # GMT's accelerator engine
    monkeypatch.setattr(noise, "_HOST_NOISE_DEVICES", ())  # the accelerators' noise path
    two, four = _syncs(tmp_path, name, 2, extra), _syncs(tmp_path, name, 4, extra)
    assert two == four, f"{name}: syncs grow with the number of layers: 2 layers {two}, 4 layers {four}"
    assert sum(two.values()) <= lora_syncs + BEYOND_LORA, (
        f"{name}: {two} host syncs per optimizer step, LoRA {lora_syncs} (+{BEYOND_LORA} allowed)")


def test_the_counter_sees_what_syncs():
    """The counter counts the ops this test exists to catch (so a pass means something)."""
    counter = SyncCounter()
    x = torch.tensor([0.0, 1.0, 2.0])
    with counter, HostReads(counter):
        int(x.sum()), x.nonzero(), x[x > 0], torch.bincount(x.long()), x.tolist()
        x.masked_fill_(x > 1, 0)  # elementwise: no sync
        x[torch.tensor([0, 2])]  # integer index: no sync
    assert counter.counts == {"_local_scalar_dense": 1, "nonzero": 1, "index[bool]": 1, "bincount": 1, "tolist": 1}
    from salientft.ops.noise import draw_seed

    with counter:
        draw_seed()  # host-only, allowed by name
    assert counter.counts["_local_scalar_dense"] == 1


def test_tokens_are_counted_exactly_between_logs(tmp_path, monkeypatch):
    """The token count read at the logging step (and at the end) is the sum of every consumed
    batch's attention mask, with logs every 2 steps of 5 (the last step unlogged)."""
    from salientft.data.chat import ChatCollator

    seen = []
    real = ChatCollator.__call__

    def recording(self, features):
        batch = real(self, features)
        seen.append(int(batch["attention_mask"].sum()))
        return batch

    monkeypatch.setattr(ChatCollator, "__call__", recording)
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(model="tiny-random-llama", data=str(tmp_path / "d.jsonl"), output=str(tmp_path / "o"),
                      method="full", max_steps=5, batch_size=2, grad_accum=2, max_length=64, dtype="fp32",
                      lr=1e-3, warmup_ratio=0.0, eval_before=False, logging_steps=2, save_steps=0)
    metrics = train(cfg, model=tiny_random_llama(seed=0), tokenizer=tiny_tokenizer())
    assert metrics["steps"] == 5 and len(seen) >= 10
    assert metrics["tokens_seen"] == sum(seen[:10]) > 0  # 5 steps x 2 micro-batches (the loader may read ahead)
