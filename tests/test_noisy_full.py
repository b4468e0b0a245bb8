"""Full fine-tuning (and GMT) with GIFT-SW's noise: NoisyLinear's forward, gradients and noise scale,
what its backward keeps, the dense methods' wrapping, a tiny training run and the refusals.

Everything is fp32. Tolerances of 1e-5 (relative and absolute) compare the same products summed in
another order (the layer multiplies the noisy weight chunk by chunk, the references in one GEMM):
in fp32 that moves results by ~1e-7 relative on these sizes, while the noise itself (std 0.025-0.3
against weights below 0.125) moves them by 1e-2 or more, which those tests also assert, so a
missing noise term cannot pass within the tolerance.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import suite_device
from salientft import methods
from salientft.config import TrainConfig
from salientft.gift.noisy_dense import (
    NoisyLinear,
    apply_dense_noise,
    noisy_layers,
    plain_layers,
)
from salientft.models import tiny_random_llama, tiny_tokenizer
from salientft.ops.grid import quantize_rows
from salientft.ops.noise import draw_seed, noisy_weight, output_noise_z
from salientft.targets import find_target_modules

OUT, IN = 48, 64
DEVICE = suite_device()
TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32, other summation order only (module docstring)


def make_layer(kind="linear", bias=True, std=0.05, noise="weight", keep_noise=False, seed=0):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=bias) if kind == "linear" else Conv1D(OUT, IN)  # Conv1D: weight (in, out)
    base.to(DEVICE)  # seeded on the CPU: the same weights on every device
    layer = NoisyLinear(base, torch.linspace(std / 2, std, OUT, device=DEVICE), noise=noise, keep_noise=keep_noise)
    return base, layer


def weight_of(layer) -> torch.Tensor:
    return layer.weight.detach().t() if layer.is_conv1d else layer.weight.detach()


def standard_normal(seed: int) -> torch.Tensor:
    """z ~ N(0, 1) that ops.noise draws for ``seed`` on an (OUT, IN) layer: the noisy weight of a
    zero weight with unit scale and no salient column."""
    zero = torch.zeros(OUT, IN, device=DEVICE)
    return noisy_weight(zero, zero[:, :0], torch.empty(0, dtype=torch.long, device=DEVICE), torch.ones(OUT, device=DEVICE),
                        seed, torch.float32)


def seed_after(torch_seed: int) -> int:
    """The noise seed a training forward draws right after ``torch.manual_seed(torch_seed)``."""
    torch.manual_seed(torch_seed)
    return draw_seed()


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True)])
@pytest.mark.numerics
def test_train_forward_adds_the_seeded_noise_and_eval_is_the_plain_layer(kind, bias, device):
    base, layer = make_layer(kind, bias)
    x = torch.randn(3, 5, IN, device=device)
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    z = standard_normal(seed_after(7))
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05  # N(0, 1)
    w = weight_of(layer)
    ref = F.linear(x, w + layer.noise_std[:, None] * z, layer.bias)
    torch.testing.assert_close(y, ref, **TOL)
    # the same through the reference noisy weight of ops.noise with an empty salient index
    empty = torch.empty(0, dtype=torch.long, device=device)
    torch.testing.assert_close(y, F.linear(x, noisy_weight(w, w[:, :0], empty, layer.noise_std, seed_after(7),
                                                           torch.float32), layer.bias), **TOL)
    plain = base(x)
    assert (y - plain).abs().max() > 1e-2  # the noise is really there
    torch.manual_seed(8)
    assert not torch.allclose(layer(x), y)  # fresh noise every forward

    layer.eval()
    state = torch.get_rng_state()
    assert torch.equal(layer(x), plain)  # exactly the wrapped layer's own forward
    assert torch.equal(torch.get_rng_state(), state)  # no seed drawn in eval


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True)])
@pytest.mark.parametrize("keep_noise", [False, True])
@pytest.mark.numerics
def test_gradients_match_autograd_through_the_explicit_noisy_weight(kind, bias, keep_noise, device):
    _, layer = make_layer(kind, bias, std=0.3, keep_noise=keep_noise)
    layer.train()
    x = torch.randn(4, 7, IN, requires_grad=True, device=device)
    g = torch.randn(4, 7, OUT, device=device)
    torch.manual_seed(123)
    (layer(x) * g).sum().backward()

    # Reference: autograd through W + noise with the same noise (same torch seed), all in fp32.
    empty = torch.empty(0, dtype=torch.long, device=device)
    w0 = weight_of(layer)
    noise = noisy_weight(w0, w0[:, :0], empty, layer.noise_std, seed_after(123), torch.float32) - w0
    w_ref = w0.clone().requires_grad_(True)
    b_ref = layer.bias.detach().clone().requires_grad_(True) if bias else None
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, w_ref + noise, b_ref) * g).sum().backward()

    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    grad_w = layer.weight.grad.t() if layer.is_conv1d else layer.weight.grad
    assert layer.weight.grad.shape == layer.weight.shape
    torch.testing.assert_close(grad_w, w_ref.grad, **TOL)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b_ref.grad, **TOL)
    # backward used the noisy weight, not W: the noise-free input gradient is far off
    assert (x.grad - g @ w0).abs().max() > 1e-2


def test_keep_noise_gives_bit_identical_outputs_and_gradients(device):
    results = []
    for keep in (False, True):
        _, layer = make_layer(std=0.2, keep_noise=keep)
        layer.train()
        x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1), requires_grad=True).to(device)
        torch.manual_seed(9)
        y = layer(x)
        (y * torch.arange(OUT, device=device)).sum().backward()
        results.append((y.detach(), x.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("keep_noise", [False, True])
def test_backward_keeps_no_out_by_in_tensor_unless_keep_noise(keep_noise, device):
    base, layer = make_layer(std=0.1, keep_noise=keep_noise)
    layer.train()
    x = torch.randn(2, 9, IN, requires_grad=True, device=device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    big = [t for t in saved if t.numel() >= OUT * IN
           and t.untyped_storage().data_ptr() != base.weight.untyped_storage().data_ptr()]
    assert len(big) == (1 if keep_noise else 0), [tuple(t.shape) for t in big]
    y.sum().backward()
    assert base.weight.grad is not None and base.weight.grad.shape == (OUT, IN)


@pytest.mark.numerics
def test_output_noise_is_gift_sws_output_noise_over_all_inputs(device):
    base, layer = make_layer(noise="output", std=0.2)
    x = torch.randn(3, 4, IN, device=device)
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    xi = output_noise_z(draw_seed(), 12, OUT, device).view(3, 4, OUT)  # the seeded draw of that forward
    ref = base(x) + xi * x.norm(dim=-1, keepdim=True) * layer.noise_std
    torch.testing.assert_close(y, ref, **TOL)
    assert (y - base(x)).abs().max() > 1e-2
    layer.eval()
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.numerics
def test_full_wraps_gift_sws_targets_with_delta_over_two_over_all_columns(bits):
    model = tiny_random_llama(seed=0).to(DEVICE)
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    targets = list(find_target_modules(model))  # GIFT-SW's default targets: block linears, no lm_head
    kw = {} if bits == 4 else {"noise_bits": bits}
    cfg = TrainConfig(method="full", noise="weight", model="tiny-random-llama", **kw)
    weights = {n: m.weight.detach().clone() for n, m in find_target_modules(model).items()}
    methods.get("full").prepare(model, cfg)
    layers = noisy_layers(model)
    assert list(layers) == targets and "lm_head" not in layers
    for name, layer in layers.items():
        _, delta, _ = quantize_rows(weights[name], bits)  # the quantizer of docs/methods.md#row-quantizer over every column
        assert torch.equal(layer.noise_std, delta / 2), name
        assert layer.noise == "weight" and not layer.keep_noise
    # same Parameters under the same names, every one trainable; the noise scale is not in the state dict
    assert {n: p for n, p in model.named_parameters()} == params
    assert all(p.requires_grad for p in model.parameters())
    assert list(model.state_dict()) == keys


def test_gmt_wraps_the_chosen_targets_and_plain_layers_restores_them():
    model = tiny_random_llama(seed=0).to(DEVICE)
    cfg = TrainConfig(method="gmt", noise="weight", keep_noise=True, target_modules=["q_proj", "down_proj"],
                      model="tiny-random-llama")
    methods.get("gmt").prepare(model, cfg)
    layers = noisy_layers(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["down_proj", "q_proj"] and len(layers) == 4
    assert all(m.keep_noise for m in layers.values())
    with plain_layers(model):
        assert not noisy_layers(model)
        assert all(type(model.get_submodule(n)) is nn.Linear and model.get_submodule(n).weight is m.weight
                   for n, m in layers.items())
    assert noisy_layers(model) == layers
    with pytest.raises(ValueError, match="already has noisy dense layers"):
        apply_dense_noise(model)


def test_no_noise_by_default():
    model = tiny_random_llama(seed=0).to(DEVICE)
    for name in ("full", "gmt"):
        methods.get(name).prepare(model, TrainConfig(method=name, model="tiny-random-llama"))
        assert not noisy_layers(model)


@pytest.mark.numerics
def test_gpt2_conv1d_layers_are_wrapped_and_saved_as_conv1d(tmp_path, tiny_gpt2, device):
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2
    x = torch.randint(0, 100, (2, 12), device=device)
    with torch.no_grad():
        want = model(x).logits
    apply_dense_noise(model)
    layers = noisy_layers(model)
    assert len(layers) == 8 and all(m.is_conv1d for m in layers.values())
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)  # eval: Conv1D's own addmm
    model.train()
    model(x).logits.pow(2).mean().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers.values())
    with plain_layers(model):
        model.save_pretrained(tmp_path / "m")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval().to(device)
    assert type(loaded.transformer.h[0].attn.c_attn) is Conv1D
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits, rtol=0, atol=0)


def jsonl(path: Path, n: int = 24) -> str:
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_full(tmp_path: Path, out: str, **kw):
    from salientft.train import train

    cfg = TrainConfig(model="tiny-random-llama", data=jsonl(tmp_path / "d.jsonl"), output=str(tmp_path / out),
                      method="full", max_steps=3, batch_size=4, max_length=64, dtype="fp32", lr=1e-3,
                      weight_decay=0.1, warmup_ratio=0.0, eval_before=False, device=str(DEVICE), **kw)
    model, tok = tiny_random_llama(seed=0, pad_token_id=None), tiny_tokenizer()
    train(cfg, model=model, tokenizer=tok)
    return cfg, model


def test_a_full_run_with_weight_noise_trains_every_weight_and_saves_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_random_llama(seed=0, pad_token_id=None)
    before = {n: t.clone() for n, t in base.state_dict().items()}
    cfg, model = run_full(tmp_path, "noisy", noise="weight")
    assert noisy_layers(model)  # trained with the wrappers (saving swapped them out only while writing)
    out = Path(cfg.output) / "model"
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any(isinstance(m, NoisyLinear) for m in saved.modules())
    assert type(saved.model.layers[0].self_attn.q_proj) is nn.Linear
    after = saved.state_dict()
    assert list(after) == list(before)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"weights that did not train: {unchanged}"
    with open(out / "config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    # the noise took part in training: the same run without it ends elsewhere
    _, plain = run_full(tmp_path, "plain")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not noisy_layers(plain)
    assert (plain.state_dict()[q].cpu() - after[q]).abs().max() > 1e-4


def test_refusals_and_declared_fields():
    full, gmt, lora = methods.get("full"), methods.get("gmt"), methods.get("lora")
    for m in (full, gmt):
        assert {"noise", "noise_bits", "keep_noise", "target_modules"} <= m.declared()
        assert {"noise", "noise_bits", "keep_noise"} <= set(m.only_used({"noise": "weight", "noise_bits": 3,
                                                                           "keep_noise": True}))
    assert not {"noise", "noise_bits", "keep_noise"} & set(lora.only_used({"noise": "weight", "noise_bits": 3,
                                                                           "keep_noise": True}))
    with pytest.raises(ValueError, match=r"method 'lora' does not use --noise; remove it \(--noise applies to .*full"):
        TrainConfig(method="lora", noise="weight")
    with pytest.raises(ValueError, match="method 'full' reads --noise-bits only with GIFT-SW's noise; "
                                         "add --noise weight, or remove it"):
        TrainConfig(method="full", noise_bits=3)
    with pytest.raises(ValueError, match="method 'gmt' reads --keep-noise, --target-modules only"):
        TrainConfig(method="gmt", keep_noise=True, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="keep_noise .* needs noise='weight', not 'output'"):
        TrainConfig(method="full", noise="output", keep_noise=True)
    with pytest.raises(ValueError, match="noise_bits must be an integer in"):
        TrainConfig(method="full", noise="weight", noise_bits=1)
    assert TrainConfig(method="full", noise="none").noise == "none"
    assert TrainConfig(method="gmt", noise="output", noise_bits=3).noise == "output"
