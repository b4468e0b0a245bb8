"""The weight noise drawn in parallel, kept for backward, and blocked per device (ops/noise.py).

No timing here: these tests check that the noise of a seed does not depend on how it is drawn
(thread count, kept or regenerated, compute dtype) and that kept noise is freed by backward.
"""
import gc
import weakref

import pytest
import torch
from torch import nn

import salientft.ops.noise as N
from salientft import SalientLinear
from salientft.gift.config import GiftConfig

OUT, IN = 96, 80


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    N.set_noise_threads(None)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(N, "NOISE_BLOCK_ELEMS", 7 * IN)  # 14 row blocks of 7 rows, the last one 5
    monkeypatch.setattr(N, "WAVE_ELEMS", 3 * 7 * IN)  # chunks of 3 blocks: 5 chunks
    assert len(N.noise_blocks(OUT, IN)) == 14 and N.noise_blocks(OUT, IN)[-1] == (91, 96)


def make_layer(keep_noise=False, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=bias).to(dtype)
    idx = torch.tensor([0, 7, 8, 41, 79])
    layer = SalientLinear(base, idx, torch.linspace(0.01, 0.3, OUT), noise="weight", keep_noise=keep_noise,
                          fp32_salient=True)
    with torch.no_grad():
        layer.salient_weight.add_(0.1)
    return layer.train()


def step(layer, x, seed=5, autocast=False):
    """(output, input gradient, salient gradient) of one noisy forward/backward."""
    layer.salient_weight.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, OUT)).sum().backward()
    return y.detach(), x.grad, layer.salient_weight.grad.clone()


def test_block_rows_follow_the_device_type(monkeypatch):
    assert N.noise_block_rows(4096, 1536, "cpu") == (1 << 18) // 1536 == 170
    assert N.noise_block_rows(10, 1 << 20, "cpu") == 1
    assert N.noise_block_rows(5, 100, "cpu") == 5
    blocks = N.noise_blocks(4096, 1536, "cpu")
    assert blocks[0] == (0, 170) and blocks[-1] == (4080, 4096) and len(blocks) == 25
    # SALIENTFT_NOISE_GENERATOR=philox seeds the same blocks on every device: the same noise as on CPU
    monkeypatch.setenv("SALIENTFT_NOISE_GENERATOR", "philox")
    for dev in ("cuda", "mps"):
        assert N.noise_blocks(4096, 1536, dev) == blocks and N.noise_blocks(4096, 14336, dev) == N.noise_blocks(4096, 14336)
    # chunks (drawn, added and multiplied at once): whole blocks, up to WAVE_ELEMS = 8M weights on CPU,
    # balanced (block counts differ by at most one: no small tail chunk)
    assert N.noise_chunks(4096, 1536) == [blocks]  # 6.3M weights: one chunk
    assert [len(c) for c in N.noise_chunks(11008, 4096)] == [29] * 4 + [28] * 2  # 172 blocks of 64 rows
    # SALIENTFT_NOISE_GENERATOR=torch: torch's normal_ on the device, in the fewest balanced large blocks
    monkeypatch.setenv("SALIENTFT_NOISE_GENERATOR", "torch")
    assert N.noise_block_rows(4096, 1536, "cuda") == 4096  # one draw for the whole layer
    assert N.noise_block_rows(14336, 1024, "cuda") == 14336  # 14.7M weights: still one draw
    assert N.noise_block_rows(4096, 14336, "cuda") == 1024  # 58.7M: 4 equal blocks (not 3 x 1170 + 586)
    assert N.noise_blocks(4096, 14336, "cuda") == [(r, r + 1024) for r in range(0, 4096, 1024)]
    assert N.noise_block_rows(10, 1 << 26, "cuda") == 1 and N.noise_block_rows(4096, 1536, "mps") == 4096
    assert N.noise_chunks(4096, 14336, "cuda") == [N.noise_blocks(4096, 14336, "cuda")]  # one chunk
    assert N.noise_blocks(4096, 1536, "cpu") == blocks  # the CPU is unaffected
    monkeypatch.setenv("SALIENTFT_NOISE_GENERATOR", "bogus")
    with pytest.raises(ValueError, match="SALIENTFT_NOISE_GENERATOR='bogus': choose one of philox, torch"):
        N.noise_blocks(8, 8, "cuda")


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096), (28672, 8192)])
def test_device_chunk_plan_of_large_layers_is_a_few_balanced_chunks(monkeypatch, shape):
    """7B/70B-sized layers on "cuda": one or a few chunks (each one set of launches and one matmul),
    equal to within one block; the plan is a pure function of the shape and the device type."""
    for gen in ("philox", "torch"):
        monkeypatch.setenv("SALIENTFT_NOISE_GENERATOR", gen)
        chunks = N.noise_chunks(*shape, "cuda")
        sizes = [(c[-1][1] - c[0][0]) * shape[1] for c in chunks]
        assert len(chunks) <= 4 and max(sizes) <= N.DEVICE_WAVE_ELEMS
        assert max(len(c) for c in chunks) - min(len(c) for c in chunks) <= 1
        assert [b for c in chunks for b in c] == N.noise_blocks(*shape, "cuda")
        rows = [b1 - b0 for b0, b1 in N.noise_blocks(*shape, "cuda")]
        if gen == "torch":  # balanced blocks too: equal rows, the last one at most (blocks - 1) rows short
            assert len(set(rows[:-1])) <= 1 and 0 <= rows[0] - rows[-1] < len(rows)


