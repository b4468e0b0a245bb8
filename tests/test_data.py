"""Data pipeline: sources, assistant-only labels, truncation, packing, collator, calibration."""
import json
import sys
import types

import pytest
import torch

from salientft.data import instruct
from salientft.data.chat import (
    IGNORE_INDEX, ChatCollator, ChatDataset, build_dataset, calibration_batches_from_dataset,
    pack_examples, tokenize_conversation, tokenize_conversations,
)
from salientft.data.instruct import heldout_texts, load_conversations, read_jsonl

U = {"role": "user", "content": "What is 2+2?"}
A = {"role": "assistant", "content": "It is 4."}
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue!"},
]


def _label_runs(ex):
    """Contiguous runs of trained token ids."""
    runs, cur = [], []
    for i, lab in zip(ex["input_ids"], ex["labels"]):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i  # labels are the input ids themselves (the model shifts)
            cur.append(lab)
    if cur:
        runs.append(cur)
    return runs


def _expected(tok, content, end_id):
    return tok(content, add_special_tokens=False)["input_ids"] + [end_id]


# ----------------------------------------------------------------------------- masking
def test_masking_single_turn_tiny(tiny_tok):
    ex = tokenize_conversation([U, A], tiny_tok)
    assert _label_runs(ex) == [_expected(tiny_tok, A["content"], tiny_tok.eos_token_id)]
    # the end token is followed by an untrained newline, the last token of the rendering
    assert ex["labels"][-1] == IGNORE_INDEX and tiny_tok.decode(ex["input_ids"][-1:]) == "\n"


def test_masking_multi_turn_with_system_tiny(tiny_tok):
    ex = tokenize_conversation(MULTI, tiny_tok)
    eos = tiny_tok.eos_token_id
    assert _label_runs(ex) == [_expected(tiny_tok, "Hello there.", eos), _expected(tiny_tok, "Blue!", eos)]
    trained = tiny_tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])
    assert "Be brief" not in trained and "colour" not in trained and "assistant" not in trained


def test_masking_smollm2_tokenizer_default_system_prompt():
    from transformers import AutoTokenizer

    from salientft.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for conv, answers in (([U, A], [A["content"]]), (MULTI[1:], ["Hello there.", "Blue!"]), (MULTI, ["Hello there.", "Blue!"])):
        ex = tokenize_conversation(conv, tok)
        assert _label_runs(ex) == [_expected(tok, a, end) for a in answers]
    # SmolLM2 injects "You are a helpful AI assistant named SmolLM" when no system turn: never trained on
    ex = tokenize_conversation([U, A], tok)
    assert "SmolLM" in tok.decode(ex["input_ids"])
    assert "SmolLM" not in tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])
    # the embedded mix: every example trains on exactly its answer and <|im_end|>
    convs = load_conversations("embedded", limit=300)
    for conv, ex in zip(convs, tokenize_conversations(convs, tok, max_length=None)):
        assert _label_runs(ex) == [_expected(tok, conv[1]["content"], end)]


def test_non_incremental_template_is_a_clear_error(tiny_tok):
    tiny_tok.chat_template = "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="incrementally"):
        tokenize_conversation(MULTI, tiny_tok)


def test_missing_template_falls_back_to_chatml(tiny_tok):
    tiny_tok.chat_template = None
    ex = tokenize_conversation([U, A], tiny_tok)
    assert _label_runs(ex) == [_expected(tiny_tok, A["content"], tiny_tok.eos_token_id)]


# ----------------------------------------------------------------------------- truncation
def test_truncation(tiny_tok):
    full = tokenize_conversation([U, A], tiny_tok)
    n = len(full["input_ids"])
    first_label = next(i for i, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX)
    long_conv = [U, {"role": "assistant", "content": "x" * 200}]
    exs = tokenize_conversations([[U, A], long_conv], tiny_tok, max_length=n)
    assert len(exs) == 2 and all(len(e["input_ids"]) <= n for e in exs)
    assert exs[0] == full  # short one untouched
    whole = tokenize_conversation(long_conv, tiny_tok)
    assert exs[1] == {"input_ids": whole["input_ids"][:n], "labels": whole["labels"][:n]}
    assert exs[1]["labels"][-1] != IGNORE_INDEX  # cut inside the answer: the kept part still trains
    # cut before any assistant token: an error when nothing is left
    with pytest.raises(ValueError, match="no examples left"):
        tokenize_conversations([[U, A]], tiny_tok, max_length=first_label)


