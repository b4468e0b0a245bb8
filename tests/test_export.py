"""salientft export: GIFT-SW adapters as PEFT LoRA, merged models, quantized models as compressed-tensors.

The claims are checked where they matter: stock transformers + PEFT (+ compressed-tensors) load the
exports in a subprocess where ``salientft`` cannot be imported (``sys.modules["salientft"] = None``)
and reproduce salientft's logits.

Tolerance 1e-5 on fp32 logits: the two sides compute the same function in a different order (PEFT
adds the rank-k update x A^T B^T to x W^T, where salientft multiplies by the merged W), which on
this tiny model moves logits by ~1e-7; a wrong column, sign or scale moves them by > 1e-2. The
compressed-tensors weights themselves are compared bit for bit (torch.equal): the scales are
stored in fp32 and dequantized as q * scale in fp32, as salientft does.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("compressed_tensors")

from conftest import suite_device  # noqa: E402
import salientft  # noqa: E402
from salientft import GiftConfig, apply_gift, merge_gift, save_adapter  # noqa: E402
from salientft.cli import main  # noqa: E402
from salientft.export import (  # noqa: E402
    SALIENT_LORA_DIR, export, export_compressed_tensors, export_lora, export_merged,
)
from salientft.models import load_model, tiny_random_llama, tiny_tokenizer  # noqa: E402
from salientft.quant.model import quantize, quantized_layers, save_quantized  # noqa: E402

IDS = torch.tensor([[5, 17, 33, 81, 120, 7, 64, 99, 3, 42]])
DEVICE = suite_device()  # where the exports run (the files do not depend on it)
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
WITHOUT_SALIENTFT = """import sys; sys.modules["salientft"] = None
try:
    import salientft
except ImportError:
    pass
else:
    raise SystemExit("salientft is importable")
import json, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
ids = torch.tensor({ids})
want = torch.load({want!r}, weights_only=True)


def ranks(model):
    return {{n.removeprefix("base_model.model.").removesuffix(".lora_A.default"): m.weight.shape[0]
            for n, m in model.named_modules() if n.endswith(".lora_A.default")}}
"""


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def perturb_(model):
    """Stand-in for training: the trainable salient columns move by N(0, 0.5^2), deterministically."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in filter(lambda p: p.requires_grad, model.parameters()):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype), alpha=0.5)


def run_without_salientft(tmp_path, want: torch.Tensor, body: str) -> dict:
    """Run ``body`` in a fresh Python where salientft cannot be imported; it prints one JSON line."""
    torch.save(want, tmp_path / "want.pt")
    code = WITHOUT_SALIENTFT.format(ids=IDS.tolist(), want=str(tmp_path / "want.pt")) + body
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny Llama saved as a plain transformers folder, so stock transformers can load it."""
    d = tmp_path_factory.mktemp("base")
    tiny_random_llama(seed=0).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gift(base_dir, tmp_path_factory):
    """A trained salientft GIFT-SW adapter with k = 4 (in = 64) or 8 (down_proj, in = 128), and the
    logits of the merged model."""
    d = tmp_path_factory.mktemp("gift")
    model, _ = load_model(str(base_dir), dtype="fp32")
    apply_gift(model, GiftConfig(salient_fraction=1 / 16, metric="magnitude", noise="none"))
    perturb_(model)
    save_adapter(model, d / "adapter", base_model=str(base_dir))
    return d / "adapter", logits(merge_gift(model))


@pytest.mark.numerics
def test_lora_export_gives_the_merged_logits_in_stock_peft(gift, base_dir, tmp_path):
    adapter, want = gift
    result = export_lora(adapter, tmp_path / "lora")  # the base is the one the adapter names
    assert result.base_model == str(base_dir)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str(base_dir)
    assert cfg["r"] == cfg["lora_alpha"] == 8 and cfg["fan_in_fan_out"] is False
    names = {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(cfg["target_modules"]) == names
    # per-layer k: every layer but down_proj has k = 4, listed with an equal alpha (scaling 1)
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {n: 4 for n in names if not n.endswith("down_proj")}
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    assert a.shape == (8, 128) and torch.equal(a.sum(1), torch.ones(8)) and set(a.unique().tolist()) == {0.0, 1.0}

    got = run_without_salientft(tmp_path, want, f"""
base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {str(tmp_path / 'lora')!r}).eval()
with torch.no_grad():
    got = model(input_ids=ids).logits