@pytest.mark.numerics
@pytest.mark.parametrize("shape", [(OUT, IN), (4097, 64), (300, 1000)])
def test_device_philox_path_equals_the_cpu_kernel_bit_for_bit(monkeypatch, shape):
    """The accelerators' noise (torch ops on the device, many blocks per launch, keys computed
    there) run on CPU tensors: the numba kernel's numbers, for whole layers and tail blocks."""
    torch.manual_seed(1)
    out_f, in_f = shape
    w, sw = torch.randn(out_f, in_f), torch.randn(out_f, 3)
    idx, std = torch.tensor([2, 9, 50]), torch.rand(out_f)
    ref = N.noisy_weight(w, sw, idx, std, 123, torch.float32)
    monkeypatch.setenv("SALIENTFT_NOISE_GENERATOR", "philox")
    monkeypatch.setattr(N, "_HOST_NOISE_DEVICES", ())
    monkeypatch.setattr(N, "DEVICE_PHILOX_PASS", 5000)  # several passes per chunk
    assert torch.equal(N.noisy_weight(w, sw, idx, std, 123, torch.float32), ref)
    z = torch.empty(out_f, in_f)
    N.draw_noise(z[:7], 5, 0)  # one block
    ref_z = torch.empty(7, in_f)
    N.philox_normal_(ref_z, N.block_seed(5, 0))
    assert torch.equal(z[:7], ref_z)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.numerics
def test_cuda_noise_equals_the_cpu_noise(monkeypatch):
    """On a GPU the Philox noise is the CPU's, bit for bit, whatever the GPU model."""
    monkeypatch.setenv("SALIENTFT_NOISE_GENERATOR", "philox")
    torch.manual_seed(1)
    w, sw = torch.randn(4097, 300), torch.randn(4097, 3)
    idx, std = torch.tensor([2, 9, 50]), torch.rand(4097)
    ref = N.noisy_weight(w, sw, idx, std, 123, torch.float32)
    got = N.noisy_weight(w.cuda(), sw.cuda(), idx.cuda(), std.cuda(), 123, torch.float32)
    assert torch.equal(got.cpu(), ref)


@pytest.mark.numerics
@pytest.mark.cpu_only("the CPU noise's thread pool")
@pytest.mark.parametrize("autocast", [False, True])
def test_thread_count_does_not_change_outputs_or_gradients(small_blocks, autocast):
    layer = make_layer()
    x = torch.randn(3, 11, IN)
    results = []
    for threads in (1, 2, 4):
        N.set_noise_threads(threads)
        results.append(step(layer, x, autocast=autocast))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    N.set_noise_threads(3)  # another seed: other noise
    assert not torch.equal(step(layer, x, seed=6, autocast=autocast)[0], results[0][0])


