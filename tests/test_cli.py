"""The command line's flags: calibrate/quantize declared by salientft.cli_args, train by TrainConfig.

The expected namespaces below are what the hand-written parsers (before cli_args) produced for
the same argv: every flag keeps its name, type, default and behaviour.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from salientft.cli import _build_parser
from salientft.cli_args import CalibrateArgs, CalibrationArgs, QuantizeArgs
from salientft.saliency import METRICS

CALIBRATE_DEFAULTS = {
    "model": "smollm2-135m", "data": "embedded", "metric": "gift", "calib_samples": 128, "seq_len": 512, "batch_size": 8,
    "bits": 4, "tau": None, "rho": None, "gamma": None, "n_salient": None, "salient_fraction": None,
    "target_modules": None, "seed": 0, "stats_output": None, "plot": None, "dtype": "bf16", "device": "auto",
    "sequential": False,
}
QUANTIZE_DEFAULTS = {
    "model": "smollm2-135m", "n_salient": None, "salient_fraction": None, "quantizer": "gptq", "group_size": None,
    "metric": "gift", "scores": None, "data": "embedded", "calib_samples": 128, "seq_len": 512, "batch_size": 8,
    "target_modules": None, "seed": 0, "dtype": "bf16", "device": "auto", "no_progress": False, "overwrite": False,
    "sequential": False,
}


def parse(*argv: str) -> dict:
    ns = vars(_build_parser().parse_args(list(argv)))
    ns.pop("func")
    return ns


def rejected(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        _build_parser().parse_args(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--output", "s.safetensors"], {"output": "s.safetensors"}),
    (["--output", "o", "--model", "tiny-random-llama", "--data", "x.jsonl", "--metric", "wanda", "--calib-samples", "3",
      "--seq-len", "64", "--batch-size", "2", "--bits", "3", "--tau", "inf", "--rho", "1", "--gamma", "0.5",
      "--n-salient", "7", "--target-modules", "q_proj, v_proj", "--seed", "5", "--stats-output", "st",
      "--plot", "p.png", "--dtype", "fp32"],
     {"output": "o", "model": "tiny-random-llama", "data": "x.jsonl", "metric": "wanda", "calib_samples": 3, "seq_len": 64,
      "batch_size": 2, "bits": 3, "tau": "inf", "rho": "1", "gamma": 0.5, "n_salient": 7,
      "target_modules": ["q_proj", "v_proj"], "seed": 5, "stats_output": "st", "plot": "p.png", "dtype": "fp32"}),
    (["--output", "o", "--salient-fraction", "0.25", "--target-modules", "re:.*proj"],
     {"output": "o", "salient_fraction": 0.25, "target_modules": ".*proj"}),
])
def test_calibrate_flags_parse_as_before(argv, expected):
    ns = parse("calibrate", *argv)
    assert ns == {"command": "calibrate", "verbose": False, **CALIBRATE_DEFAULTS, **expected}
    for key in ("calib_samples", "seq_len", "batch_size", "bits", "seed"):
        assert type(ns[key]) is int, key
    assert ns["gamma"] is None or type(ns["gamma"]) is float


@pytest.mark.parametrize("argv, expected", [
    (["--output", "q", "--bits", "4"], {"output": "q", "bits": 4}),
    (["--output", "q", "--bits", "3", "--model", "m", "--n-salient", "0", "--quantizer", "rtn", "--group-size", "128",
      "--metric", "magnitude", "--scores", "s", "--data", "d", "--calib-samples", "4", "--seq-len", "32", "--batch-size", "1",
      "--target-modules", "q_proj", "--seed", "2", "--dtype", "fp16", "--no-progress", "--overwrite"],
     {"output": "q", "bits": 3, "model": "m", "n_salient": 0, "quantizer": "rtn", "group_size": 128,
      "metric": "magnitude", "scores": "s", "data": "d", "calib_samples": 4, "seq_len": 32, "batch_size": 1,
      "target_modules": ["q_proj"], "seed": 2, "dtype": "fp16", "no_progress": True, "overwrite": True}),
    (["--output", "q", "--bits", "2", "--salient-fraction", "0"], {"output": "q", "bits": 2, "salient_fraction": 0.0}),
])
def test_quantize_flags_parse_as_before(argv, expected):
    ns = parse("quantize", *argv)
    assert ns == {"command": "quantize", "verbose": False, **QUANTIZE_DEFAULTS, **expected}
    assert type(ns["bits"]) is int and type(ns["no_progress"]) is bool


def test_the_dataclasses_are_the_flags():
    shared = {"model", "data", "calib_samples", "seq_len", "batch_size", "n_salient", "salient_fraction", "metric",
              "target_modules", "seed", "dtype", "device", "sequential"}
    assert {f.name for f in dataclasses.fields(CalibrationArgs)} == shared
    for cls, argv in ((CalibrateArgs, ["calibrate", "--output", "o"]),
                      (QuantizeArgs, ["quantize", "--output", "o", "--bits", "4"])):
        ns = parse(*argv)
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields == set(ns) - {"command", "verbose"}
        # a field's default is the flag's default: the namespace builds the dataclass unchanged
        assert dataclasses.asdict(cls(**{k: ns[k] for k in fields})) == {k: ns[k] for k in fields}
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls


def test_cli_args_imports_no_torch_at_module_level():
    import salientft.cli_args

    tree = ast.parse(Path(salientft.cli_args.__file__).read_text())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "dataclasses", "typing", ".config_base"}, imported


@pytest.mark.parametrize("command, cls, required", [
    ("calibrate", CalibrateArgs, []),
    ("quantize", QuantizeArgs, ["--bits", "4"]),
])
def test_n_salient_and_salient_fraction_are_exclusive(command, cls, required, capsys):
    err = rejected(command, "--output", "o", *required, "--n-salient", "1", "--salient-fraction", "0.1", capsys=capsys)
    assert "not allowed with argument" in err
    assert parse(command, "--output", "o", *required, "--n-salient", "1")["n_salient"] == 1


@pytest.mark.parametrize("command, required", [("calibrate", []), ("quantize", ["--bits", "4"])])
def test_unknown_metric_is_rejected(command, required, capsys):
    err = rejected(command, "--output", "o", *required, "--metric", "nope", capsys=capsys)
    assert "invalid choice: 'nope'" in err and "gift-g2" in err
    for metric in METRICS:
        assert parse(command, "--output", "o", *required, "--metric", metric)["metric"] == metric


@pytest.mark.parametrize("argv, message", [
    (["calibrate"], "--output"),
    (["quantize", "--output", "o"], "--bits"),
    (["quantize", "--bits", "4"], "--output"),
    (["quantize", "--bits", "4", "--output", "o", "--quantizer", "x"], "invalid choice: 'x'"),
    (["quantize", "--bits", "4.5", "--output", "o"], "invalid int value"),
    (["calibrate", "--output", "o", "--calib-samples", "x"], "invalid int value"),
    (["quantize", "--bits", "4", "--output", "o", "--method", "x"], "invalid choice: 'x'"),  # the old flag too
    (["calibrate", "--output", "o", "--gamma", "x"], "invalid float value"),
])
def test_required_flags_and_types_are_enforced(argv, message, capsys):
    assert message in rejected(*argv, capsys=capsys)


def _help(command: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping: each flag's help on one line
    with pytest.raises(SystemExit) as e:
        _build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _config_classes():
    from salientft.config import TrainConfig

    return [("calibrate", CalibrateArgs), ("quantize", QuantizeArgs), ("train", TrainConfig)]


@pytest.mark.parametrize("command", ["calibrate", "quantize", "train"])
def test_help_describes_every_flag(command, capsys, monkeypatch):
    cls = dict(_config_classes())[command]
    text = _help(command, capsys, monkeypatch)
    # train's flags: TrainConfig's own fields and every registered method's settings (flag_fields)
    for f in (cls.flag_fields() if hasattr(cls, "flag_fields") else dataclasses.fields(cls)):
        flag = "--" + f.name.replace("_", "-")
        help_text = " ".join(f.metadata["help"].split())
        assert f"{flag} " in text, flag
        assert help_text in text, (flag, help_text)
        if f.default_factory is not dataclasses.MISSING:
            continue
        if f.default is dataclasses.MISSING:
            assert f"{help_text} (required)" in text, flag
        elif f.default is not None or "default" not in help_text:
            assert f"{help_text} (default: {f.default!r})" in text, flag


def test_help_shows_defaults_and_choices(capsys, monkeypatch):
    text = _help("calibrate", capsys, monkeypatch)
    assert "(default: 'smollm2-135m')" in text and "(default: 128)" in text
    assert "{" + ",".join(METRICS) + "}" in text
    assert "[--n-salient N_SALIENT | --salient-fraction SALIENT_FRACTION]" in text
    text = _help("quantize", capsys, monkeypatch)
    assert "--quantizer {gptq,rtn}" in text and "--bits BITS" in text and "[--bits" not in text


@pytest.mark.parametrize("command", ["calibrate", "quantize", "train"])
def test_help_names_each_concept_once(command, capsys, monkeypatch):
    """One name per concept (docs/configuration.md#names): --calib-samples on every command that
    calibrates, --quantizer, --scores; the old spellings are not in --help."""
    text = _help(command, capsys, monkeypatch)
    assert "--calib-samples CALIB_SAMPLES" in text
    if command != "calibrate":
        assert "--scores SCORES" in text
    if command == "quantize":
        assert "--quantizer {gptq,rtn}" in text
    for old in ("--samples ", "--scores-file", "--scores-path", "--n-samples"):
        assert old not in text, old
    if command != "train":  # train's --method is the training method
        assert "--method" not in text


@pytest.mark.parametrize("command, old, new, value, expected", [
    ("calibrate", "--samples", "calib_samples", "3", 3),
    ("quantize", "--samples", "calib_samples", "4", 4),
    ("quantize", "--method", "quantizer", "rtn", "rtn"),
])
def test_old_flags_still_work_with_a_deprecation_note(command, old, new, value, expected, capsys):
    extra = ["--bits", "4"] if command == "quantize" else []
    ns = parse(command, "--output", "o", *extra, old, value)
    assert ns[new] == expected and type(ns[new]) is type(expected)
    assert f"{old} is deprecated, use --{new.replace('_', '-')}" in capsys.readouterr().err
    assert not any(k in ns for k in ("samples", "method"))  # one attribute per concept


def test_train_flags_stay_unset_unless_given():
    ns = parse("train")
    assert ns == {"command": "train", "config": None, "resume": False, "verbose": False}  # YAML values survive
    ns = parse("train", "--packing", "--lr", "1e-4", "--target-modules", "q_proj,k_proj", "--no-eval-before",
               "--max-steps", "3", "--target-modules", "re:.*proj", "--no-packing")
    assert ns["packing"] is False and ns["eval_before"] is False and ns["lr"] == 1e-4 and ns["max_steps"] == 3
    assert ns["target_modules"] == ".*proj"
