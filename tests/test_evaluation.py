"""Evaluation: lm-eval-identical prompts, exact scoring, metrics, perplexity, CLI and compare."""
import json
import math
import os

import pytest
import torch

from salientft.evaluation import compare_runs, evaluate, load_for_eval, perplexity, results_markdown
from salientft.evaluation.scorer import LoglikScorer, PairEncoder, choose
from salientft.evaluation.tasks import TASKS, hellaswag_preprocess, load_items, parse_tasks


def _direct_loglik(model, tok, ctx, cont):
    """Reference: lm-eval's pair encoding + one unbatched forward of the whole sequence."""
    n = len(ctx) - len(ctx.rstrip())
    if n:
        ctx, cont = ctx[:-n], ctx[-n:] + cont
    c = tok.encode(ctx)
    w = tok.encode(ctx + cont)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([w], device=next(model.parameters()).device)).logits[0].float(), -1)
    return sum(lp[len(c) - 1 + k, w[len(c) + k]].item() for k in range(len(w) - len(c)))


GROUPS = [
    # shared context, continuations of different lengths
    [("Question: what is up?\nAnswer:", " the sky"), ("Question: what is up?\nAnswer:", " no")],
    # partial evaluation (winogrande shape): contexts differ, continuation shared
    [("The cup fell because the cup", " was slippery."), ("The cup fell because the table", " was slippery.")],
    # trailing whitespace in the context moves to the continuation
    [("abc ", "d"), ("abc ", "de"), ("abc ", "def")],
    # a single request
    [("x", " y z")],
]


@pytest.mark.numerics
def test_scorer_matches_direct_loglik(tiny_model, tiny_tok):
    ref = [[_direct_loglik(tiny_model, tiny_tok, *p) for p in g] for g in GROUPS]
    for share, batch_size in ((True, 1), (True, 3), (False, 2)):
        out = LoglikScorer(tiny_model, tiny_tok, batch_size=batch_size, share_context=share,
                           progress=False, logprob_dtype="float32").score(GROUPS)
        for got, want in zip(out, ref):
            assert got == pytest.approx(want, abs=1e-4), (share, batch_size)


def test_batches_are_cut_by_sequences_and_padded_tokens():
    from salientft.evaluation.scorer import batch_bounds

    lengths = [1291, 700, 600, 300, 260, 256, 200, 100, 90, 80]  # longest first, as the scorer sorts
    assert batch_bounds(lengths, 16, None) == [(0, 10)]
    assert batch_bounds(lengths, 4, None) == [(0, 4), (4, 8), (8, 10)]
    # 4096 padded tokens: 4096 // 1291 = 3 sequences, then 4096 // 300 = 13 (7 remain)
    assert batch_bounds(lengths, 16, 4096) == [(0, 3), (3, 10)]
    assert batch_bounds([5000, 10], 16, 4096) == [(0, 1), (1, 2)]  # longer than the budget: alone
    for s, e in batch_bounds(lengths, 3, 1000):
        assert 1 <= e - s <= 3 and ((e - s) * lengths[s] <= 1000 or e - s == 1)


@pytest.mark.numerics
def test_token_budget_and_plain_path_give_the_same_scores(tiny_model, tiny_tok):
    """Batches cut by padded tokens, and batches without branches sent as plain causal sequences
    (2D padding mask, default positions), score like one unbatched forward per request."""
    ref = [[_direct_loglik(tiny_model, tiny_tok, *p) for p in g] for g in GROUPS]
    # one-token answers (BoolQ's shape; one byte each with the tiny byte-level tokenizer)
    boolq = [[("Passage one.\nAnswer:", " A"), ("Passage one.\nAnswer:", " B")],
             [("A longer passage two.\nAnswer:", " A"), ("A longer passage two.\nAnswer:", " B")]]
    want_b = [[_direct_loglik(tiny_model, tiny_tok, *p) for p in g] for g in boolq]
    seen = []
    real_forward = tiny_model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["attention_mask"].dim())
        return real_forward(*args, **kwargs)

    tiny_model.forward = spy
    try:
        seen.clear()
        got_b = LoglikScorer(tiny_model, tiny_tok, progress=False, logprob_dtype="float32").score(boolq)
        assert seen == [2]  # one batch, no branches: the plain path
        for got, want in zip(got_b, want_b):
            assert got == pytest.approx(want, abs=1e-4)
        for budget in (1, 20, 40, None):
            seen.clear()
            out = LoglikScorer(tiny_model, tiny_tok, batch_size=3, progress=False, logprob_dtype="float32",
                               max_batch_tokens=budget).score(GROUPS)
            assert 4 in seen  # the shared-context groups still take the tree mask
            if budget == 1:
                assert len(seen) == len(GROUPS)  # every packed sequence alone
            for got, want in zip(out, ref):
                assert got == pytest.approx(want, abs=1e-4), budget
    finally:
        del tiny_model.forward
    with pytest.raises(ValueError, match="max_batch_tokens"):
        LoglikScorer(tiny_model, tiny_tok, max_batch_tokens=0)