@pytest.mark.numerics
@pytest.mark.cpu_only("the CPU noise's thread pool")
def test_noisy_weight_is_the_same_for_any_thread_count_and_dtype(small_blocks):
    torch.manual_seed(1)
    w, sw = torch.randn(OUT, IN), torch.randn(OUT, 3)
    idx, std = torch.tensor([2, 9, 70]), torch.rand(OUT)
    ref = None
    for threads in (1, 2, 4):
        N.set_noise_threads(threads)
        full = N.noisy_weight(w, sw, idx, std, 123, torch.float32)
        ref = full if ref is None else ref
        assert torch.equal(full, ref)
        chunks = list(N.noisy_row_blocks(w, sw, idx, std, 123, torch.float32, out=torch.empty(OUT, IN)))
        assert [(r0, r1) for r0, r1, _ in chunks] == [(c[0][0], c[-1][1]) for c in N.noise_chunks(OUT, IN)]
    # the draw is fp32 whatever the compute dtype: bf16 is the fp32 noisy weight rounded once
    assert torch.equal(N.noisy_weight(w, sw, idx, std, 123, torch.bfloat16), ref.to(torch.bfloat16))
    assert torch.equal(ref[:, idx], sw)
    z = (ref - w) / std[:, None]
    keep = torch.ones(IN, dtype=torch.bool)
    keep[idx] = False
    assert abs(z[:, keep].std().item() - 1) < 0.05 and abs(z[:, keep].mean().item()) < 0.05


@pytest.mark.cpu_only("the CPU noise's thread pool")
def test_chunks_group_whole_blocks_by_shape_only(small_blocks):
    chunks = N.noise_chunks(OUT, IN)
    assert [len(c) for c in chunks] == [3, 3, 3, 3, 2]  # WAVE_ELEMS = 3 blocks, whatever the threads
    assert [b for c in chunks for b in c] == N.noise_blocks(OUT, IN)
    # a chunk drawn by two threads equals the chunk drawn in the calling thread
    parallel = [z.clone() for _, _, z in N.drawn_chunks(9, chunks, IN, "cpu", threads=2)]
    serial = [z.clone() for _, _, z in N.drawn_chunks(9, chunks, IN, "cpu", threads=1)]
    assert all(torch.equal(a, b) for a, b in zip(parallel, serial))
    assert not torch.equal(parallel[0][:7], parallel[0][7:14])  # each block its own stream


@pytest.mark.numerics
@pytest.mark.parametrize("autocast", [False, True])
def test_kept_noise_gives_the_same_outputs_and_gradients(small_blocks, autocast):
    x = torch.randn(2, 9, IN)
    N.set_noise_threads(2)
    regenerated = step(make_layer(keep_noise=False), x, autocast=autocast)
    kept = step(make_layer(keep_noise=True), x, autocast=autocast)
    for a, b in zip(regenerated, kept):
        assert torch.equal(a, b)


def test_kept_noise_is_one_weight_and_freed_after_backward():
    layer = make_layer(keep_noise=True)
    x = torch.randn(4, IN, requires_grad=True)
    big = []

    def pack(t):
        if t.numel() >= OUT * IN and t.untyped_storage().data_ptr() != layer.weight.untyped_storage().data_ptr():
            big.append(weakref.ref(t))
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert len(big) == 1 and big[0]() is not None and big[0]().shape == (OUT, IN)
    y.sum().backward()
    gc.collect()
    assert big[0]() is None, "the kept noise outlived backward"
    assert y.grad_fn is not None  # the output is still alive: backward itself freed it
    # Nothing is kept when no input gradient needs it, nor in eval mode.
    for inp, mode in ((x.detach(), "train"), (x, "eval")):
        big.clear()
        layer.train(mode == "train")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(inp)
        assert big == []


