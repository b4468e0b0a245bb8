"""The architecture battery: every transformers family a user is likely to bring, through every route.

Each family is a tiny random config built in code (no download: hidden 32, 2 blocks, vocabulary 320,
4 experts), and each column is one test, parametrized by family so a failure names it:

| column (test)                   | what it proves |
|---|---|
| ``test_api_data_free``          | ``apply_gift`` with ``magnitude``: k salient columns on every layer that computes x W^T (linear, Conv1D, every expert of a fused 3-D expert parameter), nothing else trainable, outputs equal to the base before training |
| ``test_api_calibrated``         | the same with ``gift`` chosen from two calibration batches (one right-padded) |
| ``test_train_step``             | one AdamW step under the default weight noise: finite loss, gradients only on the salient columns, the salient columns move (the experts' included), nothing frozen moves |
| ``test_save_load``              | ``save_adapter`` / ``load_adapter`` onto a fresh base gives the same logits, bit for bit |
| ``test_merge``                  | ``merge_gift`` is a plain model equal to the adapter model |
| ``test_peft_route``             | ``GiftSWConfig`` -> ``get_peft_model`` -> ``save_pretrained`` -> ``PeftModel.from_pretrained`` -> ``merge_and_unload`` |
| ``test_peft_calibrated``        | the documented calibrated PEFT recipe: ``preprocess_gift_sw`` then ``get_peft_model`` |
| ``test_peft_reload_fresh_process`` | docs/ecosystem.md's reload order in a new process (``import salientft``, load the base, ``PeftModel.from_pretrained``), all families in one process |
| ``test_lora_export_stock_peft`` | ``export_lora`` loaded by stock transformers + PEFT in one process where salientft cannot be imported, all families in it |
| ``test_gmt``                    | ``GradientMask`` on a full fine-tuning step: the configured fraction masked per tensor, embeddings (input, position, output) left dense |

"Trained" for the round trips is ``perturb_``: every trainable entry moves by N(0, 0.5^2), seeded, so
each salient column of each target (and of each expert) differs from the base, which is what the
column checks (``changed_columns``) detect after a merge: exactly k input columns per layer and per
expert changed, every other tensor untouched.

Tolerances (fp32 logits, docs/testing.md rule 2): the merged model computes x (W + D) where the
adapter model computes x W + x_S D_S, PEFT's LoRA computes x W + (x A^T) B^T: other summation orders,
measured <= 7e-7 on these models (logits of magnitude < 1). ``TOL`` = 2e-5 is ~30x that, while
putting back the base value of ONE salient column of any one layer moves the logits by >= 1.8e-3
(Gemma3's k_proj, the least sensitive; 90x ``TOL``). The MoE routers see nearly equal hidden states
on both sides; on ``IDS`` the chosen experts' router logits beat the rejected ones' by >= 2.5e-4
(``test_moe_routing_is_far_from_ties`` requires > 1e-4, over 100x the differences), so no routing
decision can flip. Round trips of the same computation in the same process (save/load, PEFT reload)
are ``torch.equal``.

``scripts/architecture_table.py`` runs this file and writes docs/results/architectures.json and the
table in docs/ecosystem.md; ``test_ecosystem_table_is_generated_from_the_results`` keeps them in step.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import salientft  # noqa: F401  (registers GIFT-SW with PEFT, as a user's script does)
from salientft import (GiftConfig, GMTConfig, apply_gift, build_gradient_mask, load_adapter, merge_gift,
                       save_adapter)
from salientft.config_base import salient_count
from salientft.models import tiny_tokenizer
from salientft.tiny_tokenizer import TINY_VOCAB_SIZE

ROOT = Path(__file__).resolve().parents[1]
FRACTION = 1 / 8  # k = 4 of 32 inputs, 8 of 64, 16 of 128
TOL = 2e-5
IDS = torch.tensor([[5, 17, 33, 81, 120, 7, 64, 99, 3, 42, 250, 11]])
BATCH = {"input_ids": torch.tensor([[9, 40, 77, 3, 150, 61, 8, 201, 33, 5, 70, 12],
                                    [100, 4, 56, 230, 19, 88, 2, 47, 160, 31, 6, 75]])}
BATCH["attention_mask"] = torch.ones_like(BATCH["input_ids"])
# two calibration batches, the second right-padded (pads must not count in the statistics)
CALIBRATION = [
    {"input_ids": torch.tensor([[12, 99, 143, 7, 66, 250, 31, 8, 190, 45]]), "attention_mask": torch.ones(1, 10)},
    {"input_ids": torch.tensor([[3, 77, 18, 201, 54, 9, 0, 0, 0, 0], [160, 24, 88, 5, 133, 70, 41, 16, 222, 2]]),
     "attention_mask": torch.tensor([[1] * 6 + [0] * 4, [1] * 10])},
]

SMALL = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
GATED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=48, output_router_logits=False)
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@dataclass(frozen=True)
class Family:
    """A transformers family as the battery builds it.

    ``linear``: suffixes (within a block) of the layers that compute x W^T as nn.Linear/Conv1D;
    ``experts``: suffixes of fused 3-D expert parameters, stored [experts, out, in] (transformers 5);
    ``conv1d``: the block's layers are transformers' Conv1D (weight stored (in, out)).
    """

    name: str
    config: str  # class names in transformers, looked up when the test runs
    model: str
    kwargs: dict
    blocks: str  # the ModuleList of the blocks
    linear: tuple[str, ...]
    experts: tuple[str, ...] = ()
    conv1d: bool = False


FAMILIES = [
    # Llama: q/k/v/o_proj, gate/up/down_proj (nn.Linear, no bias); RoPE; untied; no in-place output ops.
    Family("llama", "LlamaConfig", "LlamaForCausalLM", SMALL, "model.layers", ATTN + GATED_MLP),
    # Mistral: Llama's layer names; RoPE, sliding-window attention; untied.
    Family("mistral", "MistralConfig", "MistralForCausalLM", SMALL, "model.layers", ATTN + GATED_MLP),
    # Qwen2: Llama's names, q/k/v_proj with bias; RoPE; untied.
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", SMALL, "model.layers", ATTN + GATED_MLP),
    # Qwen3: Llama's names (no bias), q_norm/k_norm on heads; RoPE; untied.
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(SMALL, head_dim=8), "model.layers", ATTN + GATED_MLP),
    # Gemma2: Llama's names; RoPE, logit soft-capping, sandwich norms; tied embeddings (scaled by sqrt(hidden)).
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", dict(SMALL, head_dim=8), "model.layers",
           ATTN + GATED_MLP),
    # Gemma3 (text): Llama's names, q/k norms; RoPE (local + global); tied, scaled embeddings.
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", dict(SMALL, head_dim=8), "model.layers",
           ATTN + GATED_MLP),
    # Phi3: fused self_attn.qkv_proj and mlp.gate_up_proj (nn.Linear), o_proj, down_proj; RoPE; untied.
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", SMALL, "model.layers",
           ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")),
    # GPT-2: attn.c_attn/c_proj, mlp.c_fc/c_proj are transformers' Conv1D (weight (in, out), bias);
    # learned position embeddings transformer.wpe; lm_head tied to transformer.wte.
    Family("gpt2", "GPT2Config", "GPT2LMHeadModel",
           dict(vocab_size=TINY_VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                eos_token_id=2),
           "transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), conv1d=True),
    # GPT-NeoX: attention.query_key_value/dense, mlp.dense_h_to_4h/dense_4h_to_h (nn.Linear, bias);
    # partial RoPE; input embeddings gpt_neox.embed_in, untied output embed_out.
    Family("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", SMALL, "gpt_neox.layers",
           ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
    # OPT (350m-style, word_embed_proj_dim != hidden): self_attn.q/k/v/out_proj, fc1, fc2 (nn.Linear, bias);
    # model.decoder.project_in/project_out sit outside the blocks (not targets); learned position
    # embeddings model.decoder.embed_positions; tied lm_head.
    Family("opt", "OPTConfig", "OPTForCausalLM",
           dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
           "model.decoder.layers",
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")),
    # Falcon (7b-style: parallel attention, multi-query): self_attention.query_key_value/dense,
    # mlp.dense_h_to_4h/dense_4h_to_h (FalconLinear, an nn.Linear, no bias); RoPE; tied. In-place output
    # op: the block does `mlp_output += attention_output` on the bias-free dense_4h_to_h output.
    Family("falcon", "FalconConfig", "FalconForCausalLM",
           dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                pad_token_id=0, bos_token_id=1, eos_token_id=2),
           "transformer.h",
           ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
    # Mixtral: attention q/k/v/o_proj (nn.Linear); fused experts mlp.experts.gate_up_proj [E, 2I, H] and
    # mlp.experts.down_proj [E, H, I] (3-D Parameters, F.linear per expert); router mlp.gate (a 2-D
    # weight in a TopKRouter, not a target); RoPE; untied.
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM",
           dict(SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, output_router_logits=False),
           "model.layers", ATTN, EXPERTS),
    # Qwen3-MoE: attention as Qwen3 (q/k norms); fused experts as Mixtral (moe_intermediate_size); router mlp.gate.
    Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(SMALL, head_dim=8, num_experts=4, **MOE),
           "model.layers", ATTN, EXPERTS),
    # Qwen2-MoE: attention as Qwen2 (q/k/v bias); fused experts as Mixtral; plus a dense shared expert
    # mlp.shared_expert.gate/up/down_proj and mlp.shared_expert_gate (Linear hidden -> 1); router mlp.gate.
    Family("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
           dict(SMALL, num_experts=4, shared_expert_intermediate_size=64, **MOE), "model.layers",
           ATTN + ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                   "mlp.shared_expert_gate"), EXPERTS),
    # OLMo2: Llama's names, q_norm/k_norm, post-norms; RoPE; untied.
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", SMALL, "model.layers", ATTN + GATED_MLP),
    # Granite: Llama's names; embedding/residual/attention/logit multipliers; RoPE; untied.
    Family("granite", "GraniteConfig", "GraniteForCausalLM", SMALL, "model.layers", ATTN + GATED_MLP),
    # StableLM: Llama's names, LayerNorm with bias; partial RoPE; untied.
    Family("stablelm", "StableLmConfig", "StableLmForCausalLM", SMALL, "model.layers", ATTN + GATED_MLP),
    # Bloom: self_attention.query_key_value/dense, mlp.dense_h_to_4h/dense_4h_to_h (nn.Linear, bias);
    # ALiBi (no position embeddings); word_embeddings_layernorm; tied lm_head to transformer.word_embeddings.
    Family("bloom", "BloomConfig", "BloomForCausalLM",
           dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1,
                eos_token_id=2),
           "transformer.h",
           ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
]
MOE_FAMILIES = [f.name for f in FAMILIES if f.experts]
LABELS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma2",
          "gemma3": "Gemma3 (text)", "phi3": "Phi3", "gpt2": "GPT-2", "gpt_neox": "GPT-NeoX", "opt": "OPT",
          "falcon": "Falcon", "mixtral": "Mixtral (MoE)", "qwen3_moe": "Qwen3-MoE", "qwen2_moe": "Qwen2-MoE",
          "olmo2": "OLMo2", "granite": "Granite", "stablelm": "StableLM", "bloom": "Bloom"}


def logits(model, ids=IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def perturb_(model, scale=0.5, seed=1):
    """Stand-in for training: every trainable entry moves by N(0, scale^2), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def trainable_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


