"""The contract every registered training method honours (in the spirit of PEFT's shared tests).

The battery is parametrized from ``salientft.methods.registered()`` when pytest collects this file
(``pytest_generate_tests`` below), so a newly registered method joins it with no edit here
(``test_a_newly_registered_method_joins_the_battery`` proves it). Each method runs on two tiny
random bases: a Llama (``nn.Linear`` layers) and a GPT-2 (transformers' ``Conv1D``, which stores
the weight transposed); a recovery method (``quantized``) runs on their 4-bit RTN quantizations.
``ROWS`` adds a row where a method has a setting the battery should exercise. For every case:

1. prepare the base and train two optimizer steps, checkpointing after each; the run writes its
   outputs (metrics, loss plot, run_config.json, the method's ``output`` folder and nothing of
   another method's, ``merged/`` for a mergeable method) and loads back to generate
   (``test_run_writes_its_outputs``);
2. resume a second run from the first checkpoint: same trainable tensors, logits and step-2 loss as
   the uninterrupted run, bit for bit (``test_resume_equals_the_uninterrupted_run``);
3. re-attach the output to a freshly loaded base: the trained model's logits
   (``test_output_reattached_to_a_fresh_base_gives_the_trained_logits``);
4. the reported trainable count is exactly the number of parameter entries that changed, and
   nothing outside the trainable parameters changed. The one allowed exception is a gradient mask
   (GMT's, ``TrainConfig.mask``): an entry it masked at every step, in a parameter the Trainer does not
   decay (norm weights), cannot move, and is counted as such
   (``test_trainable_count_is_the_entries_that_changed``);
5. a ``mergeable`` method's ``merged/`` model, a plain transformers model, gives the attached
   adapter's logits (``test_merged_model_equals_the_attached_adapter``); any other method refuses
   ``merge`` before any work (``test_an_unmergeable_method_refuses_merge``);
6. prepared on a bf16 base, every trainable tensor is fp32 (a bf16 AdamW step of 1e-4 on a weight of
   0.05 is below half its spacing and would be rounded away) (``test_trainable_tensors_are_fp32_on_a_bf16_base``).

A method that cannot train a Conv1D model must refuse it clearly before training: list it in
``CONV1D_REFUSALS`` with the message it gives; its GPT-2 case then checks that refusal
(in ``test_run_writes_its_outputs``) instead of the battery, and no output is written
(``test_a_method_without_conv1d_is_held_to_its_refusal`` shows it with a throwaway method). Today
every registered method supports Conv1D.

Everything runs in fp32, so equalities are exact (resume: the same computation repeated) or within
``ATOL`` = 1e-5 (re-attaching and merging recompute the same function through other code paths:
x (W + D) instead of x W + x_S D_S, or LoRA's x W + (x A^T) B^T; measured: re-attached 0, merged
<= 2.7e-7 on these logits, while the trained model's logits differ from the base's by > 1e-3, asserted). Weight decay is on
so that every trainable entry moves, even one whose gradient happens to be zero in both steps
(LoRA's A in its first step, a GMT-masked entry); and the Llama base has no padding row in its
embedding (an ``nn.Embedding(padding_idx=...)`` row never receives a gradient and starts at zero,
so it could not move and would make the count differ for a reason that has nothing to do with the
method). The GPT-2 base keeps its dropout: the resumed run must also restore the RNG state.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from salientft import methods
from salientft.config import TrainConfig
from salientft.models import load_model, tiny_random_llama, tiny_tokenizer
from salientft.tiny_tokenizer import TINY_VOCAB_SIZE
from salientft.train import load_run, train

from conftest import suite_device

BASES = ("llama", "gpt2")
# Rows for a setting the battery should exercise: (method, quantized, base, row name, settings).
ROWS = [
    # full fine-tuning under GIFT-SW's weight noise: its wrapped layers must resume, save and re-attach
    ("full", False, "llama", "noise-weight", {"noise": "weight"}),
    # GIFT-SW calibrated on the training data with the paper's metric (the battery's default is the
    # data-free magnitude): resuming must choose the same columns again
    ("gift-sw", False, "llama", "metric-gift", {"metric": "gift", "calib_samples": 8}),
    # GMT's mask on top of GIFT-SW with one global threshold: a quarter of the gradient entries kept
    ("gift-sw", False, "llama", "mask-global", {"mask_ratio": 0.75, "mask_granularity": "global"}),
]
# (method, quantized) -> the message (a regex) of a method that refuses a Conv1D (GPT-2) base.
CONV1D_REFUSALS: dict[tuple[str, bool], str] = {}
# (method, quantized) -> the largest trainable fraction the method may report on these bases.
TRAINABLE_FRACTION_BELOW = {("gift-sw", False): 0.2, ("salient", False): 0.2}
IDS = torch.tensor([[5, 17, 33, 81, 120, 7, 64, 99, 3, 42, 11, 250]])
STEPS = 2
ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    """One row of the battery: a registered method on one base, with extra TrainConfig settings."""

    method: str
    quantized: bool
    base: str
    row: str = ""
    settings: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        return "-".join(p for p in (self.method, "quantized" if self.quantized else "", self.base, self.row) if p)

    @property
    def training_method(self):
        return methods.get(self.method, quantized=self.quantized)

    @property
    def refuses_conv1d(self) -> bool:
        return self.base == "gpt2" and (self.method, self.quantized) in CONV1D_REFUSALS


def battery_cases() -> list[Case]:
    """Every registered method on every base, then the ``ROWS`` of registered methods: read from the
    registry each time pytest collects this file, never from a list written here."""
    cases = [Case(m.name, m.quantized, base) for m in methods.registered() for base in BASES]
    registered = {(m.name, m.quantized) for m in methods.registered()}
    cases += [Case(name, q, base, row, settings) for name, q, base, row, settings in ROWS if (name, q) in registered]
    return cases


# fixture name -> which cases it is parametrized with
SELECTIONS = {
    "any_case": lambda c: True,
    "case": lambda c: not c.refuses_conv1d,
    "mergeable_case": lambda c: not c.refuses_conv1d and c.training_method.mergeable,
    "unmergeable_case": lambda c: not c.row and not c.refuses_conv1d and not c.training_method.mergeable,
    "bf16_case": lambda c: not c.row and not c.refuses_conv1d,
    "gift_case": lambda c: not c.refuses_conv1d and _is_gift(c.training_method),
}


def pytest_generate_tests(metafunc):
    """Parametrize the battery's tests from the registry at collection time."""
    for name, keep in SELECTIONS.items():
        if name in metafunc.fixturenames:
            cases = [c for c in battery_cases() if keep(c)]
            metafunc.parametrize(name, cases, ids=[c.id for c in cases])


