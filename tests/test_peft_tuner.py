"""GIFT-SW as a PEFT tuner (salientft.peft): every PEFT feature the docs promise, on the tiny model.

Comparisons are in fp32 on one machine; where two different code paths compute the same function
(PEFT layer vs salientft's SalientLinear, merged vs unmerged) the tolerance is 1e-5, far above
fp32 reduction-order differences (~1e-7 here) and far below any real difference (a trained
column moves logits by > 1e-2).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from conftest import suite_device  # noqa: E402
from salientft import GiftConfig, apply_gift  # noqa: E402
from salientft.models import tiny_random_llama, tiny_tokenizer  # noqa: E402
from salientft.peft import GiftSWConfig, preprocess_gift_sw  # noqa: E402

DEVICE = suite_device()
IDS = torch.tensor([[5, 17, 33, 81, 120, 7, 64, 99, 3, 42]], device=DEVICE)
ROOT = Path(__file__).resolve().parents[1]


def config(**kw):
    base = dict(metric="magnitude", n_salient=4, task_type="CAUSAL_LM")
    base.update(kw)
    return GiftSWConfig(**base)


def tiny(seed=0, **kw):
    """The tiny model (seeded on the CPU: the same weights everywhere) on the suite's device."""
    return tiny_random_llama(seed=seed, **kw).to(DEVICE)


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float()


def perturb_(model, scale=0.5, seed=1):
    """Stand-in for training: move every trainable column (deterministically)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def giftsw_layers(model):
    from salientft.peft.layer import GiftSWLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, GiftSWLayer)}


def test_get_peft_model_trains_only_the_salient_columns(capsys):
    base = tiny(seed=0)
    ref = logits(base)
    model = peft.get_peft_model(base, config())
    layers = giftsw_layers(model)
    assert len(layers) == 14  # every linear layer of the 2 blocks, not lm_head
    k_out = sum(4 * layer.out_features for layer in layers.values())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == k_out
    assert all(".giftsw_weight.default" in n for n in trainable)
    model.print_trainable_parameters()
    assert f"trainable params: {k_out:,}" in capsys.readouterr().out
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=1e-5)  # eval, untrained: the base


def test_tuner_layer_is_salientft_gift_sw_exactly():
    """Same columns, same noise for the same seed, same outputs and gradients as apply_gift."""
    a = peft.get_peft_model(tiny(seed=0), config(noise="weight"))
    b = apply_gift(tiny(seed=0), GiftConfig(n_salient=4, metric="magnitude", noise="weight"),
                   scores={n: torch.linalg.vector_norm(m.weight.float(), dim=0)
                           for n, m in tiny(seed=0).named_modules()
                           if isinstance(m, torch.nn.Linear) and "layers" in n})
    for name, layer in giftsw_layers(a).items():
        plain = b.get_submodule(name.removeprefix("base_model.model."))
        assert torch.equal(layer.giftsw_idx["default"], plain.salient_idx)
        assert torch.equal(layer.giftsw_noise_std["default"], plain.noise_std)
    losses = []
    for m in (a, b):
        m.train()
        torch.manual_seed(7)  # the weight-noise seeds come from torch's global RNG
        loss = m(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-5)
    for name, layer in giftsw_layers(a).items():
        plain = b.get_submodule(name.removeprefix("base_model.model."))
        torch.testing.assert_close(layer.giftsw_weight["default"].grad, plain.salient_weight.grad, rtol=1e-4, atol=1e-6)


def test_save_and_reload_in_a_new_process(tmp_path):
    model = peft.get_peft_model(tiny(seed=0), config(noise="weight"))
    perturb_(model)
    want = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "GIFT_SW" and cfg["salient_indices_in_adapter"] is True
    torch.save(want.cpu(), tmp_path / "want.pt")  # the check below runs on the CPU
    code = f"""
import torch, salientft
from peft import PeftModel
from salientft.models import tiny_random_llama
m = PeftModel.from_pretrained(tiny_random_llama(seed=0), {str(tmp_path / 'adapter')!r})
m.eval()
with torch.no_grad():
    got = m(input_ids=torch.tensor({IDS.tolist()})).logits.float()
want = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)
layer = m.base_model.model.model.layers[1].mlp.down_proj
assert layer.giftsw_noise_std['default'].abs().sum() > 0, 'noise scale did not travel'
print((got - want).abs().max().item())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-5


def test_auto_peft_model_loads_base_and_adapter(tmp_path):
    base = tiny(seed=0)
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config())
    perturb_(model)
    want = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), want, rtol=0, atol=1e-5)