print(json.dumps({{"diff": (got - want).abs().max().item(), "ranks": ranks(model)}}))
""")
    assert got["diff"] <= TOL
    assert got["ranks"] == {n: 8 if n.endswith("down_proj") else 4 for n in names}


def test_run_directory_and_cli(gift, base_dir, tmp_path, capsys):
    adapter, _ = gift
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    (run / "run_config.json").write_text(json.dumps({"model": str(base_dir), "method": "gift-sw"}))
    assert main(["export", str(run), "--format", "lora", "--output", str(tmp_path / "a"), "--device", str(DEVICE)]) == 0
    out = capsys.readouterr().out
    assert "PeftModel.from_pretrained" in out and "--max-lora-rank 8" in out and "vllm serve" in out
    export_lora(adapter, tmp_path / "b")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # an earlier export is refused (exit 2), replaced with --overwrite; never a folder holding a user's file
    argv = ["export", str(run), "--format", "merged", "--output", str(tmp_path / "a")]
    assert main(argv) == 2
    assert "holds an earlier output of salientft; replace it with --overwrite" in capsys.readouterr().err
    (tmp_path / "a" / "notes.txt").write_text("mine")
    assert main(argv + ["--overwrite"]) == 2
    assert "also holds files salientft did not write (notes.txt)" in capsys.readouterr().err
    (tmp_path / "a" / "notes.txt").unlink()
    assert main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "a" / "config.json").is_file() and not (tmp_path / "a" / "adapter_config.json").exists()
    # the output may not replace the source
    assert main(["export", str(run), "--format", "lora", "--output", str(run), "--overwrite"]) == 2
    assert "would replace the source" in capsys.readouterr().err


@pytest.mark.numerics
def test_merged_export_is_a_plain_transformers_model(gift, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, want = gift
    result = export(adapter, tmp_path / "merged", "merged", device=DEVICE)
    assert result.format == "merged" and result.ranks == {}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("salient" in n for n, _ in model.named_parameters())
    AutoTokenizer.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(model), want, rtol=0, atol=TOL)


@pytest.mark.numerics
def test_peft_gift_sw_adapter_input(base_dir, tmp_path, capsys):
    import salientft.peft  # noqa: F401  (registers GIFT_SW in PEFT)
    from transformers import AutoModelForCausalLM

    tuned = peft.get_peft_model(tiny_random_llama(seed=0), salientft.peft.GiftSWConfig(metric="magnitude", n_salient=4))
    perturb_(tuned)
    want = logits(tuned)
    tuned.save_pretrained(tmp_path / "giftsw")
    assert json.loads((tmp_path / "giftsw" / "adapter_config.json").read_text())["peft_type"] == "GIFT_SW"
    # this adapter does not name its base: --base is required
    assert main(["export", str(tmp_path / "giftsw"), "--format", "lora", "--output", str(tmp_path / "x")]) == 2
    assert "pass --base" in capsys.readouterr().err

    result = export_lora(tmp_path / "giftsw", tmp_path / "lora", base=str(base_dir))
    assert set(result.ranks.values()) == {4} and len(result.ranks) == 14
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and cfg["rank_pattern"] == {}
    lora = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                          tmp_path / "lora")
    torch.testing.assert_close(logits(lora), want, rtol=0, atol=TOL)

    export_merged(tmp_path / "giftsw", tmp_path / "merged", base=str(base_dir))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=TOL)


@pytest.mark.numerics
def test_conv1d_base_is_exported_with_fan_in_fan_out(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    model, _ = load_model(str(tmp_path / "gpt2"), dtype="fp32")
    from salientft.targets import find_target_modules, linear_weight

    # explicit scores: the metric path (saliency.saliency_scores) does not take Conv1D targets yet
    scores = {n: linear_weight(m).detach().norm(dim=0) for n, m in find_target_modules(model).items()}
    apply_gift(model, GiftConfig(n_salient=3, noise="none"), scores)
    perturb_(model)
    save_adapter(model, tmp_path / "adapter")
    want = logits(merge_gift(model))
    export_lora(tmp_path / "adapter", tmp_path / "lora", base=str(tmp_path / "gpt2"))
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    lora = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"), tmp_path / "lora")
    torch.testing.assert_close(logits(lora), want, rtol=0, atol=TOL)


def _quantized(tmp_path, name="q", **kw) -> Path:
    model = tiny_random_llama(seed=0)
    quantize(model, **{"bits": 4, "quantizer": "rtn", "n_salient": 4, "metric": "magnitude", "progress": False, **kw})
    return save_quantized(model, tmp_path / name, tokenizer=tiny_tokenizer())


@pytest.mark.numerics
def test_compressed_tensors_export_reproduces_the_quantized_model(tmp_path, capsys):
    folder = _quantized(tmp_path)
    ours, _ = load_model(str(folder), dtype="fp32")
    want = logits(ours)
    dense = {}  # what compressed-tensors must dequantize to: scale * q, zeros in the salient columns
    for name, layer in quantized_layers(ours).items():
        w = torch.zeros(layer.out_features, layer.in_features)
        w[:, layer.int_idx] = layer.dequantized_int_weight(torch.float32)
        dense[name] = w
    torch.save(dense, tmp_path / "dense.pt")

    out = tmp_path / "ct"
    assert main(["export", str(folder), "--format", "compressed-tensors", "--output", str(out), "--device", str(DEVICE)]) == 0
    printed = capsys.readouterr().out
    assert "CompressedTensorsConfig(dequantize=True)" in printed and "--enable-lora" in printed
    assert f"--lora-modules salient={out / SALIENT_LORA_DIR}" in printed and "--max-lora-rank 8" in printed
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized" and q["ignore"] == ["lm_head"]
    assert [weights[k] for k in ("num_bits", "type", "symmetric", "strategy")] == [4, "int", True, "channel"]
    lora_cfg = json.loads((out / SALIENT_LORA_DIR / "adapter_config.json").read_text())
    assert lora_cfg["r"] == lora_cfg["lora_alpha"] == 4 and lora_cfg["base_model_name_or_path"] == str(out.resolve())

    got = run_without_salientft(tmp_path, want, f"""