def test_evaluate_passes_the_token_budget_through_and_none_means_no_limit(tiny_model, tiny_tok, monkeypatch):
    """One meaning of max_batch_tokens everywhere: evaluate's default is the scorer's, None is no limit."""
    from salientft.evaluation import scorer as scorer_mod

    seen = []
    real_init = scorer_mod.LoglikScorer.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append(self.max_batch_tokens)

    monkeypatch.setattr(scorer_mod.LoglikScorer, "__init__", spy)
    for kwargs in ({}, {"max_batch_tokens": None}, {"max_batch_tokens": 77}):
        evaluate(tiny_model, tiny_tok, "boolq", limit=2, progress=False, **kwargs)
    assert seen == [scorer_mod.DEFAULT_MAX_BATCH_TOKENS, None, 77]


@pytest.mark.numerics
def test_models_without_logits_to_keep_fall_back_to_full_logits(tiny_model, tiny_tok):
    class NoKeep(torch.nn.Module):  # a causal LM whose forward has no logits_to_keep argument
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    want = LoglikScorer(tiny_model, tiny_tok, progress=False).score(GROUPS)
    s = LoglikScorer(NoKeep(tiny_model), tiny_tok, batch_size=2, progress=False)
    got = s.score(GROUPS)
    assert s._keep_mode == "full"
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)


def test_tree_packing_shares_the_prefix(tiny_tok):
    # One-token answers (BoolQ): the packed sequence is the context alone, scored twice.
    from salientft.evaluation.scorer import _encode_groups

    enc = _encode_groups(PairEncoder(tiny_tok), [[("Passage.\nAnswer:", " no"), ("Passage.\nAnswer:", " yes")]],
                         2048, share=True)[0]
    # byte-level tokens: the context and the shared leading space of " no" / " yes"
    assert enc.prefix == len(tiny_tok.encode("Passage.\nAnswer:")) + 1
    length = LoglikScorer._pack(0, enc, range(2), enc.prefix, True)[0]
    assert length == enc.prefix + sum(len(i) - enc.prefix for i in enc.inputs)


@pytest.mark.numerics
def test_bf16_model_logprob_rounding(tiny_tok, device):
    from salientft.models import tiny_random_llama

    m = tiny_random_llama(seed=0, dtype=torch.bfloat16).to(device)
    g = [GROUPS[0]]
    model_dt = LoglikScorer(m, tiny_tok, progress=False, logprob_dtype="model").score(g)[0]
    exact = LoglikScorer(m, tiny_tok, progress=False, logprob_dtype="float32").score(g)[0]
    for a, b in zip(model_dt, exact):
        assert a == float(torch.tensor(a, dtype=torch.bfloat16))  # a bf16-rounded sum, like lm-eval
        assert a == pytest.approx(b, rel=2e-2)


def test_acc_norm_is_length_normalised_like_lm_eval():
    # lm-eval: pred_norm = argmax(ll / len(choice)), characters of the choice without the delimiter
    lls, chars = [-10.0, -12.0], [5, 20]
    assert choose(lls, chars) == (0, 1)
    assert choose([-4.0, -4.0], [3, 3]) == (0, 0)  # ties: the first, as np.argmax
    item = TASKS["arc_easy"].to_item({"question": "Q?", "answerKey": "B",
                                      "choices": {"text": ["é", "ab"], "label": ["A", "B"]}})
    assert item.norm_chars == (1, 2)  # characters, not bytes ("é" is 2 bytes)
    assert item.requests == (("Question: Q?\nAnswer:", " é"), ("Question: Q?\nAnswer:", " ab"))
    assert item.gold == 1