def test_merge_unload_and_disable():
    base_ref = logits(tiny(seed=0))
    model = peft.get_peft_model(tiny(seed=0), config())
    perturb_(model)
    trained = logits(model)
    assert (trained - base_ref).abs().max() > 1e-2
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model), trained, rtol=0, atol=1e-5)
    model.merge_adapter()  # merged in place, then unmerged: the base weights are restored exactly
    torch.testing.assert_close(logits(model), trained, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_ref, rtol=0, atol=0)
    merged = model.merge_and_unload()
    assert not giftsw_layers(merged) and type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged), trained, rtol=0, atol=1e-5)
    unloaded = peft.get_peft_model(tiny(seed=0), config()).unload()
    torch.testing.assert_close(logits(unloaded), base_ref, rtol=0, atol=0)


def test_two_adapters_and_set_adapter():
    base_ref = logits(tiny(seed=0))
    model = peft.get_peft_model(tiny(seed=0), config())
    perturb_(model, seed=1)
    first = logits(model)
    model.add_adapter("second", config(metric="random", n_salient=2))
    model.set_adapter("second")
    assert all(".second" in n for n, p in model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(logits(model), base_ref, rtol=0, atol=1e-5)  # untrained second
    perturb_(model, seed=2)
    second = logits(model)
    assert (second - first).abs().max() > 1e-2
    model.set_adapter("default")
    torch.testing.assert_close(logits(model), first, rtol=0, atol=1e-5)


def _trainer(model, out, max_steps, tok):
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": [(7 * i + j) % 300 + 3 for j in range(12)]} for i in range(16)]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=1, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to="none", use_cpu=DEVICE.type == "cpu", seed=0, logging_steps=1,
                             lr_scheduler_type="constant", disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=rows)


