"""Mixed-precision quantization (GPTQ/RTN + 16-bit salient columns) and its recovery."""
import json

import pytest
import torch

from conftest import suite_device
from salientft.quant.gptq import group_scales, gptq_quantize, rtn_quantize
from salientft.quant.layer import QuantizedSalientLinear
from salientft.quant.model import (
    load_quantized, model_bytes, prepare_gift_recovery, quantize, quantized_layers, save_quantized, target_bytes,
)
from salientft.quant.packing import pack, packed_row_bytes, unpack
from salientft.quant.grid import quantize_rows

DEVICE = suite_device()


def _correlated(n=1500, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g).to(DEVICE)
    return torch.randn(n, d, generator=g).to(DEVICE) @ A * 0.3 + 0.1 * torch.randn(n, d, generator=g).to(DEVICE)


def _batches(vocab=300, seed=0, pad_tail=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 24), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    if pad_tail:
        mask[1, 15:] = 0
        mask[3, 7:] = 0
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]


def _full(W, q, s, sal, idx, group_size=None):
    keep = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    keep[idx] = False
    n = int(keep.sum())
    cs = s.expand(-1, n) if group_size is None else s.repeat_interleave(group_size, 1)[:, :n]
    Wq = torch.empty_like(W)
    Wq[:, keep] = q.float() * cs
    Wq[:, idx] = sal
    return Wq


# ---- packing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 13), (2, 8), (4, 67)])
def test_pack_roundtrip_bit_exact(bits, shape, device):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(bits)).to(device)
    q[0, 0], q[-1, -1] = lo, hi  # extremes
    p = pack(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (shape[0], packed_row_bytes(shape[1], bits))
    assert torch.equal(unpack(p, bits, shape[1]).long(), q)
    assert torch.equal(unpack(p, bits, shape[1], dtype=torch.float32), q.float())


def test_pack_rejects_bad_input(device):
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.zeros(2, 2, dtype=torch.long, device=device), 5)
    with pytest.raises(ValueError, match=r"\[-4, 3\]"):
        pack(torch.tensor([[4]], device=device), 3)
    with pytest.raises(ValueError, match="integer tensor"):
        pack(torch.zeros(2, 2, device=device), 4)


def test_3bit_layer_memory_is_three_sixteenths(device):
    layer = QuantizedSalientLinear(512, 256, 3, torch.arange(8, device=device), dtype=torch.bfloat16)
    assert layer.qweight.numel() == 256 * (504 // 8) * 3
    ratio = layer.storage_bytes() / layer.dense_bytes()
    # integers 3/16 of the 504 quantized columns + 8 bf16 columns + one fp32 scale and noise std per row
    expected = (3 / 16 * 504 + 8 + 4) / 512
    assert abs(ratio - expected) < 1e-3 and ratio < 0.21
    assert all(not t.is_floating_point() or t.numel() <= 256 * 8 for t in layer.state_dict().values())


# ---- GPTQ / RTN on one matrix -------------------------------------------------------------------
def test_gptq_grid_salient_and_scales(device):
    X = _correlated()
    W = torch.randn(32, 48, generator=torch.Generator().manual_seed(1)).to(device)
    idx = torch.tensor([5, 17, 30], device=device)
    scores = torch.rand(48, generator=torch.Generator().manual_seed(2)).to(device)
    q, s, sal = gptq_quantize(W, X.T @ X, 3, idx, scores)
    keep = torch.ones(48, dtype=torch.bool, device=device)
    keep[idx] = False
    # scales are the MSE clip search on the integer columns only
    assert torch.equal(s, quantize_rows(W[:, keep], 3)[1].view(-1, 1))
    assert q.dtype == torch.int8 and int(q.min()) >= -4 and int(q.max()) <= 3
    layer = QuantizedSalientLinear.from_integers(q, s, idx, sal, None, 3, dtype=torch.float32)
    Wd = layer.dequantized_weight(torch.float32)
    assert torch.equal(Wd[:, keep], q.float() * s)  # every non-salient weight on its row's grid
    assert torch.equal(Wd[:, idx], sal)  # the 16-bit columns are the GPTQ-updated values
    assert not torch.allclose(sal, W[:, idx])  # ... which received GPTQ's error feedback
    _, _, sal_rtn = rtn_quantize(W, 3, idx)
    assert torch.equal(sal_rtn, W[:, idx])  # RTN keeps the original columns


@pytest.mark.numerics
def test_gptq_beats_rtn_on_correlated_inputs(device):
    X = _correlated()
    W = torch.randn(32, 48, generator=torch.Generator().manual_seed(1)).to(device)
    idx = torch.tensor([2, 40], device=device)
    for bits in (2, 3, 4):
        g = _full(W, *gptq_quantize(W, X.T @ X, bits, idx), idx)
        r = _full(W, *rtn_quantize(W, bits, idx), idx)
        err_g = (X @ (g - W).T).pow(2).mean()
        err_r = (X @ (r - W).T).pow(2).mean()
        assert err_g < 0.8 * err_r, (bits, err_g, err_r)


def test_groups_and_no_salient_columns(device):
    X = _correlated()
    W = torch.randn(16, 48, generator=torch.Generator().manual_seed(3)).to(device)
    idx = torch.zeros(0, dtype=torch.long, device=device)
    q, s, sal = gptq_quantize(W, X.T @ X, 4, idx, group_size=20)
    assert s.shape == (16, 3) and sal.shape == (16, 0)
    assert torch.equal(s[:, :2], group_scales(W, 4, 20)[:, :2])
    layer = QuantizedSalientLinear.from_integers(q, s, idx, sal, None, 4, group_size=20, dtype=torch.float32)
    assert torch.equal(layer.dequantized_weight(), _full(W, q, s, sal, idx, group_size=20))


# ---- the layer ------------------------------------------------------------------------------------
def _layer(dtype=torch.float32, bias=True, k=3, bits=3):
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float32).to(DEVICE)
    idx = torch.arange(k, device=DEVICE) * 7
    q, s, sal = rtn_quantize(W, bits, idx)
    b = torch.randn(24, device=DEVICE) if bias else None
    return QuantizedSalientLinear.from_integers(q, s, idx, sal.to(dtype), b, bits, dtype=dtype)


