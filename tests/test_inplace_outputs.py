"""Models may modify a layer's output in place (Falcon: ``mlp_output += attention_output``).

An autograd Function whose output is a view of a tensor made inside it cannot be modified in
place ("Output 0 of _SalientMatmul is a view and is being modified inplace"), so every salient /
noisy layer must return a tensor of its own. Comparisons are fp32: the reference builds the same
noisy weight (same seed) with ordinary differentiable ops, so it differs only in summation order
(~1e-7); 1e-5 is far from that and far below what a wrong gradient moves (> 1e-2).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from salientft import GiftConfig, apply_gift
from salientft.gift.layer import SalientLinear
from salientft.gift.noisy_dense import NoisyLinear
from salientft.ops.noise import noisy_weight

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("noise,keep", [("weight", False), ("weight", True), ("none", False), ("output", False)])
@pytest.mark.parametrize("bias", [False, True])
def test_salient_linear_output_is_not_a_view(noise, keep, bias):
    torch.manual_seed(0)
    layer = SalientLinear(nn.Linear(16, 8, bias=bias), torch.tensor([1, 5]), torch.full((8,), 0.1), noise=noise,
                          keep_noise=keep)
    x = torch.randn(2, 3, 16, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        y = layer(x)
        assert y._base is None
        y += 1.0  # what Falcon does
        y.sum().backward()


@pytest.mark.parametrize("noise,keep", [("weight", False), ("weight", True), ("output", False)])
def test_noisy_linear_output_is_not_a_view(noise, keep):
    torch.manual_seed(0)
    layer = NoisyLinear(nn.Linear(16, 8, bias=False), torch.full((8,), 0.1), noise=noise, keep_noise=keep).train()
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = layer(x)
    assert y._base is None
    y += 1.0
    y.sum().backward()
    assert layer.weight.grad is not None


def _tiny_falcon(new_decoder_architecture: bool):
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=False,
                       parallel_attn=True, new_decoder_architecture=new_decoder_architecture,
                       num_kv_heads=2 if new_decoder_architecture else None)
    return FalconForCausalLM(cfg).float()


def _reference_forward(self, x):
    """SalientLinear's weight-noise forward as plain autograd ops on the same noisy weight (same seed)."""
    seed = self.weight_noise_seed()
    w = self.base_weight()
    if seed is not None:
        w = noisy_weight(w, self.salient_weight, self.salient_idx, self.noise_std, seed, torch.float32)
    w = w.index_copy(1, self.salient_idx, self.salient_weight)
    return F.linear(x, w, self.bias)


@pytest.mark.numerics
@pytest.mark.parametrize("new_arch", [False, True])
def test_falcon_trains_with_weight_noise_and_gradients_match(monkeypatch, new_arch):
    model = apply_gift(_tiny_falcon(new_arch), GiftConfig(metric="magnitude", n_salient=3, noise="weight"))
    model.train()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)  # the layers draw their noise seeds from torch's RNG, in forward order
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    got = grads()
    assert got and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in got.values())
    monkeypatch.setattr(SalientLinear, "forward", _reference_forward)
    ref = grads()
    assert got.keys() == ref.keys()
    for n in got:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("noise", ["weight", "none"])
def test_quantized_and_ste_layers_outputs_are_not_views(noise):
    from salientft.quant.model import quantize, quantized_layers
    from salientft.quant.ste import apply_ste

    model = _tiny_falcon(False)
    quantize(model, bits=4, quantizer="rtn", n_salient=2, metric="magnitude", progress=False)
    layer = next(iter(quantized_layers(model).values()))
    layer.set_noise(noise)
    layer.train()
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    y = layer(x)
    assert y._base is None
    y += 1.0
    y.sum().backward()
    ste = apply_ste(_tiny_falcon(False), bits=4)
    from salientft.quant.ste import STELinear

    s = next(m for m in ste.modules() if isinstance(m, STELinear)).train()
    y = s(torch.randn(2, 3, s.weight.shape[1], requires_grad=True))
    assert y._base is None
    y += 1.0
    y.sum().backward()


def test_falcon_trains_on_the_peft_route():
    peft = pytest.importorskip("peft")
    from salientft.peft import GiftSWConfig

    model = peft.get_peft_model(_tiny_falcon(True), GiftSWConfig(metric="magnitude", n_salient=3, noise="weight",
                                                                  task_type="CAUSAL_LM")).train()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
