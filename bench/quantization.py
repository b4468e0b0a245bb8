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

import sys

import _suite as S
# the quantization steps are in _suite.py: recovery.py and quantize_order.py start from these models
from _suite import (QUANT, SALIENT_FRACTION, QuantSetting, calibration_texts, ensure_saved,  # noqa: F401
                    measure_quantized, quantize_one, saved_dir, spec_for, text_ids, text_perplexity)

METHODS = S.QUANT_METHODS  # name -> (method, keep salient columns)
parse_args = S.quant_args


def main(argv=None) -> int:
    args, preset, out, qs, runs = parse_args(__doc__, argv, part="quantization")
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
    S.write_report(out, "quantization", result, markdown(result), lambda: plot(result), preset=preset)
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
    prints = [f"{row['bits']} bits {row['method']} `{row['fingerprint']}`" for row in r["rows"] if row.get("fingerprint")]
    if prints:  # bench/recovery.py and bench/quant_threads.py record the same for the models they start from
        lines += ["", "Quantized models (salientft.quant.fingerprint): " + "; ".join(prints) + "."]
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