def test_layer_gradients_match_dense_reference_and_save_no_dense_weight(device):
    layer = _layer(torch.float64)
    layer.salient_weight.requires_grad_(True)
    x = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True, device=device)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert max(sizes) < 24 * 40  # no (out, in) tensor kept for backward
    y.pow(2).sum().backward()
    sw = layer.salient_weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    Wr = layer.dequantized_weight(torch.float64).index_copy(1, layer.salient_idx, sw)
    torch.nn.functional.linear(x2, Wr, layer.bias).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad) and torch.allclose(layer.salient_weight.grad, sw.grad)


def test_noise_std_and_training_noise(device):
    layer = _layer()
    layer.salient_weight.requires_grad_(True)
    layer.set_noise("weight", bits=4)
    keep = layer.int_idx
    expected = quantize_rows(layer.dequantized_weight(torch.float32)[:, keep], 4)[1] / 2
    assert torch.equal(layer.noise_std, expected)
    x = torch.randn(4, 40, device=device)
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(0)
    b = layer(x)
    assert torch.equal(a, b) and not torch.allclose(a, layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    with pytest.raises(ValueError, match="noise must be one of"):
        layer.set_noise("output")


# ---- whole models -------------------------------------------------------------------------------
@pytest.mark.numerics
def test_quantize_tiny_model_replaces_every_target(tiny_model, device):
    ref = {n: p.clone() for n, p in tiny_model.state_dict().items()}
    x = torch.randint(3, 300, (2, 12), device=device)
    with torch.no_grad():
        base = tiny_model(x).logits
    quantize(tiny_model, 4, salient_fraction=0.1, calibration=_batches(), progress=False)
    layers = quantized_layers(tiny_model)
    assert len(layers) == 14 and all(l.bits == 4 for l in layers.values())
    assert {l.k for l in layers.values()} == {6, 13}  # round(0.1 * 64), round(0.1 * 128)
    assert not any(p.requires_grad for p in tiny_model.parameters())
    with torch.no_grad():
        out = tiny_model(x).logits
    assert (out - base).abs().mean() < 0.2 * base.abs().mean()
    assert torch.equal(tiny_model.model.embed_tokens.weight, ref["model.embed_tokens.weight"])
    assert target_bytes(tiny_model) < 0.3 * sum(ref[n + ".weight"].numel() * 4 for n in layers)


@pytest.mark.numerics
def test_padding_is_excluded_from_calibration():
    from salientft.models import tiny_random_llama

    a, b = tiny_random_llama(seed=0).to(DEVICE), tiny_random_llama(seed=0).to(DEVICE)
    ba, bb = _batches(), _batches()
    for batch in bb:  # change the token ids under the padding only
        batch["input_ids"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], torch.full_like(batch["input_ids"], 7))
    quantize(a, 3, n_salient=4, calibration=ba, progress=False)
    quantize(b, 3, n_salient=4, calibration=bb, progress=False)
    for (n, la), lb in zip(quantized_layers(a).items(), quantized_layers(b).values()):
        assert torch.equal(la.qweight, lb.qweight) and torch.equal(la.salient_idx, lb.salient_idx), n


