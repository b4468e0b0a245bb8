"""GIFT-SW on fused MoE experts (transformers 5's 3-D expert parameters) and the log of what it
cannot wrap, on tiny random Mixtral, Qwen3-MoE, Qwen2-MoE and gpt-oss ([experts, in, out] with biases).

Floats: comparisons are fp32. At init the GIFT-SW experts run transformers' eager loop with the
same F.linear per expert plus exact zeros (bit-identical to the eager base); merged vs adapter are
two different computations (dense merged weight vs W + rank-k correction), ~1e-7 apart, checked at
1e-5 (a trained column moves logits by > 1e-3); save/load and unmerge are exact (same values).
"""
from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from salientft import GiftConfig, apply_gift, load_adapter, merge_gift, save_adapter, trainable_parameters  # noqa: E402
from salientft import unmerge_gift  # noqa: E402
from salientft.calibration import collect_activation_stats  # noqa: E402
from salientft.gift import gift_layers  # noqa: E402
from salientft.gift.experts import ExpertColumns, SalientExperts  # noqa: E402
from salientft.saliency import select_salient  # noqa: E402
from salientft.targets import find_expert_weights  # noqa: E402

V = 64
IDS = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(0))


def _mixtral(**kw):
    return transformers.MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2, **kw)


def _qwen3_moe(**kw):
    return transformers.Qwen3MoeConfig(vocab_size=V, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       num_experts=4, num_experts_per_tok=2, **kw)


def _qwen2_moe(**kw):
    return transformers.Qwen2MoeConfig(vocab_size=V, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                                       shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, **kw)


def _gpt_oss(**kw):
    return transformers.GptOssConfig(vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                     num_experts_per_tok=2, layer_types=["full_attention"] * 2, **kw)


def _deepseek_v3(**kw):
    return transformers.DeepseekV3Config(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                         num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
                                         num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                         topk_group=1, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
                                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **kw)


FAMILIES = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe, "gpt_oss": _gpt_oss,
            "deepseek_v3": _deepseek_v3}


def tiny(family, eager=True, seed=0):
    cfg = FAMILIES[family]()
    if eager:
        cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # gpt-oss initialises its expert biases to zero; make the biased path visible
        for n, p in model.named_parameters():
            if n.endswith("_proj_bias"):
                p.normal_(0, 0.02)
    return model.eval()


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_top(score, chosen, what=""):
    """``chosen`` are the top-k of ``score``, tie-aware: every chosen column scores at least every other
    column within 1e-5 relative (fp32 column norms computed in another order differ by ~1e-7)."""
    rest = torch.ones_like(score, dtype=torch.bool)
    rest[chosen] = False
    assert score[chosen].min() >= score[rest].max() * (1 - 1e-5), what


def experts_of(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SalientExperts)}


@pytest.mark.numerics
@pytest.mark.parametrize("family", list(FAMILIES))
def test_experts_carry_salient_columns_equal_at_init_and_counted(family):
    base = tiny(family)
    ref = logits(base)
    expected = find_expert_weights(base)
    assert len(expected) == 4  # gate_up_proj and down_proj of both blocks
    model = apply_gift(tiny(family), GiftConfig(metric="magnitude", n_salient=3))
    assert torch.equal(logits(model), ref)  # the same eager matmuls plus exact zeros
    layers = gift_layers(model)
    cols = {n: c for n, c in layers.items() if isinstance(c, ExpertColumns)}
    assert set(cols) == set(expected)
    assert len(experts_of(model)) == 2
    for c in cols.values():
        assert c.salient_idx.shape == (4, 3) and c.salient_weight.shape == (4, c.out_features, 3)
        assert c.noise_std.shape == (4, c.out_features) and (c.noise_std > 0).all()
    # magnitude: each expert's own top-3 columns by the L2 norm of its (out, in) matrix
    for name, c in cols.items():
        w = c.base_weight().detach()
        for e in range(4):
            assert_top(w[e].norm(dim=0), c.salient_idx[e], f"{name} expert {e}")
    counts = trainable_parameters(model)
    assert counts["trainable"] == sum(c.salient_weight.numel() for c in layers.values())
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["total"] == sum(p.numel() for p in base.parameters())
    assert sum(c.salient_weight.numel() for c in cols.values()) == sum(4 * c.out_features * 3 for c in cols.values())