from transformers import CompressedTensorsConfig
dense = torch.load({str(tmp_path / 'dense.pt')!r}, weights_only=True)

def exact(model):
    return all(torch.equal(model.get_submodule(n).weight, w) for n, w in dense.items())

# the default load keeps the packed integers and decompresses them at the first forward
packed = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
scale_dtype = str(packed.model.layers[0].self_attn.q_proj.weight_scale.dtype)
with torch.no_grad():
    packed(input_ids=ids)
# dequantize=True gives dense weights at load, so PEFT can attach the salient columns
base = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32,
                                            quantization_config=CompressedTensorsConfig(dequantize=True))
model = PeftModel.from_pretrained(base, {str(out / SALIENT_LORA_DIR)!r}).eval()
with torch.no_grad():
    got = model(input_ids=ids).logits
print(json.dumps({{"diff": (got - want).abs().max().item(), "packed_exact": exact(packed),
                  "dequantized_exact": exact(base), "scale": scale_dtype,
                  "ranks": set(ranks(model).values()) == {{4}}}}))
""")
    assert got["packed_exact"] and got["dequantized_exact"]  # scale * q bit for bit, in both load paths
    assert got["scale"] == "torch.float32" and got["ranks"]
    assert got["diff"] <= TOL


@pytest.mark.numerics
def test_compressed_tensors_8_bit_from_a_recovery_run(tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    run = tmp_path / "run"
    _quantized(run, name="model", bits=8)
    (run / "run_config.json").write_text(json.dumps({"method": "gift-sw", "quantized": "q", "model": "x"}))
    want = logits(load_model(str(run / "model"), dtype="fp32")[0])
    export(run, tmp_path / "ct", "compressed-tensors", device=DEVICE)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True))
    model = peft.PeftModel.from_pretrained(base, tmp_path / "ct" / SALIENT_LORA_DIR)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=TOL)


def test_compressed_tensors_keeps_a_bf16_model_bf16_and_its_steps_fp32(tmp_path):
    """With ``dequantize=True`` transformers computes q * step in fp32 and casts: salientft's bf16 weights."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny_random_llama(seed=0, dtype=torch.bfloat16)
    quantize(model, bits=4, quantizer="rtn", n_salient=4, metric="magnitude", progress=False)
    folder = save_quantized(model, tmp_path / "q", tokenizer=tiny_tokenizer())
    export(folder, tmp_path / "ct", "compressed-tensors", device=DEVICE)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), framework="pt") as f:
        dtypes = {k.rsplit(".", 1)[-1]: f.get_slice(k).get_dtype() for k in f.keys()
                  if k.startswith(("model.layers.0.self_attn.q_proj.", "model.embed_tokens."))}
    assert dtypes == {"weight": "BF16", "weight_packed": "I32", "weight_scale": "F32", "weight_shape": "I64"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, layer in quantized_layers(model).items():
        w = torch.zeros(layer.out_features, layer.in_features, dtype=torch.bfloat16)
        w[:, layer.int_idx] = layer.dequantized_int_weight(torch.bfloat16)
        assert torch.equal(loaded.get_submodule(name).weight, w), name
    lora = json.loads((tmp_path / "ct" / SALIENT_LORA_DIR / "adapter_config.json").read_text())
    assert lora["r"] == 4


@pytest.mark.parametrize("kw, message", [
    ({"bits": 3}, "quantized to 3 bits.*take 4 or 8 bits only"),
    ({"group_size": 16}, "group_size=16.*consecutive NON-salient columns.*no\\s+exact counterpart"),
])
def test_compressed_tensors_refuses_what_it_cannot_carry_exactly(tmp_path, capsys, kw, message):
    import re

    folder = _quantized(tmp_path, **kw)
    with pytest.raises(ValueError, match=message):
        export_compressed_tensors(folder, tmp_path / "ct")
    assert main(["export", str(folder), "--format", "compressed-tensors", "--output", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("salientft export: error:") and re.search(message, err)
    assert not (tmp_path / "ct").exists()


def test_wrong_inputs_are_refused_with_their_fix(gift, tmp_path, capsys):
    adapter, _ = gift
    folder = _quantized(tmp_path)
    recovery = tmp_path / "run"
    _quantized(recovery, name="model")
    (recovery / "run_config.json").write_text(json.dumps({"method": "salient", "quantized": str(folder)}))
    cases = [
        (["export", str(folder), "--format", "lora"], "export it with --format compressed-tensors"),
        (["export", str(recovery), "--format", "merged"], "export it with --format compressed-tensors"),
        (["export", str(adapter), "--format", "compressed-tensors"], "not a model written by salientft quantize"),
        (["export", str(folder), "--format", "compressed-tensors", "--base", "x"], "--base does not apply"),
        (["export", str(tmp_path / "nothing"), "--format", "merged"], "is not a folder"),
    ]
    for argv, message in cases:
        assert main(argv + ["--output", str(tmp_path / "out")]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):  # argparse: unknown format
        main(["export", str(adapter), "--format", "gguf", "--output", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="unknown export format"):
        export(adapter, tmp_path / "out", "gguf")
    # a PEFT LoRA adapter is already in PEFT's format
    lora = peft.get_peft_model(tiny_random_llama(seed=0), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "peft_lora")
    with pytest.raises(ValueError, match="PEFT LORA adapter, already in PEFT's format"):
        export_lora(tmp_path / "peft_lora", tmp_path / "out", base="tiny-random-llama")
    assert not (tmp_path / "out").exists()


def test_missing_compressed_tensors_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    folder = _quantized(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "compressed_tensors" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'salientft\[export\]'"):
        export_compressed_tensors(folder, tmp_path / "ct")


def test_export_is_public():
    # salientft.export stays the module (binding the dispatcher there would shadow it)
    import salientft.export as module

    assert module.export is export and salientft.export is module
    assert {"export_lora", "export_merged", "export_compressed_tensors"} <= set(salientft.__all__)


def test_lora_export_records_a_base_stock_tools_load(gift, base_dir, tmp_path, monkeypatch):
    model = apply_gift(tiny_random_llama(seed=0), GiftConfig(n_salient=2, metric="magnitude"))
    save_adapter(model, tmp_path / "tiny", base_model="tiny-random-llama")
    result = export_lora(tmp_path / "tiny", tmp_path / "l1")  # salientft still finds its own base
    cfg = json.loads((tmp_path / "l1" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None and result.base_model is None  # no name to load: none
    assert "tiny-random-llama is built in code" in result.instructions()
    adapter, _ = gift
    monkeypatch.chdir(base_dir.parent)
    export_lora(adapter, tmp_path / "l2", base=base_dir.name)  # a relative folder, recorded as given
    assert json.loads((tmp_path / "l2" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        base_dir.name


@pytest.mark.numerics
def test_eval_reads_a_peft_route_gift_sw_adapter(tmp_path):
    """`salientft eval --adapter <PEFT GIFT-SW adapter>` used to fail with `error: GIFT_SW`."""
    from salientft.evaluation.loading import load_for_eval

    tuned = peft.get_peft_model(tiny_random_llama(seed=0), salientft.peft.GiftSWConfig(metric="magnitude", n_salient=4))
    perturb_(tuned)
    want = logits(tuned)
    tuned.save_pretrained(tmp_path / "giftsw")
    model, _, desc = load_for_eval("tiny-random-llama", adapter=tmp_path / "giftsw", dtype="fp32")
    torch.testing.assert_close(logits(model), want, rtol=0, atol=TOL)  # SalientLinear vs PEFT's layer
    assert "adapter" in desc
