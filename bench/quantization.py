"""Mixed-precision quantization on the embedded SmolLM2-135M: held-out perplexity and memory.

For each bit width: RTN with the salient columns kept, GPTQ without salient columns, GPTQ with
salient columns (all 16-bit columns chosen by the GIFT metric at the same bit width).
Also plain RTN (no salient columns). Calibration: BoolQ passages and HellaSwag contexts
(embedded); held-out text: SciQ support paragraphs (disjoint sources). Writes docs/results/quantization.{json,md,png}.

    .venv/bin/python bench/quantization.py            # 4/3/2 bits, every block, 32 x 512 calibration
    .venv/bin/python bench/quantization.py --quick    # 3 bits, first 2 blocks only, 16 x 256 (< 5 min idle)
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from salientft._io import atomic_path, write_json  # noqa: E402
from salientft.calibration import calibration_batches  # noqa: E402
from salientft.data.embedded import read_records  # noqa: E402
from salientft.models import load_model  # noqa: E402
from salientft.quant.model import model_bytes, quantize, target_bytes  # noqa: E402

METHODS = {  # name -> (method, salient fraction)
    "rtn": ("rtn", 0.0),
    "rtn+salient": ("rtn", None),
    "gptq": ("gptq", 0.0),
    "gptq+salient": ("gptq", None),
}


def heldout_ids(tok, n_tokens: int, seq_len: int) -> torch.Tensor:
    texts = [r["support"] for r in read_records("sciq") if r.get("support")]
    ids: list[int] = []
    for t in reversed(texts):  # from the end of the file: stable and away from any calibration use
        ids += tok(t.strip()).input_ids + [tok.eos_token_id]
        if len(ids) >= n_tokens:
            break
    n = (min(len(ids), n_tokens) // seq_len) * seq_len
    return torch.tensor(ids[:n]).view(-1, seq_len)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    nll, count = 0.0, 0
    for b in range(0, ids.shape[0], batch_size):
        x = ids[b : b + batch_size]
        loss = model(input_ids=x, labels=x).loss
        n = x.shape[0] * (x.shape[1] - 1)
        nll += float(loss) * n
        count += n
    return math.exp(nll / count)


def calibration_texts() -> list[str]:
    docs = [r.get("passage") or "" for r in read_records("boolq")]
    docs += [r.get("ctx") or "" for r in read_records("hellaswag")]
    return [d.strip() for d in docs if d and d.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 bits, first 2 blocks, small calibration (< 5 min)")
    p.add_argument("--bits", type=int, nargs="+", default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--eval-tokens", type=int, default=None)
    p.add_argument("--salient-fraction", type=float, default=128 / 4096)
    p.add_argument("--blocks", type=int, default=None, help="quantize only the first N blocks")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "quantization"))
    args = p.parse_args(argv)
    quick = args.quick
    bits_list = args.bits or ([3] if quick else [4, 3, 2])
    samples = args.samples or (16 if quick else 32)
    seq_len = args.seq_len or (256 if quick else 512)
    eval_tokens = args.eval_tokens or (1024 if quick else 8192)
    blocks = args.blocks if args.blocks is not None else (2 if quick else None)
    targets = None if blocks is None else rf"model\.layers\.({'|'.join(map(str, range(blocks)))})\..*proj"
    torch.manual_seed(0)

    model, tok = load_model("smollm2-135m", dtype="bf16")
    ids = heldout_ids(tok, eval_tokens, 256)
    calib = calibration_batches(tok, calibration_texts(), samples, seq_len, 8, seed=0)
    t0 = time.time()
    base = {"ppl": perplexity(model, ids), "target_bytes": target_bytes(model, targets),
            "model_bytes": model_bytes(model)}
    print(f"bf16: ppl {base['ppl']:.3f}", flush=True)
    rows = []
    for bits in bits_list:
        for name in args.methods:
            method, frac = METHODS[name]
            model, _ = load_model("smollm2-135m", dtype="bf16")
            t = time.time()
            quantize(model, bits, salient_fraction=args.salient_fraction if frac is None else frac, method=method,
                     calibration=calib, target_modules=targets, progress=False)
            dt = time.time() - t
            row = {"bits": bits, "method": name, "ppl": perplexity(model, ids), "seconds": round(dt, 1),
                   "target_bytes": target_bytes(model), "model_bytes": model_bytes(model)}
            rows.append(row)
            print(f"{bits}-bit {name:13s} ppl {row['ppl']:.3f}  target {row['target_bytes'] / 2**20:.2f} MiB  "
                  f"({dt:.0f} s)", flush=True)
            del model
    result = {
        "model": "smollm2-135m (embedded, bf16)",
        "command": "bench/quantization.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "salient_fraction": args.salient_fraction, "metric": "gift", "calibration": {
            "data": "boolq passages + hellaswag contexts (embedded)", "samples": samples, "seq_len": seq_len},
        "heldout": {"data": "sciq support paragraphs (embedded)", "tokens": int(ids.numel()), "window": 256},
        "blocks_quantized": blocks or "all",
        "baseline": base, "rows": rows, "total_seconds": round(time.time() - t0, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    write_markdown(out.with_suffix(".md"), result)
    plot(out.with_suffix(".png"), result)
    print(f"wrote {out}.json/.md/.png")
    return 0


def write_markdown(path: Path, r: dict) -> None:
    mb = 2 ** 20
    lines = [
        f"# Quantization of {r['model']}",
        "",
        f"Command: `.venv/bin/python {r['command']}`. Salient columns: fraction {r['salient_fraction']:.4f} "
        f"of in_features per layer, GIFT metric; calibration {r['calibration']['samples']} x "
        f"{r['calibration']['seq_len']} tokens ({r['calibration']['data']}); held-out perplexity on "
        f"{r['heldout']['tokens']} tokens of {r['heldout']['data']}; blocks quantized: {r['blocks_quantized']}.",
        "",
        f"bf16 baseline: perplexity {r['baseline']['ppl']:.3f}, target layers {r['baseline']['target_bytes'] / mb:.2f} MiB, "
        f"whole model {r['baseline']['model_bytes'] / mb:.2f} MiB.",
        "",
        "| bits | method | perplexity | target layers (MiB) | whole model (MiB) | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['bits']} | {row['method']} | {row['ppl']:.3f} | {row['target_bytes'] / mb:.2f} | "
                     f"{row['model_bytes'] / mb:.2f} | {row['seconds']} |")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def plot(path: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bits = sorted({row["bits"] for row in r["rows"]}, reverse=True)
    for name in METHODS:
        pts = [(row["bits"], row["ppl"]) for row in r["rows"] if row["method"] == name]
        if pts:
            xs, ys = zip(*sorted(pts, reverse=True))
            ax.plot(xs, ys, marker="o", label=name)
    ax.axhline(r["baseline"]["ppl"], color="gray", ls="--", label="bf16")
    ax.set_xticks(bits)
    ax.invert_xaxis()
    ax.set_yscale("log")
    ax.set_xlabel("bits")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M weight-only quantization")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