def test_score_task_counts_acc_and_acc_norm():
    from salientft.evaluation.runner import score_task

    items = load_items("arc_easy", 4)

    class Fake:  # per-character log-likelihood -1 for the gold answer, -2 for the others
        def score(self, groups, desc=""):
            return [[-(1.0 if i == it.gold else 2.0) * n for i, n in enumerate(it.norm_chars)] for it in items]

    r = score_task(Fake(), "arc_easy", 4)
    exp_acc = sum(choose(ll, it.norm_chars)[0] == it.gold for ll, it in zip(Fake().score(None), items)) / 4
    assert r["n"] == 4 and r["acc_norm"] == 1.0 and r["acc"] == exp_acc


ITEM0 = {
    "boolq": (lambda c: c.startswith("All biomass goes through at least some of these steps")
              and c.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:"),
              [" no", " yes"], 0),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
             [" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
              "you will also need to supply it with a water bottle and a food dish.",
              " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
              "you will also need to supply it with a water bottle and a food dish."], 0),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He",
                  [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                   " is holding a rubik's cube.", " starts pulling up roofing on a roof."], 3),
    "arc_easy": ("Question: Which technology was developed most recently?\nAnswer:",
                 [" cellular telephone", " television", " refrigerator", " airplane"], 0),
    "arc_challenge": ("Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which "
                      "object rolls the farthest. What should they do so they can repeat their investigation?"
                      "\nAnswer:",
                      [" Put the objects in groups.", " Change the height of the ramp.",
                       " Choose different objects to roll.", " Record the details of the investigation."], 3),
    "openbookqa": ("Frilled sharks and angler fish live far beneath the surface of the ocean, which is why "
                   "they are known as", [" Deep sea animals", " fish", " Long Sea Fish", " Far Sea Animals"], 0),
}


@pytest.mark.parametrize("task", sorted(ITEM0))
def test_item0_prompts_match_lm_eval_definitions(task):
    ctx, conts, gold = ITEM0[task]
    it = load_items(task, 1)[0]
    contexts = {c for c, _ in it.requests}
    assert len(contexts) == 1
    (c,) = contexts
    assert ctx(c) if callable(ctx) else c == ctx
    assert [k for _, k in it.requests] == conts
    assert it.gold == gold
    assert it.norm_chars == tuple(len(k) - 1 for k in conts)


def test_winogrande_item0_is_partial_evaluation():
    it = load_items("winogrande", 1)[0]
    assert it.requests == (
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    )
    assert it.gold == 1


def test_nested_fields_as_strings_and_hellaswag_preprocess():
    rec = {"question_stem": "Q", "answerKey": " B",
           "choices": json.dumps({"text": ["a", "b"], "label": ["A", "B"]})}
    assert TASKS["openbookqa"].to_item(rec).gold == 1
    rec = {"activity_label": "Fix", "ctx_a": "Do it [title] now.", "ctx_b": "then", "label": "0",
           "endings": str(["go [step] home.", "stay"])}
    it = TASKS["hellaswag"].to_item(rec)
    assert it.requests[0] == ("Fix: Do it. now. Then", " go home.")
    assert hellaswag_preprocess(" a [header] b  c ") == "a b c"
    assert TASKS["boolq"].to_item({"passage": "P", "question": "q", "answer": True}).gold == 1


def test_limit_takes_the_first_items(tiny_model, tiny_tok):
    assert load_items("piqa", 3) == load_items("piqa", 5)[:3]
    rep = evaluate(tiny_model, tiny_tok, "piqa,winogrande", limit=3, progress=False)
    assert {t: r["n"] for t, r in rep["results"].items()} == {"piqa": 3, "winogrande": 3}
    assert rep["limit"] == 3 and rep["paper_avg"] is None and rep["items_per_s"] > 0
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="limit"):
            evaluate(tiny_model, tiny_tok, "piqa", limit=bad, progress=False)


def test_paper_average_uses_the_paper_metrics(tiny_model, tiny_tok):
    rep = evaluate(tiny_model, tiny_tok, "paper", limit=2, batch_size=4, progress=False)
    r = rep["results"]
    want = (r["hellaswag"]["acc_norm"] + r["arc_easy"]["acc_norm"] + r["arc_challenge"]["acc_norm"]
            + r["piqa"]["acc_norm"] + r["boolq"]["acc"] + r["winogrande"]["acc"]) / 6
    assert rep["paper_avg"] == pytest.approx(want)
    md = results_markdown(rep)
    assert "| hellaswag | 2 |" in md and "paper avg" in md