@dataclass(frozen=True)
class Target:
    """One x W^T of the model: a linear layer, or a fused 3-D expert parameter (``fused``)."""

    name: str  # module name (linear) or parameter name (fused experts)
    experts: int  # 1 for a linear layer
    out_features: int
    in_features: int
    fused: bool = False

    @property
    def k(self) -> int:
        return salient_count(self.in_features, salient_fraction=FRACTION)

    @property
    def trainable(self) -> int:
        return self.experts * self.out_features * self.k

    @property
    def key(self) -> str:
        """Its tensor in the plain model's state dict."""
        return self.name if self.fused else f"{self.name}.weight"


class Built:
    """A family's tiny model and what several columns share (built once, on first use)."""

    def __init__(self, family: Family, root: Path):
        import transformers

        self.family = family
        missing = [c for c in (family.config, family.model) if not hasattr(transformers, c)]
        self.skip = (f"{family.name}: transformers {transformers.__version__} has no {', '.join(missing)}"
                     if missing else None)
        self.dir = root / family.name
        if self.skip:
            return
        self.config = getattr(transformers, family.config)(**family.kwargs)
        self.model_cls = getattr(transformers, family.model)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            base = self.model_cls(self.config).eval()
        self.base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
        self.base_logits = logits(base)
        self.base_dir = self.dir / "base"
        base.save_pretrained(self.base_dir)  # stock transformers loads it (the subprocess columns)
        tiny_tokenizer().save_pretrained(self.base_dir)
        self.targets = self._targets(base)
        self._cache: dict = {}

    def fresh(self) -> nn.Module:
        model = self.model_cls(self.config)
        model.load_state_dict(self.base_sd)
        return model.eval()

    def _targets(self, base) -> list[Target]:
        out = []
        for i in range(self.config.num_hidden_layers):
            for s in self.family.linear:
                name = f"{self.family.blocks}.{i}.{s}"
                w = base.get_submodule(name).weight
                o, n = (w.shape[1], w.shape[0]) if self.family.conv1d else tuple(w.shape)
                out.append(Target(name, 1, o, n))
            for s in self.family.experts:
                name = f"{self.family.blocks}.{i}.{s}"
                e, o, n = base.get_parameter(name).shape
                out.append(Target(name, e, o, n, fused=True))
        return out

    def weight(self, sd: dict, t: Target) -> torch.Tensor:
        """A target's weight in a plain state dict as [experts, out, in]."""
        w = sd[t.key]
        if t.fused:
            return w
        return (w.t() if self.family.conv1d else w)[None]

    def once(self, key, make):
        """``make()`` once per family; its exception is re-raised to every column that needs it."""
        if key not in self._cache:
            try:
                self._cache[key] = (make(), None)
            except Exception as e:  # noqa: BLE001 - stored and re-raised where the result is used
                self._cache[key] = (None, e)
        value, err = self._cache[key]
        if err is not None:
            raise err
        return value

    # -- what several columns share -------------------------------------------------------------
    @property
    def gift(self):
        """(model, logits): apply_gift(magnitude), then perturbed: the 'trained' GIFT-SW model."""
        def make():
            model = apply_gift(self.fresh(), GiftConfig(salient_fraction=FRACTION, metric="magnitude"))
            perturb_(model)
            return model, logits(model)
        return self.once("gift", make)

    @property
    def adapter(self) -> Path:
        def make():
            return save_adapter(self.gift[0], self.dir / "adapter", base_model=str(self.base_dir))
        return self.once("adapter", make)

    @property
    def peft(self):
        """(PeftModel, logits, adapter folder): get_peft_model(magnitude), perturbed, save_pretrained."""
        def make():
            import peft

            from salientft.peft import GiftSWConfig

            cfg = GiftSWConfig(salient_fraction=FRACTION, metric="magnitude", task_type="CAUSAL_LM")
            model = peft.get_peft_model(self.fresh(), cfg)
            perturb_(model)
            out = self.dir / "peft_adapter"
            model.save_pretrained(str(out))
            return model, logits(model), out
        return self.once("peft", make)

    def check_columns(self, model, exact: bool = True) -> None:
        """The plain (merged) ``model`` differs from the base in k input columns of every target
        (per expert) and nowhere else. ``exact``: all k columns moved (a perturbation); else at
        most k per expert and some in every target (an optimizer step: an expert that got no token
        has no gradient)."""
        sd = model.state_dict()
        problems = []
        extra, missing = sorted(set(sd) - set(self.base_sd)), sorted(set(self.base_sd) - set(sd))
        if extra or missing:
            problems.append(f"not a plain model: extra keys {extra[:3]}, missing keys {missing[:3]}")
        keys = {t.key for t in self.targets}
        for t in self.targets:
            if t.key not in sd:
                continue
            moved = (self.weight(sd, t) != self.weight(self.base_sd, t)).any(dim=1).sum(dim=1)  # per expert
            what = f"{t.name}: {moved.tolist()} input columns changed"
            if exact and not bool((moved == t.k).all()):
                problems.append(f"{what}, expected {t.k} in each of its {t.experts} expert(s)")
            elif not exact and (bool((moved > t.k).any()) or int(moved.sum()) == 0):
                problems.append(f"{what}, expected between 1 and {t.k} per expert (some moved)")
        for k, v in sd.items():
            if k not in keys and k in self.base_sd and not torch.equal(v, self.base_sd[k]):
                problems.append(f"{k} changed but is not a target")
        assert not problems, f"{self.family.name}: " + "; ".join(problems)

    def check_trainable(self, model) -> None:
        want = sum(t.trainable for t in self.targets)
        got = trainable_count(model)
        assert got == want, (
            f"{self.family.name}: {got} trainable entries, expected {want} = k columns of every target "
            f"({len(self.targets)} targets, experts: {[t.name for t in self.targets if t.fused][:2] or 'none'})"
        )


