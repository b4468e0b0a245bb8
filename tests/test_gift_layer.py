"""SalientLinear: exactness, gradients, what backward materializes, noise statistics."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from salientft import SalientLinear

OUT, IN, K = 48, 64, 6


def make_layer(noise="none", bias=True, dtype=torch.float32, std=0.05, seed=0, fp32_salient=False,
               device=torch.device("cpu")):
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=bias).to(dtype).to(device)  # seeded on the CPU: the same weights on every device
    idx = torch.tensor([3, 10, 11, 30, 50, 63], device=device)
    layer = SalientLinear(base, idx, torch.full((OUT,), std, device=device), noise=noise, fp32_salient=fp32_salient)
    return base, layer, idx


def reference_weight(layer):
    w = layer.weight.detach().clone().float()
    w[:, layer.salient_idx] = layer.salient_weight.detach().float()
    return w


def test_shares_base_weight_and_initialises_columns(device):
    base, layer, idx = make_layer(device=device)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad
    assert torch.equal(layer.salient_weight, base.weight[:, idx])
    assert layer.salient_idx.tolist() == sorted(idx.tolist())
    assert layer.noise_std.shape == (OUT,)


def test_unsorted_indices_are_sorted(device):
    base = nn.Linear(IN, OUT).to(device)
    layer = SalientLinear(base, torch.tensor([9, 2, 5], device=device))
    assert layer.salient_idx.tolist() == [2, 5, 9]
    assert torch.equal(layer.salient_weight, base.weight[:, [2, 5, 9]])


@pytest.mark.parametrize("noise", ["none", "weight", "output"])
@pytest.mark.numerics
def test_eval_equals_linear_with_replaced_columns(noise, device):
    base, layer, idx = make_layer(device=device, noise=noise)
    x = torch.randn(3, 5, IN, device=device)
    layer.eval()
    y0 = layer(x)
    # At init: bit-identical to the base layer. The layer adds x_s @ 0 (exact zeros) and the bias after
    # the GEMM, the base fuses the bias into addmm; both round the same K = 64 dot products once and
    # add the bias once, on any CPU and BLAS (64 is below every GEMM's K-block, so no partial sums).
    # A GPU may run mm and addmm as different kernels (another split of K): one rounding apart there.
    if device.type == "cpu":
        assert torch.equal(y0, base(x))
    else:
        torch.testing.assert_close(y0, base(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        layer.salient_weight.add_(torch.randn_like(layer.salient_weight))
    ref = F.linear(x, reference_weight(layer), base.bias)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise", ["none", "weight"])
@pytest.mark.numerics
def test_gradients_match_autograd_reference(noise, device):
    base, layer, idx = make_layer(device=device, noise=noise, std=0.0 if noise == "none" else 0.05)
    layer.train()
    with torch.no_grad():
        layer.salient_weight.add_(0.1 * torch.randn_like(layer.salient_weight))
    x = torch.randn(4, 7, IN, requires_grad=True, device=device)
    g = torch.randn(4, 7, OUT, device=device)
    torch.manual_seed(123)
    (layer(x) * g).sum().backward()
    # Reference: the same noise draw (same global seed), full weight with autograd.
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    w = layer.weight.detach().clone()
    if noise == "weight":
        from salientft.ops.noise import noisy_weight

        # the whole noisy matrix for this seed (the layer itself only ever builds row blocks)
        w = noisy_weight(w, w[:, idx], idx, layer.noise_std, seed, torch.float32)
    w_full = w.clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w_used = w_full.index_copy(1, idx, layer.salient_weight.detach())
    w_used = w_full.clone()
    w_used[:, idx] = layer.salient_weight.detach()
    w_used.retain_grad()
    (F.linear(x2, w_used, base.bias) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.salient_weight.grad, w_used.grad[:, idx], rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None
    assert base.bias.grad is None  # bias is frozen


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor):
                self.ops.append((str(func.overloadpacket.__name__), tuple(o.shape)))
        return out


@pytest.mark.parametrize("noise", ["none", "weight", "output"])
def test_backward_never_builds_a_full_weight_gradient_or_keeps_a_weight_copy(noise, device):
    base, layer, idx = make_layer(device=device, noise=noise)
    layer.train()
    x = torch.randn(2, 9, IN, requires_grad=True, device=device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    for t in saved:
        if t.numel() >= OUT * IN:
            # Only the shared base weight itself may be referenced, never a copy.
            assert t.untyped_storage().data_ptr() == base.weight.untyped_storage().data_ptr(), (
                f"a {tuple(t.shape)} tensor is kept alive for backward"
            )
    rec = _RecordShapes()
    with rec:
        y.sum().backward()
    matmuls = [s for op, s in rec.ops if op in ("mm", "addmm", "bmm", "matmul")]
    assert (OUT, IN) not in matmuls and (IN, OUT) not in matmuls, "an out x in weight gradient was computed"
    if noise == "none":
        assert all(s != (OUT, IN) for _, s in rec.ops), "no (out, in) tensor is needed without noise"
    assert layer.weight.grad is None
    assert layer.salient_weight.grad.shape == (OUT, K)


@pytest.mark.numerics
def test_weight_noise_std_matches_delta_over_two(device):
    std = torch.linspace(0.01, 0.2, OUT, device=device)
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=False).to(device)
    idx = torch.tensor([1, 2, 3], device=device)
    layer = SalientLinear(base, idx, std, noise="weight").train()
    j = 20  # a non-salient column
    x = torch.zeros(1, IN, device=device)
    x[0, j] = 1.0
    clean = base.weight[:, j].detach()
    with torch.no_grad():
        draws = torch.stack([layer(x)[0] - clean for _ in range(3000)])
    torch.testing.assert_close(draws.std(0), std, rtol=0.08, atol=0)
    assert draws.mean(0).abs().max() < 4 * std.max() / 3000**0.5 * 2
    # Salient columns get no noise.
    x = torch.zeros(1, IN, device=device)
    x[0, 2] = 1.0
    with torch.no_grad():
        assert torch.equal(layer(x)[0], layer.salient_weight[:, 1])
    # One draw per forward, shared by all tokens: two identical tokens see identical noise.
    with torch.no_grad():
        y = layer(torch.stack([torch.ones(IN, device=device), torch.ones(IN, device=device)]))
    # Not torch.equal: two rows of one GEMM need not take the same kernel path on every BLAS. Two
    # different draws would differ by ~std * sqrt(IN) (0.08 to 1.6 here), 1e5 times this tolerance.
    torch.testing.assert_close(y[0], y[1], rtol=0, atol=1e-6)


@pytest.mark.numerics
def test_output_noise_std_matches_delta_times_norm(device):
    std = torch.linspace(0.01, 0.2, OUT, device=device)
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=False).to(device)
    idx = torch.tensor([1, 2, 3], device=device)
    layer = SalientLinear(base, idx, std, noise="output").train()
    x = torch.randn(4000, IN, device=device)
    with torch.no_grad():
        noise = layer(x) - base(x)
    norm_n = (x.pow(2).sum(-1) - x[:, idx].pow(2).sum(-1)).sqrt()
    z = noise / norm_n[:, None]
    torch.testing.assert_close(z.std(0), std, rtol=0.08, atol=0)
    # Independent per token: identical tokens see different noise.
    with torch.no_grad():
        y = layer(torch.ones(2, IN, device=device))
    assert not torch.equal(y[0], y[1])


def test_noise_only_in_training_and_reproducible_under_seed(device):
    _, layer, _ = make_layer(device=device, noise="weight")
    x = torch.randn(5, IN, device=device)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(7)
    a = layer(x)
    torch.manual_seed(7)
    b = layer(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, layer(x))


@pytest.mark.numerics
def test_bf16_base_autocast_and_fp32_salient_copy(device):
    base, layer, idx = make_layer(device=device, dtype=torch.bfloat16, noise="weight", fp32_salient=True)
    assert layer.salient_weight.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    layer.train()
    x = torch.randn(3, IN, dtype=torch.bfloat16, requires_grad=True, device=device)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.salient_weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16
    # fp32 input under bf16 autocast computes in bf16, returns a bf16 output, fp32 input grad.
    x32 = torch.randn(3, IN, requires_grad=True, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer(x32)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x32.grad.dtype == torch.float32
    # eval in bf16 equals the bf16 reference computation
    layer.eval()
    with torch.no_grad():
        ref = F.linear(x.detach().float(), reference_weight(layer), base.bias.float())
        torch.testing.assert_close(layer(x.detach()).float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("noise", ["weight", "output"])
def test_gradient_checkpointing_recomputes_the_same_noise(noise, device):
    from torch.utils.checkpoint import checkpoint

    _, layer, _ = make_layer(device=device, noise=noise, std=0.3)
    layer.train()
    x = torch.randn(6, IN, requires_grad=True, device=device)

    def run(ckpt):
        layer.salient_weight.grad = None
        x.grad = None
        torch.manual_seed(11)
        f = lambda t: torch.tanh(layer(t))  # noqa: E731
        y = checkpoint(f, x, use_reentrant=False) if ckpt else f(x)
        y.pow(2).sum().backward()
        return y.detach(), layer.salient_weight.grad.clone(), x.grad.clone()

    plain, ck = run(False), run(True)
    for a, b in zip(plain, ck):
        assert torch.equal(a, b)


@pytest.mark.numerics
def test_conv1d_is_supported(device):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(OUT, IN).to(device)  # weight stored (in, out)
    layer = SalientLinear(conv, torch.tensor([0, 5], device=device), noise="none")
    x = torch.randn(2, 3, IN, device=device)
    assert torch.equal(layer(x), conv(x)) or torch.allclose(layer(x), conv(x), atol=1e-6)
    assert torch.equal(layer.salient_weight, conv.weight.t()[:, [0, 5]])
    layer.train()
    layer(x).sum().backward()
    assert layer.salient_weight.grad.shape == (OUT, 2) and conv.weight.grad is None


@pytest.mark.numerics
@pytest.mark.parametrize("threads,keep_noise", [(1, False), (2, False), (2, True)])
def test_blocked_noise_on_a_wide_layer_matches_the_whole_matrix(monkeypatch, threads, keep_noise, device):
    import salientft.ops.noise as L

    monkeypatch.setattr(L, "NOISE_BLOCK_ELEMS", 5 * IN)  # force 10 row blocks (the last one short)
    monkeypatch.setattr(L, "_noise_threads", threads)  # drawn in the calling thread or by 2 threads
    assert L.noise_blocks(OUT, IN)[:2] == [(0, 5), (5, 10)] and L.noise_blocks(OUT, IN)[-1] == (45, 48)
    _, layer, idx = make_layer(device=device, noise="weight", std=0.2)
    layer.keep_noise = keep_noise  # the noisy weight kept from forward for backward, or drawn again
    layer.train()
    x = torch.randn(7, IN, requires_grad=True, device=device)
    torch.manual_seed(3)
    y = layer(x)
    (y * torch.arange(OUT, device=device)).sum().backward()
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    w = L.noisy_weight(layer.weight.detach(), layer.salient_weight.detach(), layer.salient_idx, layer.noise_std,
                        seed, torch.float32)
    torch.testing.assert_close(y, F.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, (torch.arange(OUT, dtype=torch.float32, device=device) @ w).expand(7, IN), rtol=1e-5, atol=1e-4)
    noise = w - layer.weight.detach()
    assert torch.equal(noise[:, idx], layer.salient_weight.detach() - layer.weight.detach()[:, idx])
    # blocks draw different numbers (no repeated stream)
    assert not torch.allclose(noise[0:5], noise[5:10])


def test_bad_indices_rejected(device):
    base = nn.Linear(IN, OUT).to(device)
    with pytest.raises(ValueError, match="empty"):
        SalientLinear(base, torch.tensor([], dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="distinct column indices"):
        SalientLinear(base, torch.tensor([1, IN], device=device))
    with pytest.raises(ValueError, match="distinct"):
        SalientLinear(base, torch.tensor([1, 1], device=device))
    with pytest.raises(TypeError, match="nn.Linear"):
        SalientLinear(nn.Embedding(3, 4), torch.tensor([0], device=device))
    with pytest.raises(ValueError, match="noise"):
        SalientLinear(base, torch.tensor([0], device=device), noise="uniform")


@pytest.mark.parametrize("metric", ["magnitude", "gift"])
def test_apply_gift_on_a_gpt2_model_with_conv1d_layers(metric, tiny_gpt2, device):
    """GPT-2's projections are Conv1D: apply_gift (with or without a calibration metric) wraps them,
    the untrained model is unchanged in eval mode, and training reaches every salient column."""
    import salientft as sft

    model = tiny_gpt2
    x = torch.randint(0, 100, (2, 12), device=device)
    with torch.no_grad():
        want = model(x).logits
    sft.apply_gift(model, sft.GiftConfig(metric=metric, n_salient=4),
                   calibration=[{"input_ids": torch.randint(0, 100, (2, 16), device=device)}])
    layers = [m for m in model.modules() if isinstance(m, SalientLinear)]
    assert len(layers) == 8 and all(m.is_conv1d for m in layers)  # c_attn, c_proj, c_fc, mlp.c_proj x 2
    model.eval()
    with torch.no_grad():
        # fp32; Conv1D's addmm and the wrapper's matmul may round differently: 1e-5 on logits of size ~1
        torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-5)
    model.train()
    model(x).logits.float().pow(2).mean().backward()
    assert all(m.salient_weight.grad is not None and m.salient_weight.grad.abs().sum() > 0 for m in layers)


def _old_output_noise(x, y, idx, std, xi):
    """The output noise as the layer computed it before the seeded draw (autograd through every
    op, xi given): the reference its gradients must equal."""
    dtype = y.dtype
    xf = x.float()
    sq = xf.pow(2).sum(-1, keepdim=True) - xf.index_select(-1, idx).pow(2).sum(-1, keepdim=True)
    norm_n = sq.clamp_min(0).sqrt()
    return xi.to(dtype) * (norm_n.to(dtype) * std.to(dtype))


@pytest.mark.numerics
def test_output_noise_gradients_equal_the_autograd_formula(device):
    from salientft.ops.noise import draw_seed, output_noise_z

    _, layer, idx = make_layer(noise="output", std=0.1, device=device)
    layer.train()
    torch.manual_seed(1)
    x = torch.randn(3, 5, IN, device=device, requires_grad=True)
    g = torch.randn(3, 5, OUT, device=device)
    torch.manual_seed(9)
    y = layer(x)
    y.backward(g)
    torch.manual_seed(9)
    xi = output_noise_z(draw_seed(), 15, OUT, device).view(3, 5, OUT)  # the same seed: the same draw
    x_ref = x.detach().clone().requires_grad_(True)
    sw = layer.salient_weight.detach().clone().requires_grad_(True)
    w = layer.weight.detach().clone()
    w[:, idx] = 0
    base = F.linear(x_ref, w, layer.bias) + F.linear(x_ref[..., idx], sw)
    y_ref = base + _old_output_noise(x_ref, base, layer.salient_idx, layer.noise_std, xi)
    y_ref.backward(g)
    # fp32 throughout; the two differ only in the order of a few roundings (the reference's chain
    # rule c / (2 ||x_N||) * 2 x against c / ||x_N|| * x, and its sum over outputs against mv),
    # a few ulps, while the noise's share of the input gradient is ~0.1 * |x| here.
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert (y - base).abs().max() > 0.1  # the noise is there
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.salient_weight.grad, sw.grad, rtol=1e-5, atol=1e-5)
    # the noise's own contribution is not negligible, so the comparison tests it
    plain = (F.linear(x_ref, w, layer.bias) + F.linear(x_ref[..., idx], sw))
    gx_plain = torch.autograd.grad(plain, x_ref, g)[0]
    assert (gx_plain - x_ref.grad).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_noise_saves_only_the_input_plus_per_token_bytes(dtype, device):
    """Backward keeps the layer input (no copy) and O(tokens) bytes: the salient columns (k per
    token) and one fp32 norm per token; never the (tokens, out) noise nor an fp32 copy of x."""
    torch.manual_seed(0)
    in_f, out_f, k, tokens = 256, 512, 8, 64
    base = nn.Linear(in_f, out_f, bias=False).to(dtype).to(device)
    layer = SalientLinear(base, torch.arange(0, in_f, in_f // k, device=device),
                          torch.full((out_f,), 0.1, device=device), noise="output").train()
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    own = {t.data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    saved = {}

    def pack(t):
        if t.data_ptr() not in own:
            saved[(t.data_ptr(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    per_token = k * x.element_size() + 4 + 16  # the salient inputs, the fp32 norm, a little slack
    bound = x.numel() * x.element_size() + tokens * per_token
    assert sum(saved.values()) <= bound, (sum(saved.values()), bound, sorted(saved.items(), key=lambda kv: -kv[1])[:4])


@pytest.mark.cpu_only("the noise thread pool")
def test_output_noise_does_not_depend_on_the_thread_count(monkeypatch):
    """The output noise's seeded blocks (several here: 600 tokens x 512 outputs) drawn by 1 or 2
    threads: the same outputs and input gradients, bit for bit."""
    from salientft.ops import noise as noise_mod

    torch.manual_seed(0)
    base = nn.Linear(64, 512, bias=False)
    layer = SalientLinear(base, torch.tensor([1, 5, 9]), torch.full((512,), 0.2), noise="output").train()
    assert len(noise_mod.noise_blocks(600, 512)) > 1
    runs = []
    for threads in (1, 2):
        noise_mod.set_noise_threads(threads)
        try:
            x = torch.randn(600, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
            torch.manual_seed(4)
            y = layer(x)
            y.pow(2).sum().backward()
        finally:
            noise_mod.set_noise_threads(None)
        runs.append((y.detach(), x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