def test_rtn_and_zero_salient_baselines(tiny_model):
    from salientft.models import tiny_random_llama

    quantize(tiny_model, 3, n_salient=0, quantizer="gptq", calibration=_batches(), progress=False)
    assert {l.k for l in quantized_layers(tiny_model).values()} == {0}
    m = tiny_random_llama(seed=0).to(DEVICE)
    quantize(m, 3, n_salient=5, quantizer="rtn", metric="magnitude", progress=False)  # data-free
    for n, l in quantized_layers(m).items():
        assert l.k == 5


def test_bad_inputs_are_rejected(tiny_model, device):
    for bits in (1, 9):
        with pytest.raises(ValueError, match="bits must be one of"):
            quantize(tiny_model, bits, calibration=_batches())
    with pytest.raises(ValueError, match="at least one column must be quantized"):
        quantize(tiny_model, 4, n_salient=65, calibration=_batches())
    empty = [{"input_ids": torch.ones(2, 5, dtype=torch.long, device=device), "attention_mask": torch.zeros(2, 5, dtype=torch.long, device=device)}]
    with pytest.raises(ValueError, match="calibration holds no tokens"):
        quantize(tiny_model, 4, calibration=empty)
    with pytest.raises(ValueError, match="calibration holds no tokens"):
        quantize(tiny_model, 4, calibration=[])
    with pytest.raises(ValueError, match="not both"):
        quantize(tiny_model, 4, n_salient=2, salient_fraction=0.1, calibration=_batches())
    with pytest.raises(ValueError, match="needs calibration"):
        quantize(tiny_model, 4, quantizer="gptq")
    assert not quantized_layers(tiny_model)


def test_recovery_training_changes_only_salient_columns(tiny_model, device):
    quantize(tiny_model, 3, n_salient=6, calibration=_batches(), progress=False)
    layers = quantized_layers(tiny_model)
    prepare_gift_recovery(tiny_model, noise="weight", noise_bits=4)
    assert all(l.noise_std.gt(0).all() for l in layers.values())
    before = {n: t.clone() for n, t in tiny_model.state_dict().items()}
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    assert len(params) == len(layers)
    opt = torch.optim.AdamW(params, lr=1e-2)
    tiny_model.train()
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(5)).to(device)
    for _ in range(3):
        loss = tiny_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = tiny_model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n + ".salient_weight" for n in layers}


def test_save_load_roundtrip_exact(tmp_path, device):
    from salientft.models import tiny_random_llama

    m = tiny_random_llama(seed=1, tie_word_embeddings=True).to(DEVICE)
    quantize(m, 2, salient_fraction=0.05, calibration=_batches(), group_size=32, progress=False)
    save_quantized(m, tmp_path / "q", base_model="tiny-random-llama")
    meta = json.loads((tmp_path / "q" / "quantization_config.json").read_text())
    assert meta["quantization"]["bits"] == 2 and meta["quantization"]["group_size"] == 32
    assert meta["base_model"] == "tiny-random-llama" and len(meta["layers"]) == 14
    m2 = load_quantized(tmp_path / "q", device=DEVICE)
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()
    x = torch.randint(3, 300, (2, 10), device=device)
    with torch.no_grad():
        assert torch.equal(m.eval()(x).logits, m2(x).logits)
    assert model_bytes(m2) == model_bytes(m)
    with pytest.raises(FileNotFoundError, match="quantization_config.json"):
        load_quantized(tmp_path)


def test_quantized_metadata_names_the_quantizer_and_reads_the_old_key(tmp_path):
    """quantization_config.json writes "quantizer"; a folder written when the key was "method"
    still loads, as the same config (docs/configuration.md#names)."""
    from salientft.models import tiny_random_llama
    from salientft.quant.model import QuantizeConfig

    m = tiny_random_llama(seed=1)
    quantize(m, 4, n_salient=2, quantizer="rtn", metric="magnitude", progress=False)
    save_quantized(m, tmp_path / "q", base_model="tiny-random-llama")
    path = tmp_path / "q" / "quantization_config.json"
    meta = json.loads(path.read_text())
    assert meta["quantization"]["quantizer"] == "rtn" and "method" not in meta["quantization"]
    cfg = load_quantized(tmp_path / "q").salientft_quantization
    assert cfg.quantizer == "rtn" and cfg == m.salientft_quantization
    meta["quantization"]["method"] = meta["quantization"].pop("quantizer")  # as written before the rename
    path.write_text(json.dumps(meta))
    assert load_quantized(tmp_path / "q").salientft_quantization == cfg
    assert QuantizeConfig.from_dict({"method": "rtn"}).quantizer == "rtn"
    with pytest.warns(DeprecationWarning, match=r"QuantizeConfig\(\): method= is deprecated, use quantizer="):
        assert QuantizeConfig(method="rtn") == QuantizeConfig(quantizer="rtn")
    with pytest.raises(ValueError, match="'method' is the old name of 'quantizer'"):
        QuantizeConfig.from_dict({"method": "rtn", "quantizer": "gptq"})