def test_trainer_saves_and_resumes_a_peft_model(tmp_path):
    tok = tiny_tokenizer()
    straight = peft.get_peft_model(tiny(seed=0), config(noise="weight"))
    _trainer(straight, tmp_path / "a", 2, tok).train()
    assert (tmp_path / "a" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    resumed = peft.get_peft_model(tiny(seed=0), config(noise="weight"))
    _trainer(resumed, tmp_path / "b", 2, tok).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for n in a:  # same computation repeated on the same machine: exact
        assert torch.equal(a[n], b[n]), n


def test_gradient_checkpointing_recomputes_the_same_noise():
    grads = []
    for checkpointing in (False, True):
        model = peft.get_peft_model(tiny(seed=0), config(noise="weight"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        torch.manual_seed(3)
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-6)


def test_bf16_base_keeps_fp32_trainable_columns_under_autocast():
    model = peft.get_peft_model(tiny(seed=0, dtype=torch.bfloat16), config())
    layer = next(iter(giftsw_layers(model).values()))
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert layer.giftsw_weight["default"].dtype == torch.float32
    model.train()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        model(input_ids=IDS, labels=IDS).loss.backward()
    assert layer.giftsw_weight["default"].grad.dtype == torch.float32
    assert layer.giftsw_weight["default"].grad.abs().sum() > 0


def test_calibration_metrics_need_scores_and_take_them(tmp_path):
    with pytest.raises(ValueError, match="needs calibration statistics: give scores="):
        peft.get_peft_model(tiny(seed=0), config(metric="gift"))
    from salientft import calibration_batches, collect_activation_stats, saliency_scores, save_scores

    tok = tiny_tokenizer()
    batches = calibration_batches(tok, source=["a short text about cats and dogs " * 8] * 4, calib_samples=4,
                                  seq_len=32)
    # preprocess on calibration batches == apply_gift on the same batches
    cfg = config(metric="gift")
    preprocess_gift_sw(tiny(seed=0), cfg, batches)
    tuned = peft.get_peft_model(tiny(seed=0), cfg)
    plain = apply_gift(tiny(seed=0), GiftConfig(n_salient=4, metric="gift"), calibration=batches)
    for name, layer in giftsw_layers(tuned).items():
        assert torch.equal(layer.giftsw_idx["default"],
                           plain.get_submodule(name.removeprefix("base_model.model.")).salient_idx), name
    # a scores file from salientft calibrate
    base = tiny(seed=0)
    scores = saliency_scores(base, collect_activation_stats(base, batches), metric="gift")
    save_scores(scores, tmp_path / "s.safetensors")
    from_file = peft.get_peft_model(tiny(seed=0), config(metric="gift", scores=str(tmp_path / "s.safetensors")))
    for name, layer in giftsw_layers(from_file).items():
        assert torch.equal(layer.giftsw_idx["default"], giftsw_layers(tuned)[name].giftsw_idx["default"])


def test_adapter_config_of_before_the_rename_reads_scores_file_as_scores(tmp_path):
    """``scores`` is the scores file's one name (docs/configuration.md#names); adapter_config.json
    files written before hold ``scores_file`` (null, or a path) and still load."""
    from peft import PeftConfig

    config(scores="s.safetensors").save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["scores"] == "s.safetensors" and "scores_file" not in written
    for old in (None, "old.safetensors"):
        d = {k: v for k, v in written.items() if k != "scores"}
        (tmp_path / "adapter_config.json").write_text(json.dumps({**d, "scores_file": old}))
        with pytest.warns(DeprecationWarning) if old else _no_warning():
            loaded = PeftConfig.from_pretrained(str(tmp_path))
        assert isinstance(loaded, GiftSWConfig) and loaded.scores == old
    with pytest.raises(TypeError, match="old name of scores"):
        config(scores="a", scores_file="b")


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def cm():
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            yield

    return cm()


def test_per_layer_k_and_bad_configs():
    model = peft.get_peft_model(tiny(seed=0), config(k_pattern={"down_proj": 9}))
    ks = {n.rsplit(".", 1)[-1]: layer.giftsw_idx["default"].numel() for n, layer in giftsw_layers(model).items()}
    assert ks["down_proj"] == 9 and ks["q_proj"] == 4
    for bad, msg in [(dict(metric="nope"), "metric must be one of"), (dict(noise="loud"), "noise must be one of"),
                     (dict(n_salient=0), "n_salient must be a positive integer"),
                     (dict(k_pattern={"q_proj": 0}), "k_pattern")]:
        with pytest.raises(ValueError, match=msg):
            config(**bad)
    with pytest.raises(ValueError, match="larger than"):
        peft.get_peft_model(tiny(seed=0), config(n_salient=1000))


def test_peft_internals_this_relies_on():
    """What docs/ecosystem.md lists as the PEFT internals the tuner uses, each checked."""
    from peft import mapping
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_tuner_state_dict_key_prefixes
    from peft.utils import register_peft_method

    # 1. the mappings take a string peft type (register_peft_method would refuse one outside the enum)
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["GIFT_SW"] is GiftSWConfig
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["GIFT_SW"] == "giftsw_"
    assert issubclass(mapping.PEFT_TYPE_TO_TUNER_MAPPING["GIFT_SW"], BaseTuner)
    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(name="gift_sw", config_cls=GiftSWConfig, model_cls=BaseTuner)
    # 2. a persistent BufferDict on a tuner layer is part of the adapter state dict (indices, noise scale)
    model = peft.get_peft_model(tiny(seed=0), config())
    prefixes = _get_tuner_state_dict_key_prefixes(model)
    assert any(p.endswith(".giftsw_idx") for p in prefixes) and any(p.endswith(".giftsw_noise_std") for p in prefixes)
    sd = peft.get_peft_model_state_dict(model)
    assert any(k.endswith("giftsw_idx") for k in sd) and any(k.endswith("giftsw_weight") for k in sd)
    assert not any("base_layer" in k for k in sd)  # the frozen weights are not in the adapter
    # 3. PeftConfig.from_pretrained resolves the config class through the mapping
    layer = next(iter(giftsw_layers(model).values()))
    assert isinstance(layer, BaseTunerLayer) and layer.adapter_layer_names == ("giftsw_weight",)


def test_trl_sft_trainer_trains_and_saves_a_gift_sw_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = tiny_tokenizer()
    ds = Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(16)])
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to="none", use_cpu=DEVICE.type == "cpu", logging_steps=1, save_strategy="no",
                         max_length=64, disable_tqdm=True, bf16=False)  # fp32: the comparison below is exact-ish
    trainer = trl.SFTTrainer(model=tiny_random_llama(seed=0), args=args, train_dataset=ds, processing_class=tok,
                             peft_config=config(noise="weight"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all("giftsw_weight" in n for n in moved)
    trainer.save_model(str(tmp_path / "adapter"))
    want = logits(trainer.model)
    reloaded = peft.PeftModel.from_pretrained(tiny(seed=0), str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(reloaded), want, rtol=0, atol=1e-5)


def test_fields_trl_writes_modules_to_save_and_trainable_tokens(tmp_path):
    model = peft.get_peft_model(tiny(seed=0), config(modules_to_save=["lm_head"],
                                                                  trainable_token_indices=[5, 17]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in n for n in names)
    assert any("token_adapter" in n for n in names)
    perturb_(model)
    want = logits(model)
    model.save_pretrained(tmp_path / "a")
    reloaded = peft.PeftModel.from_pretrained(tiny(seed=0), str(tmp_path / "a"))
    torch.testing.assert_close(logits(reloaded), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", ["salientft-first", "peft-first"])
def test_import_salientft_registers_the_tuner_without_importing_peft_itself(order):
    """``import salientft`` must not pay PEFT's import time, yet PEFT must know GIFT_SW once imported."""
    first, second = ("salientft", "peft") if order == "salientft-first" else ("peft", "salientft")
    code = f"""
import sys
import {first}
if {first!r} == "salientft":
    assert "peft" not in sys.modules, "import salientft imported peft"
import {second}
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
assert "GIFT_SW" in PEFT_TYPE_TO_CONFIG_MAPPING and "GIFT_SW" in PEFT_TYPE_TO_TUNER_MAPPING
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ----------------------------------------------------------------------------- registration that cannot be missed
# What probes for PEFT with importlib.util.find_spec("peft") before PEFT is imported: transformers'
# availability check (run inside from_pretrained, salientft.load_model and `import trl`). Each one alone
# used to consume salientft's import hook.
PROBES = """
import importlib.util, transformers
from transformers import AutoModelForCausalLM
assert transformers.utils.is_peft_available()
importlib.util.find_spec("peft"); importlib.util.find_spec("peft")
"""


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A PEFT-route GIFT-SW adapter on the tiny Llama saved as a plain folder, and its logits."""
    d = tmp_path_factory.mktemp("reg")
    tiny_random_llama(seed=0).save_pretrained(d / "base")
    model = peft.get_peft_model(tiny_random_llama(seed=0), config(noise="weight"))
    perturb_(model)
    model.save_pretrained(d / "adapter")
    torch.save(logits(model), d / "want.pt")
    return d


def test_registration_survives_probes_before_peft_is_imported(saved_adapter):
    """docs/ecosystem.md's reload order in a fresh process, with PEFT probed for between `import
    salientft` and PEFT's import (one process for all probes: CI time)."""
    d = saved_adapter
    code = f"""
import sys, torch
import salientft
assert "peft" not in sys.modules
{PROBES}
base = AutoModelForCausalLM.from_pretrained({str(d / 'base')!r}, dtype=torch.float32)
from peft import PeftModel
model = PeftModel.from_pretrained(base, {str(d / 'adapter')!r}).eval()
with torch.no_grad():
    got = model(input_ids=torch.tensor({IDS.tolist()})).logits.float()
print((got - torch.load({str(d / 'want.pt')!r}, weights_only=True)).abs().max().item())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-5  # same forward: ~1e-7


def test_salientft_paths_register_even_when_the_hook_missed(saved_adapter, tmp_path):
    """PEFT imported first with the mappings emptied of GIFT_SW (as if registration was missed):
    salientft's own paths (require_peft, used by eval and export for PEFT adapters) register it."""
    from peft import mapping

    from salientft.methods.peft_baselines import require_peft

    saved = {m: getattr(mapping, m).pop("GIFT_SW") for m in
             ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")}
    try:
        require_peft("this test")
        assert all("GIFT_SW" in getattr(mapping, m) for m in saved)
    finally:
        for m, v in saved.items():
            getattr(mapping, m)["GIFT_SW"] = v


def test_without_salientft_peft_cannot_know_gift_sw_and_the_folder_says_what_to_do(saved_adapter, tmp_path):
    """Documented limit (docs/ecosystem.md): in a process that never imports salientft, nothing of
    salientft runs, so PEFT's own KeyError is what it raises; salientft's adapter folders carry a
    README naming `import salientft`, and salientft's own loaders never need it."""
    from salientft import GiftConfig as GC, apply_gift as ag, save_adapter

    m = ag(tiny_random_llama(seed=0), GC(n_salient=2, metric="magnitude"))
    save_adapter(m, tmp_path / "a")
    assert "`import salientft`" in (tmp_path / "a" / "README.md").read_text()
    code = f"""
import sys
sys.modules["salientft"] = None  # never importable here
from peft import PeftConfig
try:
    PeftConfig.from_pretrained({str(tmp_path / 'a')!r})
except KeyError as e:
    print("KeyError", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "KeyError 'GIFT_SW'", out.stderr[-2000:]


# ----------------------------------------------------------------------------- one adapter format
@pytest.mark.numerics
def test_salientft_adapter_loads_in_peft_and_peft_adapter_loads_in_salientft(tmp_path):
    from salientft import load_adapter, save_adapter

    ours = apply_gift(tiny_random_llama(seed=0), GiftConfig(n_salient=4, metric="magnitude"))
    perturb_(ours)
    want = logits(ours)
    save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_random_llama(seed=0), str(tmp_path / "ours"))
    # PEFT's layer vs SalientLinear: the same salient_linear function on the same tensors
    torch.testing.assert_close(logits(loaded), want, rtol=0, atol=1e-5)

    theirs = peft.get_peft_model(tiny_random_llama(seed=0), config(n_salient=3))
    perturb_(theirs)
    want = logits(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    fp = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["base_fingerprint"]
    assert isinstance(fp, str) and len(fp) == 64
    back = load_adapter(tiny_random_llama(seed=0), tmp_path / "theirs")
    torch.testing.assert_close(logits(back), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="fingerprint mismatch"):  # salientft's check holds for both origins
        load_adapter(tiny_random_llama(seed=1), tmp_path / "theirs")
    with pytest.warns(UserWarning, match="base fingerprint mismatch"):  # PEFT's loading warns
        peft.PeftModel.from_pretrained(tiny_random_llama(seed=1), str(tmp_path / "theirs"))


def test_peft_route_adapter_with_modules_to_save_is_refused_by_salientft_loader(tmp_path):
    from salientft import load_adapter

    model = peft.get_peft_model(tiny_random_llama(seed=0), config(modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="modules_to_save.*PeftModel.from_pretrained"):
        load_adapter(tiny_random_llama(seed=0), tmp_path / "a")


# ----------------------------------------------------------------------------- one declaration per setting
def test_gift_sw_settings_have_one_default_and_one_help():
    import dataclasses

    from salientft.gift.config import SETTINGS
    from salientft.methods.gift_sw import GiftSWMethodConfig

    ours = {f.name: f for f in dataclasses.fields(GiftConfig)}
    theirs = {f.name: f for f in dataclasses.fields(GiftSWConfig)}
    train = {f.name: f for f in dataclasses.fields(GiftSWMethodConfig)}  # the settings of `salientft train`
    for name in (*SETTINGS, "target_modules"):
        assert theirs[name].default == ours[name].default, name
        assert theirs[name].metadata["help"] == ours[name].metadata["help"], name
    for name in ("n_salient", "salient_fraction", "metric", "noise_bits", "fp32_salient", "keep_noise"):
        assert train[name].default == ours[name].default, name
        assert train[name].metadata["help"].endswith(ours[name].metadata["help"]), name
    assert GiftConfig().fp32_salient is GiftSWConfig().fp32_salient is True
    assert GiftSWConfig().target_modules == "all-linear"
    assert GiftConfig(target_modules="all-linear").target_modules is None  # the same set


# ----------------------------------------------------------------------------- all-linear
def test_all_linear_is_the_blocks_linear_layers_on_opt_350m_style_models():
    """OPT-350m projects embeddings (word_embed_proj_dim != hidden_size) with project_in/project_out,
    outside the blocks: not GIFT-SW targets, and the calibrated recipe works on such a model."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                    word_embed_proj_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    base = OPTForCausalLM(cfg).eval()
    assert {"model.decoder.project_in", "model.decoder.project_out"} <= {n for n, _ in base.named_modules()}
    c = config(metric="gift", n_salient=2)
    batches = [{"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)),
                "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    preprocess_gift_sw(base, c, batches)
    model = peft.get_peft_model(base, c)
    targeted = set(giftsw_layers(model))
    assert len(targeted) == 12 and not any("project" in n for n in targeted)
    assert all(".layers." in n for n in targeted)


def test_peft_loading_refuses_broken_adapters(tmp_path):
    from safetensors.torch import load_file, save_file

    model = peft.get_peft_model(tiny_random_llama(seed=0), config())
    model.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    good = load_file(path)
    key = "base_model.model.model.layers.0.mlp.up_proj.giftsw_"
    for name, broken, message in (("weight", float("nan"), "NaN or infinite"), ("idx", None, "twice")):
        t = dict(good)
        t[key + name] = t[key + name].clone()
        if broken is None:
            t[key + name][1] = t[key + name][0]
        else:
            t[key + name][0, 0] = broken
        save_file(t, str(path))
        with pytest.raises(ValueError, match=message):
            peft.PeftModel.from_pretrained(tiny_random_llama(seed=0), str(tmp_path / "a"))
