"""Every refused input: a one-line message naming the input and the fix, exit code 2, nothing written.

``ROWS`` is the table of ``docs/troubleshooting.md``: (what the user did, the command line, a
fragment of the message). Each row runs ``salientft`` in-process in a folder holding the files
of ``FILES``, with the model loader replaced by a failure, so every refusal is shown to come
before a model loads; the folder must be unchanged afterwards. The page is generated from the
same rows (``test_troubleshooting_page_is_current`` keeps them equal); after changing a row run

    python tests/test_refusals.py --write
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "troubleshooting.md"

MODEL = ["--model", "tiny-random-llama"]


def train(*flags: str, data: str = "d.jsonl", output: str | None = "out") -> list[str]:
    """``salientft train`` on the tiny model and the small data file, with ``flags`` (no --output: None)."""
    return ["train", *MODEL, "--data", data, *(["--output", output] if output else []), "--max-steps", "2", *flags]


def _rows(text: str) -> str:
    return "".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}) + "\n"
                   for i in range(8)) + text


def _run_config(output: str, **settings) -> str:
    from salientft.train import resolve_train_config

    flags = {"model": "tiny-random-llama", "data": "d.jsonl", "output": output, "max_steps": 2, **settings}
    return json.dumps(resolve_train_config(None, flags).to_dict())


def _manifest(folder: str, *names: str) -> dict:
    """The manifest salientft keeps in a folder it wrote (salientft.outputs), listing ``names``."""
    return {f"{folder}/.salientft-manifest.json": json.dumps({"salientft_manifest": 1, "entries": sorted(names)})}


_CHECKPOINT = {"checkpoint-1/salientft_complete": "1\n", "checkpoint-1/trainer_state.json": "{}"}
_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
_CHAT = {"role": "user", "content": "Hi"}

# The folder the commands run in: name -> (what it is, its files: relative path -> text or bytes).
FILES = {
    "d.jsonl": ("8 valid prompt/response records", {"d.jsonl": _rows("")}),
    "latin1.jsonl": ("line 9 is Latin-1, not UTF-8",
                     {"latin1.jsonl": _rows("").encode() + '{"prompt": "café"}\n'.encode("latin-1")}),
    "broken.jsonl": ("line 9 is cut short", {"broken.jsonl": _rows('{"prompt": "a"\n')}),
    "empty-reply.jsonl": ("a chat whose assistant message is empty", {"empty-reply.jsonl": json.dumps(
        {"messages": [_CHAT, {"role": "assistant", "content": " "}]}) + "\n"}),
    "empty-response.jsonl": ("a record whose response is empty", {"empty-response.jsonl": json.dumps(
        {"prompt": "Hi", "response": ""}) + "\n"}),
    "folder/": ("a folder with one file", {"folder/readme.txt": "not a run\n"}),
    "a-file": ("a plain file", {"a-file": "x\n"}),
    "bad.yaml": ("a config with an unknown field", {"bad.yaml": "method: gift-sw\nbogus_field: 1\n"}),
    "run-full/": ("a finished full fine-tuning run of 2 steps, without checkpoints (--save-steps 0)", {
        "run-full/run_config.json": _run_config("run-full", method="full"),
        "run-full/model/config.json": "{}", "run-full/metrics.json": json.dumps({"steps": 2}),
        **_manifest("run-full", "run_config.json", "model", "metrics.json")}),
    "notes/": ("a run's checkpoint beside a file of the user's", {
        "notes/run_config.json": _run_config("notes"), "notes/notes.txt": "mine\n",
        **{f"notes/{k}": v for k, v in _CHECKPOINT.items()}, **_manifest("notes", "run_config.json", "checkpoint-1")}),
    "run-lr/": ("a gift-sw run at --lr 0.001 with one checkpoint", {
        "run-lr/run_config.json": _run_config("run-lr", lr=0.001),
        **{f"run-lr/{k}": v for k, v in _CHECKPOINT.items()}, **_manifest("run-lr", "run_config.json", "checkpoint-1")}),
    "run-data/": ("a run whose data file d.jsonl had other contents when it started", {
        "run-data/run_config.json": _run_config("run-data"),
        "run-data/run_history.json": json.dumps({"data_sha256": "0" * 64, "history": []}),
        **{f"run-data/{k}": v for k, v in _CHECKPOINT.items()},
        **_manifest("run-data", "run_config.json", "run_history.json", "checkpoint-1")}),
    "legacy/": ("a finished run of a salientft that kept no manifest", {
        "legacy/run_config.json": _run_config("legacy"), "legacy/adapter/adapter_config.json": "{}",
        "legacy/metrics.json": json.dumps({"steps": 2}), **{f"legacy/{k}": v for k, v in _CHECKPOINT.items()}}),
    "busy/": ("a run folder whose lock another salientft process holds (the test holds it)", {
        "busy/run_config.json": _run_config("busy"), **{f"busy/{k}": v for k, v in _CHECKPOINT.items()},
        **_manifest("busy", "run_config.json", "checkpoint-1")}),
    "thesis/": ("the user's own folder: thesis.tex and chapters/", {
        "thesis/thesis.tex": "\\documentclass{article}\n", "thesis/chapters/one.tex": "x\n"}),
    "q-old/": ("an earlier `salientft quantize` output (its own manifest)", {
        "q-old/config.json": "{}", **_manifest("q-old", "config.json")}),
    "mine.json": ("a JSON file of the user's", {"mine.json": "{}\n"}),
    "r.samples.jsonl": ("a JSONL file of the user's, named like a samples file", {"r.samples.jsonl": "{}\n"}),
    "results.json": ("`salientft eval` results written without --log-samples", {
        "results.json": json.dumps({"results": {"piqa": {"acc": 0.5, "acc_norm": 0.5, "n": 2}}, "paper_avg": None})}),
    "bomb.yaml": ("a 342-byte config whose YAML aliases expand to 10^9 strings (a \"billion laughs\")",
                  {"bomb.yaml": _BOMB}),
    "typed.yaml": ("a config whose packing is `maybe`", {"typed.yaml": "packing: maybe\nlr: 2e-4\n"}),
    "int-output.yaml": ("a config whose output is the number 5", {"int-output.yaml": "output: 5\n"}),
    "frac-steps.yaml": ("a config whose max_steps is 2.5", {"frac-steps.yaml": "max_steps: 2.5\n"}),
    "long.jsonl": ("8 records whose prompts are 400 characters long",
                   {"long.jsonl": "".join(json.dumps({"prompt": "Tell me why. " * 31, "response": f"Because {i}."})
                                          + "\n" for i in range(8))}),
    "d.csv": ("a CSV file with prompt and response columns", {"d.csv": "prompt,response\nHi,Hello\n"}),
    "run-corrupt/": ("a run whose run_config.json is not JSON", {
        "run-corrupt/run_config.json": "{\"model\": \"tiny-",
        "run-corrupt/adapter/adapter_config.json": "{}",
        **{f"run-corrupt/{k}": v for k, v in _CHECKPOINT.items()}}),
}

# (what the user did, argv after `salientft`, a fragment of the message)
ROWS = [
    # one folder, one run
    ("trained a second run into the folder of a finished one", train("--method", "gift-sw", output="run-full"),
     "--output run-full already holds a run (metrics.json, model, run_config.json); continue it with --resume, "
     "replace it with --overwrite, or choose another --output"),
    ("--overwrite on a folder that also holds other files", train("--overwrite", output="notes"),
     "--overwrite: notes holds files salientft did not write (notes.txt), so nothing is written there"),
    ("--resume in a folder that also holds other files", train("--resume", output="notes"),
     "--resume: notes holds files salientft did not write (notes.txt)"),
    ("train into a folder of the user's own files", train(output="thesis"),
     "--output: thesis holds files salientft did not write (chapters, thesis.tex), so nothing is written there"),
    ("--overwrite a run written before salientft kept manifests", train("--overwrite", output="legacy"),
     "--overwrite: legacy was written by an older salientft that kept no list of its files, so nothing there is "
     "deleted; these look like a run's: adapter, checkpoint-1, metrics.json, run_config.json"),
    ("train into a folder another salientft process is writing", train("--resume", output="busy"),
     "--output busy is in use by another salientft process (PID"),
    ("--resume after the data file changed", train("--resume", output="run-data"),
     "data: d.jsonl changed since the run started (SHA-256 000000000000... ->"),
    ("--resume a finished run with a larger --max-steps but no checkpoint",
     train("--resume", "--method", "full", "--max-steps", "5", output="run-full"),
     "--resume: the run in run-full is finished (2 steps) and kept no checkpoint to continue from"),
    ("--resume with another learning rate", train("--resume", "--lr", "0.01", output="run-lr"),
     "--resume: the settings differ from the run in run-lr (run_config.json): lr: 0.001 -> 0.01. Resume with the "
     "run's settings (only --max-steps may grow, --lr be lowered, --dtype become fp32)"),
    ("--resume with a smaller --max-steps and another seed",
     ["train", *MODEL, "--data", "d.jsonl", "--output", "run-lr", "--max-steps", "1", "--seed", "3", "--lr", "0.001",
      "--resume"],
     "max_steps: 2 -> 1; seed: 0 -> 3"),
    ("--resume and --overwrite together", train("--resume", "--overwrite"),
     "argument --overwrite: not allowed with argument --resume"),
    ("--resume where no run was saved", train("--resume", output="new-run"),
     "--resume: no complete checkpoint-<step> folder in new-run"),
    ("--resume a run whose run_config.json is corrupt", train("--resume", output="run-corrupt"),
     "--resume: run-corrupt/run_config.json is corrupt (not valid JSON"),
    # output paths
    ("train --output is a file", train(output="a-file"), "--output a-file is a file; give a directory path"),
    ("train --output cannot be written", train(output="/proc/salientft-run"),
     "--output /proc/salientft-run cannot be written"),
    ("eval --output is a folder", ["eval", *MODEL, "--tasks", "boolq", "--output", "folder"],
     "--output folder is a directory; give a file path"),
    ("eval --output cannot be written", ["eval", *MODEL, "--tasks", "boolq", "--output", "/proc/results.json"],
     "--output /proc/results.json cannot be written"),
    ("calibrate --output is a folder", ["calibrate", *MODEL, "--output", "folder"],
     "--output folder is a directory; give a file path"),
    ("calibrate --plot cannot be written", ["calibrate", *MODEL, "--output", "s.safetensors", "--plot", "/proc/s.png"],
     "--plot /proc/s.png cannot be written"),
    ("calibrate --stats-output inside a file", ["calibrate", *MODEL, "--output", "s.safetensors",
                                                "--stats-output", "a-file/stats.safetensors"],
     "--stats-output a-file/stats.safetensors: a-file is a file, so no folder can be made inside it"),
    ("quantize --output is a file", ["quantize", *MODEL, "--bits", "4", "--output", "a-file"],
     "--output a-file is a file; give a directory path"),
    ("quantize --output is a folder of the user's", ["quantize", *MODEL, "--bits", "4", "--output", "thesis"],
     "--output thesis is not empty and salientft did not write it (no .salientft-manifest.json; it holds chapters, "
     "thesis.tex); nothing there is replaced"),
    ("quantize --output holds an earlier quantized model", ["quantize", *MODEL, "--bits", "4", "--output", "q-old"],
     "--output q-old holds an earlier output of salientft; replace it with --overwrite"),
    ("export --overwrite onto a folder of the user's", ["export", "run-full", "--format", "merged", "--output",
                                                         "thesis", "--overwrite"],
     "--output thesis is not empty and salientft did not write it"),
    ("eval --output names a file salientft did not write", ["eval", *MODEL, "--tasks", "boolq", "--output", "mine.json"],
     "--output mine.json already exists and salientft did not write it (it is not in .salientft-manifest.json)"),
    ("eval --log-samples would replace a file of the user's",
     ["eval", *MODEL, "--tasks", "boolq", "--output", "r.json", "--log-samples"],
     "--log-samples r.samples.jsonl already exists and salientft did not write it"),
    ("calibrate --output names a file salientft did not write", ["calibrate", *MODEL, "--output", "mine.json"],
     "--output mine.json already exists and salientft did not write it"),
    ("compare --plot names a file salientft did not write", ["compare", "results.json", "--plot", "mine.json"],
     "--plot mine.json already exists and salientft did not write it"),
    ("compare --plot is a folder", ["compare", "run-full", "--plot", "folder"],
     "--plot folder is a directory; give a file path"),
    # evaluation items and samples
    ("eval --log-samples without --output", ["eval", *MODEL, "--tasks", "boolq", "--log-samples"],
     "--log-samples writes <output stem>.samples.jsonl beside the results: give --output"),
    ("eval --limit and --subset together", ["eval", *MODEL, "--limit", "5", "--subset", "paper500"],
     "argument --subset: not allowed with argument --limit"),
    ("eval an unknown --subset", ["eval", *MODEL, "--subset", "paper1000"],
     "unknown subset 'paper1000'; valid subsets: paper500"),
    ("compare --plot-diffs of a run without its samples file", ["compare", "results.json", "--plot-diffs", "d.png"],
     "--plot-diffs needs two runs or more, each with its samples file; results has none (evaluate with salientft "
     "eval --log-samples"),
    # devices (the rows run as on a machine without a GPU)
    ("a misspelled --device", train("--device", "gpu"),
     "--device 'gpu' is not a device: use auto (CUDA if available, else CPU), cpu, cuda or cuda:N"),
    ("--device cuda on a machine without a GPU", ["eval", *MODEL, "--tasks", "boolq", "--device", "cuda"],
     "--device cuda: no CUDA device is available"),
    ("calibrate on a GPU the machine does not have", ["calibrate", *MODEL, "--output", "s.safetensors",
                                                      "--device", "cuda:1"],
     "--device cuda:1: no CUDA device is available"),
    ("export with a misspelled --device", ["export", "run-full", "--format", "merged", "--output", "m",
                                           "--device", "cuda0"], "--device 'cuda0' is not a device"),
    # data
    ("--data names a folder", train(data="folder"), "data file folder is a directory; pass a .jsonl file"),
    ("--data names a missing file that does not end in .jsonl", train(data="train.txt"),
     "data file train.txt does not exist; give an existing .jsonl file, 'embedded', or hf:NAME"),
    ("--data names a missing file in a folder", train(data="folder/train"), "data file folder/train does not exist"),
    ("--data is not UTF-8", train(data="latin1.jsonl"),
     "latin1.jsonl:9: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8"),
    ("--data has a line that is not JSON", train(data="broken.jsonl"), "broken.jsonl:9: invalid JSON"),
    ("a chat's assistant message is empty", train(data="empty-reply.jsonl"),
     "empty-reply.jsonl:1: message 1 (assistant) is empty (nothing to train on)"),
    ("a record's response is empty", train(data="empty-response.jsonl"),
     "empty-response.jsonl:1: 'response' is empty (nothing to train on)"),
    ("--data is a CSV file", train(data="d.csv"),
     "data file d.csv is CSV; salientft reads JSONL: one JSON object per line, with a \"messages\" list of "
     "{\"role\", \"content\"} turns or \"prompt\" and \"response\" strings"),
    ("every record's reply lies beyond --max-length", train("--max-length", "100", data="long.jsonl"),
     "no examples left: all 8 conversations lost their assistant tokens (max_length=100 too small, or the data is "
     "empty); --max-length 445 would keep the shortest of them"),
    # typed settings: config files and flags
    ("a config's bool is not a yes/no word", train("--config", "typed.yaml"),
     "--config typed.yaml: TrainConfig.packing must be true or false (true/yes/on/1 or false/no/off/0), got 'maybe'"),
    ("a config's output is a number", train("--config", "int-output.yaml", output=None),
     "--config int-output.yaml: TrainConfig.output must be a string, got 5"),
    ("a config's max_steps is fractional", ["train", *MODEL, "--data", "d.jsonl", "--config", "frac-steps.yaml"],
     "--config frac-steps.yaml: TrainConfig.max_steps must be an integer, got 2.5"),
    ("a config is a YAML alias bomb", train("--config", "bomb.yaml"),
     "--config bomb.yaml is refused: its aliases expand it to more than 10000 values; write the values out"),
    ("--max-steps is fractional", train("--max-steps", "2.5"), "argument --max-steps: invalid int value: '2.5'"),
    ("--lr is negative", train("--lr", "-1e-4"), "TrainConfig.lr must be positive, got -0.0001"),
    ("--lr is infinite", train("--lr", "inf"), "TrainConfig.lr must be a finite number or null, got inf"),
    ("--weight-decay is negative", train("--weight-decay", "-0.1"), "TrainConfig.weight_decay must be >= 0, got -0.1"),
    ("--max-grad-norm is negative", train("--max-grad-norm", "-1"), "TrainConfig.max_grad_norm must be >= 0, got -1.0"),
    ("--seed is negative", train("--seed", "-1"), "TrainConfig.seed must be >= 0 and <= 4294967295, got -1"),
    ("--lora-dropout is 1", train("--method", "lora", "--lora-dropout", "1"),
     "LoRAMethodConfig.lora_dropout must be >= 0 and < 1, got 1.0"),
    ("a misspelled --report-to", train("--report-to", "tensorbord"),
     "--report-to: unknown tracker 'tensorbord'; did you mean 'tensorboard'?"),
    ("--report-to names no tracker", train("--report-to", "json"), "--report-to: unknown tracker 'json'; valid: "),
    # checked on the model's config (its skeleton on the meta device), before the weights load
    ("--n-salient wider than the model's layers", train("--n-salient", "100000"),
     "n_salient=100000 is larger than model.layers.0.self_attn.q_proj's 64 input features"),
    ("--target-modules names no layer of the model", train("--target-modules", "qproj"),
     "target module 'qproj' matches no module in the model; linear layer names here: "),
    ("a --target-modules regex that matches nothing", train("--target-modules", "re:.*attention"),
     "target_modules regex '.*attention' matches no module name"),
    ("a --target-modules regex that is not one", train("--target-modules", "re:(q|k"),
     "target_modules regex '(q|k' is not a valid regular expression"),
    ("calibrate --n-salient wider than the layers", ["calibrate", *MODEL, "--n-salient", "100000", "--output", "s.st"],
     "n_salient=100000 is larger than model.layers.0.self_attn.q_proj's 64 input features"),
    ("quantize keeping every column in 16 bits", ["quantize", *MODEL, "--bits", "4", "--n-salient", "64",
                                                   "--output", "q4"],
     "64 salient columns for 'model.layers.0.self_attn.q_proj', which has only 64 input features: at least one "
     "column must be quantized"),
    ("calibrate --calib-samples 0", ["calibrate", *MODEL, "--calib-samples", "0", "--output", "s.st"],
     "CalibrateArgs.calib_samples must be a positive integer, got 0"),
    ("calibrate --tau of an unknown norm", ["calibrate", *MODEL, "--tau", "3", "--output", "s.st"],
     "tau must be 1, 2 or 'inf', got '3'"),
    ("quantize --group-size 0", ["quantize", *MODEL, "--bits", "4", "--group-size", "0", "--output", "q4"],
     "QuantizeConfig.group_size must be a positive integer or None, got 0"),
    # settings
    ("an unknown method", train("--method", "qlora"), "unknown method 'qlora'; choose from"),
    ("--salient-fraction above 1", train("--salient-fraction", "1.5"),
     "GiftSWMethodConfig.salient_fraction must be in (0, 1]"),
    ("--n-salient 0", train("--n-salient", "0"), "GiftSWMethodConfig.n_salient must be a positive integer, got 0"),
    ("--n-salient and --salient-fraction together", train("--n-salient", "4", "--salient-fraction", "0.1"),
     "give n_salient or salient_fraction, not both"),
    ("an unknown salience metric", train("--metric", "bogus"), "unknown salience metric 'bogus' (--metric)"),
    ("--scores names a missing file", train("--scores", "s.safetensors"),
     "--scores s.safetensors: no such file; give a scores file written by salientft calibrate"),
    ("a LoRA flag with gift-sw", train("--lora-r", "4"),
     "method 'gift-sw' does not use --lora-r; remove it (--lora-r applies to lora, dora)"),
    ("GIFT-SW flags with full fine-tuning", train("--method", "full", "--n-salient", "4", "--metric", "wanda"),
     "method 'full' does not use --n-salient, --metric; remove them"),
    ("--mask-ratio with lora", train("--method", "lora", "--mask-ratio", "0.5"),
     "method 'lora' does not use --mask-ratio (GMT's gradient mask); remove it (--mask-ratio applies to gift-sw, salient, full, gmt)"),
    ("--mask-granularity without a mask", train("--mask-granularity", "global"),
     "--mask-granularity applies only when a gradient mask runs; add --mask-ratio, or remove it"),
    ("--noise with the noise-free method", train("--method", "salient", "--noise", "weight"),
     "method 'salient' is GIFT-SW without noise; use --method gift-sw --noise weight"),
    ("--noise with lora", train("--method", "lora", "--noise", "weight"),
     "method 'lora' does not use --noise; remove it (--noise applies to gift-sw, salient, full, gmt)"),
    ("--noise-bits with full fine-tuning but no noise", train("--method", "full", "--noise-bits", "3"),
     "method 'full' reads --noise-bits only with GIFT-SW's noise; add --noise weight, or remove it"),
    ("--quantized names a missing folder", train("--quantized", "q4"),
     "--quantized q4: no such folder; give a folder written by salientft quantize"),
    ("--max-steps 0", train("--max-steps", "0"), "TrainConfig.max_steps must be positive (or -1 to use epochs)"),
    ("--config names a missing file", train("--config", "missing.yaml"), "--config missing.yaml: no such file"),
    ("--config has an unknown field", train("--config", "bad.yaml"),
     "--config bad.yaml: TrainConfig: unknown field(s) bogus_field"),
    ("eval of a run whose run_config.json is corrupt", ["eval", "--model", "run-corrupt", "--tasks", "boolq"],
     "run-corrupt/run_config.json is corrupt (not valid JSON"),
]


def make_files(folder: Path) -> None:
    for _, files in FILES.values():
        for rel, content in files.items():
            p = folder / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)


def snapshot(folder: Path) -> dict:
    """Every file and folder below ``folder``; a file with its size and modification time."""
    return {str(p.relative_to(folder)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    from salientft.outputs import FolderLock

    make_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    busy = FolderLock(tmp_path / "busy").acquire()  # as a training process would, for the run's life

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded before the input was refused")

    import salientft.models
    import salientft.train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same messages on a GPU machine
    monkeypatch.setattr(salientft.models, "load_model", no_model)
    monkeypatch.setattr(salientft.train, "load_model", no_model)
    yield tmp_path
    busy.release()


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from salientft.cli import main

    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("what, argv, fragment", ROWS, ids=[r[0] for r in ROWS])
def test_refused(workdir, capsys, what, argv, fragment):
    before = snapshot(workdir)
    rc, err = run_cli(argv, capsys)
    assert rc == 2, err
    assert fragment in err, err
    # one line, not a traceback (argparse's refusals come after its usage lines)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, err
    assert snapshot(workdir) == before  # nothing written


def page() -> str:
    """docs/troubleshooting.md, from FILES and ROWS."""

    def code(text: str) -> str:
        return "`" + text.replace("|", "\\|") + "`"

    lines = [
        "# Troubleshooting: refused inputs",
        "",
        "Every input below is refused with one line on stderr that names the input and the fix, exit code 2, "
        "and nothing written; all of them are found before a model loads. A training run that stops later "
        "(a non-finite loss, a checkpoint or output that cannot be written because the disk is full or failed) "
        "exits with code 3 and names its last good checkpoint, from which `--resume` continues; Ctrl-C (SIGINT) "
        "and SIGTERM save a checkpoint at the next step boundary and exit with code 130 / 143.",
        "",
        "No command replaces or deletes what salientft did not write: each folder it writes into keeps a "
        "manifest, `.salientft-manifest.json`, of the files and folders salientft wrote there, and `--overwrite` "
        "removes only those (see the README's \"One output folder, one run\").",
        "",
        "This page is generated from `tests/test_refusals.py`, whose tests run each command and check its "
        "message; after changing a row there, regenerate it with `python tests/test_refusals.py --write`.",
        "",
        "The commands run in a folder holding:",
        "",
        *[f"- `{name}`: {what}" for name, (what, _) in FILES.items()],
        "",
        "| what you did | command | the message says (excerpt) |",
        "|---|---|---|",
    ]
    for what, argv, fragment in ROWS:
        command = " ".join(a if a and " " not in a else json.dumps(a) for a in argv)
        lines.append(f"| {what.replace('|', '/')} | {code('salientft ' + command)} | {code(fragment)} |")
    return "\n".join(lines) + "\n"


def test_troubleshooting_page_is_current():
    assert PAGE.read_text() == page(), "docs/troubleshooting.md is stale: run python tests/test_refusals.py --write"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_refusals.py --write   (regenerates docs/troubleshooting.md)")
    PAGE.write_text(page())
    print(f"wrote {PAGE}")