def test_truncation_drops_only_empty(tiny_tok, caplog):
    full = tokenize_conversation([U, A], tiny_tok)
    first_label = next(i for i, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX)
    short = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A."}]
    with caplog.at_level("WARNING"):
        exs = tokenize_conversations([[U, A], short], tiny_tok, max_length=first_label)
    assert len(exs) == 1 and "dropped 1 of 2" in caplog.text


# ----------------------------------------------------------------------------- packing
def _convs(n):
    return [[{"role": "user", "content": f"Question number {i}?" + " pad" * (i % 5)},
             {"role": "assistant", "content": f"Answer {i}" + "!" * (i % 3)}] for i in range(n)]


def test_packing_preserves_labels_and_resets_positions(tiny_tok):
    convs = _convs(12)
    plain = tokenize_conversations(convs, tiny_tok, max_length=256)
    packed = tokenize_conversations(convs, tiny_tok, max_length=256, packing=True)
    assert len(packed) < len(plain)
    assert all(len(r["input_ids"]) <= 256 for r in packed)
    cat = lambda rows, k: [x for r in rows for x in r[k]]  # noqa: E731
    assert cat(packed, "input_ids") == cat(plain, "input_ids")
    assert cat(packed, "labels") == cat(plain, "labels")
    assert cat(packed, "position_ids") == [p for e in plain for p in range(len(e["input_ids"]))]
    with pytest.raises(ValueError, match="exceeds"):
        pack_examples([{"input_ids": [1] * 5, "labels": [1] * 5}], 4)


@pytest.mark.numerics
def test_packed_attention_stays_inside_examples(tiny_tok, tiny_model, device):
    """The collator's packed batch (position resets, no attention_mask) gives each example the
    same logits as running it alone: attention does not cross example boundaries."""
    plain = tokenize_conversations(_convs(3), tiny_tok, max_length=256)
    packed = pack_examples(plain, 256)
    assert len(packed) == 1
    batch = ChatCollator(tiny_tok, pad_to_multiple_of=64)(packed)
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] % 64 == 0
    tiny_model.train()  # as under the Trainer (config.use_cache stays on)
    with torch.no_grad():
        out = tiny_model(**batch).logits[0]
        start = 0
        for ex in plain:
            n = len(ex["input_ids"])
            alone = tiny_model(input_ids=torch.tensor([ex["input_ids"]], device=device)).logits[0]
            torch.testing.assert_close(out[start:start + n], alone, atol=1e-5, rtol=1e-4)
            start += n
        # and with the plain causal mask it does cross (documented alternative)
        crossed = tiny_model(**ChatCollator(tiny_tok, block_diagonal=False)(packed)).logits[0]
        n0 = len(plain[0]["input_ids"])
        assert not torch.allclose(crossed[n0:n0 + 5], out[n0:n0 + 5], atol=1e-4)


# ----------------------------------------------------------------------------- collator
@pytest.mark.numerics
def test_collator_pads_right(tiny_tok, tiny_model):
    exs = tokenize_conversations([[U, A], MULTI], tiny_tok, max_length=512)
    batch = ChatCollator(tiny_tok, pad_to_multiple_of=8)(exs)
    lengths = [len(e["input_ids"]) for e in exs]
    L = batch["input_ids"].shape[1]
    assert L % 8 == 0 and L >= max(lengths) and set(batch) == {"input_ids", "labels", "attention_mask"}
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (L - n)
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][i, n:].eq(tiny_tok.pad_token_id).all()
        assert batch["labels"][i, :n].tolist() == exs[i]["labels"]
    loss = tiny_model(**batch).loss
    assert torch.isfinite(loss)
    # the loss is the mean over the trained tokens only
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- JSONL
def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