_BUILT: dict[str, Built] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("architectures")


def built(name: str, root: Path) -> Built:
    if name not in _BUILT:
        _BUILT[name] = Built(next(f for f in FAMILIES if f.name == name), root)
    return _BUILT[name]


@pytest.fixture(scope="module", params=[f.name for f in FAMILIES])
def fam(request, root) -> Built:
    b = built(request.param, root)
    if b.skip:
        pytest.skip(b.skip)
    return b


# --------------------------------------------------------------------------- the Python API

@pytest.mark.numerics
def test_api_data_free(fam):
    model, _ = fam.gift
    fam.check_trainable(model)
    unperturbed = apply_gift(fam.fresh(), GiftConfig(salient_fraction=FRACTION, metric="magnitude"))
    torch.testing.assert_close(logits(unperturbed), fam.base_logits, rtol=0, atol=TOL)  # nothing trained yet
    fam.check_columns(merge_gift(copy.deepcopy(model)))


@pytest.mark.numerics
def test_api_calibrated(fam):
    model = apply_gift(fam.fresh(), GiftConfig(salient_fraction=FRACTION, metric="gift"), calibration=CALIBRATION)
    fam.check_trainable(model)
    torch.testing.assert_close(logits(model), fam.base_logits, rtol=0, atol=TOL)
    perturb_(model)
    fam.check_columns(merge_gift(model))


