"""apply_gift / adapters / merge on a tiny random Llama."""
import json
from pathlib import Path

import pytest
import torch

from salientft import GiftConfig, apply_gift, load_adapter, merge_gift, save_adapter, trainable_parameters, unmerge_gift
from salientft.gift import SalientLinear, gift_layers, noise_std_for
from salientft.models import tiny_random_llama
from salientft.quant.grid import quantize_rows

from conftest import suite_device

IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0)).to(suite_device())


def tiny(seed=0, **kw):
    """The tiny model (seeded on the CPU: the same weights everywhere) on the suite's device."""
    return tiny_random_llama(seed=seed, **kw).to(suite_device())


def magnitude_scores(model):
    from salientft.targets import find_target_modules, linear_weight

    return {n: linear_weight(m).detach().float().norm(dim=0) for n, m in find_target_modules(model).items()}


def gift_model(noise="weight", **kw):
    model = tiny(seed=0)
    cfg = GiftConfig(n_salient=kw.pop("n_salient", 4), noise=noise, **kw)
    return apply_gift(model, cfg, magnitude_scores(model))


def train_steps(model, n=3, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


@pytest.mark.numerics
def test_equal_to_base_at_init_and_only_salient_trainable():
    base = tiny(seed=0).eval()
    model = gift_model().eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)
    layers = gift_layers(model)
    assert len(layers) == 14
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.salient_weight" for n in layers}
    counts = trainable_parameters(model)
    assert counts["trainable"] == sum(m.out_features * 4 for m in layers.values())
    assert counts["total"] == sum(p.numel() for p in base.parameters())


@pytest.mark.numerics
def test_top_k_follow_scores_and_noise_std_is_half_delta_of_non_salient_columns():
    model = tiny(seed=0)
    scores = magnitude_scores(model)
    apply_gift(model, GiftConfig(n_salient=5), scores)
    name, layer = next(iter(gift_layers(model).items()))
    expected = torch.topk(scores[name], 5).indices.sort().values
    assert torch.equal(layer.salient_idx, expected)
    w = layer.weight.detach()
    keep = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    keep[expected] = False
    _, delta, _ = quantize_rows(w[:, keep], 4)
    torch.testing.assert_close(layer.noise_std, delta / 2)
    torch.testing.assert_close(noise_std_for(w, expected, 4), delta / 2)


def test_training_changes_only_salient_columns():
    base = tiny(seed=0)
    model = train_steps(gift_model())
    sd, sd0 = model.state_dict(), base.state_dict()
    assert set(sd0) <= set(sd)  # the original parameter names are kept
    for n, p0 in sd0.items():
        assert torch.equal(sd[n], p0), n
    layer = next(iter(gift_layers(model).values()))
    assert not torch.equal(layer.salient_weight, layer.weight[:, layer.salient_idx])


def test_salient_fraction_and_paper_default():
    model = apply_gift(tiny(seed=0), GiftConfig(salient_fraction=0.25, metric="magnitude"))
    ks = {n: m.k for n, m in gift_layers(model).items()}
    assert ks["model.layers.0.self_attn.q_proj"] == 16 and ks["model.layers.0.mlp.down_proj"] == 32
    model = apply_gift(tiny(seed=0), GiftConfig(metric="magnitude"))
    assert all(m.k == max(1, round(m.in_features / 32)) for m in gift_layers(model).values())


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = train_steps(gift_model())
    save_adapter(model, tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = load_adapter(tiny(seed=0), tmp_path / "a")
    for (n, a), (m, b) in zip(gift_layers(model).items(), gift_layers(fresh).items()):
        assert n == m
        assert torch.equal(a.salient_idx, b.salient_idx)
        assert torch.equal(a.salient_weight, b.salient_weight)
        assert torch.equal(a.noise_std, b.noise_std)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, fresh.eval()(IDS).logits)
    assert fresh.salientft_gift_config == model.salientft_gift_config


def test_adapter_is_small(tmp_path):
    from salientft.models import load_model

    model, _ = load_model("tiny-random-llama", device=suite_device())
    apply_gift(model, GiftConfig(n_salient=2, metric="magnitude"))
    save_adapter(model, tmp_path / "a")
    size = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    target_bytes = sum(m.weight.numel() * 4 for m in gift_layers(model).values())
    # trained columns (k/in of the weights) + indices + noise scales + header
    assert size < 0.15 * target_bytes