def _is_gift(method) -> bool:
    from salientft.methods.gift_sw import GiftSW
    from salientft.methods.recovery import RecoverGiftSW

    return isinstance(method, (GiftSW, RecoverGiftSW))


# ----------------------------------------------------------------------------- the bases


def plain_base(base: str):
    """A fresh tiny random base, fp32: the Llama without a padding row, or a GPT-2 (Conv1D)."""
    if base == "llama":
        return tiny_random_llama(seed=0, pad_token_id=None)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=TINY_VOCAB_SIZE, n_positions=128, bos_token_id=1,
                     eos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT2LMHeadModel(cfg).eval()


_BUILT: dict[str, Path] = {}  # the workdir of this process's first session, reused by nested ones


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The training data and the bases as folders (plain and 4-bit, Llama and GPT-2, fp32; the 4-bit
    ones also in bf16): a run loads its base the way the CLI does, and ``load_run`` finds it again.
    Read only, so the sessions the registry tests nest inside this one reuse it."""
    if "workdir" in _BUILT and _BUILT["workdir"].is_dir():
        return _BUILT["workdir"]
    _BUILT["workdir"] = _build_workdir(tmp_path_factory.mktemp("contract"))
    return _BUILT["workdir"]


def _build_workdir(d: Path) -> Path:
    from salientft.quant.model import quantize, save_quantized

    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(24)]
    (d / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tiny_tokenizer()
    for base in BASES:
        plain_base(base).save_pretrained(d / base)
        tok.save_pretrained(d / base)
        model = plain_base(base)
        quantize(model, bits=4, quantizer="rtn", n_salient=4, metric="magnitude", progress=False)
        save_quantized(model, d / f"{base}-q4", tokenizer=tok, base_model=str(d / base))
        # as `salientft quantize` writes a bf16 model: 16-bit tensors in bf16 (the integers stay integers)
        save_quantized(model.to(torch.bfloat16), d / f"{base}-q4-bf16", tokenizer=tok, base_model=str(d / base))
    return d


def base_dir(workdir: Path, case: Case, dtype="fp32") -> Path:
    if not case.quantized:
        return workdir / case.base
    return workdir / f"{case.base}-q4{'-bf16' if dtype == 'bf16' else ''}"  # loads in the dtype it was stored in


def fresh_base(workdir: Path, case: Case, device, dtype="fp32"):
    model, _ = load_model(str(base_dir(workdir, case, dtype)), dtype=dtype, device=device)
    return model


def config_for(workdir: Path, case: Case, out: Path, device=None, **extra) -> TrainConfig:
    settings = dict(
        model=str(workdir / case.base), data=str(workdir / "d.jsonl"), output=str(out), method=case.method,
        quantized=str(base_dir(workdir, case)) if case.quantized else None, max_steps=STEPS, save_steps=1,
        batch_size=4, max_length=64, dtype="fp32", lr=1e-2, weight_decay=0.1, warmup_ratio=0.0,
        metric="magnitude", n_salient=4, lora_r=2, eval_before=False,
        merge=case.training_method.mergeable,  # the merge check reads the run's merged/
        device=str(device or suite_device()),  # the test device, never "auto"
    )
    # a method refuses the others' settings
    return TrainConfig(**{**case.training_method.only_used(settings), **case.settings, **extra})


def logits(model) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS.to(next(model.parameters()).device)).logits.float()
    model.train(was)
    return out


def mask_of(method, cfg):
    """The gradient mask a run configures (None without one): the run's add-on, which ``method``
    accepts or refuses when the config is built."""
    return cfg.mask


# ----------------------------------------------------------------------------- the runs


class Recorder:
    """A TrainerCallback that snapshots the parameters at train begin and end, which entries ever
    received a gradient, and the final logits."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
                self.begin = {n: p.detach().clone() for n, p in model.named_parameters()}
                self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
                self.had_grad = {}
                # what the Trainer's AdamW decays (not norm weights and biases), read from its groups
                ids = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
                self.decayed = {n for n, p in model.named_parameters() if id(p) in ids}

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


