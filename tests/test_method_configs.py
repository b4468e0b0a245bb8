"""Each method owns its settings (``salientft.methods``' config classes): a new method with a setting
of its own is one module, and its setting is a flag, a YAML key (flat and nested), validated, and
compared on resume; TrainConfig's flat, nested and object forms build the same config; the flat
run_config.json of earlier versions still loads and resumes."""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from salientft import methods
from salientft.cli import _build_parser, main
from salientft.config import GMTConfig, TrainConfig, resolve_train_config
from salientft.config_base import check_range, flag
from salientft.methods.base import MethodConfig, WholeModelMethod, _REGISTRY, register, save_plain_model
from salientft.methods.gift_sw import GiftSWMethodConfig
from salientft.methods.peft_baselines import LoRAMethodConfig
from salientft.train import config_changes, train

from conftest import suite_device


# ----------------------------------------------------------------------------- a new method, one module

@dataclass
class TopLayersConfig(MethodConfig):
    top_layers: int = flag(1, "train only the last N decoder layers")

    def check(self) -> None:
        check_range(self, "top_layers", min=1, what="must be a positive integer")


class TopLayers(WholeModelMethod):
    """Train the last ``top_layers`` decoder layers (every other weight frozen)."""

    name = "top-layers"
    summary = "the last decoder layers only (a test method)"
    config_class = TopLayersConfig

    def prepare(self, model, config, data=None, **_):
        n = config.method_config.top_layers
        layers = model.model.layers
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers[len(layers) - n:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        return model

    def metrics(self, log_history):
        return {"top_layers_logged_steps": sum(1 for h in log_history if "loss" in h)}

    def save_output(self, model, tokenizer, config, out: Path) -> None:
        save_plain_model(model, tokenizer, out / "model")


@pytest.fixture
def top_layers():
    register(TopLayers)
    try:
        yield methods.get("top-layers")
    finally:
        del _REGISTRY[("top-layers", False)]


def test_a_new_methods_setting_is_a_flag_with_its_help(top_layers, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        _build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--top-layers TOP_LAYERS top-layers: train only the last N decoder layers (default: 1)" in text
    assert "top-layers: the last decoder layers only (a test method)" in text  # the method list
    ns = vars(_build_parser().parse_args(["train", "--method", "top-layers", "--top-layers", "3"]))
    assert ns["top_layers"] == 3


def test_a_new_methods_setting_reads_from_yaml_flat_and_nested(top_layers, tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("method: top-layers\ntop_layers: 2\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("method:\n  name: top-layers\n  top_layers: 3\nmax_steps: 4\n")
    assert resolve_train_config(str(flat), {}).method_config == TopLayersConfig(top_layers=2)
    cfg = resolve_train_config(str(nested), {})
    assert (cfg.method, cfg.top_layers, cfg.max_steps) == ("top-layers", 3, 4)
    assert resolve_train_config(str(nested), {"top_layers": 5}).top_layers == 5  # a flag wins over the file
    # the method flag over a nested section keeps the section's other settings
    assert resolve_train_config(str(nested), {"method": "top-layers"}).top_layers == 3
    assert TrainConfig(method=TopLayersConfig(top_layers=4)).method == "top-layers"  # the object form


def test_a_new_methods_setting_is_validated(top_layers, tmp_path):
    with pytest.raises(ValueError, match=r"TopLayersConfig.top_layers must be a positive integer, got 0"):
        TrainConfig(method="top-layers", top_layers=0)
    with pytest.raises(ValueError, match=r"TopLayersConfig.top_layers must be an integer, got 'many'"):
        TrainConfig(method="top-layers", top_layers="many")
    with pytest.raises(ValueError, match=r"method 'gift-sw' does not use --top-layers; remove it "
                                         r"\(--top-layers applies to top-layers\)"):
        TrainConfig(method="gift-sw", top_layers=2)
    TrainConfig(method="gift-sw", top_layers=1)  # at its default: a flat file of every setting loads
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {name: top-layers, top_layers: -1}\n")
    with pytest.raises(ValueError, match="top_layers must be a positive integer"):
        resolve_train_config(str(bad), {})


def test_a_new_methods_setting_is_compared_on_resume(top_layers):
    stored = TrainConfig(method="top-layers", top_layers=2, max_steps=5).to_dict()
    assert stored["method_config"] == {"top_layers": 2}
    assert config_changes(stored, TrainConfig(method="top-layers", top_layers=2, max_steps=5)) == []
    assert config_changes(stored, TrainConfig(method="top-layers", top_layers=3, max_steps=5)) == [
        "top_layers: 2 -> 3"]


@pytest.mark.integration
def test_a_new_method_trains_end_to_end_and_adds_its_metrics(top_layers, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i}?", "response": f"{2 * i}."}) + "\n"
                            for i in range(16)))
    out = tmp_path / "run"
    rc = main(["train", "--model", "tiny-random-llama", "--data", str(data), "--output", str(out),
               "--method", "top-layers", "--top-layers", "1", "--max-steps", "2", "--dtype", "fp32",
               "--max-length", "64", "--no-eval-before", "--device", str(suite_device())])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top_layers_logged_steps"] == 2  # the method's metrics hook
    assert metrics["trainable_fraction"] < 1 and (out / "model").is_dir()
    stored = json.loads((out / "run_config.json").read_text())
    assert (stored["method"], stored["method_config"]) == ("top-layers", {"top_layers": 1})
    with pytest.raises(ValueError, match=r"top_layers: 1 -> 2"):
        train(TrainConfig.from_dict({**stored, "top_layers": 2}), resume=True)


def test_a_config_class_belongs_to_one_method(top_layers):
    class Twin(TopLayers):
        name = "twin"

    with pytest.raises(ValueError, match="shares TopLayersConfig with 'top-layers'; give it its own subclass"):
        register(Twin)


# ----------------------------------------------------------------------------- the registered methods

def test_every_registered_method_has_its_own_config_class():
    classes = [m.config_class for m in methods.registered()]
    assert len(set(classes)) == len(classes)
    for m in methods.registered():
        assert issubclass(m.config_class, MethodConfig), m
        assert all(f.metadata.get("help") for f in dataclasses.fields(m.config_class)), m


def test_a_setting_several_methods_read_is_declared_alike():
    """One flag per setting: the config classes that share a setting agree on its type and default."""
    seen = {}
    for m in methods.registered():
        for f in dataclasses.fields(m.config_class):
            seen.setdefault(f.name, set()).add((str(f.type), repr(f.default)))
    assert {name: s for name, s in seen.items() if len(s) > 1} == {}


def test_gift_sw_settings_are_giftconfigs_declarations():
    from salientft.gift.config import GiftConfig

    gift = {f.name: f for f in dataclasses.fields(GiftConfig)}
    for f in dataclasses.fields(GiftSWMethodConfig):
        # noise: None means the method's own default; target_modules: the run's spelling
        # ('q_proj,v_proj', 're:<regex>'), shared with LoRA and full, not GiftConfig's Python one
        if f.name in gift and f.name not in ("noise", "target_modules"):
            assert (f.default, f.metadata["help"]) == (gift[f.name].default, gift[f.name].metadata["help"]), f.name


def test_flat_nested_and_object_forms_build_the_same_config():
    flat = TrainConfig(method="lora", lora_r=16, target_modules=["q_proj"], merge=True, max_steps=3)
    nested = TrainConfig.from_dict({"method": {"name": "lora", "lora_r": 16, "target_modules": ["q_proj"],
                                               "merge": True}, "max_steps": 3})
    objects = TrainConfig(method=LoRAMethodConfig(lora_r=16, target_modules=["q_proj"], merge=True), max_steps=3)
    assert flat == nested == objects
    assert TrainConfig.from_dict(flat.to_dict()) == flat
    assert TrainConfig.from_yaml(flat.to_yaml()) == flat
    assert TrainConfig.from_dict(json.loads(flat.to_json())) == flat
    assert (flat.lora_r, flat.merge, flat.n_salient, flat.mask_ratio) == (16, True, None, None)  # read-only reads
    with pytest.raises(AttributeError, match="build a new TrainConfig"):
        flat.lora_r = 4
    with pytest.raises(ValueError, match="takes a LoRAMethodConfig"):
        TrainConfig(method="lora", method_config=GiftSWMethodConfig())


def test_the_gradient_mask_is_the_runs_and_a_method_may_refuse_it():
    cfg = TrainConfig(method="gift-sw", mask=GMTConfig(ratio=0.2, granularity="global"))
    assert (cfg.mask_ratio, cfg.mask_granularity) == (0.2, "global")
    assert TrainConfig(method="gift-sw", mask_ratio=0.2, mask_granularity="global") == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig(method="gmt").mask == GMTConfig()  # gmt: full with the mask on by default
    assert TrainConfig(method="gmt", mask_mode="strict").mask == GMTConfig(mode="strict")
    assert TrainConfig(method="full").mask is None
    with pytest.raises(ValueError, match=r"method 'dora' does not use --mask-ratio"):
        TrainConfig(method="dora", mask=GMTConfig())
    with pytest.raises(ValueError, match=r"TrainConfig.mask_ratio must be a finite number"):
        TrainConfig(method="gmt", mask_ratio="half")
    with pytest.raises(ValueError, match=r"TrainConfig.mask_ratio must be in \[0, 1\), got 1.5"):
        TrainConfig(method="gmt", mask_ratio=1.5)
    with pytest.raises(ValueError, match=r"GMTConfig.ratio .* must be in \[0, 1\)"):
        TrainConfig(method="gmt", mask={"ratio": 1.5})  # the nested form: GMTConfig checks it


# ----------------------------------------------------------------------------- runs of earlier versions

# run_config.json as salientft wrote it before the methods owned their settings: every field flat,
# those of every method at their defaults.
FLAT_GMT = {
    "model": "tiny-random-llama", "data": "embedded", "output": "runs/x", "method": "gmt", "lr": None, "epochs": 1.0,
    "max_steps": 10, "batch_size": 4, "grad_accum": 1, "warmup_ratio": 0.03, "weight_decay": 0.0,
    "max_grad_norm": 1.0, "max_length": 512, "packing": False, "data_limit": None, "dtype": "bf16",
    "device": "auto", "gradient_checkpointing": False, "fsdp": "", "seed": 0, "save_steps": 0, "logging_steps": 1,
    "merge": False, "n_salient": None, "salient_fraction": None, "metric": "gift", "scores": None, "noise": None,
    "noise_bits": 4, "fp32_salient": False, "keep_noise": False, "calib_samples": 128, "target_modules": None,
    "lora_r": 8, "lora_alpha": None, "lora_dropout": 0.0, "mask_ratio": None, "mask_granularity": "tensor",
    "mask_mode": "paper", "eval_tasks": "", "eval_limit": None, "eval_subset": None, "eval_before": True,
    "report_to": "none", "trust_remote_code": False, "quantized": None,
}


def test_a_flat_run_config_of_an_earlier_version_loads_and_resumes():
    old = TrainConfig.from_dict(FLAT_GMT)
    assert old == TrainConfig(method="gmt", model="tiny-random-llama", output="runs/x", max_steps=10)
    assert config_changes(FLAT_GMT, old) == []
    assert config_changes(FLAT_GMT, TrainConfig.from_dict({**FLAT_GMT, "max_steps": 20})) == []  # may grow
    assert config_changes(FLAT_GMT, TrainConfig.from_dict({**FLAT_GMT, "mask_ratio": 0.3})) == [
        "mask_ratio: 0.5 -> 0.3"]
    assert config_changes(FLAT_GMT, TrainConfig.from_dict({**FLAT_GMT, "mask_mode": "strict"})) == [
        "mask_mode: 'paper' -> 'strict'"]
    gift = {**FLAT_GMT, "method": "gift-sw", "n_salient": 8}
    assert config_changes(gift, TrainConfig.from_dict(gift)) == []
    assert config_changes(gift, TrainConfig.from_dict({**gift, "n_salient": 16})) == ["n_salient: 8 -> 16"]
    assert config_changes(gift, TrainConfig.from_dict({**gift, "mask_ratio": 0.2})) == ["mask_ratio: None -> 0.2"]
    lora = {**FLAT_GMT, "method": "lora", "lora_r": 4}
    assert config_changes(lora, TrainConfig.from_dict({**lora, "lora_r": 8})) == ["lora_r: 4 -> 8"]
    changes = config_changes(lora, TrainConfig(method="gift-sw", model="tiny-random-llama", output="runs/x",
                                               max_steps=10))
    assert {"method: 'lora' -> 'gift-sw'", "lora_r: 4 -> '(absent)'", "n_salient: '(absent)' -> None"} <= set(changes)
