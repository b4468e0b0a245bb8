"""The contract every registered training method honours (in the spirit of PEFT's shared tests).

For each method of ``salientft.methods.registered()``, on the tiny random Llama (or its 4-bit
quantization for the recovery methods):

1. prepare the model and train two optimizer steps, checkpointing after each;
2. resume a second run from the first checkpoint: it ends with the same trainable tensors and
   the same logits as the uninterrupted run;
3. re-attach the finished run's output to a freshly loaded base: same logits as the trained model;
4. the reported trainable count is exactly the number of parameter entries that changed, and
   nothing outside the trainable parameters changed. The one allowed exception is GMT's mask
   (a run with a gradient mask, ``TrainConfig.mask``): an entry it masked at every step, in a parameter the Trainer
   does not decay (norm weights), cannot move, and is counted as such.

A new method gets this battery by registering. Everything runs in fp32, so equalities are exact
(resume) or within 1e-5 (re-attaching recomputes the same function through other code paths).
Weight decay is on so that every trainable entry moves, even one whose gradient happens to be
zero in both steps (LoRA's A in its first step, a GMT-masked entry); and the base model has no
padding row in its embedding (an ``nn.Embedding(padding_idx=...)`` row never receives a gradient
and starts at zero, so it could not move and would make the count differ for a reason that has
nothing to do with the method).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from salientft import methods
from salientft.config import TrainConfig
from salientft.models import load_model, tiny_random_llama, tiny_tokenizer
from salientft.train import train

CASES = [pytest.param(m.name, m.quantized, {}, id=f"{m.name}{'-quantized' if m.quantized else ''}")
         for m in methods.registered()]
# Rows for a setting the battery should exercise: full fine-tuning under GIFT-SW's weight noise
# (its wrapped layers must resume, save and re-attach like the plain model).
CASES += [pytest.param("full", False, {"noise": "weight"}, id="full-noise-weight")]
IDS = torch.tensor([[5, 17, 33, 81, 120, 7, 64, 99, 3, 42, 11, 250]])


def fresh_plain_base():
    return tiny_random_llama(seed=0, pad_token_id=None), tiny_tokenizer()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("contract")
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(24)]
    (d / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from salientft.quant.model import quantize, save_quantized

    model, tok = fresh_plain_base()
    quantize(model, bits=4, method="rtn", n_salient=4, metric="magnitude")
    save_quantized(model, d / "q4", tokenizer=tok, base_model="tiny-random-llama")
    return d


def config_for(workdir: Path, name: str, quantized: bool, out: Path, extra: dict | None = None,
               device=torch.device("cpu")) -> TrainConfig:
    settings = dict(
        model="tiny-random-llama", data=str(workdir / "d.jsonl"), output=str(out), method=name,
        quantized=str(workdir / "q4") if quantized else None, max_steps=2, save_steps=1, batch_size=4,
        max_length=64, dtype="fp32", lr=1e-2, weight_decay=0.1, warmup_ratio=0.0, metric="magnitude",
        n_salient=4, lora_r=2, eval_before=False, device=str(device),  # the test device, never "auto"
    )
    # a method refuses the others
    return TrainConfig(**methods.get(name, quantized=quantized).only_used(settings), **(extra or {}))


def base_for(workdir: Path, quantized: bool, device=torch.device("cpu")):
    if quantized:
        return load_model(str(workdir / "q4"), dtype="fp32", device=device)
    model, tok = fresh_plain_base()
    return model.to(device), tok


def logits(model) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS.to(next(model.parameters()).device)).logits.float()
    model.train(was)
    return out


class Recorder:
    """A TrainerCallback that snapshots the parameters at train begin and end, and the final logits."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                self.begin = {n: p.detach().clone() for n, p in model.named_parameters()}
                self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
                self.had_grad = {}

            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                # runs after the method's callbacks: these are the gradients the optimizer applies
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        seen = self.had_grad.get(n, torch.zeros_like(p, dtype=torch.bool))
                        self.had_grad[n] = seen | (p.grad != 0)

            def on_train_end(self, args, state, control, model=None, **kw):
                self.end = {n: p.detach().clone() for n, p in model.named_parameters()}
                self.logits = logits(model)

        return _Recorder()


def run(workdir, name, quantized, out, resume=False, extra=None, device=torch.device("cpu")):
    cfg = config_for(workdir, name, quantized, out, extra, device)
    rec = Recorder()
    model, tok = (None, None) if quantized else fresh_plain_base()
    metrics = train(cfg, resume=resume, model=model, tokenizer=tok, callbacks=[rec])
    return cfg, rec, metrics