GOOD = json.dumps({"messages": [U, A]})


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"text": "hi"}), "needs a 'messages' list"),
    (json.dumps({"prompt": "hi"}), "no 'response' field"),
    (json.dumps({"prompt": "hi", "response": 3}), "'response' must be a string"),
    (json.dumps({"prompt": "hi", "response": "ok", "system": 1}), "'system' must be a string"),
    (json.dumps({"prompt": "hi", "response": "  "}), "empty"),
    (json.dumps({"messages": "hi"}), "must be a list"),
    (json.dumps({"messages": []}), "is empty"),
    (json.dumps({"messages": ["hi"]}), "must be an object"),
    (json.dumps({"messages": [{"role": "user"}]}), "no 'content' field"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}, A]}), "unknown role 'bot'"),
    (json.dumps({"messages": [{"role": "user", "content": ["x"]}, A]}), "content must be a string"),
    (json.dumps({"messages": [U]}), "no assistant turn"),
    (json.dumps({"messages": [U, {"role": "assistant", "content": " "}]}), "message 1 (assistant) is empty"),
    (json.dumps({"messages": [U, A, {"role": "system", "content": "s"}]}), "only the first turn"),
    (json.dumps({"messages": [U, A], "prompt": "p", "response": "r"}), "both"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad, problem):
    p = _write(tmp_path, [GOOD, "", bad, GOOD])  # blank line 2 is skipped, the bad record is line 3
    with pytest.raises(ValueError) as e:
        read_jsonl(p)
    assert str(e.value).startswith(f"{p}:3: ") and problem in str(e.value)


def test_jsonl_empty_and_missing(tmp_path):
    p = _write(tmp_path, ["", "  "])
    with pytest.raises(ValueError, match="is empty"):
        load_conversations(str(p), split="all")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_conversations(str(tmp_path / "nope.jsonl"))


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n" + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_jsonl(p)
    p.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")  # a UTF-8 byte-order mark is fine
    assert read_jsonl(p) == [[U, A]]


def test_path_like_sources_are_files_not_dataset_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("train.txt", "data/train", "./train", "/abs/train", "~/train", "a/b/c", "data", "x.json"):
        assert instruct.is_path_like(name), name
    for name in ("squad", "owner/name", "HuggingFaceH4/ultrachat_200k"):
        assert not instruct.is_path_like(name), name
    with pytest.raises(FileNotFoundError, match="data file train.txt does not exist; give an existing .jsonl file"):
        load_conversations("train.txt")
    with pytest.raises(FileNotFoundError, match="data file data/train does not exist"):
        load_conversations("data/train")
    with pytest.raises(IsADirectoryError, match="data file data is a directory"):
        load_conversations("data")


def test_prompt_response_form(tmp_path, tiny_tok):
    p = _write(tmp_path, [json.dumps({"prompt": "P", "response": "R", "system": "S"}),
                          json.dumps({"prompt": "P2", "response": "R2"}), GOOD])
    convs = load_conversations(p, split="all", seed=0)
    assert sorted(map(json.dumps, convs)) == sorted(map(json.dumps, [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "P"}, {"role": "assistant", "content": "R"}],
        [{"role": "user", "content": "P2"}, {"role": "assistant", "content": "R2"}],
        [U, A],
    ]))
    ds = build_dataset(str(p), tiny_tok, max_length=128, split="all")
    assert isinstance(ds, ChatDataset) and len(ds) == 3 and ds.n_label_tokens > 0
    assert ds.n_label_tokens == sum(len(_label_runs(e)[0]) for e in ds.examples)


def test_split_applies_to_files(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(200)]
    p = _write(tmp_path, lines)
    train, held = load_conversations(p, split="train"), load_conversations(p, split="heldout")
    assert len(train) + len(held) == 200 and 0 < len(held) < 30
    assert not {json.dumps(c) for c in train} & {json.dumps(c) for c in held}
    with pytest.raises(ValueError, match="split must be"):
        load_conversations(p, split="test")