def test_bad_task_names_list_the_valid_ones(capsys):
    with pytest.raises(ValueError) as e:
        parse_tasks("piqa,hellaswg,mmlu")
    msg = str(e.value)
    assert "'hellaswg'" in msg and "'mmlu'" in msg
    for name in TASKS:
        assert name in msg
    from salientft.cli import main

    assert main(["eval", "--model", "tiny-random-llama", "--tasks", "nope"]) == 2
    assert "valid tasks: boolq, piqa" in capsys.readouterr().err


def test_cli_eval_writes_results_and_table(tmp_path, capsys, device):
    from salientft.cli import main

    out = tmp_path / "results.json"
    txt = tmp_path / "t.txt"
    txt.write_text("hello world, this is a small text for perplexity. " * 4)
    rc = main(["eval", "--model", "tiny-random-llama", "--tasks", "boolq,piqa", "--limit", "2",
               "--batch-size", "2", "--output", str(out), "--perplexity", str(txt), "--ppl-max-length", "64",
               "--dtype", "fp32", "--no-progress", "--device", str(device)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"boolq", "piqa"}
    for r in rep["results"].values():
        assert {"acc", "acc_norm", "n"} <= set(r) and r["n"] == 2
    assert rep["paper_avg"] is None and rep["model"] == "tiny-random-llama" and rep["limit"] == 2
    assert rep["perplexity"]["perplexity"] > 1
    stdout = capsys.readouterr().out
    assert "| boolq | 2 |" in stdout and "perplexity" in stdout


@pytest.mark.numerics
def test_perplexity_matches_direct_computation(tiny_model, tiny_tok, tmp_path, device):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = tiny_tok(text)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model(torch.tensor([ids], device=device)).logits[0].float(), -1)
    nll = -sum(lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)) / (len(ids) - 1)
    full = perplexity(tiny_model, tiny_tok, [text], max_length=512, progress=False)
    assert full["tokens"] == len(ids) - 1 and full["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    # windows shorter than the text: every token is scored exactly once
    f = tmp_path / "t.txt"
    f.write_text(text)
    strided = perplexity(tiny_model, tiny_tok, f, max_length=32, stride=16, batch_size=3, progress=False)
    assert strided["tokens"] == len(ids) - 1 and strided["windows"] > 2
    widest = perplexity(tiny_model, tiny_tok, f, max_length=32, stride=31, progress=False)
    assert widest["tokens"] == len(ids) - 1
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny_model, tiny_tok, f, max_length=32, stride=32)
    with pytest.raises(FileNotFoundError):
        perplexity(tiny_model, tiny_tok, tmp_path / "missing.txt")


def _fake_run(d, name, accs, params, paper=True):
    d = d / name
    d.mkdir()
    results = {t: {"acc": a, "acc_norm": a + 0.01, "n": 10} for t, a in accs.items()}
    avg = sum(accs.values()) / len(accs) if paper else None
    (d / "eval_after.json").write_text(json.dumps({"results": results, "paper_avg": avg}))
    (d / "metrics.json").write_text(json.dumps({"trainable_params": params, "wall_time_s": 12.5,
                                                "peak_memory_bytes": 3 * 2**30}))
    return d