def decayed(model, tmp_path) -> set[str]:
    """Names of the parameters the Trainer's AdamW decays (norm weights and biases are not)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "decay"), report_to="none", use_cpu=True)
    return set(Trainer(model=model, args=args).get_decay_parameter_names(model))


@pytest.mark.parametrize("name,quantized,extra", CASES)
@pytest.mark.numerics
def test_method_contract(workdir, tmp_path, name, quantized, extra, device):
    method = methods.get(name, quantized=quantized)
    assert method.name == name and method.quantized == quantized

    # 1. two steps, a checkpoint after each
    cfg, straight, metrics = run(workdir, name, quantized, tmp_path / "straight", extra=extra, device=device)
    assert metrics["device"]["device"] == str(device)  # train() ran where the test asked, not where it found a GPU
    assert metrics["steps"] == 2
    assert (tmp_path / "straight" / method.output).is_dir()

    # 2. resume from the first checkpoint equals the uninterrupted run
    shutil.copytree(tmp_path / "straight" / "checkpoint-1", tmp_path / "resumed" / "checkpoint-1")
    shutil.copy(tmp_path / "straight" / "run_config.json", tmp_path / "resumed")  # the run's settings, compared
    _, resumed, rmetrics = run(workdir, name, quantized, tmp_path / "resumed", resume=True, extra=extra,
                               device=device)
    assert rmetrics["resumed_from"].endswith("checkpoint-1")
    assert straight.end.keys() == resumed.end.keys()
    for n in straight.trainable:
        assert torch.equal(straight.end[n], resumed.end[n]), f"{n} differs after resuming"
    torch.testing.assert_close(resumed.logits, straight.logits, rtol=0, atol=0)

    # 3. the output re-attached to a fresh base gives the trained model's logits
    base, _ = base_for(workdir, quantized, device)
    attached = method.attach(base, Path(cfg.output))
    torch.testing.assert_close(logits(attached), straight.logits, rtol=0, atol=1e-5)

    # 4. the reported trainable count is the number of entries that changed, all of them trainable
    changed = {n: int((straight.begin[n] != straight.end[n]).sum()) for n in straight.begin}
    moved_frozen = {n: c for n, c in changed.items() if c and n not in straight.trainable}
    assert not moved_frozen, f"frozen parameters changed: {moved_frozen}"
    undecayed = straight.trainable - decayed(method.prepare(base_for(workdir, quantized, device)[0], cfg), tmp_path)
    stuck = {n: int((~straight.had_grad[n]).sum()) for n in undecayed}
    stuck = {n: c for n, c in stuck.items() if c}
    if cfg.mask is None:
        assert not stuck, f"trainable entries that never received a gradient: {stuck}"
    assert sum(changed.values()) == metrics["trainable_params"] - sum(stuck.values()) > 0


def test_registry_lists_every_family_and_refuses_unknown_names():
    assert methods.names() == ["gift-sw", "salient", "lora", "dora", "full", "gmt"]
    assert methods.names(quantized=True) == ["gift-sw", "salient", "ste", "lora"]
    assert set(methods.names(quantized=None)) == {"gift-sw", "salient", "lora", "dora", "full", "gmt", "ste"}
    with pytest.raises(ValueError, match=r"unknown method 'bogus'; choose from \['gift-sw'"):
        methods.get("bogus")
    with pytest.raises(ValueError, match="--quantized recovers with one of"):
        methods.get("full", quantized=True)
    with pytest.raises(ValueError, match="trains a quantized model"):
        methods.get("ste")
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="bogus")


def test_method_defaults_come_from_the_registry():
    assert TrainConfig(method="gift-sw").learning_rate == methods.get("gift-sw").default_lr == 1e-4
    assert TrainConfig(method="lora").learning_rate == 3e-5
    assert methods.get("full").master_dtype(TrainConfig(method="full", dtype="bf16")) == torch.float32
    assert methods.get("gift-sw").master_dtype(TrainConfig(dtype="bf16")) == torch.bfloat16
    assert TrainConfig(method="gmt").mask.ratio == 0.5
    assert TrainConfig(method="full").mask is None
    assert TrainConfig(mask_ratio=0.3).mask.ratio == 0.3
    with pytest.raises(ValueError, match="--mask-ratio applies to"):
        TrainConfig(method="lora", mask_ratio=0.3)


def test_a_registered_method_gets_the_battery():
    """Registering is all it takes: the new name is listed, found, and parametrises the contract."""
    from salientft.methods import base

    @methods.register
    class Frozen(methods.Method):
        name = "frozen-test"
        summary = "trains nothing"

    try:
        assert "frozen-test" in methods.names()
        assert isinstance(methods.get("frozen-test"), Frozen)
        with pytest.raises(ValueError, match="registered twice"):
            methods.register(Frozen)
    finally:
        del base._REGISTRY[("frozen-test", False)]
    assert "frozen-test" not in methods.names()
