"""Mixed-precision quantization of the embedded SmolLM2-135M: quality and memory at 4, 3 and 2 bits.

For each bit width: RTN, RTN with the salient columns kept in 16 bits, GPTQ without salient
columns, GPTQ with salient columns (docs/methods.md#quantization-recovery; 3.1 % of the columns of every layer, chosen
by the GIFT metric at the same bit width). Every model is measured three ways: perplexity on
held-out text (SciQ support paragraphs, a source used neither for calibration nor for training),
perplexity on the held-out chats of the instruction mix, and the paper's six-task average; plus
its size. Calibration: BoolQ passages and HellaSwag contexts (embedded). Each finished
configuration is cached like every other run of the suite (bench/_suite.py); the GPTQ +
salient models are also saved, for bench/recovery.py.

    .venv/bin/python bench/quantization.py           # 4/3/2 bits x 4 methods (about 35 min), docs/results/quantization.*
    .venv/bin/python bench/quantization.py --quick   # 3 bits, RTN/GPTQ + salient
    .venv/bin/python bench/quantization.py --smoke --out /tmp/q   # tiny random model (CI)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import _suite as S

METHODS = {  # name -> (method, keep salient columns)
    "rtn": ("rtn", False),
    "rtn+salient": ("rtn", True),
    "gptq": ("gptq", False),
    "gptq+salient": ("gptq", True),
}
SALIENT_FRACTION = 128 / 4096


@dataclass(frozen=True)
class QuantSetting:
    bits: tuple[int, ...]
    methods: tuple[str, ...]
    samples: int
    seq_len: int
    text_tokens: int


QUANT = {
    "full": QuantSetting((4, 3, 2), tuple(METHODS), samples=32, seq_len=512, text_tokens=8192),
    "quick": QuantSetting((3,), ("rtn+salient", "gptq+salient"), samples=16, seq_len=256, text_tokens=2048),
    "smoke": QuantSetting((3,), tuple(METHODS), samples=4, seq_len=64, text_tokens=512),
    # the 500-item refresh: the start points of recovery (and of train-then-quantize), measured on the subset
    "paper500": QuantSetting((4, 3, 2), ("gptq+salient",), samples=32, seq_len=512, text_tokens=8192),
}


def records(name: str) -> list[dict]:
    from salientft.data.embedded import read_records

    return read_records(name)


def calibration_texts() -> list[str]:
    docs = [r.get("passage") or "" for r in records("boolq")] + [r.get("ctx") or "" for r in records("hellaswag")]
    return [d.strip() for d in docs if d and d.strip()]


def text_ids(tok, n_tokens: int, window: int = 256):
    """Held-out text: SciQ support paragraphs from the end of the file, cut into windows."""
    import torch

    texts = [r["support"] for r in records("sciq") if r.get("support")]
    ids: list[int] = []
    for t in reversed(texts):
        ids += tok(t.strip()).input_ids + [tok.eos_token_id]
        if len(ids) >= n_tokens:
            break
    n = (min(len(ids), n_tokens) // window) * window
    return torch.tensor(ids[:n]).view(-1, window)


def text_perplexity(model, ids, batch_size: int = 4) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, ids.shape[0], batch_size):
            x = ids[b : b + batch_size]
            n = x.shape[0] * (x.shape[1] - 1)
            nll += float(model(input_ids=x, labels=x).loss) * n
            count += n
    return math.exp(nll / count)


def spec_for(qs: QuantSetting, name: str, bits: int) -> dict:
    return {"part": "quantize", "method": name, "bits": bits, "salient_fraction": SALIENT_FRACTION,
            "samples": qs.samples, "seq_len": qs.seq_len, "text_tokens": qs.text_tokens}


def saved_dir(preset: S.Preset, qs: QuantSetting, bits: int) -> Path:
    """Where the GPTQ + salient model at ``bits`` is kept (salientft's cache; outside the repo)."""
    from salientft.models import cache_dir

    return cache_dir() / "bench" / f"{preset.name}-gptq+salient-{S.run_key(preset, spec_for(qs, 'gptq+salient', bits))}"


def quantize_one(preset: S.Preset, qs: QuantSetting, name: str, bits: int, save: Path | None = None) -> dict:
    """Quantize the bf16 model with one configuration and measure it (and save it if asked)."""
    import torch

    from salientft.calibration import calibration_batches
    from salientft.models import load_model
    from salientft.quant.model import model_bytes, quantize, save_quantized, target_bytes

    torch.manual_seed(0)
    model, tok = load_model(preset.model, dtype="bf16")
    before = {"target_bytes": target_bytes(model), "model_bytes": model_bytes(model)}
    if name == "bf16":
        seconds = 0.0
    else:
        method, salient = METHODS[name]
        calib = calibration_batches(tok, calibration_texts(), qs.samples, qs.seq_len, 8, seed=0)
        t = time.time()
        quantize(model, bits, salient_fraction=SALIENT_FRACTION if salient else 0.0, method=method,
                 calibration=calib, progress=True)
        seconds = time.time() - t
        if save is not None:
            save_quantized(model, save, tokenizer=tok, base_model=preset.model)
    return {"method": name, "bf16": before, **measure_quantized(model, tok, preset, qs, bits, seconds)}


def measure_quantized(model, tok, preset: S.Preset, qs: QuantSetting, bits: int, seconds: float) -> dict:
    """What every quantized model of the suite reports: bits, time, text perplexity, sizes, and
    train()'s measurements (held-out loss, six-task evaluation)."""
    from salientft.quant.model import model_bytes, target_bytes

    return {"bits": bits, "quantize_seconds": round(seconds, 1),
            "text_ppl": text_perplexity(model, text_ids(tok, qs.text_tokens)),
            "target_bytes": target_bytes(model), "model_bytes": model_bytes(model), **S.model_metrics(model, tok, preset)}


def parse_args(doc: str, argv=None):
    """(args, preset, out, quant setting, runs) of a quantization part (--bits and the suite's flags)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    S.add_common_args(p)
    p.add_argument("--bits", type=int, nargs="+", default=None)
    args = p.parse_args(argv)
    preset, out = S.resolve(args)
    return args, preset, out, QUANT[preset.name], S.Runs(preset, out, args.max_minutes)


def ensure_saved(runs: S.Runs, qs: QuantSetting, bits: int) -> Path:
    """The saved GPTQ + salient model at ``bits``, quantizing it again if it is not on disk."""
    path = saved_dir(runs.preset, qs, bits)
    if not (path / "quantization_config.json").is_file():
        S.log.info("quantizing gptq+salient at %d bits for recovery (not on disk: %s)", bits, path)
        quantize_one(runs.preset, qs, "gptq+salient", bits, save=path)
    return path


def main(argv=None) -> int:
    args, preset, out, qs, runs = parse_args(__doc__, argv)
    base = runs.get(spec_for(qs, "bf16", 16), lambda: quantize_one(preset, qs, "bf16", 16))
    rows = []
    for bits in args.bits or qs.bits:
        for name in qs.methods:
            save = saved_dir(preset, qs, bits) if name == "gptq+salient" else None
            rec = runs.get(spec_for(qs, name, bits), lambda: quantize_one(preset, qs, name, bits, save))
            if rec is not None:
                rows.append(rec["result"])
    command = S.report_command("quantization.py", argv)
    result = {"preset": preset.name, "settings": {**S.asdict(preset), **S.asdict(qs)}, "command": command,
              "salient_fraction": SALIENT_FRACTION, "base": None if base is None else base["result"],
              "rows": rows, "incomplete": runs.skipped, "machine": S.machine()}
    S.write_report(out, "quantization", result, markdown(result), lambda: plot(result))
    return 0


def markdown(r: dict) -> list[str]:
    mb = 2 ** 20
    st = r["settings"]
    lines = ["# Mixed-precision quantization (bench/quantization.py)", "",
             f"Command: `.venv/bin/python {r['command']}`. Model {st['model']} in bf16; weight-only, symmetric, per "
             f"output row, no groups; salient columns: {r['salient_fraction']:.4f} of each layer's inputs (GIFT metric). "
             f"Calibration {st['samples']} x {st['seq_len']} tokens (BoolQ passages + HellaSwag contexts). Text ppl: "
             f"{st['text_tokens']} tokens of SciQ support paragraphs; chat ppl: 200 held-out chats of the instruction "
             f"mix; six-task average on {'the fixed ' + st['eval_subset'] + ' subset' if st.get('eval_subset') else 'the first ' + str(st['eval_limit']) + ' items'} of each task (in %).", ""]
    if r["incomplete"]:
        lines += [f"**Incomplete**: {len(r['incomplete'])} configuration(s) not yet run; rerun to continue.", ""]
    lines += ["| bits | method | text ppl | chat ppl | six-task avg | target layers (MiB) | whole model (MiB) | quantize (s) |",
              "|---|---|---|---|---|---|---|---|"]
    rows = ([r["base"]] if r["base"] else []) + r["rows"]
    for row in rows:
        lines.append(f"| {row['bits']} | {row['method']} | {row['text_ppl']:.2f} | {S.ppl(row['heldout_loss_after']):.3f} | "
                     f"{S.fmt(row['paper_avg'], scale=100)} | {row['target_bytes'] / mb:.1f} | {row['model_bytes'] / mb:.1f} | "
                     f"{row['quantize_seconds']} |")
    lines += ["", "![quantization](quantization.png)"]
    return lines


def plot(r: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label, log in ((axes[0], "text_ppl", "held-out text perplexity (log)", True),
                                (axes[1], "heldout_loss_after", "held-out chat perplexity (log)", True),
                                (axes[2], "paper_avg", "six-task average (%)", False)):
        def value(row):
            return S.ppl(row[key]) if key == "heldout_loss_after" else (row[key] * 100 if key == "paper_avg" else row[key])
        for name in METHODS:
            pts = sorted(((row["bits"], value(row)) for row in r["rows"] if row["method"] == name), reverse=True)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=name)
        if r["base"]:
            ax.axhline(value(r["base"]), color="gray", ls="--", label="bf16")
        bits = sorted({row["bits"] for row in r["rows"]}, reverse=True)
        ax.set_xticks(bits)
        ax.invert_xaxis()
        if log:
            S.log_axis(ax)
        ax.set_xlabel("bits")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{r['settings']['model']}: weight-only quantization with and without 16-bit salient columns")
    return fig


if __name__ == "__main__":
    sys.exit(main())
