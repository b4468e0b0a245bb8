"""The ``salientft`` command: argument parsing only; every command calls the public API.

Each subcommand has one ``_add_<name>(sub)`` function that declares its flags and a handler
``_run_<name>(args)`` that calls the library.
"""
from __future__ import annotations

import argparse
import logging
import sys


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="salientft", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn in sorted(globals().items()):
        if name.startswith("_add_") and callable(fn):
            fn(sub)
    return p


# --------------------------------------------------------------------------- train

_FLAG_TYPES = {"str": str, "int": int, "float": float}


def _config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field (--kebab-case); unset flags stay absent so YAML values survive."""
    import dataclasses

    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        ann = str(f.type)
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"(default: {f.default!r})"}
        if ann == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif ann.startswith("list[str]"):
            parser.add_argument(flag, type=_list_or_regex, metavar="NAMES", **kw)
        else:
            base = ann.split("|")[0].strip()
            parser.add_argument(flag, type=_FLAG_TYPES.get(base, str), **kw)


def _list_or_regex(text: str):
    """'q_proj,v_proj' -> a list of names; 're:<pattern>' -> a regular expression."""
    if text.startswith("re:"):
        return text[3:]
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_train(sub) -> None:
    from .config import TrainConfig

    p = sub.add_parser("train", help="fine-tune a model (gift-sw, salient, gmt, full, lora, dora; ste on a quantized model)",
                       description="Fine-tune a model. Every config field is a flag; flags win over --config.")
    p.add_argument("--config", help="YAML (or JSON) file with TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --output")
    _config_flags(p, TrainConfig)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .train import NonFiniteLossError, format_summary, resolve_train_config, train

    flags = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "func", "command", "verbose")}
    config = resolve_train_config(args.config, flags)
    try:
        result = train(config, resume=args.resume)
    except NonFiniteLossError as e:
        print(f"salientft train: stopped: {e}", file=sys.stderr)
        return 3
    print(format_summary(result, config.output))
    return 0


def _add_calibrate(sub) -> None:
    from .saliency import METRICS

    p = sub.add_parser("calibrate", help="score every target layer's input columns (salience)",
                       description="Run calibration data through a model and write per-column salience "
                                   "scores (safetensors) and optionally a PNG summary.")
    p.add_argument("--model", default="smollm2-135m", help="preset (smollm2-135m, tiny-random-llama), folder or hub id")
    p.add_argument("--data", default="embedded", help="'embedded', a .txt/.jsonl file, or a Hugging Face dataset name")
    p.add_argument("--metric", default="gift", choices=METRICS)
    p.add_argument("--samples", type=int, default=128, help="number of calibration samples")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bits", type=int, default=4, help="quantizer bits for D = W - Q(W)")
    p.add_argument("--tau", default=None, help="weight-error norm: 1, 2 or inf (gift/gift-g2 only)")
    p.add_argument("--rho", default=None, help="activation norm: 1, 2 or inf (gift/gift-g2 only)")
    p.add_argument("--gamma", type=float, default=None, help="activation exponent: 0.5, 1 or 2 (gift/gift-g2 only)")
    k = p.add_mutually_exclusive_group()
    k.add_argument("--n-salient", type=int, default=None, help="k columns per layer (for the plot and metadata)")
    k.add_argument("--salient-fraction", type=float, default=None, help="k as a fraction of in_features")
    p.add_argument("--target-modules", type=_list_or_regex, default=None, help="'q_proj,v_proj' or 're:<regex>'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="scores file (.safetensors)")
    p.add_argument("--stats-output", default=None, help="also save the activation statistics (.safetensors)")
    p.add_argument("--plot", default=None, help="PNG summary of the scores")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args) -> int:
    from .calibration import calibrate
    from .models import load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    scores = calibrate(
        model, tok, args.data, metric=args.metric, bits=args.bits, tau=args.tau, rho=args.rho, gamma=args.gamma,
        n_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
        target_modules=args.target_modules, n_salient=args.n_salient, salient_fraction=args.salient_fraction,
        output=args.output, plot=args.plot, stats_output=args.stats_output,
        metadata={"model": args.model, "dtype": args.dtype},
    )
    print(f"wrote {args.metric} scores of {len(scores)} layers to {args.output}"
          + (f" and a plot to {args.plot}" if args.plot else ""))
    return 0


def _add_quantize(sub) -> None:
    from .saliency import METRICS

    p = sub.add_parser("quantize", help="quantize to 2-8 bits keeping the salient columns in 16 bits (GPTQ or RTN)",
                       description="Weight-only symmetric quantization of every target layer; the k salient "
                                   "columns stay 16-bit (METHODS.md 1.6). Writes a folder load_quantized() reads.")
    p.add_argument("--model", default="smollm2-135m", help="preset (smollm2-135m, tiny-random-llama), folder or hub id")
    p.add_argument("--bits", type=int, required=True, help="2, 3, 4 or 8")
    k = p.add_mutually_exclusive_group()
    k.add_argument("--n-salient", type=int, default=None, help="16-bit columns per layer (0: none)")
    k.add_argument("--salient-fraction", type=float, default=None, help="k as a fraction of in_features (0: none)")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    p.add_argument("--group-size", type=int, default=None, help="scale per group of columns (default: per row)")
    p.add_argument("--metric", default="gift", choices=METRICS, help="salience metric (see salientft calibrate)")
    p.add_argument("--scores", default=None, help="precomputed scores file from salientft calibrate")
    p.add_argument("--data", default="embedded", help="calibration data: 'embedded', a .txt/.jsonl file or a dataset name")
    p.add_argument("--samples", type=int, default=128, help="number of calibration samples")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--target-modules", type=_list_or_regex, default=None, help="'q_proj,v_proj' or 're:<regex>'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--output", required=True, help="output folder")
    p.set_defaults(func=_run_quantize)


def _run_quantize(args) -> int:
    import json

    from .quant.model import quantize_pretrained

    s = quantize_pretrained(
        args.model, args.output, args.bits, n_salient=args.n_salient, salient_fraction=args.salient_fraction,
        method=args.method, group_size=args.group_size, metric=args.metric, data=args.data,
        n_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
        dtype=args.dtype, scores_path=args.scores, target_modules=args.target_modules,
        progress=not args.no_progress,
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
    p.add_argument("--limit", type=int, help="first N items of each task (as lm-eval's --limit)")
    p.add_argument("--batch-size", type=int, default=16, help="items per forward pass (default 16)")
    p.add_argument("--output", help="write results JSON here (atomically)")
    p.add_argument("--backend", choices=("native", "lm-eval"), default="native",
                   help="native (fast) or lm-eval (cross-check; needs requirements/lmeval.txt)")
    p.add_argument("--perplexity", metavar="FILE|heldout",
                   help="also report perplexity on a text file or the held-out instruction split")
    p.add_argument("--ppl-max-length", type=int, default=1024, help="perplexity window (default 1024)")
    p.add_argument("--ppl-stride", type=int, help="perplexity stride (default: half the window)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="model dtype (default bf16)")
    p.add_argument("--logprob-dtype", choices=("model", "float32"), default="model",
                   help="'model' sums log-probs in the model dtype like lm-eval's HFLM default; 'float32' is exact")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from .evaluation import results_markdown, run_eval

    report = run_eval(
        args.model, args.tasks, adapter=args.adapter, limit=args.limit, batch_size=args.batch_size,
        output=args.output, backend=args.backend, perplexity_source=args.perplexity,
        ppl_max_length=args.ppl_max_length, ppl_stride=args.ppl_stride, dtype=args.dtype,
        logprob_dtype=args.logprob_dtype, progress=not args.no_progress,
    )
    if report["results"]:
        print(results_markdown(report))
    if "perplexity" in report:
        pp = report["perplexity"]
        print(f"perplexity ({pp['source']}): {pp['perplexity']:.3f} over {pp['tokens']} tokens")
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="side-by-side table (and bar chart) of several runs' eval results",
                       description="Each RUN is a run directory (eval_after.json / results.json / "
                                   "eval_before.json, metrics.json) or a results JSON file.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories or results JSON files")
    p.add_argument("--plot", help="write a grouped bar chart PNG here")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    from .evaluation import compare_runs

    out = compare_runs(args.runs, plot=args.plot)
    print(out["table"])
    if args.plot:
        print(f"wrote {out['plot']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, NotADirectoryError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"salientft {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