def test_compare_runs_table_and_plot(tmp_path, capsys):
    a = _fake_run(tmp_path, "gift", {"piqa": 0.6, "boolq": 0.7}, 1_500_000)
    b = _fake_run(tmp_path, "lora", {"piqa": 0.5, "boolq": 0.65}, 4_000_000)
    c = tmp_path / "other.json"
    c.write_text(json.dumps({"results": {"piqa": {"acc": 0.4, "acc_norm": 0.45, "n": 10}}, "paper_avg": None}))
    out = compare_runs([a, b, c], plot=tmp_path / "cmp.png")
    t = out["table"]
    assert "| | gift | lora | other |" in t
    assert "| piqa (acc_norm) | 61.00 | 51.00 | 45.00 |" in t
    assert "| boolq (acc) | 70.00 | 65.00 | – |" in t
    assert "1.50M" in t and "3.00 GiB" in t
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    from salientft.cli import main

    assert main(["compare", str(a), str(b)]) == 0
    assert "gift" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        compare_runs([tmp_path / "empty_missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="results.json"):
        compare_runs([tmp_path / "empty"])


@pytest.mark.numerics
def test_load_for_eval_run_dirs(tmp_path, tiny_model, tiny_tok, device):
    # merged run: model/ is a full HF folder
    run = tmp_path / "run_full"
    tiny_model.save_pretrained(run / "model")
    tiny_tok.save_pretrained(run / "model")
    (run / "run_config.json").write_text(json.dumps({"model": "tiny-random-llama"}))
    m, tok, desc = load_for_eval(str(run), dtype="fp32", device=device)
    assert "full model model/" in desc
    sd = tiny_model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    # adapter run: a PEFT LoRA adapter on the named base
    from peft import LoraConfig, get_peft_model

    from salientft.models import tiny_random_llama

    base = tiny_random_llama(seed=0).to(device)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    run2 = tmp_path / "run_lora"
    lora.save_pretrained(run2 / "adapter")
    (run2 / "run_config.json").write_text(json.dumps({"model": "tiny-random-llama"}))
    m2, _, desc2 = load_for_eval(str(run2), dtype="fp32", device=device)
    assert type(m2).__name__.startswith("Peft") and "adapter" in desc2
    ids = torch.tensor([[5, 6, 7]], device=device)
    with torch.no_grad():
        assert torch.allclose(m2(ids).logits, lora.eval()(ids).logits)
    with pytest.raises(FileNotFoundError):
        load_for_eval("tiny-random-llama", adapter=tmp_path / "nope")


@pytest.mark.numerics
def test_load_for_eval_gift_adapter_run(tmp_path, device):
    from salientft import GiftConfig, apply_gift, save_adapter
    from salientft.models import tiny_random_llama

    base = tiny_random_llama(seed=0).to(device)
    scores = {n: torch.arange(m.in_features, dtype=torch.float32, device=device)
              for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    trained = apply_gift(base, GiftConfig(n_salient=4, noise="none"), scores=scores)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.5)
    run = tmp_path / "run_gift"
    save_adapter(trained, run / "adapter", base_model="tiny-random-llama")
    (run / "run_config.json").write_text(json.dumps({"model": "tiny-random-llama"}))
    m, _, desc = load_for_eval(str(run), dtype="fp32", device=device)
    ids = torch.tensor([[5, 6, 7, 8]], device=device)
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, trained.eval()(ids).logits, atol=1e-5)
        assert not torch.allclose(m(ids).logits, tiny_random_llama(seed=0).to(device)(ids).logits, atol=1e-3)


# ----------------------------------------------------------------------------- lm-eval parity

@pytest.mark.integration
def test_tokenization_matches_lm_eval(embedded):
    from lm_eval.models.huggingface import HFLM

    from salientft.models import tiny_random_llama

    _, tok = embedded
    lm = HFLM(pretrained=tiny_random_llama(), tokenizer=tok, batch_size=1, device="cpu")
    enc = PairEncoder(tok)
    pairs = [r for t in TASKS for it in load_items(t, 5) for r in it.requests]
    pairs += [("abc  ", "x"), ("Hello\n", "world")]
    assert enc.encode_pairs(pairs) == [lm._encode_pair(c, k) for c, k in pairs]


# Per-choice log-likelihoods of the two backends in fp32 differ only by float reduction order:
# the native scorer packs an item's choices into one tree-shaped sequence and batches by packed
# length, lm-eval pads each request separately, so GEMM blocking, attention and log-softmax sum in
# other orders (as another CPU's kernels, BLAS or thread count also do). Each token log-prob then
# moves by ~1e-7 relative, a continuation's sum of up to ~100 of them by ~1e-5 nats: at most
# 7.6e-5 measured on piqa/arc_easy (50 items each) between the backends with PyTorch's AVX-512, AVX2
# and default kernels and 1 or 2 threads (docs/testing.md). LL_TOL = 1e-3 nats is 13x that, and far
# below what a real scoring bug moves (a wrong token, a lost space, a shifted position: >= 0.1 nats). Two backends may then pick different answers only where the top two scores lie
# within 2 * LL_TOL (each score within LL_TOL of the other side); such an item is a tie, not a miss.
LL_TOL = 1e-3


def assert_items_agree(task, native, ref, tol=LL_TOL):
    """Per item: every choice's log-likelihood within ``tol``, and the same prediction for acc and
    acc_norm unless the two candidates are a near-tie (within 2 * tol) on both sides.

    ``native`` / ``ref`` are one task's results from ``evaluate(..., return_items=True)``. Returns
    the near-tie disagreements as (item, metric) pairs. lm-eval's own per-item acc / acc_norm are
    checked to follow from its log-likelihoods, so its real prediction rule is the one compared.
    """
    items = load_items(task, native["n"])
    a_items, b_items = native["items"], ref["items"]
    assert len(a_items) == len(b_items) == len(items) == native["n"] == ref["n"]
    ties = []
    for i, (it, a, b) in enumerate(zip(items, a_items, b_items)):
        assert a["gold"] == it.gold and b["gold"] in (it.gold, None), (task, i)  # None: winogrande
        assert len(a["lls"]) == len(b["lls"]) == len(it.requests), (task, i)
        worst = max(abs(x - y) for x, y in zip(a["lls"], b["lls"]))
        assert worst <= tol, f"{task} item {i}: log-likelihoods {a['lls']} vs {b['lls']} ({worst:.2e} apart)"
        preds = [choose(lls, it.norm_chars) for lls in (a["lls"], b["lls"])]
        assert b["acc"] == float(preds[1][0] == it.gold), (task, i)  # lm-eval's argmax is choose()'s
        if b["acc_norm"] is not None:
            assert b["acc_norm"] == float(preds[1][1] == it.gold), (task, i)
        metrics = [("acc", [1] * len(it.norm_chars))]
        if b["acc_norm"] is not None:
            metrics.append(("acc_norm", it.norm_chars))
        for k, (metric, div) in enumerate(metrics):
            pa, pb = preds[0][k], preds[1][k]
            if pa == pb:
                continue
            for lls in (a["lls"], b["lls"]):
                margin = abs(lls[pa] / div[pa] - lls[pb] / div[pb])
                assert margin <= 2 * tol, (
                    f"{task} item {i} {metric}: native picks {pa}, lm-eval {pb}, margin {margin:.2e} "
                    f"> {2 * tol:.0e} (lls {a['lls']} vs {b['lls']})")
            ties.append((i, metric))
    return ties


@pytest.mark.integration
@pytest.mark.numerics
def test_both_backends_agree_on_piqa_and_arc_easy(embedded_fp32):
    """Per item, the same answers on the first 50 items of piqa and arc_easy, in fp32.

    Both sides run the fp32 model with float32 log-probabilities. The packed native batches have
    other shapes than lm-eval's padded ones, so the sums differ in the last bits; that decides
    nothing unless an item is a near-tie (see LL_TOL). In bf16 (lm-eval's default handling rounds
    the sums to bf16) the same shape differences move a choice's sum by up to 2 nats and make exact
    ties; which way they break, and so the accuracies, changed with the CPU kernels (piqa acc 0.64 to
    0.72 on these 50 items), so this cross-check does not run in bf16.
    """
    model, tok = embedded_fp32
    kw = dict(limit=50, batch_size=16, progress=False, logprob_dtype="float32", return_items=True)
    threads = torch.get_num_threads()
    # on a shared 2-core machine, 2 spinning threads run several times slower
    torch.set_num_threads(int(os.environ.get("SALIENTFT_TEST_THREADS") or 1))
    try:
        native = evaluate(model, tok, ["piqa", "arc_easy"], **kw)
        ref = evaluate(model, tok, ["piqa", "arc_easy"], backend="lm-eval", **kw)
    finally:
        torch.set_num_threads(threads)
    for task in ("piqa", "arc_easy"):
        a, b = native["results"][task], ref["results"][task]
        assert a["n"] == b["n"] == 50
        ties = assert_items_agree(task, a, b)
        for m in ("acc", "acc_norm"):  # the totals differ by the near-ties only
            assert abs(a[m] - b[m]) * 50 <= sum(1 for _, t in ties if t == m) + 1e-9, (task, m, a[m], b[m])


@pytest.mark.integration
@pytest.mark.numerics
def test_lm_eval_backend_matches_native_on_every_task(tiny_model, tiny_tok):
    """fp32 tiny model, first 3 items of all seven tasks: the same log-likelihoods and answers on
    both backends, per item (a near-tie within 2 * LL_TOL may go either way, see LL_TOL)."""
    state = torch.random.get_rng_state()
    ref = evaluate(tiny_model, tiny_tok, "all", limit=3, backend="lm-eval", progress=False, return_items=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # lm-eval did not reseed torch
    nat = evaluate(tiny_model, tiny_tok, "all", limit=3, progress=False, return_items=True)
    for task, r in ref["results"].items():
        a = nat["results"][task]
        assert r["n"] == a["n"] == 3, task
        assert_items_agree(task, a, r)
    assert ref["results"]["boolq"]["acc_norm"] is None and ref["results"]["winogrande"]["acc_norm"] is None


# --------------------------------------------------------------------------- fixed subsets, per-item samples

def test_subsets_are_fixed_seeded_and_sized_from_the_data():
    from salientft.evaluation.tasks import SUBSETS, get_subset, task_size

    paper = SUBSETS["paper500"]
    assert paper.describe(list(PAPER_TASKS))["n"] == {
        "hellaswag": 500, "arc_easy": 570, "arc_challenge": 299, "piqa": 500, "boolq": 500, "winogrande": 500}
    assert paper.ids("arc_challenge") == list(range(task_size("arc_challenge")))  # fewer than 1000: whole
    for spec in SUBSETS.values():
        for task in TASKS:
            ids = spec.ids(task)
            assert ids == sorted(set(ids)) and 0 <= ids[0] and ids[-1] < task_size(task)
            assert len(ids) == spec.size(task_size(task))
    # the permutation is sha256 of (name, seed, task, id): these ids are the same on every machine forever
    assert SUBSETS["smoke20"].ids("piqa")[:6] == [131, 581, 608, 756, 792, 941]
    assert paper.ids("boolq")[:6] == [0, 9, 10, 12, 15, 19]
    with pytest.raises(ValueError, match="unknown subset 'nope'; valid subsets: paper500"):
        get_subset("nope")


PAPER_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "boolq", "winogrande")


def test_evaluate_on_a_subset(tiny_model, tiny_tok):
    from salientft.evaluation.tasks import SUBSETS

    spec = SUBSETS["smoke20"]
    rep = evaluate(tiny_model, tiny_tok, "arc_challenge,boolq", subset="smoke20", batch_size=8, progress=False,
                   return_items=True)
    assert rep["subset"] == {"name": "smoke20", "seed": spec.seed, "per_task": 20,
                             "n": {"arc_challenge": 20, "boolq": 20}}
    for task, res in rep["results"].items():
        ids = spec.ids(task)
        assert res["n"] == 20 and [it["id"] for it in res["items"]] == ids
        assert [it["gold"] for it in res["items"]] == [it.gold for it in load_items(task, ids=ids)]
        assert sum(it["acc"] for it in res["items"]) / 20 == res["acc"]
    assert "subset smoke20" in results_markdown(rep)
    with pytest.raises(ValueError, match="--limit and --subset are exclusive"):
        evaluate(tiny_model, tiny_tok, "boolq", limit=3, subset="smoke20", progress=False)
    with pytest.raises(ValueError, match="--subset runs on the native backend only"):
        evaluate(tiny_model, tiny_tok, "boolq", subset="smoke20", backend="lm-eval", progress=False)


@pytest.mark.integration
def test_log_samples_with_the_lm_eval_backend(tmp_path, device):
    """lm-eval's logged samples carry no ids, no predictions, and no gold for winogrande: filled from our
    items; the records still reproduce lm-eval's accuracies exactly."""
    from salientft.evaluation import run_eval

    out = tmp_path / "r.json"
    rep = run_eval("tiny-random-llama", "winogrande,boolq,piqa", limit=3, backend="lm-eval", dtype="fp32",
                   output=out, log_samples=True, progress=False, device=str(device))
    recs = [json.loads(line) for line in (tmp_path / "r.samples.jsonl").read_text().splitlines()]
    assert json.loads(out.read_text())["results"] == rep["results"]
    for task, res in rep["results"].items():
        mine = [r for r in recs if r["task"] == task]
        items = load_items(task, 3)
        assert [r["id"] for r in mine] == [0, 1, 2] and [r["gold"] for r in mine] == [it.gold for it in items]
        assert sum(r["acc"] for r in mine) / 3 == res["acc"]
        if res["acc_norm"] is None:
            assert all(r["acc_norm"] is None and r["pred_norm"] is None for r in mine)
        else:
            assert sum(r["acc_norm"] for r in mine) / 3 == res["acc_norm"]