@dataclass
class Run:
    cfg: TrainConfig
    out: Path
    recorder: object
    metrics: dict


class Battery:
    """Each case's runs, trained once and shared by the tests that read them."""

    def __init__(self, workdir: Path, root: Path, device):
        self.workdir, self.root, self.device = workdir, root, device
        self.runs: dict[tuple, Run] = {}

    def _train(self, case: Case, folder: str, resume: bool) -> Run:
        out = self.root / case.id / folder
        cfg = config_for(self.workdir, case, out, self.device)
        rec = Recorder()
        metrics = train(cfg, resume=resume, callbacks=[rec])
        return Run(cfg, out, rec, metrics)

    def straight(self, case: Case) -> Run:
        """Two steps, a checkpoint after each."""
        key = (case, "straight")
        if key not in self.runs:
            self.runs[key] = self._train(case, "straight", resume=False)
        return self.runs[key]

    def resumed(self, case: Case) -> Run:
        """A second run resumed from the uninterrupted run's first checkpoint."""
        key = (case, "resumed")
        if key not in self.runs:
            straight = self.straight(case)
            target = self.root / case.id / "resumed"
            shutil.copytree(straight.out / "checkpoint-1", target / "checkpoint-1")
            shutil.copy(straight.out / "run_config.json", target)  # the run's settings, compared on resume
            self.runs[key] = self._train(case, "resumed", resume=True)
        return self.runs[key]


@pytest.fixture(scope="module")
def battery(workdir, tmp_path_factory, device):
    return Battery(workdir, tmp_path_factory.mktemp("runs"), device)


# ----------------------------------------------------------------------------- the battery


