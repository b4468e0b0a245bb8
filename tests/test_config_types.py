"""Typed configs (config_base): every field read as its declared type, bounds, bounded YAML aliases;
the checks that come before the weights load (preflight); what the data costs the tokenizer."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import pytest

from salientft.config_base import (
    BOOL_WORDS,
    FALSE_WORDS,
    TRUE_WORDS,
    YAML_MAX_NODES,
    ConfigMixin,
    FieldTypeError,
    YAMLTooLarge,
    coerce_field,
    coerce_fields,
    load_yaml,
)


@dataclass
class Example(ConfigMixin):
    flag: bool = False
    count: int = 1
    rate: float = 0.5
    name: str = "x"
    maybe_int: int | None = None
    maybe_float: float | None = None
    names_or_regex: list[str] | str | None = None
    table: dict | None = None

    def __post_init__(self):
        coerce_fields(self)


# ----------------------------------------------------------------------------- bools
@pytest.mark.parametrize("word", [*TRUE_WORDS, "TRUE", " Yes ", "On", True, 1])
def test_bool_true_words(word):
    assert Example(flag=word).flag is True


@pytest.mark.parametrize("word", [*FALSE_WORDS, "False", "NO", " off", False, 0])
def test_bool_false_words(word):
    assert Example(flag=word).flag is False


@pytest.mark.parametrize("bad", ["maybe", "", "t", "f", "y", 2, -1, 0.0, 1.0, None, [], "true false"])
def test_bool_refuses_anything_else(bad):
    with pytest.raises(FieldTypeError, match=r"Example\.flag must be true or false \(true/yes/on/1 or false/no/off/0\)"):
        Example(flag=bad)


def test_bool_words_are_the_documented_set():
    assert set(BOOL_WORDS) == {"true", "false", "yes", "no", "on", "off", "1", "0"}


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("value, expected", [(3, 3), ("3", 3), (" 12 ", 12), ("1_000", 1000), (4.0, 4), ("2e3", 2000),
                                             (-1, -1), ("-1", -1)])
def test_int_from_numbers_and_numeric_strings(value, expected):
    got = Example(count=value).count
    assert got == expected and type(got) is int


@pytest.mark.parametrize("bad", [2.5, "2.5", "1e-3", True, False, "two", float("inf"), float("nan"), "nan", None, [1]])
def test_int_refuses_fractions_bools_and_words(bad):
    with pytest.raises(FieldTypeError, match=r"Example\.count must be an integer, got "):
        Example(count=bad)


@pytest.mark.parametrize("value, expected", [("2e-4", 2e-4), ("1E-3", 1e-3), (" 0.25", 0.25), (3, 3.0), ("-1.5", -1.5)])
def test_float_from_numbers_and_numeric_strings(value, expected):
    got = Example(rate=value).rate
    assert got == expected and type(got) is float


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), "inf", "nan", "-Infinity", True, "fast", None])
def test_float_refuses_non_finite_bools_and_words(bad):
    with pytest.raises(FieldTypeError, match=r"Example\.rate must be a finite number, got "):
        Example(rate=bad)


# ----------------------------------------------------------------------------- strings, optionals, unions
@pytest.mark.parametrize("bad", [5, 2.0, True, None, ["a"]])
def test_str_refuses_non_strings(bad):
    with pytest.raises(FieldTypeError, match=r"Example\.name must be a string, got "):
        Example(name=bad)


def test_optional_fields():
    e = Example(maybe_int=None, maybe_float=None)
    assert e.maybe_int is None and e.maybe_float is None
    e = Example(maybe_int="7", maybe_float="2e-4")
    assert e.maybe_int == 7 and e.maybe_float == 2e-4
    with pytest.raises(FieldTypeError, match=r"Example\.maybe_int must be an integer or null, got 0\.5"):
        Example(maybe_int=0.5)
    with pytest.raises(FieldTypeError, match=r"Example\.maybe_float must be a finite number or null, got 'x'"):
        Example(maybe_float="x")


def test_union_keeps_a_value_of_one_of_its_types():
    assert Example(names_or_regex="q_proj").names_or_regex == "q_proj"  # a regex string stays a string
    assert Example(names_or_regex=("q_proj", "v_proj")).names_or_regex == ["q_proj", "v_proj"]
    with pytest.raises(FieldTypeError, match=r"names_or_regex must be a list of strings or a string or null"):
        Example(names_or_regex=["q_proj", 3])
    with pytest.raises(FieldTypeError, match="names_or_regex"):
        Example(names_or_regex=3)


def test_mapping_field():
    assert Example(table={"a": 1}).table == {"a": 1}
    with pytest.raises(FieldTypeError, match=r"Example\.table must be a mapping or null"):
        Example(table=["a"])


def test_error_names_the_field_and_shortens_the_value():
    with pytest.raises(FieldTypeError) as e:
        coerce_field("C", "f", int, "x" * 500)
    assert e.value.field == "f" and len(str(e.value)) < 140


def test_from_dict_json_and_yaml_read_types():
    assert Example.from_dict({"flag": "no", "count": "3"}) == Example(flag=False, count=3)
    assert Example.from_json('{"flag": "yes", "rate": "2e-4"}') == Example(flag=True, rate=2e-4)
    assert Example.from_yaml("flag: off\nrate: 2e-4\nname: run\n") == Example(flag=False, rate=2e-4, name="run")


# ----------------------------------------------------------------------------- the package's configs
def test_train_config_reads_each_field_as_its_type():
    from salientft.config import TrainConfig

    c = TrainConfig(lr="2e-4", packing="no", merge="no", eval_before="false", trust_remote_code="false",
                    epochs="2", save_steps="3", max_steps="10", n_salient="8")
    assert c.lr == 2e-4 and c.packing is False and c.merge is False and c.eval_before is False
    assert c.trust_remote_code is False and c.epochs == 2.0 and c.save_steps == 3 and c.max_steps == 10
    assert c.n_salient == 8
    assert TrainConfig(trust_remote_code="yes").trust_remote_code is True


@pytest.mark.parametrize("field, value, message", [
    ("output", 5, "TrainConfig.output must be a string, got 5"),
    ("max_steps", 2.5, "TrainConfig.max_steps must be an integer, got 2.5"),
    ("lr", float("inf"), "TrainConfig.lr must be a finite number or null, got inf"),
    ("lr", -1e-4, "TrainConfig.lr must be positive, got -0.0001"),
    ("weight_decay", -0.1, "TrainConfig.weight_decay must be >= 0, got -0.1"),
    ("max_grad_norm", -1, "TrainConfig.max_grad_norm must be >= 0, got -1.0"),
    ("epochs", 0, "TrainConfig.epochs must be positive"),
    ("seed", -1, "TrainConfig.seed must be >= 0"),
    ("noise_bits", 1, "GiftSWMethodConfig.noise_bits must be an integer in [2, 16]"),
    ("eval_limit", 0, "TrainConfig.eval_limit must be a positive integer"),
    ("trust_remote_code", "perhaps", "TrainConfig.trust_remote_code must be true or false"),
    ("target_modules", "re:(", "is not a valid regular expression"),
])
def test_train_config_refusals(field, value, message):
    from salientft.config import TrainConfig

    kw = {field: value[3:] if isinstance(value, str) and value.startswith("re:") else value}
    with pytest.raises(ValueError) as e:
        TrainConfig(**kw)
    assert message in str(e.value)


def test_lora_bounds():
    from salientft.config import TrainConfig

    with pytest.raises(ValueError, match=r"LoRAMethodConfig.lora_alpha must be positive, got 0\.0"):
        TrainConfig(method="lora", lora_alpha=0)
    with pytest.raises(ValueError, match=r"LoRAMethodConfig.lora_dropout must be >= 0 and < 1"):
        TrainConfig(method="lora", lora_dropout=-0.1)


def test_other_configs_read_types():
    from salientft.config import GiftConfig, GMTConfig
    from salientft.quant.model import QuantizeConfig

    assert GiftConfig(n_salient="8", keep_noise="yes").keep_noise is True
    with pytest.raises(FieldTypeError, match="GiftConfig.fp32_salient must be true or false"):
        GiftConfig(fp32_salient="sometimes")
    assert GMTConfig(ratio="0.3", global_cache_mb="64") == GMTConfig(ratio=0.3, global_cache_mb=64)
    with pytest.raises(FieldTypeError, match="GMTConfig.global_cache_mb must be an integer"):
        GMTConfig(global_cache_mb=1.5)
    assert QuantizeConfig(bits="4", damp="1e-2").bits == 4
    with pytest.raises(FieldTypeError, match="QuantizeConfig.damp must be a finite number"):
        QuantizeConfig(damp=math.inf)


def test_calibrate_and_quantize_flags_are_checked():
    from salientft.cli_args import CalibrateArgs, QuantizeArgs

    CalibrateArgs(output="s.safetensors", calib_samples="16")
    with pytest.raises(ValueError, match="CalibrateArgs.seq_len must be at least 2 tokens, got 1"):
        CalibrateArgs(output="s.safetensors", seq_len=1)
    with pytest.raises(ValueError, match="CalibrateArgs.salient_fraction must be >= 0 and <= 1, got 1.5"):
        CalibrateArgs(output="s.safetensors", salient_fraction=1.5)
    with pytest.raises(ValueError, match="QuantizeConfig.bits must be one of"):
        QuantizeArgs(output="q", bits=5)
    with pytest.raises(FieldTypeError, match="QuantizeArgs.no_progress must be true or false"):
        QuantizeArgs(output="q", bits=4, no_progress="sure")


# ----------------------------------------------------------------------------- config files
def test_config_file_false_is_false_and_recorded(tmp_path):
    """`trust_remote_code: "false"` must never turn remote code on; the run records the real value."""
    from salientft.train import resolve_train_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text('trust_remote_code: "false"\npacking: "no"\nlr: 2e-4\neval_before: "false"\n')
    c = resolve_train_config(str(cfg), {})
    assert c.trust_remote_code is False and c.packing is False and c.eval_before is False and c.lr == 2e-4
    assert json.loads(json.dumps(c.to_dict()))["trust_remote_code"] is False  # what run_config.json holds
    cfg.write_text("trust_remote_code: true\n")
    assert resolve_train_config(str(cfg), {}).trust_remote_code is True


def test_config_file_type_error_names_the_file(tmp_path):
    from salientft.train import resolve_train_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: lots\n")
    with pytest.raises(ValueError, match=r"--config .*c\.yaml: TrainConfig\.epochs must be a finite number"):
        resolve_train_config(str(cfg), {})
    # a flag's own mistake is not blamed on the file
    with pytest.raises(ValueError, match=r"^TrainConfig\.epochs"):
        resolve_train_config(str(cfg), {"epochs": "many"})


def _bomb(levels: int = 9) -> str:
    names = "abcdefghijklmnop"[:levels]
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    return text + "".join(f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip(names, names[1:]))


def test_yaml_alias_bomb_is_refused_quickly():
    text = _bomb()
    assert len(text) < 410
    t0 = time.perf_counter()
    with pytest.raises(YAMLTooLarge, match=f"more than {YAML_MAX_NODES} values"):
        load_yaml(text)
    assert time.perf_counter() - t0 < 5  # measured: milliseconds; a walk of 10^9 strings would take hours
    with pytest.raises(YAMLTooLarge):
        Example.from_yaml(text)  # every config's from_yaml goes through the same loader


def test_yaml_aliases_within_the_bound_load():
    assert load_yaml("base: &b {x: 1}\nrun: *b\n") == {"base": {"x": 1}, "run": {"x": 1}}
    assert load_yaml("a: &a [1, 2]\nb: [*a, *a]\n") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}
    load_yaml(_bomb(4))  # 9^3 strings: within the bound
    with pytest.raises(YAMLTooLarge, match="recursive"):
        load_yaml("a: &a [1, *a]\n")


# ----------------------------------------------------------------------------- trackers
def test_tracker_names_match_transformers():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from salientft.deps import TRACKERS

    assert set(TRACKERS) == set(INTEGRATION_TO_CALLBACK)


def test_unknown_tracker_is_never_an_install_command():
    from salientft import deps

    assert deps.missing_for("train", model="tiny-random-llama", data="x.jsonl", report_to="tensorbord") == []
    with pytest.raises(ValueError, match="did you mean 'tensorboard'"):
        deps.tracker_names("tensorbord")
    with pytest.raises(ValueError, match="did you mean 'wandb'"):
        deps.tracker_names("tensorboard,wandbb")
    with pytest.raises(ValueError, match="stand alone"):
        deps.tracker_names("none,wandb")
    assert deps.tracker_names("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert deps.tracker_names("none") == [] and deps.tracker_names("all") == []


# ----------------------------------------------------------------------------- the command line
def test_negative_numbers_reach_their_checks():
    from salientft.cli import _attach_negative_values

    assert _attach_negative_values(["train", "--lr", "-1e-4", "--seed", "-3", "--x", "-.5", "--y", "-inf"]) == [
        "train", "--lr=-1e-4", "--seed=-3", "--x=-.5", "--y=-inf"]
    # flags and ordinary values are left alone
    assert _attach_negative_values(["train", "--lr", "1e-4", "--resume", "--output", "-out", "--packing"]) == [
        "train", "--lr", "1e-4", "--resume", "--output", "-out", "--packing"]


# ----------------------------------------------------------------------------- data: bytes before tokens
@pytest.fixture(scope="module")
def tiny_tok():
    from salientft.models import tiny_tokenizer

    return tiny_tokenizer()


class _Recording:
    """A tokenizer proxy that records the longest text (in UTF-8 bytes) it was asked to encode."""

    def __init__(self, tok):
        self._tok = tok
        self.longest = 0

    def __call__(self, texts, **kw):
        self.longest = max([self.longest, *(len(t.encode("utf-8")) for t in texts)])
        return self._tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)


def test_records_are_capped_by_bytes_before_the_tokenizer(tiny_tok):
    from salientft.data.chat import longest_token_bytes, tokenize_conversations

    max_length = 64
    cap = max_length * longest_token_bytes(tiny_tok)
    huge = [{"role": "user", "content": "é" * 2_000_000 + "?"}, {"role": "assistant", "content": "Yes." * 1000}]
    rec = _Recording(tiny_tok)
    with pytest.raises(ValueError, match="no examples left"):  # the reply lies far beyond 64 tokens
        tokenize_conversations([huge], rec, max_length=max_length)
    assert 0 < rec.longest <= cap + 200  # the content cap plus the template's own text
    # a long reply after a short prompt: still trained on, cut to max_length
    long_reply = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "word " * 1_000_000}]
    rec = _Recording(tiny_tok)
    (ex,) = tokenize_conversations([long_reply], rec, max_length=max_length)
    assert rec.longest <= cap + 200 and len(ex["input_ids"]) == max_length
    assert any(x != -100 for x in ex["labels"])


def test_the_byte_cap_never_changes_an_example(tiny_tok, monkeypatch):
    """Capping before tokenizing gives the same examples as tokenizing everything, then truncating."""
    import salientft.data.chat as chat

    convs = [[{"role": "user", "content": "ab " * n}, {"role": "assistant", "content": "é!" * (3 * n)}]
             for n in (1, 10, 40, 100, 400)]
    capped = chat.tokenize_conversations(convs, tiny_tok, max_length=48)
    monkeypatch.setattr(chat, "longest_token_bytes", lambda tok: 10**9)  # no cap
    assert chat.tokenize_conversations(convs, tiny_tok, max_length=48) == capped


def test_cap_conversation_cuts_on_characters():
    from salientft.data.chat import cap_conversation

    conv = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "éé"}, {"role": "user", "content": "x"}]
    assert cap_conversation(conv, 100) == conv
    assert cap_conversation(conv, 5) == [conv[0], {"role": "assistant", "content": "é"}]  # 2 + 2 bytes, not half a char
    assert cap_conversation(conv, 2) == [conv[0], {"role": "assistant", "content": ""}]


def test_some_records_beyond_max_length_are_dropped_with_counts(tiny_tok, caplog):
    from salientft.data.chat import tokenize_conversations

    short = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A."}]
    long = [{"role": "user", "content": "why " * 40}, {"role": "assistant", "content": "Because."}]
    with caplog.at_level("WARNING"):
        exs = tokenize_conversations([short, long, long], tiny_tok, max_length=48)
    assert len(exs) == 1
    assert "dropped 2 of 3 conversations" in caplog.text and "--max-length" in caplog.text


# ----------------------------------------------------------------------------- before the weights load
def test_train_refuses_before_any_weight_loads(tmp_path, monkeypatch):
    """k wider than a layer, and targets that match nothing, come from the model's skeleton on the
    meta device; the real loader is never called."""
    import salientft.train
    from salientft.config import TrainConfig

    def no_model(*a, **kw):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(salientft.train, "load_model", no_model)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}", "response": f"A{i}."}) + "\n" for i in range(8)))
    base = dict(model="tiny-random-llama", data=str(data), output=str(tmp_path / "out"), max_steps=1)
    with pytest.raises(ValueError, match="n_salient=65 is larger than model.layers.0.self_attn.q_proj's 64"):
        salientft.train.train(TrainConfig(**base, n_salient=65))
    with pytest.raises(ValueError, match="target module 'nope' matches no module"):
        salientft.train.train(TrainConfig(**base, method="lora", target_modules=["nope"]))
    with pytest.raises(ValueError, match="no examples left"):
        salientft.train.train(TrainConfig(**base, max_length=4))
    assert not (tmp_path / "out").exists()


def test_skeleton_is_on_meta_and_matches_the_model():
    from salientft.models import model_skeleton, tiny_random_llama

    sk = model_skeleton("tiny-random-llama")
    assert {p.device.type for p in sk.parameters()} == {"meta"}
    real = tiny_random_llama()
    assert {n: tuple(p.shape) for n, p in sk.named_parameters()} == {n: tuple(p.shape) for n, p in real.named_parameters()}


def test_skeleton_of_a_local_folder(tmp_path):
    from salientft.models import model_skeleton, tiny_random_llama
    from salientft.preflight import check_model_settings

    tiny_random_llama().config.save_pretrained(tmp_path)  # a config.json only: no weights at all
    sk = model_skeleton(str(tmp_path))
    assert sk is not None and {p.device.type for p in sk.parameters()} == {"meta"}
    ks = check_model_settings(str(tmp_path), ["q_proj"], n_salient=4)
    assert ks == {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 4}
    with pytest.raises(ValueError, match="at least one column must be quantized"):
        check_model_settings(str(tmp_path), None, n_salient=64, quantized=True)


# ----------------------------------------------------------------------------- compare
def _results(path, dtype):
    path.write_text(json.dumps({"results": {"piqa": {"acc": 0.5, "acc_norm": 0.5, "n": 2}}, "paper_avg": None,
                                "dtype": dtype, "logprob_dtype": "model"}))
    return str(path)


def test_compare_notes_mixed_precisions(tmp_path):
    from salientft.evaluation import compare_runs

    a, b = _results(tmp_path / "a.json", "bfloat16"), _results(tmp_path / "b.json", "float32")
    notes = compare_runs([a, b])["notes"]
    assert any("different model dtypes (a: bfloat16, b: float32)" in n for n in notes), notes
    c = _results(tmp_path / "c.json", "bfloat16")
    assert not any("dtype" in n for n in compare_runs([a, c])["notes"])


def test_peft_config_reads_its_own_fields():
    import salientft.peft  # noqa: F401  (registers GIFT-SW with PEFT)
    from salientft.peft import GiftSWConfig

    c = GiftSWConfig(keep_noise="false", fp32_salient="no", n_salient="4", target_modules=["q_proj"])
    assert c.keep_noise is False and c.fp32_salient is False and c.n_salient == 4
    assert c.target_modules == {"q_proj"}
    with pytest.raises(FieldTypeError, match="GiftSWConfig.noise_bits must be an integer"):
        GiftSWConfig(noise_bits=3.5)


def _remote_code_model(folder):
    """A model folder whose config names its own Python code; importing that code writes a marker."""
    folder.mkdir()
    marker = folder / "REMOTE_CODE_RAN"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "salientft_marker", "auto_map": {"AutoConfig": "marker_code.MarkerConfig",
                                                       "AutoModelForCausalLM": "marker_code.MarkerModel"}}))
    (folder / "marker_code.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class MarkerConfig(PretrainedConfig):\n    model_type = 'salientft_marker'\n"
        "class MarkerModel:\n    pass\n")
    return marker


def test_a_false_word_never_runs_remote_code(tmp_path, monkeypatch, capsys):
    """`trust_remote_code: "false"` in a config file: the model folder's own code never runs, neither
    in the checks before loading (the skeleton, the tokenizer) nor in the load that refuses it."""
    from salientft.cli import main
    from salientft.models import model_skeleton

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    marker = _remote_code_model(tmp_path / "custom")
    assert model_skeleton(str(tmp_path / "custom")) is None and not marker.exists()
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}", "response": "A."}) + "\n"
                                              for i in range(8)))
    (tmp_path / "c.yaml").write_text('model: ./custom\ntrust_remote_code: "false"\n')
    rc = main(["train", "--config", "c.yaml", "--data", "d.jsonl", "--output", "out", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "trust_remote_code" in err, err
    assert not marker.exists()


def test_calibration_documents_are_capped_by_bytes(tiny_tok, tmp_path):
    from salientft.calibration import calibration_batches
    from salientft.data.chat import longest_token_bytes

    doc = tmp_path / "c.txt"
    doc.write_text("salient " * 500_000 + "\n")  # one 4 MB line
    rec = _Recording(tiny_tok)
    batches = calibration_batches(rec, str(doc), calib_samples=4, seq_len=32, batch_size=2, seed=0)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 4 * 32
    assert 0 < rec.longest <= 4 * 32 * longest_token_bytes(tiny_tok)