def _train_step(model, lr=1e-2, seed=0):
    model.train()
    torch.manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_a_training_step_changes_exactly_the_salient_columns_of_the_experts(family):
    base = tiny(family)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = _train_step(apply_gift(tiny(family), GiftConfig(metric="magnitude", n_salient=3, noise="weight")))
    cols = {n: (c.salient_idx.clone(), c) for n, c in gift_layers(model).items() if isinstance(c, ExpertColumns)}
    merge_gift(model)
    after = dict(model.named_parameters())
    moved = 0
    for name, (idx, c) in cols.items():
        w0, w1 = before[name], after[name].detach()
        if c._experts.is_transposed:  # [experts, in, out]: compare as [experts, out, in]
            w0, w1 = w0.transpose(1, 2), w1.transpose(1, 2)
        changed = w0 != w1
        allowed = torch.zeros_like(changed)
        allowed.scatter_(2, idx[:, None, :].expand(-1, w0.shape[1], -1), True)
        assert not (changed & ~allowed).any(), f"{name}: an entry outside the salient columns moved"
        moved += int(changed.any(dim=(1, 2)).sum())
    assert moved >= 4  # experts that received tokens trained
    for n, p in after.items():  # nothing else (routers, norms, biases, embeddings) moved
        if n not in cols and not n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) \
                and "shared_expert." not in n and "shared_expert_gate" not in n:
            assert torch.equal(p.detach(), before[n]), n


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_save_load_exact_merge_matches_and_unmerge_restores(tmp_path, family):
    model = _train_step(apply_gift(tiny(family), GiftConfig(metric="magnitude", n_salient=2)))
    trained = logits(model)
    save_adapter(model, tmp_path / "a")
    fresh = load_adapter(tiny(family), tmp_path / "a")
    for (n, a), (m, b) in zip(gift_layers(model).items(), gift_layers(fresh).items()):
        assert n == m and torch.equal(a.salient_idx, b.salient_idx) and torch.equal(a.salient_weight, b.salient_weight)
        assert torch.equal(a.noise_std, b.noise_std)
    assert torch.equal(logits(fresh), trained)
    assert (trained - logits(tiny(family))).abs().max() > 1e-3  # the step moved the model
    merge_gift(fresh, keep_original=True)
    assert not experts_of(fresh) and type(fresh.model.layers[0].mlp.experts).__name__.endswith("Experts")
    torch.testing.assert_close(logits(fresh), trained, rtol=0, atol=1e-5)
    unmerge_gift(fresh)
    assert torch.equal(logits(fresh), trained)
    base_sd = tiny(family).state_dict()
    merge_gift(fresh)
    merge_gift(model)
    for n, p in model.state_dict().items():
        assert torch.equal(p, fresh.state_dict()[n])
    assert set(model.state_dict()) == set(base_sd)


def test_load_adapter_refuses_another_base(tmp_path):
    model = apply_gift(tiny("mixtral"), GiftConfig(metric="magnitude", n_salient=2))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="fingerprint"):
        load_adapter(tiny("mixtral", seed=1), tmp_path / "a")


def _routing(model):
    """Record (hidden_states, top_k_index) that each experts module receives."""
    seen, handles = {}, []
    for n, m in model.named_modules():
        if type(m).__name__.endswith("Experts"):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, n=n: seen.setdefault(n, []).append((args[0].detach(), args[1].detach()))))
    return seen, handles


