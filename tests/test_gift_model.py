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
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
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
    with pytest.raises(FileNotFoundError, match="not a GIFT-SW adapter"):
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


# ----------------------------------------------------------------------------- one adapter format
FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_IDS = torch.tensor([[5, 17, 33, 81, 120, 7, 64, 99, 3, 42]])


@pytest.mark.numerics
def test_version_1_adapter_written_before_the_format_change_still_loads():
    """tests/fixtures/adapter_v1: save_adapter's first format ({"format": "salientft-gift"}), written by
    salientft before the PEFT-format change (n_salient=3, magnitude, columns moved by N(0, 0.5^2))."""
    from safetensors.torch import load_file

    raw = load_file(FIXTURES / "adapter_v1" / "adapter_model.safetensors")
    model = load_adapter(tiny_random_llama(seed=0), FIXTURES / "adapter_v1").eval()
    layers = gift_layers(model)
    assert len(layers) == 14 and model.salientft_gift_config.n_salient == 3
    for name, layer in layers.items():  # selection of stored values: exact
        assert torch.equal(layer.salient_idx, raw[f"{name}.salient_idx"])
        assert torch.equal(layer.salient_weight, raw[f"{name}.salient_weight"])
    # logits stored when the fixture was written, on another machine maybe: fp32 reduction order
    # differs by ~1e-6 on logits of size ~1; a wrong column moves them by > 1e-2.
    want = load_file(FIXTURES / "adapter_v1_logits.safetensors")["logits"]
    with torch.no_grad():
        got = model(input_ids=FIXTURE_IDS).logits.float()[0, :, :16]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_save_adapter_writes_the_peft_format_with_the_base_fingerprint(tmp_path):
    from safetensors.torch import load_file

    from salientft.gift.adapter import fingerprint
    from salientft.targets import linear_weight

    model = train_steps(gift_model())
    save_adapter(model, tmp_path / "a", base_model="tiny-random-llama")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    base = tiny_random_llama(seed=0)
    names = sorted(gift_layers(model))
    assert cfg["peft_type"] == "GIFT_SW" and cfg["salient_indices_in_adapter"] is True
    assert cfg["target_modules"] == names and cfg["n_salient"] == 4 and cfg["k_pattern"] == {}
    assert cfg["base_fingerprint"] == fingerprint({n: linear_weight(base.get_submodule(n)) for n in names})
    # tiny-random-llama has no name stock tools load: none recorded there, salientft's own kept apart
    assert cfg["base_model_name_or_path"] is None and cfg["salientft_base_model"] == "tiny-random-llama"
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors").keys()
    assert keys == {f"base_model.model.{n}.giftsw_{t}" for n in names for t in ("idx", "weight", "noise_std")}
    assert "import salientft" in (tmp_path / "a" / "README.md").read_text()


def test_base_names_that_stock_tools_load():
    from salientft.models import EMBEDDED_HUB_ID, stock_name

    assert stock_name("smollm2-135m") == EMBEDDED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert stock_name("tiny-random-llama") is None
    assert stock_name("runs/../my-base") == "runs/../my-base"  # a path as the user gave it
    assert stock_name("org/model") == "org/model"


def _rewrite(folder, fn):
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, str(path))


@pytest.mark.numerics
def test_columns_listed_out_of_order_are_matched_to_their_indices(tmp_path):
    model = train_steps(gift_model())
    with torch.no_grad():
        want = model(IDS).logits
    save_adapter(model, tmp_path / "a")
    key = "base_model.model.model.layers.0.mlp.down_proj.giftsw_"

    def reverse_both(t):  # the same adapter, columns listed in descending index order
        t[key + "idx"] = t[key + "idx"].flip(0).contiguous()
        t[key + "weight"] = t[key + "weight"].flip(1).contiguous()

    _rewrite(tmp_path / "a", reverse_both)
    fresh = load_adapter(tiny_random_llama(seed=0), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, want)  # the same computation once matched
    layer = gift_layers(fresh)["model.layers.0.mlp.down_proj"]
    assert bool((layer.salient_idx[1:] > layer.salient_idx[:-1]).all())

    # the check above would see a mismatch: only the indices reversed is another model
    save_adapter(model, tmp_path / "b")
    _rewrite(tmp_path / "b", lambda t: t.__setitem__(key + "idx", t[key + "idx"].flip(0).contiguous()))
    other = load_adapter(tiny_random_llama(seed=0), tmp_path / "b").eval()
    with torch.no_grad():
        assert not torch.equal(other(IDS).logits, want)


@pytest.mark.parametrize("what, message", [
    ("nan", "NaN or infinite"), ("inf_std", "NaN or infinite"), ("duplicate", "lists a salient column twice"),
    ("out_of_range", "different base model"),
])
def test_broken_adapters_are_refused(tmp_path, what, message):
    model = train_steps(gift_model())
    save_adapter(model, tmp_path / "a")
    key = "base_model.model.model.layers.1.self_attn.v_proj.giftsw_"

    def break_(t):
        if what == "nan":
            t[key + "weight"][0, 0] = float("nan")
        elif what == "inf_std":
            t[key + "noise_std"][3] = float("inf")
        elif what == "duplicate":
            t[key + "idx"][1] = t[key + "idx"][0]
        else:
            t[key + "idx"][-1] = 64  # v_proj has 64 inputs

    _rewrite(tmp_path / "a", break_)
    with pytest.raises(ValueError, match=message):
        load_adapter(tiny_random_llama(seed=0), tmp_path / "a")


# ----------------------------------------------------------------------------- save_pretrained
def test_save_pretrained_of_a_gift_model_is_refused_until_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    model = train_steps(gift_model())
    with pytest.raises(ValueError, match=r"save_adapter.*merge_gift"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with torch.no_grad():
        want = model(IDS).logits
    merge_gift(model)
    model.save_pretrained(tmp_path / "m")  # a plain model again: what reloads is the trained model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, want, rtol=1e-5, atol=1e-5)  # merged vs adapter forward
    import copy

    again = apply_gift(tiny_random_llama(seed=0), GiftConfig(n_salient=2, metric="magnitude"))
    with pytest.raises(ValueError, match="save_adapter"):
        copy.deepcopy(again).save_pretrained(tmp_path / "copy")  # the guard follows a copy


def test_hf_trainer_save_model_of_a_gift_model_is_refused(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = gift_model()
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    with pytest.raises(ValueError, match="save_adapter"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- precision
@pytest.mark.numerics
def test_bf16_model_trains_fp32_columns_by_default_and_adamw_moves_every_entry():
    """The README's "In Python" recipe on a bf16 model: GiftConfig's defaults keep the columns fp32,
    so one AdamW step at lr 1e-4 moves every entry with a gradient (bf16 columns would lose most)."""
    model = tiny_random_llama(seed=0, dtype=torch.bfloat16)
    apply_gift(model, GiftConfig(metric="magnitude"))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    has_grad = torch.cat([(p.grad != 0).flatten() for p in params])
    opt.step()
    moved = torch.cat([(p.detach() != b).flatten() for p, b in zip(params, before)])
    assert has_grad.float().mean() > 0.9
    assert bool(moved[has_grad].all())  # AdamW's first step moves each by ~lr: fp32 keeps it