def test_train_step(fam):
    model = apply_gift(fam.fresh(), GiftConfig(salient_fraction=FRACTION, metric="magnitude"))  # weight noise
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    model.train()
    loss = model(**BATCH, labels=BATCH["input_ids"], use_cache=False).loss
    assert torch.isfinite(loss), f"{fam.family.name}: loss {loss.item()}"
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    opt.step()
    for n, p in params.items():
        # Adam's first step moves an entry by lr * g / (|g| + 1e-8): by >= 1e-4 (far above fp32's step at
        # these weights) when |g| > 1e-10, not at all when g = 0; tinier gradients are left unjudged.
        assert p.grad is not None, f"{n} is trainable but got no gradient"
        moved, g = p.detach() != before[n], p.grad.abs()
        assert bool(moved[g > 1e-10].all()) and not bool(moved[g == 0].any()), f"{n}: not the entries with gradients moved"
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    fam.check_columns(merge_gift(model), exact=False)  # every target's (and expert's) columns trained


@pytest.mark.numerics
def test_save_load(fam):
    model, want = fam.gift
    loaded = load_adapter(fam.fresh(), fam.adapter)
    assert torch.equal(logits(loaded), want)  # the same computation: exact
    assert trainable_count(loaded) == trainable_count(model)


@pytest.mark.numerics
def test_merge(fam):
    model, want = fam.gift
    merged = merge_gift(copy.deepcopy(model))
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=TOL)
    fam.check_columns(merged)