# ----------------------------------------------------------------------------- embedded mix
def test_embedded_mix_sources_and_heldout():
    summary = instruct.embedded_mix_summary()
    assert set(summary) == {"sciq", "social_iqa", "commonsense_qa", "trivia_qa"}
    assert not set(instruct.EMBEDDED_MIX) & set(instruct.EVAL_TASKS)
    for counts in summary.values():
        assert counts["train"] > 500 and counts["heldout"] > 20
    train = load_conversations("embedded", split="train")
    held = load_conversations("embedded", split="heldout")
    total = sum(c["train"] + c["heldout"] for c in summary.values())
    assert len(train) + len(held) == total == len(load_conversations("embedded", split="all"))
    assert 0.03 < len(held) / total < 0.07
    keys = lambda cs: {json.dumps(c) for c in cs}  # noqa: E731
    assert not keys(train) & keys(held)
    # stable: same membership for any seed/limit, same order for the same seed
    assert keys(load_conversations("embedded", split="heldout", seed=123)) == keys(held)
    assert load_conversations("embedded", split="train", limit=50) == train[:50]
    assert load_conversations("embedded", split="train", limit=50, seed=1) != train[:50]
    assert heldout_texts() == heldout_texts()
    # every conversation is a user question and a short assistant sentence
    for c in train[:200]:
        assert [m["role"] for m in c] == ["user", "assistant"] and c[1]["content"][-1] in ".!?\"')"


def test_embedded_limit_mixes_sources():
    origin = {json.dumps(c): name for name, c in instruct._embedded_mix()}
    firsts = load_conversations("embedded", limit=100)
    assert {origin[json.dumps(c)] for c in firsts} == set(instruct.EMBEDDED_MIX)


def test_heldout_texts_render_with_template(tiny_tok):
    texts = heldout_texts(tokenizer=tiny_tok, limit=3)
    assert len(texts) == 3 and all(t.startswith("<|im_start|>user\n") and t.endswith("</s>\n") for t in texts)
    plain = heldout_texts(limit=3)
    assert plain[0].startswith("User: ") and "\nAssistant: " in plain[0]


def test_converters_handle_struct_and_repr():
    csqa = {"question": "Where?", "answerKey": "B",
            "choices": {"label": ["A", "B"], "text": ["home", "bank"]}}
    assert instruct._commonsense_qa(csqa, "w")[1]["content"] == "Bank."
    csqa["choices"] = repr(csqa["choices"])
    assert instruct._commonsense_qa(csqa, "w")[1]["content"] == "Bank."
    tqa = {"question": "Who?", "answer": {"value": "Sunset Blvd.", "aliases": []}}
    assert instruct._trivia_qa(tqa, "w")[1]["content"] == "Sunset Blvd."
    tqa["answer"] = repr(tqa["answer"])
    assert instruct._trivia_qa(tqa, "w")[1]["content"] == "Sunset Blvd."
    tqa["answer"] = "__import__('os').system('echo pwned')"
    with pytest.raises(ValueError, match="cannot parse"):
        instruct._trivia_qa(tqa, "w")
    siqa = {"context": "Tracy stayed.", "question": "What next?", "answerA": "a", "answerB": "b",
            "answerC": "go home", "label": "3"}
    assert instruct._social_iqa(siqa, "w") == [
        {"role": "user", "content": "Tracy stayed. What next?"}, {"role": "assistant", "content": "Go home."}]
    with pytest.raises(ValueError, match="label"):
        instruct._social_iqa({**siqa, "label": "4"}, "w")
    sciq = {"question": "Who?", "correct_answer": "darwin", "support": "Darwin did."}
    assert instruct._sciq(sciq, "w")[1]["content"] == "Darwin."
    assert instruct._sciq(sciq, "w", sciq_support=True)[0]["content"] == "Darwin did.\n\nWho?"


# ----------------------------------------------------------------------------- Hugging Face
def test_hf_dataset_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_conversations("someone/some-data")


