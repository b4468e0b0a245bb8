"""The LM head on the labelled positions only (salientft.labelled_logits): the same loss, gradients
and held-out loss as the full logits, on fewer rows, and a model it does not fit falls back whole.

Compared in fp32 with a relative tolerance of 1e-5: the head's matrix product over a subset of the
rows may sum in another blocking than over all of them, which moves the last bits (about 1e-7
relative per product), never more."""
import contextlib
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from salientft import labelled_logits as LL
from salientft.models import tiny_random_llama
from salientft.train import heldout_loss, train

from test_train import tiny_config


def _batch(seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 19), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100  # the prompt
    labels[1, 15:] = -100  # padding
    labels[2, 11:] = -100
    attention = (labels != -100).long()
    attention[:, :7] = 1
    return ids, labels, attention


def test_the_rows_are_the_positions_whose_next_token_the_loss_reads():
    _, labels, _ = _batch()
    rows, targets = LL.labelled_rows(labels)
    # transformers' causal-LM shift: position t predicts labels[t + 1]
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    assert torch.equal(rows, (shifted != -100).nonzero().squeeze(1))
    assert torch.equal(targets, shifted[shifted != -100])
    assert rows.numel() < labels.numel() - 3 * 7  # the prompt's positions and the pads are gone


@pytest.mark.parametrize("arch", ["llama", "gemma2-softcap", "mixtral-router-loss"])
def test_the_loss_and_its_gradients_equal_the_full_logits(arch):
    """Soft-capped logits (elementwise after the head) and a router loss (added by the model when
    labels are given) come out as with every position's logits."""
    ids, labels, attention = _batch()
    model = _model(arch)
    full = model(input_ids=ids, attention_mask=attention, labels=labels)
    full.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    rows, targets = LL.labelled_rows(labels)
    with LL.head_on_rows(LL.output_layer(model), rows, labels.numel()) as seen:
        out = model(input_ids=ids, attention_mask=attention, labels=labels, shift_labels=targets)
    out.loss.backward()
    assert seen["calls"] == 1 and out.logits.shape == (rows.numel(), model.config.vocab_size)
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-5, atol=0)
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=n)


def _model(arch: str) -> nn.Module:
    if arch == "llama":
        return tiny_random_llama(seed=0)
    torch.manual_seed(0)
    small = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, pad_token_id=0)
    if arch == "gemma2-softcap":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        return Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=3.0)).float()
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2,
                                            output_router_logits=True, router_aux_loss_coef=0.5)).float()


def test_the_held_out_loss_equals_the_full_logits_mean():
    from salientft.data.chat import ChatCollator

    ids, labels, attention = _batch(seed=1)
    model = tiny_random_llama(seed=0)
    examples = [{"input_ids": i[a.bool()].tolist(), "labels": lab[a.bool()].tolist()}
                for i, lab, a in zip(ids, labels, attention)]
    collator = ChatCollator(pad_token_id=0)
    with torch.no_grad():
        batch = collator(examples)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    head_rows = []
    hook = model.lm_head.register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[:-1].numel()))
    got = heldout_loss(model, examples, collator, batch_size=2)
    hook.remove()
    assert got == pytest.approx(float(want), rel=1e-5)
    assert sum(head_rows) == int((batch["labels"][:, 1:] != -100).sum())  # only the labelled rows reached the head


def test_a_model_that_never_calls_its_output_layer_is_run_in_full():
    ids, labels, _ = _batch()
    model = tiny_random_llama(seed=0)
    rows, _ = LL.labelled_rows(labels)
    model.get_output_embeddings = lambda: nn.Linear(64, 320)  # names a layer its forward never calls
    logits = LL.labelled_logits(model, rows, input_ids=ids)
    with torch.no_grad():
        full = model(input_ids=ids).logits.reshape(-1, 320)
    torch.testing.assert_close(logits, full[rows], rtol=0, atol=0)


def test_the_collator_finds_the_rows_on_the_host_and_a_split_batch_finds_its_own():
    from salientft.data.chat import ChatCollator

    inner = ChatCollator(pad_token_id=7)
    wrapped = LL.WithLabelledRows(inner)
    assert wrapped.pad_token_id == 7  # the wrapped collator's settings read through
    ex = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    batch = wrapped(ex)
    rows, shape = batch[LL.ROWS_KEY]
    assert shape == tuple(batch["labels"].shape) and torch.equal(rows, LL.labelled_rows(batch["labels"])[0])
    first = batch["labels"][:1]  # the batch split across processes on the way: the carried rows do not fit
    got_rows, got_targets = LL.rows_for(first, batch[LL.ROWS_KEY])
    assert torch.equal(got_rows, torch.tensor([1, 2])) and torch.equal(got_targets, torch.tensor([7, 8]))