# --------------------------------------------------------------------------- PEFT

@pytest.mark.numerics
def test_peft_route(fam):
    peft = pytest.importorskip("peft")

    model, want, folder = fam.peft
    fam.check_trainable(model)
    loaded = peft.PeftModel.from_pretrained(fam.fresh(), str(folder))
    assert torch.equal(logits(loaded), want)  # the same computation: exact
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=TOL)
    fam.check_columns(merged)


def test_peft_calibrated(fam):
    peft = pytest.importorskip("peft")

    from salientft.peft import GiftSWConfig, preprocess_gift_sw

    cfg = GiftSWConfig(salient_fraction=FRACTION, metric="gift", task_type="CAUSAL_LM")
    base = fam.fresh()
    preprocess_gift_sw(base, cfg, CALIBRATION)
    model = peft.get_peft_model(base, cfg)
    fam.check_trainable(model)
    perturb_(model)
    fam.check_columns(model.merge_and_unload())


# Each family in its own try: one family's failure is reported against it and the others still run.
_LOAD_EACH = """
import json, sys, traceback, torch
torch.set_num_threads({threads})
from transformers import AutoModelForCausalLM
ids = torch.tensor({ids})
results = {{}}
for name, (base_dir, adapter, want) in json.loads(sys.argv[1]).items():
    try:
        want = torch.load(want, weights_only=True)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        from peft import PeftModel  # first imported after transformers has loaded a model: the documented order
        model = PeftModel.from_pretrained(base, adapter).eval()
        with torch.no_grad():
            got = model(input_ids=ids, use_cache=False).logits.float()
        r = {{"diff": (got - want).abs().max().item()}}
        {more}
        results[name] = r
    except Exception as e:
        results[name] = {{"error": f"{{type(e).__name__}}: {{e}}"[:400], "trace": traceback.format_exc()[-1500:]}}
print(json.dumps(results))
"""