@pytest.mark.numerics
def test_merge_gives_plain_model_and_unmerge_restores(tmp_path):
    model = train_steps(gift_model())
    with torch.no_grad():
        before = model(IDS).logits
    expected = {n: l.weight.detach().clone().index_copy(1, l.salient_idx, l.salient_weight.detach())
                for n, l in gift_layers(model).items()}
    merged = merge_gift(model, keep_original=True)
    assert not gift_layers(merged)
    for n, w in expected.items():
        mod = merged.get_submodule(n)
        assert type(mod) is torch.nn.Linear and torch.equal(mod.weight, w)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, before, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    for n, w in expected.items():
        assert torch.equal(reloaded.get_submodule(n).weight, w.cpu())
    back = unmerge_gift(merged)
    base = tiny(seed=0)
    for n, l in gift_layers(back).items():
        assert torch.equal(l.weight, base.get_submodule(n).weight)
        assert torch.equal(l.salient_weight, expected[n][:, l.salient_idx])


def test_merged_fingerprint_refused_and_other_base_refused(tmp_path):
    model = train_steps(gift_model())
    save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        load_adapter(tiny(seed=1), tmp_path / "a")
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(tiny(seed=0, hidden_size=32, intermediate_size=64), tmp_path / "a")
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(tiny(seed=0, num_hidden_layers=1), tmp_path / "a")
    # fingerprint ignores dtype: the bf16 copy of the same base is accepted
    load_adapter(tiny(seed=0, dtype=torch.bfloat16), tmp_path / "a")


def test_corrupt_and_truncated_adapter_files(tmp_path):
    model = gift_model()
    save_adapter(model, tmp_path / "a")
    w = tmp_path / "a" / "adapter_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapter(tiny(seed=0), tmp_path / "a")
    w.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapter(tiny(seed=0), tmp_path / "a")
    save_adapter(model, tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(tiny(seed=0), tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="PEFT LORA adapter"):
        load_adapter(tiny(seed=0), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not a salientft adapter"):
        load_adapter(tiny(seed=0), tmp_path / "nothing")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = gift_model()
    save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    import safetensors.torch

    def boom(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")  # a crash mid-write
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    train_steps(model, n=1)
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_bad_inputs_rejected():
    m = tiny(seed=0)
    with pytest.raises(ValueError, match="n_salient must be a positive integer"):
        GiftConfig(n_salient=0)
    with pytest.raises(ValueError, match="larger than .* 64 input features"):
        apply_gift(tiny(seed=0), GiftConfig(n_salient=65), magnitude_scores(m))
    with pytest.raises(ValueError, match="matches no module"):
        apply_gift(tiny(seed=0), GiftConfig(n_salient=2, target_modules=["qkv"]), magnitude_scores(m))
    with pytest.raises(ValueError, match="not a linear layer"):
        apply_gift(tiny(seed=0), GiftConfig(n_salient=2, target_modules=["input_layernorm"]), {})
    bad = magnitude_scores(m)
    name = next(iter(bad))
    bad[name] = bad[name][:-1]
    with pytest.raises(ValueError, match="63 entries but the layer has 64"):
        apply_gift(tiny(seed=0), GiftConfig(n_salient=2), bad)
    with pytest.raises(ValueError, match="noise must be one of"):
        GiftConfig(noise="uniform")
    with pytest.raises(ValueError, match="not both"):
        GiftConfig(n_salient=2, salient_fraction=0.1)
    with pytest.raises(ValueError, match="already has GIFT-SW layers"):
        apply_gift(gift_model(), GiftConfig(n_salient=2), magnitude_scores(m))


def test_config_round_trips_json_and_yaml(tmp_path):
    cfg = GiftConfig(salient_fraction=0.1, target_modules=["q_proj", "v_proj"], noise="output", seed=3)
    assert GiftConfig.from_json(cfg.to_json()) == cfg
    assert GiftConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert GiftConfig.from_json(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown field"):
        GiftConfig.from_dict({"n_salient": 3, "bogus": 1})


@pytest.mark.numerics
def test_gradient_checkpointing_on_model_gives_same_grads():
    def grads(ckpt):
        model = gift_model(noise="weight")
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(5)
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {n: l.salient_weight.grad.clone() for n, l in gift_layers(model).items()}

    a, b = grads(False), grads(True)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)


def test_layers_are_salient_linear():
    model = gift_model()
    assert isinstance(model.model.layers[0].self_attn.q_proj, SalientLinear)
    assert isinstance(model.lm_head, torch.nn.Linear) and not model.lm_head.weight.requires_grad