def test_run_writes_its_outputs(battery, any_case, device, tmp_path):
    """The run's outputs; for a method listed in CONV1D_REFUSALS, its GPT-2 case checks the refusal."""
    case = any_case
    if case.refuses_conv1d:
        out = tmp_path / "out"
        with pytest.raises(ValueError, match=CONV1D_REFUSALS[(case.method, case.quantized)]):
            train(config_for(battery.workdir, case, out, device))
        assert not (out / case.training_method.output).exists() and not (out / "metrics.json").exists()
        return
    run = battery.straight(case)
    method = case.training_method
    assert method.name == case.method and method.quantized == case.quantized
    assert run.metrics["device"]["device"] == str(device)  # train() ran where the test asked, not where it found a GPU
    assert run.metrics["steps"] == STEPS
    metrics = json.loads((run.out / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert [h["step"] for h in metrics["train_loss"]] == list(range(1, STEPS + 1))
    for key in ("trainable_params", "wall_time_s", "tokens_per_s", "peak_memory_bytes"):
        assert metrics[key] > 0, key
    for key in ("heldout_loss_before", "heldout_loss_after"):  # None when no record hashed into held-out
        assert metrics.get(key) is None or metrics[key] > 0
    assert (run.out / "loss.png").stat().st_size > 1000
    assert TrainConfig.from_json(run.out / "run_config.json") == run.cfg
    # the method's output folder, nothing of another method's, merged/ exactly when mergeable
    written = {p.name for p in run.out.iterdir() if p.name in ("adapter", "model", "merged")}
    assert written == {method.output, *(["merged"] if method.mergeable else [])}
    below = TRAINABLE_FRACTION_BELOW.get((case.method, case.quantized))
    if below is not None:
        assert metrics["trainable_params"] < below * metrics["total_params"]
    mask = mask_of(method, run.cfg)
    if mask is not None:  # the mask's kept fraction is reported at every step: 1 - ratio of the entries
        kept = [k["kept_fraction"] for k in metrics["kept_fraction"]]
        assert len(kept) == STEPS and all(abs(k - (1 - mask.ratio)) < 0.01 for k in kept), kept
    # the saved run loads back (base + output) and generates
    model, tok = load_run(run.out, dtype="fp32")
    ids = tok("What is 2 plus 2?", return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    if case.quantized:  # still quantized after recovery (STE rounds back onto the grid), every layer of it
        base = fresh_base(battery.workdir, case, device)
        assert len(quantized_layers(model)) == len(quantized_layers(base)) > 0


def quantized_layers(model) -> list:
    from salientft.quant.layer import QuantizedSalientLinear

    return [x for x in model.modules() if isinstance(x, QuantizedSalientLinear)]


@pytest.mark.numerics
def test_resume_equals_the_uninterrupted_run(battery, case):
    straight, resumed = battery.straight(case), battery.resumed(case)
    assert resumed.metrics["resumed_from"].endswith("checkpoint-1")
    a, b = straight.recorder, resumed.recorder
    assert a.end.keys() == b.end.keys()
    for n in a.trainable:
        assert torch.equal(a.end[n], b.end[n]), f"{n} differs after resuming"
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    # the same computation repeated: the step after the checkpoint has the very same loss (the
    # history before it comes from the checkpoint)
    assert resumed.metrics["train_loss"] == straight.metrics["train_loss"]


@pytest.mark.numerics
def test_output_reattached_to_a_fresh_base_gives_the_trained_logits(battery, case, device):
    run = battery.straight(case)
    base = fresh_base(battery.workdir, case, device)
    before = logits(base)
    attached = case.training_method.attach(base, run.out)
    torch.testing.assert_close(logits(attached), run.recorder.logits, rtol=0, atol=ATOL)
    assert (before - run.recorder.logits).abs().max() > 100 * ATOL  # training moved them: equality is not trivial


def _key_bias(name: str, entries: torch.Tensor) -> torch.Tensor:
    """The entries of ``name`` that are an attention key's bias. A key bias adds the same q . b to
    every score of a query, which the softmax cancels: its exact gradient is zero, and whether
    rounding leaves an entry exactly zero on every step depends on the kernels' summation order."""
    mask = torch.zeros_like(entries, dtype=torch.bool)
    if name.endswith("k_proj.bias"):
        mask[:] = True
    elif name.endswith("attn.c_attn.bias"):  # GPT-2's fused query, key, value
        third = entries.shape[0] // 3
        mask[third:2 * third] = True
    return mask


@pytest.mark.numerics
def test_trainable_count_is_the_entries_that_changed(battery, case):
    run = battery.straight(case)
    rec = run.recorder
    changed = {n: int((rec.begin[n] != rec.end[n]).sum()) for n in rec.begin}
    moved_frozen = {n: c for n, c in changed.items() if c and n not in rec.trainable}
    assert not moved_frozen, f"frozen parameters changed: {moved_frozen}"
    assert rec.decayed <= rec.trainable
    undecayed = rec.trainable - rec.decayed
    stuck = {n: int((~rec.had_grad[n] & ~_key_bias(n, rec.had_grad[n])).sum()) for n in undecayed}
    stuck = {n: c for n, c in stuck.items() if c}
    if run.cfg.mask is None:
        assert not stuck, f"trainable entries that never received a gradient: {stuck}"
    # entries without a gradient (a key bias's exact one is zero) do not move: not counted as changed
    stuck = {n: int((~rec.had_grad[n]).sum()) for n in undecayed}
    assert sum(changed.values()) == run.metrics["trainable_params"] - sum(stuck.values()) > 0


@pytest.mark.numerics
def test_merged_model_equals_the_attached_adapter(battery, mergeable_case, device):
    """merged/ is a plain transformers model (the base's parameters, no adapter) computing what the
    adapter computes; merging in memory gives the same. Tolerance: ATOL (module docstring)."""
    from transformers import AutoModelForCausalLM

    case = mergeable_case
    run = battery.straight(case)
    attached = case.training_method.attach(fresh_base(battery.workdir, case, device), run.out)
    reference = logits(attached)
    merged = AutoModelForCausalLM.from_pretrained(run.out / "merged", dtype=torch.float32).to(device)
    base = fresh_base(battery.workdir, case, device)
    assert type(merged) is type(base)
    assert merged.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(logits(merged), reference, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(case.training_method.merge(attached)), reference, rtol=0, atol=ATOL)
    assert (logits(base) - reference).abs().max() > 100 * ATOL  # the merge wrote the training in


def test_an_unmergeable_method_refuses_merge(battery, unmergeable_case, tmp_path):
    case = unmergeable_case
    with pytest.raises(ValueError, match="does not use --merge"):
        config_for(battery.workdir, case, tmp_path / "out", merge=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        case.training_method.merge(None)


def test_trainable_tensors_are_fp32_on_a_bf16_base(battery, bf16_case, tmp_path):
    """Loaded in the dtype the method asks for under --dtype bf16 (a quantized base: written in bf16,
    as ``salientft quantize`` writes it), every trainable tensor of the prepared model is fp32; a
    recovered quantized model is saved with its 16-bit tensors in bf16 again, as it was stored."""
    case = bf16_case
    method = case.training_method
    cfg = config_for(battery.workdir, case, tmp_path / "out", dtype="bf16")
    dtype = "bf16" if case.quantized else method.master_dtype(cfg)
    model = fresh_base(battery.workdir, case, torch.device("cpu"), dtype=dtype)
    if not method.dense:
        assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    prepared = method.prepare(model, cfg)
    trainable = {n: p.dtype for n, p in prepared.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    if case.quantized and method.output == "model":
        method.save_output(prepared, tiny_tokenizer(), cfg, tmp_path)
        saved, _ = load_model(str(tmp_path / "model"))
        assert len(quantized_layers(saved)) == len(quantized_layers(prepared)) > 0
        assert {x.salient_weight.dtype for x in quantized_layers(saved)} == {torch.bfloat16}


# ----------------------------------------------------------------------------- GIFT-SW's own checks


@pytest.mark.numerics
def test_gift_sw_output_changes_only_the_salient_columns(battery, gift_case, device):
    """The run trains the k salient columns and nothing else: a plain model's merged/ differs from the
    base in those columns only, each equal to the adapter's trained column, and stock PEFT loads the
    adapter as the merged model; a recovered quantized model differs from its base in the 16-bit
    salient columns only."""
    from salientft.targets import linear_weight

    case = gift_case
    run = battery.straight(case)
    base = fresh_base(battery.workdir, case, device)
    if case.quantized:
        trained, _ = load_run(run.out, dtype="fp32")
        ref = base.state_dict()
        changed = {n for n, t in trained.state_dict().items() if not torch.equal(t, ref[n])}
        assert changed and all(n.endswith("salient_weight") or n.endswith("noise_std") for n in changed), changed
        assert any(n.endswith("salient_weight") for n in changed)  # the noise scale is set when recovery starts
        return
    from transformers import AutoModelForCausalLM

    from salientft.gift import read_adapter

    merged = AutoModelForCausalLM.from_pretrained(run.out / "merged", dtype=torch.float32).to(device)
    meta, tensors = read_adapter(run.out / "adapter")
    changed_any = False
    for name in meta["modules"]:
        w, w0 = linear_weight(merged.get_submodule(name)), linear_weight(base.get_submodule(name))
        idx = tensors[f"{name}.salient_idx"].to(w.device)
        rest = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
        rest[idx] = False
        assert torch.equal(w[:, rest], w0[:, rest]), name
        assert torch.equal(w[:, idx], tensors[f"{name}.salient_weight"].to(w)), name
        changed_any |= not torch.equal(w[:, idx], w0[:, idx])
    assert changed_any
    merged_state, base_state = merged.state_dict(), base.state_dict()
    targeted = {f"{name}.weight" for name in meta["modules"]}
    assert all(torch.equal(t, base_state[n]) for n, t in merged_state.items() if n not in targeted)
    # the run's adapter/ is a PEFT GIFT-SW adapter: stock PEFT loads it (salientft imported) as the merged model
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(fresh_base(battery.workdir, case, device), str(run.out / "adapter"))
    torch.testing.assert_close(logits(loaded), logits(merged), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- the registry


def test_registry_lists_every_family_and_refuses_unknown_names():
    every = methods.registered()
    assert methods.names() == list(dict.fromkeys(m.name for m in every if not m.quantized))
    assert methods.names(quantized=True) == list(dict.fromkeys(m.name for m in every if m.quantized))
    assert set(methods.names(quantized=None)) == {m.name for m in every}
    # the families the documentation promises stay registered (more may join)
    assert {"gift-sw", "salient", "lora", "dora", "full", "gmt"} <= set(methods.names())
    assert {"gift-sw", "salient", "ste", "lora"} <= set(methods.names(quantized=True))
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
    with pytest.raises(ValueError, match="mask_granularity must be one of"):
        TrainConfig(method="gmt", mask_granularity="layer")


# ----------------------------------------------------------------------------- a new method joins


class NormsOnly(methods.Method):
    """A throwaway method, registered only by the ``throwaway_method`` fixture: it trains the norm
    weights (and their biases) and writes them as one safetensors file."""

    name = "norms-only-test"
    summary = "trains the norm weights only (a test's throwaway method)"
    accepts_mask = False

    @staticmethod
    def trains(name: str) -> bool:
        return "norm" in name or ".ln_" in name  # Llama's RMSNorms, GPT-2's LayerNorms

    def prepare(self, model, config, data=None, **_):
        for n, p in model.named_parameters():
            p.requires_grad_(self.trains(n))
        return model

    def save_output(self, model, tokenizer, config, out: Path) -> None:
        from safetensors.torch import save_file

        from salientft._io import atomic_dir

        with atomic_dir(out / "adapter") as tmp:
            save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      str(tmp / "norms.safetensors"))

    def attach(self, base, out: Path, check_base: bool = True):
        from safetensors.torch import load_file

        params = dict(base.named_parameters())
        with torch.no_grad():
            for n, t in load_file(str(Path(out) / "adapter" / "norms.safetensors")).items():
                params[n].copy_(t)
        return base


@pytest.fixture
def throwaway_method():
    """``NormsOnly`` registered for the duration of a test, then unregistered."""
    from salientft.methods import base

    methods.register(NormsOnly)
    try:
        yield NormsOnly
    finally:
        del base._REGISTRY[(NormsOnly.name, NormsOnly.quantized)]


class _Session:
    """A pytest plugin that records what a nested session collected and each test's outcome."""

    def __init__(self):
        self.collected: list[str] = []
        self.outcomes: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    def pytest_collection_finish(self, session):
        self.collected = [item.nodeid.split("::", 1)[1] for item in session.items]

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            test = report.nodeid.split("::", 1)[1]
            self.outcomes[test] = report.outcome
            if report.failed:
                self.errors[test] = report.longreprtext


def nested_pytest(tmp_path: Path, *args) -> _Session:
    """Run pytest on this file inside this process (the registry as it is now) and record it; its
    temporary folders go under ``tmp_path`` (no numbered folder of its own, none of ours pruned)."""
    session = _Session()
    tmp_path.mkdir(parents=True, exist_ok=True)
    pytest.main([__file__, "-p", "no:cacheprovider", "-q", "--no-header", "-o", "addopts=",
                 f"--basetemp={tmp_path / 'nested'}", *args], plugins=[session])
    return session


def test_a_newly_registered_method_joins_the_battery(throwaway_method, workdir, tmp_path):
    """Registering is all it takes: the new name is listed and found, and collecting this file again
    gives it every battery test on both bases; run, it passes them. Unregistered, it is gone."""
    name = throwaway_method.name
    assert name in methods.names() and isinstance(methods.get(name), throwaway_method)
    with pytest.raises(ValueError, match="registered twice"):
        methods.register(throwaway_method)

    collected = nested_pytest(tmp_path, "--collect-only").collected
    for base in BASES:
        for test in ("test_run_writes_its_outputs", "test_resume_equals_the_uninterrupted_run",
                     "test_output_reattached_to_a_fresh_base_gives_the_trained_logits",
                     "test_trainable_count_is_the_entries_that_changed", "test_an_unmergeable_method_refuses_merge",
                     "test_trainable_tensors_are_fp32_on_a_bf16_base"):
            assert f"{test}[{name}-{base}]" in collected, (test, base)
    assert not any(f"[{name}" in c for c in collected if c.startswith("test_merged_model"))  # not mergeable

    ran = nested_pytest(tmp_path, "-k", f"{name}-llama and (outputs or reattached or count)").outcomes
    assert len(ran) == 3 and set(ran.values()) == {"passed"}, ran


def test_the_battery_catches_a_method_that_breaks_the_contract(throwaway_method, workdir, monkeypatch, tmp_path):
    """The same throwaway method, its ``attach`` forgetting the trained weights: the battery fails it."""
    monkeypatch.setattr(throwaway_method, "attach", lambda self, base, out, check_base=True: base)
    ran = nested_pytest(tmp_path, "-k", f"{throwaway_method.name}-llama and reattached")
    test = f"test_output_reattached_to_a_fresh_base_gives_the_trained_logits[{throwaway_method.name}-llama]"
    assert ran.outcomes == {test: "failed"} and "Tensor-likes are not close" in ran.errors[test]


def test_unregistered_the_throwaway_method_is_gone():
    assert NormsOnly.name not in methods.names()
    assert all(c.method != NormsOnly.name for c in battery_cases())


def test_a_method_without_conv1d_is_held_to_its_refusal(throwaway_method, workdir, monkeypatch, tmp_path):
    """A method listed in CONV1D_REFUSALS: its GPT-2 case leaves the battery and checks the refusal,
    which passes when the method refuses clearly and fails when it trains the model anyway."""
    name = throwaway_method.name

    def refuse(self, model, config, data=None, **_):
        if any(type(m).__name__ == "Conv1D" for m in model.modules()):
            raise ValueError(f"method {name!r} does not support transformers' Conv1D layers (GPT-2); use a "
                             "model with nn.Linear layers")
        return NormsOnly.prepare(self, model, config, data)

    monkeypatch.setitem(CONV1D_REFUSALS, (name, False), r"does not support transformers' Conv1D layers")
    collected = [c for c in nested_pytest(tmp_path / "a", "--collect-only").collected if f"[{name}-gpt2]" in c]
    assert collected == [f"test_run_writes_its_outputs[{name}-gpt2]"]
    # the method trains GPT-2 after all: its refusal check fails
    trains = nested_pytest(tmp_path / "b", "-k", f"{name}-gpt2")
    assert trains.outcomes == {collected[0]: "failed"} and "DID NOT RAISE" in trains.errors[collected[0]]
    monkeypatch.setattr(throwaway_method, "prepare", refuse)
    assert nested_pytest(tmp_path / "c", "-k", f"{name}-gpt2").outcomes == {collected[0]: "passed"}