def _subprocess_results(root: Path, jobs: dict, prelude: str, more: str, what: str) -> dict:
    """``jobs``: family -> (base folder, adapter folder, wanted logits); one process for all of them."""
    wanted = {}
    for name, (base_dir, adapter, want) in jobs.items():
        path = root / f"{name}_{what.replace(' ', '_')}_want.pt"
        torch.save(want, path)
        wanted[name] = (str(base_dir), str(adapter), str(path))
    code = prelude + _LOAD_EACH.format(threads=torch.get_num_threads(), ids=IDS.tolist(), more=more)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run([sys.executable, "-c", code, json.dumps(wanted)], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, f"{what}: the subprocess failed:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare_all(root: Path, make) -> tuple[dict, dict]:
    """``make(built)`` -> (base folder, adapter folder, wanted logits) for every family transformers has;
    the exceptions of the families where it failed, by name."""
    jobs, errors = {}, {}
    for f in FAMILIES:
        b = built(f.name, root)
        if b.skip:
            continue
        try:
            jobs[f.name] = make(b)
        except Exception as e:  # noqa: BLE001 - reported by that family's test
            errors[f.name] = e
    return jobs, errors


@pytest.fixture(scope="module")
def peft_reload(root):
    """docs/ecosystem.md's order in a new process: import salientft, load the base with transformers,
    then PeftModel.from_pretrained and merge_and_unload."""
    jobs, errors = _prepare_all(root, lambda b: (b.base_dir, b.peft[2], b.peft[1]))
    prelude = "import salientft\n"
    more = """merged = model.merge_and_unload()
        with torch.no_grad():
            r["merged_diff"] = (merged(input_ids=ids, use_cache=False).logits.float() - want).abs().max().item()"""
    results = _subprocess_results(root, jobs, prelude, more, "peft reload") if jobs else {}
    return results, errors


@pytest.fixture(scope="module")
def stock_lora(root):
    """export_lora for every family, then stock transformers + PEFT load them all in ONE process in which
    salientft cannot be imported."""
    from salientft import export_lora

    def make(b):
        out = export_lora(b.adapter, b.dir / "lora", base=str(b.base_dir))
        return b.base_dir, out.output, b.gift[1]

    jobs, errors = _prepare_all(root, make)
    prelude = """import sys; sys.modules["salientft"] = None
try:
    import salientft
except ImportError:
    pass
else:
    raise SystemExit("salientft is importable")
"""
    more = 'r["salientft_imported"] = any(m.split(".")[0] == "salientft" for m in sys.modules if sys.modules[m])'
    results = _subprocess_results(root, jobs, prelude, more, "stock lora") if jobs else {}
    return results, errors


def _subprocess_verdict(fam, results_errors, what):
    results, errors = results_errors
    name = fam.family.name
    if name in errors:
        raise errors[name]
    r = results[name]
    assert "error" not in r, f"{name}: {what}: {r['error']}\n{r.get('trace', '')}"
    return r


@pytest.mark.numerics
def test_peft_reload_fresh_process(fam, peft_reload):
    pytest.importorskip("peft")
    r = _subprocess_verdict(fam, peft_reload, "PeftModel.from_pretrained in a new process")
    assert r["diff"] <= TOL and r["merged_diff"] <= TOL, r


@pytest.mark.numerics
def test_lora_export_stock_peft(fam, stock_lora):
    pytest.importorskip("peft")
    r = _subprocess_verdict(fam, stock_lora, "stock PEFT loading the exported LoRA")
    assert r["salientft_imported"] is False
    assert r["diff"] <= TOL, f"{fam.family.name}: stock PEFT's logits differ from the GIFT-SW model's by {r['diff']}"


# --------------------------------------------------------------------------- GMT

def embedding_parameters(model) -> dict[int, str]:
    """The vocabulary and position matrices by role: input embeddings, output embeddings (lm_head),
    every nn.Embedding (learned position embeddings such as GPT-2's wpe, OPT's embed_positions)."""
    found = {id(model.get_input_embeddings().weight): "input embeddings"}
    out = model.get_output_embeddings()
    if out is not None:
        found.setdefault(id(out.weight), "output embeddings")
    for n, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            found.setdefault(id(m.weight), n)
    return found


def test_gmt(fam):
    model = fam.fresh().train()
    cfg = GMTConfig()
    mask = build_gradient_mask(model, cfg)
    emb = embedding_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    masked_emb = [f"{emb[id(p)]} ({names[id(p)]})" for _, p in mask.params if id(p) in emb]
    assert not masked_emb, f"{fam.family.name}: GMT masks {masked_emb}; embeddings must train densely"
    expected = {id(p) for p in model.parameters() if id(p) not in emb}
    assert {id(p) for _, p in mask.params} == expected, "every other trainable parameter is masked"
    model(**BATCH, labels=BATCH["input_ids"], use_cache=False).loss.backward()
    grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    mask.apply_()
    for pid, n in emb.items():
        p = next(q for q in model.parameters() if id(q) == pid)
        assert p.grad is None or torch.equal(p.grad, grads[pid]), f"{n}: gradient changed by the mask"
    for name, p in mask.params:
        if p.grad is None:
            continue
        before, after = grads[id(p)], p.grad
        n = p.numel()
        keep = n - math.floor(cfg.ratio * n)
        kept = int(after.count_nonzero())
        assert kept == min(keep, int(before.count_nonzero())), f"{name}: kept {kept} of {n}, expected {keep}"
        assert torch.equal(after[after != 0], before[after != 0]), f"{name}: kept gradients were changed"
    before = {id(p): p.detach().clone() for p in model.parameters()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for name, p in mask.params:
        if p.grad is not None:
            assert torch.equal(p.detach()[p.grad == 0], before[id(p)][p.grad == 0]), f"{name}: a masked entry moved"


# --------------------------------------------------------------------------- guards of the battery itself

@pytest.mark.numerics
@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_moe_routing_is_far_from_ties(name, root):
    """The tolerance argument above: on IDS, every MoE router of the perturbed ('trained') GIFT-SW and
    PEFT models prefers its chosen experts to the rejected ones by far more than the fp32 differences
    between the merged, adapter and LoRA computations, so those cannot route a token differently."""
    pytest.importorskip("peft")
    b = built(name, root)
    if b.skip:
        pytest.skip(b.skip)
    k = b.config.num_experts_per_tok
    gaps = []

    def hook(mod, args, out):
        top = (out[0] if isinstance(out, tuple) else out).float().sort(dim=-1, descending=True).values
        gaps.append((top[..., k - 1] - top[..., k]).min().item())

    for model in (b.fresh(), b.gift[0], b.peft[0]):
        handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("mlp.gate")]
        assert len(handles) == b.config.num_hidden_layers
        try:
            logits(model)
        finally:
            for h in handles:
                h.remove()
    assert min(gaps) > 1e-4, gaps


def test_every_issue_family_is_in_the_battery():
    assert {f.name for f in FAMILIES} >= {
        "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt", "falcon",
        "mixtral", "qwen3_moe", "qwen2_moe", "olmo2", "granite", "stablelm", "bloom"}


def test_a_family_transformers_lacks_is_skipped_with_its_name(tmp_path):
    b = Built(Family("futurelm", "FutureLMConfig", "FutureLMForCausalLM", {}, "model.layers", ()), tmp_path)
    assert b.skip.startswith("futurelm: transformers ") and "FutureLMConfig, FutureLMForCausalLM" in b.skip
    assert not b.dir.exists()  # nothing built


def _table_script():
    spec = importlib.util.spec_from_file_location("architecture_table", ROOT / "scripts" / "architecture_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ecosystem_table_is_generated_from_the_results():
    """docs/ecosystem.md's table is what docs/results/architectures.json renders, and the JSON covers every
    family and column of this file: regenerate both with scripts/architecture_table.py."""
    script = _table_script()
    results = json.loads((ROOT / script.RESULTS).read_text())
    doc = (ROOT / script.DOC).read_text()
    assert script.current_table(doc) == script.render(results), (
        "docs/ecosystem.md's architecture table is stale or edited by hand: run "
        "`PYTHONPATH=src .venv/bin/python scripts/architecture_table.py`")
    assert [f["name"] for f in results["families"]] == [f.name for f in FAMILIES]
    columns = [c["test"] for c in results["columns"]]
    assert columns == list(script.COLUMNS), "the JSON's columns are not the script's"
    here = {n for n in globals() if n.startswith("test_")}
    assert set(columns) <= here, f"columns without a test here: {set(columns) - here}"
