"""fp16 and bf16 alike: every method trains fp32 master values, and an fp16 run steps through a GradScaler.

On CUDA the Trainer (accelerate) runs fp16 under autocast with ``torch.amp.GradScaler("cuda")``,
whose ``unscale_`` refuses fp16 gradients ("Attempting to unscale FP16 gradients"). On the CPU
accelerate uses neither, so the ``fp16_like_cuda`` fixture gives the CPU run the same path: fp16
autocast and ``torch.amp.GradScaler("cpu")``, which applies the same rule. On a CUDA test device the
real scaler runs.
"""
import json

import pytest
import torch

from salientft import methods
from salientft.config import TrainConfig
from salientft.train import train


def jsonl(path, n=24):
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture
def fp16_like_cuda(monkeypatch, device):
    """The accelerators of the runs in this test, each with the GradScaler it uses (CPU: made to
    behave as on CUDA, see the module docstring)."""
    import accelerate

    made = []
    init = accelerate.Accelerator.__init__

    def patched(self, *a, **kw):
        init(self, *a, **kw)
        if self.state.mixed_precision == "fp16" and self.device.type == "cpu":
            self.native_amp = True  # fp16 autocast around the model's forward
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        made.append(self)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", patched)
    return made


class GradDtypes:
    """A TrainerCallback recording the dtypes of the trainable parameters and of the gradients the
    optimizer applies (after the scaler has unscaled them), and which parameters moved."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                self.params = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
                self.begin = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                self.grads = set()

            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                self.grads |= {p.grad.dtype for p in model.parameters() if p.grad is not None}

            def on_train_end(self, args, state, control, model=None, **kw):
                self.moved = sum(not torch.equal(self.begin[n], p.detach()) for n, p in model.named_parameters()
                                 if n in self.begin)

        return _Recorder()


CASES = [
    ("gift-sw", False, {"noise": "output", "metric": "gift"}),  # weight noise: the same columns, slower on a CPU
    ("salient", False, {}),
    ("full", False, {}),
    ("full", False, {"noise": "weight", "target_modules": ["down_proj"]}),  # NoisyLinear
    ("gmt", False, {}),
    ("lora", False, {}),
    ("dora", False, {}),
    ("gift-sw", True, {}),
    ("salient", True, {}),
    ("ste", True, {}),
    ("lora", True, {}),
]


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    from salientft.models import tiny_random_llama, tiny_tokenizer
    from salientft.quant.model import quantize, save_quantized

    d = tmp_path_factory.mktemp("q4")
    model = tiny_random_llama(seed=0)
    quantize(model, bits=4, quantizer="rtn", n_salient=4, metric="magnitude")
    save_quantized(model, d, tokenizer=tiny_tokenizer(), base_model="tiny-random-llama")
    return d


@pytest.mark.parametrize("name,quantized,extra", CASES,
                         ids=[f"{n}{'-quantized' if q else ''}{'-' + e['noise'] if 'noise' in e else ''}"
                              for n, q, e in CASES])
def test_fp16_run_trains_fp32_masters_through_the_grad_scaler(tmp_path, device, fp16_like_cuda, quantized_dir,
                                                              name, quantized, extra):
    settings = dict(model="tiny-random-llama", data=jsonl(tmp_path / "d.jsonl"), output=str(tmp_path / "run"),
                    method=name, quantized=str(quantized_dir) if quantized else None, max_steps=2, batch_size=4,
                    max_length=64, dtype="fp16", lr=1e-3, warmup_ratio=0.0, metric="magnitude", n_salient=4,
                    lora_r=2, calib_samples=8, eval_before=False, device=str(device))
    cfg = TrainConfig(**{**methods.get(name, quantized=quantized).only_used(settings), **extra})
    rec = GradDtypes()
    result = train(cfg, callbacks=[rec])
    assert result["steps"] == 2
    assert rec.params and set(rec.params.values()) == {torch.float32}, rec.params
    assert rec.grads == {torch.float32}
    scaler = fp16_like_cuda[-1].scaler
    assert scaler is not None and scaler.is_enabled()
    if device.type == "cpu":  # our scaler (init 2^10): both steps were taken, none skipped for an overflow
        assert scaler.get_scale() == scaler._init_scale and int(scaler._growth_tracker) == 2
    assert rec.moved > 0  # (accelerate's, on a GPU, starts at 2^16 and may skip a first step)


def test_the_scaler_refuses_fp16_gradients():
    """What fp16 trainable columns met before: the guard the test above passes through."""
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((w.float() * 2).sum()).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(opt)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gift_sw_keeps_fp32_columns_in_any_16_bit_dtype(tmp_path, dtype):
    from salientft.models import resolve_dtype, tiny_random_llama
    from salientft.train import prepare_model

    cfg = TrainConfig(model="tiny-random-llama", data=jsonl(tmp_path / "d.jsonl"), method="salient", dtype=dtype,
                      metric="magnitude", n_salient=4, device="cpu")
    assert cfg.gift_config().fp32_salient
    model = prepare_model(tiny_random_llama(seed=0, dtype=resolve_dtype(dtype)), cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_peft_route_on_an_fp16_base_unscales(device):
    """GiftSWConfig (salientft's PEFT tuner) on an fp16 model: fp32 columns, one scaled step."""
    import peft

    from salientft.models import tiny_random_llama
    from salientft.peft import GiftSWConfig

    model = tiny_random_llama(seed=0, dtype=torch.float16).to(device)
    model = peft.get_peft_model(model, GiftSWConfig(n_salient=4, metric="magnitude", noise="none"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10)
    ids = torch.randint(3, 200, (2, 16), device=device)
    with torch.autocast(device.type, dtype=torch.float16):
        loss = model(input_ids=ids, labels=ids).loss
    before = [p.detach().clone() for p in trainable]
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # raises on fp16 gradients
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainable))