@pytest.mark.numerics
def test_calibrated_statistics_are_each_experts_own_routed_tokens():
    """8 experts, top-2, 5 unpadded tokens: at most 10 (expert, token) pairs, so some experts get none."""
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)).float().eval()
    ids = torch.tensor([[5, 9, 17, 33, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    seen, handles = _routing(model)
    names = list(find_expert_weights(model))
    stats = collect_activation_stats(model, [{"input_ids": ids, "attention_mask": mask}], target_modules=[],
                                     experts=names, progress=False)
    for h in handles:
        h.remove()
    (mod, [(hidden, top)]) = next(iter(seen.items()))
    keep = mask.reshape(-1).bool()
    hidden, top = hidden[keep].double(), top[keep]  # padding never counts
    experts = model.get_submodule(mod)
    empty = 0
    for e in range(8):
        x = hidden[(top == e).any(-1)]
        gu = x @ experts.gate_up_proj[e].detach().double().T
        g, u = gu.chunk(2, dim=-1)
        h = torch.nn.functional.silu(g) * u
        for proj, inp in (("gate_up_proj", x), ("down_proj", h)):
            s = stats[f"{mod}.{proj}.{e}"]
            assert s.count == inp.shape[0]
            torch.testing.assert_close(s.sum_sq, (inp * inp).sum(0), rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(s.sum_abs, inp.abs().sum(0), rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(s.max_abs.double(), inp.abs().amax(0) if len(inp) else torch.zeros(inp.shape[1],
                                       dtype=torch.float64), rtol=1e-5, atol=1e-9)
        empty += x.shape[0] == 0
    assert empty >= 1  # 5 tokens x top-2 cannot reach all 8 experts: an unrouted expert has zero statistics


@pytest.mark.numerics
def test_calibrated_metric_selects_per_expert_columns_from_routed_tokens(caplog):
    model = tiny("mixtral")
    batches = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]
    with caplog.at_level(logging.WARNING):
        apply_gift(model, GiftConfig(metric="wanda", n_salient=2), calibration=batches)
    names = list(find_expert_weights(tiny("mixtral")))
    stats = collect_activation_stats(tiny("mixtral"), batches, target_modules=[], experts=names, progress=False)
    for name, c in gift_layers(model).items():
        if not isinstance(c, ExpertColumns):
            continue
        w = c.base_weight().detach().float()
        for e in range(c.num_experts):
            s = stats[f"{name}.{e}"]
            score = (w[e].abs().sum(0).double() * s.sum_sq.sqrt()).float() if s.count else w[e].norm(dim=0)
            assert_top(score, c.salient_idx[e], f"{name} expert {e}")


def test_explicit_targets_reach_the_experts_and_a_linear_only_method_names_them():
    model = apply_gift(tiny("qwen3_moe"), GiftConfig(metric="magnitude", n_salient=2, target_modules=["down_proj"]))
    assert set(gift_layers(model)) == {f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)}
    model = apply_gift(tiny("qwen3_moe"), GiftConfig(metric="magnitude", n_salient=2, target_modules=["experts"]))
    assert len(gift_layers(model)) == 4
    from salientft.targets import find_target_modules

    with pytest.raises(ValueError, match="fused MoE experts"):
        find_target_modules(tiny("qwen3_moe"), ["experts"])


def test_uncovered_layers_are_named_in_the_log_with_parameter_counts(caplog):
    with caplog.at_level(logging.WARNING, logger="salientft"):
        apply_gift(tiny("mixtral"), GiftConfig(metric="magnitude", n_salient=2))
    text = caplog.text
    assert "model.layers.*.mlp.gate.weight (MixtralTopKRouter): 2 x 128 parameters" in text
    caplog.clear()
    from salientft.models import tiny_random_llama

    with caplog.at_level(logging.WARNING, logger="salientft"):
        apply_gift(tiny_random_llama(seed=0), GiftConfig(metric="magnitude", n_salient=2))
    assert "cannot wrap" not in caplog.text


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_gmt_masks_the_3d_expert_gradients(granularity):
    from salientft.gmt import GradientMask

    model = tiny("mixtral").train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    mask = GradientMask(model, ratio=0.5, granularity=granularity, exclude=[])
    mask.apply_()
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert name in {n for n, _ in mask.params}
    g0, g1 = before[name].abs(), model.get_parameter(name).grad
    kept = g1 != 0
    assert torch.equal(g1[kept], before[name][kept])  # kept entries untouched
    if granularity == "tensor":
        assert 0.4 < kept.float().mean() < 0.6
        assert g0[kept].min() >= g0[~kept].max()  # the largest gradients of the 3-D tensor are the ones kept
    else:  # one threshold over every tensor: the 3-D one is cut at the same value as the others
        everything = torch.cat([g.abs().flatten() for g in before.values()])
        kept_all = torch.cat([model.get_parameter(n).grad.flatten() != 0 for n in before])
        assert g0[kept].min() >= everything[~kept_all].max()


def test_calibrate_scores_file_carries_per_expert_rows_that_apply_gift_uses(tmp_path):
    from salientft.models import tiny_tokenizer
    from salientft.pipelines import calibrate
    from salientft.saliency import load_scores

    text = tmp_path / "calib.txt"
    text.write_text("".join(chr(33 + (i * 7) % 60) for i in range(600)))
    tok = tiny_tokenizer()
    model = tiny("mixtral")
    if len(tok) > V:
        model.resize_token_embeddings(len(tok))
    out = tmp_path / "scores.safetensors"
    calibrate(model, tok, str(text), metric="gift", calib_samples=2, seq_len=16, batch_size=2, output=out, progress=False)
    scores = load_scores(out)
    name = "model.layers.1.mlp.experts.down_proj"
    assert {f"{name}.{e}" for e in range(4)} <= set(scores) and scores[f"{name}.0"].shape == (24,)
    gifted = apply_gift(model, GiftConfig(n_salient=2), scores)
    col = gift_layers(gifted)[name]
    for e in range(4):
        assert torch.equal(col.salient_idx[e], select_salient(scores[f"{name}.{e}"], 2))  # the same selection
    peft = pytest.importorskip("peft")
    from salientft.peft import GiftSWConfig

    tuned = peft.get_peft_model(tiny("mixtral"), GiftSWConfig(metric="gift", n_salient=2, scores=str(out)))
    holder = tuned.base_model.model.model.layers[1].mlp.experts.holders()["down_proj"]
    assert torch.equal(holder.giftsw_idx["default"], col.salient_idx)  # the PEFT route reads the same rows


def test_peft_preprocess_scores_each_expert_from_its_routed_tokens_as_apply_gift_does():
    peft = pytest.importorskip("peft")
    from salientft.peft import GiftSWConfig, preprocess_gift_sw

    batches = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]
    ref = apply_gift(tiny("qwen2_moe"), GiftConfig(metric="wanda", n_salient=2), calibration=batches)
    cfg = GiftSWConfig(metric="wanda", n_salient=2, task_type="CAUSAL_LM")
    base = tiny("qwen2_moe")
    scores = preprocess_gift_sw(base, cfg, batches)
    assert scores["model.layers.0.mlp.experts.down_proj"].shape == (4, 24)  # [experts, in]
    model = peft.get_peft_model(base, cfg)
    want = gift_layers(ref)
    got = {}
    for n, m in model.base_model.model.named_modules():
        if hasattr(m, "holders"):
            got.update({f"{n}.{p}": h.giftsw_idx["default"] for p, h in m.holders().items()})
        elif hasattr(m, "giftsw_idx"):
            got[n] = m.giftsw_idx["default"]
    assert set(got) == set(want) and any("shared_expert" in n for n in got)
    for n, idx in got.items():
        assert torch.equal(idx, want[n].salient_idx), n
    with pytest.raises(ValueError, match="matches no linear layer or fused MoE experts"):
        preprocess_gift_sw(tiny("qwen2_moe"), GiftSWConfig(metric="wanda", n_salient=2, target_modules=["nothing"]),
                           batches)
    only = GiftSWConfig(metric="wanda", n_salient=2, target_modules=["experts.gate_up_proj"])
    assert set(preprocess_gift_sw(tiny("qwen2_moe"), only, batches)) == {
        f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)}


@pytest.mark.numerics
def test_lora_export_of_expert_columns_loads_in_stock_peft_without_salientft(tmp_path):
    """The exported LoRA (PEFT target_parameters for the experts, rank k per expert, k differing between
    gate_up_proj (in 32: k 4) and down_proj (in 24: k 3)) gives the trained model's logits in a process
    that cannot import salientft; fp32, different code paths (W + B A vs W + rank-k correction): 1e-5."""
    import json
    import subprocess
    import sys

    pytest.importorskip("peft")
    from salientft.export import export_lora
    from salientft.models import load_model, tiny_tokenizer

    base_dir = tmp_path / "base"
    tiny("mixtral", eager=False).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model, _ = load_model(str(base_dir), dtype="fp32")
    apply_gift(model, GiftConfig(salient_fraction=1 / 8, metric="magnitude", noise="none"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in filter(lambda p: p.requires_grad, model.parameters()):
            p.add_(torch.randn(p.shape, generator=g), alpha=0.5)
    want = logits(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(base_dir))
    export_lora(tmp_path / "adapter", tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(find_expert_weights(tiny("mixtral")))
    torch.save(want, tmp_path / "want.pt")
    code = f"""import sys; sys.modules["salientft"] = None
import json, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {str(tmp_path / 'lora')!r}).eval()
with torch.no_grad():
    got = model(input_ids=torch.tensor({IDS.tolist()})).logits
want = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)
ranks = {{n: m.lora_A["default"].weight.shape[0] for n, m in model.named_modules()
         if type(m).__name__ == "ParamWrapper"}}
print(json.dumps({{"diff": (got - want).abs().max().item(), "ranks": sorted(ranks.values())}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ranks"] == [12, 12, 16, 16]  # experts (4) x k: 3 for down_proj, 4 for gate_up_proj
    assert got["diff"] <= 1e-5


def _peft_experts(model):
    from salientft.peft.layer import Experts

    return {n: m for n, m in model.named_modules() if isinstance(m, Experts)}


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_peft_route_trains_the_experts_and_logs_only_what_it_cannot_wrap(caplog, family):
    """Default targets: every expert of every fused projection, k columns each, as apply_gift (gpt-oss:
    [experts, in, out] with biases); only the router is left (and named)."""
    peft = pytest.importorskip("peft")
    from salientft.peft import GiftSWConfig

    ref = apply_gift(tiny(family), GiftConfig(metric="magnitude", n_salient=3))
    with caplog.at_level(logging.WARNING, logger="salientft"):
        model = peft.get_peft_model(tiny(family), GiftSWConfig(metric="magnitude", n_salient=3, task_type="CAUSAL_LM"))
    assert "mlp.router.weight" in caplog.text or "mlp.gate.weight" in caplog.text
    assert "experts" not in caplog.text  # the experts are covered now
    layers = _peft_experts(model)
    assert len(layers) == 2
    want = {n: c for n, c in gift_layers(ref).items() if isinstance(c, ExpertColumns)}
    for name, layer in layers.items():
        name = name.removeprefix("base_model.model.")
        for proj, holder in layer.holders().items():
            c = want[f"{name}.{proj}"]  # the same columns, noise scale and initial values as apply_gift's
            assert torch.equal(holder.giftsw_idx["default"], c.salient_idx)
            assert torch.equal(holder.giftsw_noise_std["default"], c.noise_std)
            assert torch.equal(holder.giftsw_weight["default"], c.salient_weight)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".giftsw_weight.default" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == trainable_parameters(ref)["trainable"]
    assert torch.equal(logits(model), logits(tiny(family)))  # eager base, same matmuls plus exact zeros


@pytest.mark.numerics
def test_peft_route_expert_gradients_equal_apply_gifts():
    """One backward without noise: the PEFT layer's per-expert column gradients are apply_gift's (the same
    per-expert salient matmuls; fp32, summation order may differ only in the attention's autograd)."""
    peft = pytest.importorskip("peft")
    from salientft.peft import GiftSWConfig

    ref = apply_gift(tiny("mixtral"), GiftConfig(metric="magnitude", n_salient=3, noise="none")).train()
    model = peft.get_peft_model(tiny("mixtral"), GiftSWConfig(metric="magnitude", n_salient=3, noise="none",
                                                               task_type="CAUSAL_LM")).train()
    for m in (ref, model):
        m(input_ids=IDS, labels=IDS).loss.backward()
    want = {n: c.salient_weight.grad for n, c in gift_layers(ref).items() if isinstance(c, ExpertColumns)}
    got = {f"{n.removeprefix('base_model.model.')}.{p}": h.giftsw_weight["default"].grad
           for n, layer in _peft_experts(model).items() for p, h in layer.holders().items()}
    assert set(got) == set(want)
    for n in want:
        assert got[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7)


def test_peft_route_targets_experts_by_module_projection_or_parameter_name():
    peft = pytest.importorskip("peft")
    from salientft.peft import GiftSWConfig

    def projections(targets, **kw):
        model = peft.get_peft_model(tiny("mixtral"), GiftSWConfig(metric="magnitude", n_salient=2,
                                                                   target_modules=targets, **kw))
        trained = {n.removeprefix("base_model.model.").split(".giftsw_")[0]
                   for n, p in model.named_parameters() if p.requires_grad}
        return model, trained

    both = {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert projections(["experts"])[1] == both
    assert projections(["experts.down_proj"])[1] == {n for n in both if n.endswith("down_proj")}
    assert projections(["model.layers.1.mlp.experts.gate_up_proj", "q_proj"])[1] == {
        "model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert projections(r".*\.1\.mlp\.experts\.down_proj")[1] == {"model.layers.1.mlp.experts.down_proj"}
    assert projections(["experts"], exclude_modules=["down_proj"])[1] == {n for n in both if n.endswith("gate_up_proj")}
    model, trained = projections(["experts.down_proj"])
    layer = next(iter(_peft_experts(model).values()))
    assert not len(layer.holders()["gate_up_proj"].giftsw_weight)  # the untargeted projection runs frozen


@pytest.mark.numerics
def test_apply_gift_adapter_loads_in_peft_and_peft_adapter_loads_in_salientft(tmp_path):
    """One adapter format for fused experts both ways: <param>.giftsw_idx [E, k], .giftsw_weight [E, out, k],
    .giftsw_noise_std [E, out] under base_model.model., the base fingerprint included."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from salientft.peft import GiftSWConfig

    torch.manual_seed(3)
    ours = apply_gift(tiny("mixtral"), GiftConfig(metric="magnitude", n_salient=3))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny("mixtral"), str(tmp_path / "ours"))
    assert torch.equal(logits(loaded), logits(ours))  # the same computation, bit for bit
    torch.testing.assert_close(logits(loaded.merge_and_unload()), logits(ours), rtol=0, atol=1e-5)

    theirs = peft.get_peft_model(tiny("mixtral"), GiftSWConfig(metric="magnitude", n_salient=3, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    tensors = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.mlp.experts.gate_up_proj.giftsw_"
    assert tensors[key + "idx"].shape == (4, 3) and tensors[key + "weight"].shape == (4, 48, 3)
    assert tensors[key + "noise_std"].shape == (4, 48)
    back = load_adapter(tiny("mixtral"), tmp_path / "theirs")  # checks the base fingerprint too
    assert torch.equal(logits(back), logits(theirs))
    # PEFT's state-dict-driven injection (inject_adapter_in_model(..., state_dict=...)) finds the experts too
    injected = peft.inject_adapter_in_model(peft.PeftConfig.from_pretrained(str(tmp_path / "theirs")), tiny("mixtral"),
                                            state_dict={k.removeprefix("base_model.model."): v for k, v in tensors.items()})
    assert len(_peft_experts(injected)) == 2
    assert not peft.set_peft_model_state_dict(injected, tensors).unexpected_keys
    assert torch.equal(logits(injected), logits(theirs))
    with pytest.raises(ValueError, match="different base weights"):
        load_adapter(tiny("mixtral", seed=1), tmp_path / "theirs")


@pytest.mark.numerics
def test_peft_route_experts_merge_unmerge_disable_and_two_adapters():
    peft = pytest.importorskip("peft")
    from salientft.peft import GiftSWConfig

    base_logits = logits(tiny("mixtral"))
    model = peft.get_peft_model(tiny("mixtral"), GiftSWConfig(metric="magnitude", n_salient=3, target_modules=["experts"]))
    model.add_adapter("other", GiftSWConfig(metric="random", n_salient=2, seed=5, target_modules=["experts.down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".giftsw_weight." in n:
                p.add_(0.5 * torch.randn_like(p))
    assert all(".giftsw_weight.default" in n for n, p in model.named_parameters() if p.requires_grad)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    tuned = logits(model)
    assert not torch.equal(tuned, base_logits)
    with model.disable_adapter():
        assert torch.equal(logits(model), base_logits)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), tuned, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    model.set_adapter("other")
    other = logits(model)
    assert not torch.equal(other, tuned) and not torch.equal(other, base_logits)
    assert all(".giftsw_weight.other" in n and "down_proj" in n for n, p in model.named_parameters() if p.requires_grad)
    model.base_model.set_adapter(["default", "other"])  # both: base output plus each adapter's correction
    assert not torch.equal(logits(model), tuned)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model), tuned)
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(logits(merged), tuned, rtol=0, atol=1e-5)


def test_peft_route_trains_experts_under_weight_noise_and_refuses_a_corrupt_expert_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    from salientft.peft import GiftSWConfig

    model = peft.get_peft_model(tiny("mixtral"), GiftSWConfig(metric="magnitude", n_salient=3, task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".giftsw_weight.default" in n for n in moved)
    assert any("experts.down_proj" in n for n in moved) and any("experts.gate_up_proj" in n for n in moved)
    model.save_pretrained(str(tmp_path / "a"))
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.1.mlp.experts.down_proj.giftsw_idx"
    tensors[key][2, 1] = tensors[key][2, 0]  # expert 2 lists a column twice
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="experts.down_proj lists a salient column twice"):
        peft.PeftModel.from_pretrained(tiny("mixtral"), str(tmp_path / "a"))


def test_quantize_names_the_experts_it_leaves_in_16_bits(caplog):
    from salientft.quant.model import quantize

    with caplog.at_level(logging.WARNING, logger="salientft"):
        quantize(tiny("mixtral"), bits=4, quantizer="rtn", n_salient=2, metric="magnitude", progress=False)
    assert "quantize cannot wrap" in caplog.text and "experts.down_proj (MixtralExperts)" in caplog.text


@pytest.mark.parametrize("method", ["gift-sw", "gmt"])
def test_salientft_train_on_a_local_moe_model_trains_its_experts(tmp_path, method):
    """The whole `salientft train` path on a tiny Mixtral folder: GIFT-SW calibrates on the training data
    and its adapter carries trained expert columns; GMT masks the 3-D expert gradients of full training."""
    import json

    from salientft import methods
    from salientft.config import TrainConfig
    from salientft.train import train
    from salientft.models import tiny_tokenizer

    tok = tiny_tokenizer()
    folder = tmp_path / "mixtral"
    cfg = _mixtral()
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(16)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    settings = dict(model=str(folder), data=str(tmp_path / "d.jsonl"), output=str(tmp_path / "run"), method=method,
                    max_steps=2 if method == "gift-sw" else 1, batch_size=4, max_length=64, dtype="fp32", lr=1e-2,
                    metric="gift", n_salient=2,
                    calib_samples=4, warmup_ratio=0.0, mask_ratio=0.5)
    train(TrainConfig(**methods.get(method).only_used(settings)))
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if method == "gift-sw":
        model = load_adapter(base, tmp_path / "run" / "adapter")
        cols = {n: c for n, c in gift_layers(model).items() if isinstance(c, ExpertColumns)}
        assert len(cols) == 4
        moved = sum(int((c.salient_weight - c.base_weight().gather(
            2, c.salient_idx[:, None, :].expand(-1, c.out_features, -1))).abs().amax(dim=(1, 2)).gt(0).sum())
            for c in cols.values())
        assert moved >= 4  # experts that saw tokens trained
    else:
        trained = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32)
        w0 = base.model.layers[0].mlp.experts.gate_up_proj
        w1 = trained.model.layers[0].mlp.experts.gate_up_proj
        changed = (w0 != w1).float().mean().item()
        assert 0 < changed <= 0.5  # one step under a 50% mask (zero gradients, e.g. unrouted experts, never kept)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_expert_column_gradients_equal_the_dense_gradient_of_those_columns(family):
    """At init the GIFT-SW model is the base, so the gradient of expert e's salient columns is the
    dense weight gradient of the eager base at those columns. fp32, (out, k) via g^T x_S vs autograd's
    full (out, in) gradient: summation order differs (~1e-7); 1e-5 relative is far below a wrong
    expert or column (different values altogether)."""
    base = tiny(family).train()
    base.requires_grad_(True)
    base(input_ids=IDS, labels=IDS).loss.backward()
    model = apply_gift(tiny(family), GiftConfig(metric="magnitude", n_salient=3, noise="none")).train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    checked = 0
    for name, c in gift_layers(model).items():
        if not isinstance(c, ExpertColumns):
            continue
        g = base.get_parameter(name).grad
        g = g.transpose(1, 2) if c._experts.is_transposed else g  # as [experts, out, in]
        want = torch.gather(g, 2, c.salient_idx[:, None, :].expand(-1, c.out_features, -1))
        torch.testing.assert_close(c.salient_weight.grad, want, rtol=1e-5, atol=1e-8)
        checked += int(want.abs().amax(dim=(1, 2)).gt(0).sum())
    assert checked >= 4


def test_expert_weight_noise_is_seeded_per_forward_and_absent_in_eval():
    model = apply_gift(tiny("qwen3_moe"), GiftConfig(metric="magnitude", n_salient=2, noise="weight",
                                                     target_modules=["experts"]))  # only experts add noise
    clean = logits(model)
    model.train()

    def noisy(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(input_ids=IDS).logits

    a, b, c = noisy(5), noisy(5), noisy(6)
    assert torch.equal(a, b)  # the same seeds: the same noise (same computation)
    assert (a - c).abs().max() > 1e-4 and (a - clean).abs().max() > 1e-4  # noise is there, fresh per seed
    assert torch.equal(logits(model), clean)  # eval: no noise
    cols = [c for c in gift_layers(model).values() if isinstance(c, ExpertColumns)]
    std = cols[0].noise_std
    assert not torch.equal(std[0], std[1])  # each expert's own Delta / 2


def test_expert_columns_refuse_wrong_shapes():
    experts = tiny("mixtral").model.layers[0].mlp.experts
    with pytest.raises(ValueError, match=r"salient_idx of gate_up_proj must be \[experts=4, k\]"):
        ExpertColumns(experts, "gate_up_proj", torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="distinct column indices"):
        ExpertColumns(experts, "gate_up_proj", torch.tensor([[0, 0]] * 4))
    with pytest.raises(ValueError, match=r"noise_std of down_proj must be \[experts=4, out\]"):
        ExpertColumns(experts, "down_proj", torch.tensor([[0, 1]] * 4), torch.zeros(3, 32))
    model = tiny("mixtral")
    name = "model.layers.0.mlp.experts.down_proj"
    scores = {n: torch.rand(4, 32 if n.endswith("gate_up_proj") else 24) for n in find_expert_weights(model)}
    scores[name] = torch.rand(24)
    with pytest.raises(ValueError, match=r"need \[experts=4, in=24\]"):
        apply_gift(model, GiftConfig(n_salient=2, target_modules=["experts"]), scores)


@pytest.mark.numerics
def test_apply_gift_keeps_an_eval_model_noise_free():
    """A model in eval mode (as from_pretrained returns it) stays in eval mode: no weight noise until train()."""
    base = tiny("mixtral")
    with torch.no_grad():
        ref = base(input_ids=IDS).logits
    model = apply_gift(tiny("mixtral"), GiftConfig(metric="magnitude", n_salient=2, noise="weight"))
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, ref)