def _train_losses(out: Path) -> list[float]:
    return [x["loss"] for x in json.loads((out / "metrics.json").read_text())["train_loss"]]


@pytest.mark.parametrize("method", ["gift-sw", "lora"])
def test_training_on_the_labelled_rows_matches_the_full_logits(tmp_path, monkeypatch, method):
    """A whole run (the trainer's collator, gradient accumulation over two micro-batches) ends with the
    weights of the run that computes every position's logits, and its head saw the labelled rows only."""
    seen = []
    real = LL.head_on_rows

    @contextlib.contextmanager
    def spy(head, rows, positions):
        with real(head, rows, positions) as cut:
            yield cut
        seen.append((cut["calls"], rows.numel(), positions))

    monkeypatch.setattr(LL, "head_on_rows", spy)
    kw = dict(max_steps=3, batch_size=2, grad_accum=2, eval_before=False, logging_steps=1, save_steps=0)
    train(tiny_config(tmp_path, method, output=str(tmp_path / "rows"), **kw))
    assert len(seen) == 3 * 2 and all(calls == 1 and n < p for calls, n, p in seen)  # every micro-step, cut
    monkeypatch.setattr(LL, "output_layer", lambda model: None)  # the full logits, as transformers computes them
    train(tiny_config(tmp_path, method, output=str(tmp_path / "full"), **kw))
    assert _train_losses(tmp_path / "rows") == pytest.approx(_train_losses(tmp_path / "full"), rel=1e-5)
    a, b = _weights(tmp_path / "rows", method), _weights(tmp_path / "full", method)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def _weights(out: Path, method: str) -> dict:
    if method == "gift-sw":
        from salientft.gift import read_adapter

        return read_adapter(out / "adapter")[1]
    from safetensors.torch import load_file

    return load_file(str(next((out / "adapter").glob("*.safetensors"))))


def test_a_model_whose_loss_ignores_the_rows_trains_in_full_with_a_warning(tmp_path, monkeypatch, caplog):
    """A model whose output layer is not the module its forward calls: the first step's shapes
    disagree, the trainer warns once, turns the selection off and computes that step in full, with
    the noise it would have drawn (the same losses as a run that never tried)."""
    import salientft.trainer as T

    unused = nn.Linear(64, 320)
    monkeypatch.setattr(LL, "output_layer", lambda model: unused)
    calls = []
    real = T.SalientTrainerMixin.compute_loss

    def count(self, *a, **kw):
        calls.append(getattr(self, "_labelled_only", None))
        return real(self, *a, **kw)

    monkeypatch.setattr(T.SalientTrainerMixin, "compute_loss", count)
    kw = dict(max_steps=2, batch_size=2, eval_before=False, logging_steps=1, save_steps=0)
    with caplog.at_level(logging.WARNING, logger="salientft.trainer"):
        train(tiny_config(tmp_path, "gift-sw", output=str(tmp_path / "x"), **kw))
    assert calls == [None, False]
    assert sum("labelled positions only does not fit" in r.message for r in caplog.records) == 1
    monkeypatch.undo()
    train(tiny_config(tmp_path, "gift-sw", output=str(tmp_path / "y"), **kw))
    assert _train_losses(tmp_path / "x") == pytest.approx(_train_losses(tmp_path / "y"), rel=1e-5)


def test_text_perplexity_runs_the_head_on_the_scored_tokens_only(monkeypatch):
    """Strided windows (32 tokens, stride 16): the same perplexity as every position's logits, and
    the head saw each scored token's row once, not every window's positions."""
    from salientft.evaluation.perplexity import perplexity
    from salientft.models import tiny_tokenizer

    model, tok = tiny_random_llama(seed=0), tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 3
    head_rows = []
    hook = model.lm_head.register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[:-1].numel()))
    got = perplexity(model, tok, [text], max_length=32, stride=16, batch_size=3, progress=False)
    assert got["windows"] > 2 and sum(head_rows) == got["tokens"] == len(tok(text)["input_ids"]) - 1
    head_rows.clear()
    monkeypatch.setattr(LL, "output_layer", lambda model: None)  # every position's logits, then indexed
    full = perplexity(model, tok, [text], max_length=32, stride=16, batch_size=3, progress=False)
    hook.remove()
    assert sum(head_rows) > 1.5 * got["tokens"]  # every window position, the context included
    assert got["nll_per_token"] == pytest.approx(full["nll_per_token"], rel=1e-5)