def test_old_keyword_names_still_work_with_a_deprecation_warning():
    from salientft.models import tiny_random_llama

    m = tiny_random_llama(seed=1)
    with pytest.warns(DeprecationWarning, match="method= is deprecated, use quantizer="):
        quantize(m, 4, n_salient=2, method="rtn", metric="magnitude", progress=False)
    assert m.salientft_quantization.quantizer == "rtn"
    with pytest.raises(TypeError, match="give one of them"):
        quantize(tiny_random_llama(seed=1), 4, method="rtn", quantizer="rtn")
    from salientft.pipelines import quantize_pretrained

    for old in ({"method": "nope"}, {"scores_path": None, "n_samples": 4, "method": "nope"}):
        with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="quantizer must be one of"):
            quantize_pretrained("tiny-random-llama", "unused", 4, **old)  # mapped, then validated before any work


# ---- baselines ------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_ste_starts_at_the_quantized_model_and_rounds_back(tiny_model, device):
    from salientft.quant.ste import STELinear, apply_ste, ste_to_quantized

    quantize(tiny_model, 3, n_salient=4, calibration=_batches(), progress=False)
    x = torch.randint(3, 300, (2, 12), device=device)
    with torch.no_grad():
        ref = tiny_model(x).logits
    apply_ste(tiny_model)
    with torch.no_grad():
        assert torch.allclose(tiny_model(x).logits, ref, atol=1e-5)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all(n.endswith(".weight") for n in trainable)
    opt = torch.optim.SGD([p for p in tiny_model.parameters() if p.requires_grad], lr=1.0)
    tiny_model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters() if p.requires_grad)
    opt.step()
    ste_to_quantized(tiny_model)
    assert not any(isinstance(m, STELinear) for m in tiny_model.modules())
    for l in quantized_layers(tiny_model).values():
        assert l.integers().abs().max() <= 4


@pytest.mark.numerics
def test_lora_through_peft_on_frozen_quantized_model(tiny_model, device):
    from salientft.quant.ste import apply_lora_quantized

    quantize(tiny_model, 4, n_salient=2, calibration=_batches(), progress=False)
    x = torch.randint(3, 300, (2, 12), device=device)
    with torch.no_grad():
        ref = tiny_model(x).logits
    peft_model = apply_lora_quantized(tiny_model, r=4)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and len(names) == 28
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=x).logits, ref)  # B = 0 at init
    peft_model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n)


# ---- CLI and the embedded model ----------------------------------------------------------------
def test_cli_quantize_tiny(tmp_path, capsys):
    from salientft.cli import main

    out = tmp_path / "q"
    rc = main(["quantize", "--model", "tiny-random-llama", "--bits", "3", "--salient-fraction", "0.05",
               "--calib-samples", "4", "--seq-len", "32", "--output", str(out), "--no-progress", "--device", str(DEVICE)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["after"]["target_bytes"] < 0.35 * summary["before"]["target_bytes"]
    assert summary["quantizer"] == "gptq" and summary["calibration"]["calib_samples"] == 4  # the new names
    assert "method" not in summary and "n_samples" not in summary["calibration"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    m = load_quantized(out)
    assert len(quantized_layers(m)) == 14
    assert main(["quantize", "--model", "tiny-random-llama", "--bits", "9", "--output", str(tmp_path / "x")]) == 2


@pytest.mark.numerics
def test_embedded_two_blocks(embedded):
    import copy

    model, tok = embedded
    model = copy.deepcopy(model)
    ids = tok("Photosynthesis converts light energy into chemical energy stored in glucose. " * 6,
              return_tensors="pt").input_ids[:, :64].to(DEVICE)
    with torch.no_grad():
        base = model(input_ids=ids, labels=ids).loss
    quantize(model, 4, salient_fraction=128 / 4096, calibration=[{"input_ids": ids}],
             target_modules=r"model\.layers\.1\.self_attn\.[qkvo]_proj", progress=False)
    layers = quantized_layers(model)
    assert len(layers) == 4 and {l.k for l in layers.values()} == {18}  # round(576 * 128 / 4096)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and loss < base + 0.5