def test_hf_dataset_columns(monkeypatch):
    rows = {
        "a/msgs": [{"messages": [U, A]}],
        "a/pairs": [{"instruction": "Do", "input": "this", "output": "Done."}, {"instruction": "Go", "output": "Gone."}],
        "a/sharegpt": [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
        "a/bad": [{"text": "x"}],
    }
    calls = []

    def load_dataset(name, config=None, split="train"):
        calls.append((name, config, split))
        if name not in rows:
            raise ConnectionError("offline")
        return rows[name]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_conversations("a/msgs", split="all") == [[U, A]]
    assert load_conversations("hf:a/pairs", split="all", seed=0, hf_split="validation") in (
        [[{"role": "user", "content": "Do\n\nthis"}, {"role": "assistant", "content": "Done."}],
          [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "Gone."}]],
        [[{"role": "user", "content": "Go"}, {"role": "assistant", "content": "Gone."}],
          [{"role": "user", "content": "Do\n\nthis"}, {"role": "assistant", "content": "Done."}]])
    assert calls[-1] == ("a/pairs", None, "validation")
    assert load_conversations("a/sharegpt", split="all") == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]
    with pytest.raises(ValueError, match=r"a/bad\[train\]:row 0: no 'messages' column"):
        load_conversations("a/bad")
    with pytest.raises(RuntimeError, match="Offline"):
        load_conversations("a/missing")
    with pytest.raises(ValueError, match="a local file"):  # one line at the command line too
        load_conversations("a/missing")


# ----------------------------------------------------------------------------- calibration
def test_calibration_batches(tiny_tok):
    ds = ChatDataset(tokenize_conversations(_convs(20), tiny_tok, max_length=256), pad_token_id=0)
    batches = calibration_batches_from_dataset(ds, calib_samples=10, batch_size=4, seed=3)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    seen = []
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"}
        for row, mask in zip(b["input_ids"], b["attention_mask"]):
            n = int(mask.sum())
            assert mask.tolist() == [1] * n + [0] * (len(mask) - n) and row[n:].eq(0).all()
            seen.append(row[:n].tolist())
    assert all(any(s == e["input_ids"] for e in ds.examples) for s in seen)
    assert len({json.dumps(s) for s in seen}) == 10  # sampled without replacement
    again = calibration_batches_from_dataset(ds, calib_samples=10, batch_size=4, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    assert sum(b["input_ids"].shape[0] for b in calibration_batches_from_dataset(ds, 100, 8)) == 20


def test_trainer_consumes_packed_dataset_and_collator(tmp_path, tiny_tok, tiny_model, device):
    """The HF Trainer accepts the dataset and the collator's batches (incl. use_cache=False)."""
    from transformers import Trainer, TrainingArguments

    p = _write(tmp_path, [json.dumps({"prompt": f"Q{i}?", "response": f"A{i}."}) for i in range(8)])
    ds = build_dataset(str(p), tiny_tok, max_length=128, packing=True, split="all")
    assert ds.packed and len(ds) < 8
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    before = tiny_model.lm_head.weight.detach().clone()
    out = Trainer(model=tiny_model, args=args, train_dataset=ds, data_collator=ChatCollator(tiny_tok)).train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(before, tiny_model.lm_head.weight)


def test_build_dataset_takes_chats_in_memory(tiny_tok):
    from salientft.data.chat import build_dataset

    chats = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(6)]
    chats.append({"prompt": "a record", "response": "as in a JSONL file"})
    ds = build_dataset(chats, tiny_tok, max_length=64, split="all")
    assert len(ds) == 7 and ds.n_conversations == 7
    with pytest.raises(ValueError, match=r"one chat .* wrap it in a list"):
        build_dataset(chats[0], tiny_tok)
    with pytest.raises(ValueError, match=r"chats\[1\]: message 1 .*unknown role"):
        build_dataset([chats[0], [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]], tiny_tok)
    with pytest.raises(ValueError, match="empty"):
        build_dataset([], tiny_tok)
    with pytest.raises(TypeError, match="list of chats"):
        build_dataset(3, tiny_tok)