def test_kept_noise_under_gradient_checkpointing():
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(6, IN)

    def run(layer, ckpt):
        xg = x.clone().requires_grad_(True)
        torch.manual_seed(11)
        f = lambda t: torch.tanh(layer(t))  # noqa: E731
        y = checkpoint(f, xg, use_reentrant=False) if ckpt else f(xg)
        y.pow(2).sum().backward()
        return y.detach(), xg.grad, layer.salient_weight.grad

    plain = run(make_layer(keep_noise=False), False)
    for keep, ckpt in ((True, False), (True, True)):
        for a, b in zip(plain, run(make_layer(keep_noise=keep), ckpt)):
            assert torch.equal(a, b)


@pytest.mark.cpu_only("the CPU noise's thread pool")
def test_thread_setting_is_checked(monkeypatch):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            N.set_noise_threads(bad)
    N.set_noise_threads(None)
    monkeypatch.setenv("SALIENTFT_NOISE_THREADS", "3")
    assert N.noise_threads() == 3
    N.set_noise_threads(1)
    assert N.noise_threads() == 1  # the explicit setting wins
    N.set_noise_threads(None)
    monkeypatch.setenv("SALIENTFT_NOISE_THREADS", "zero")
    with pytest.raises(ValueError, match="SALIENTFT_NOISE_THREADS"):
        N.noise_threads()
    monkeypatch.delenv("SALIENTFT_NOISE_THREADS")
    assert N.noise_threads() == torch.get_num_threads()


def test_keep_noise_in_the_configs(tmp_path):
    cfg = GiftConfig(keep_noise=True)
    assert GiftConfig.from_json(cfg.to_json()).keep_noise is True
    assert GiftConfig.from_yaml(cfg.to_yaml()).keep_noise is True
    assert GiftConfig().keep_noise is False
    with pytest.raises(ValueError, match="keep_noise must be true or false"):
        GiftConfig(keep_noise=2)  # 1/0 and true/yes/on, false/no/off are bools (config_base.BOOL_WORDS)
    with pytest.raises(ValueError, match="needs noise='weight'"):
        GiftConfig(noise="output", keep_noise=True)
    from salientft.config import TrainConfig

    assert TrainConfig(method="gift-sw", keep_noise=True).gift_config().keep_noise is True
    assert TrainConfig(method="gift-sw").gift_config().keep_noise is False
    with pytest.raises(ValueError, match="needs noise='weight'"):
        TrainConfig(method="salient", keep_noise=True)
    with pytest.raises(ValueError, match="keep-noise"):
        TrainConfig(method="lora", keep_noise=True)


def test_apply_gift_passes_keep_noise_to_the_layers():
    from salientft.gift.model import apply_gift, gift_layers
    from salientft.models import tiny_random_llama

    model = tiny_random_llama(seed=0)
    scores = {n: torch.rand(m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)
              and "layers." in n}
    apply_gift(model, GiftConfig(n_salient=2, keep_noise=True, target_modules=["q_proj"]), scores)
    layers = gift_layers(model)
    assert layers and all(layer.keep_noise for layer in layers.values())


def test_peft_tuner_keeps_noise_on_request():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from salientft.peft import GiftSWConfig

    out = []
    for keep in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN, OUT), nn.Tanh(), nn.Linear(OUT, 8))
        cfg = GiftSWConfig(target_modules=["0", "2"], n_salient=3, metric="magnitude", keep_noise=keep)
        peft_model = get_peft_model(model, cfg).train()
        layer = peft_model.base_model.model[0]
        assert layer.giftsw_keep_noise["default"] is keep
        x = torch.randn(5, IN)
        torch.manual_seed(3)
        y = peft_model(x)
        y.pow(2).sum().backward()
        out.append((y.detach(), layer.giftsw_weight["default"].grad.clone()))
    for a, b in zip(*out):
        assert torch.equal(a, b)
