"""bench/memory_at_scale.py's accounting, on tiny shapes (seconds): fake tensors count what real
ones do, peaks are affine in tokens, per block x layers + fixed parts gives a whole model's peak,
and the fit decision picks the right setup."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import memory_at_scale as mas  # noqa: E402

PHASES = ["load", "gift-sw output noise", "qlora (4-bit lora)"]  # with their +ckpt variants


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    threads = torch.get_num_threads()
    try:
        assert mas.main(["--smoke", "--only", *PHASES, "--out", str(out), "--doc", str(out / "scale.md")]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "scale.json").read_text())


def test_fake_counts_equal_real_counts(smoke):
    _, res = smoke
    assert {"load", "gift-sw output noise", "qlora (4-bit lora) +ckpt"} <= set(res["verify"])
    for name, v in res["verify"].items():
        assert abs(v["fake_peak"] - v["real_peak"]) <= mas.VERIFY_TOLERANCE, name
    assert not res["failed"]


def test_peaks_are_affine_in_tokens(smoke):
    _, res = smoke
    model = res["models"]["tiny"]
    for name, row in model["plan"].items():
        top = max(x["peak"] for per_l in model["measured"][name].values() for x in per_l.values())
        for part in ("fixed", "block"):
            res_bytes = row["model"][part]["max_residual"]
            if name.endswith("+ckpt"):
                # with checkpointing the peak moves between a block's recompute and the loss: the max
                # of two affine functions (measured: up to 8 KiB of ~0.6 MB on tiny shapes)
                assert res_bytes <= 0.02 * top, (name, part, row["model"][part])
            else:
                # exact up to a few small tensors (measured: 0 to 256 B); a quadratic term (an
                # attention matrix) would leave tens of KiB at these token counts
                assert res_bytes <= 1024, (name, part, row["model"][part])


def test_per_block_times_layers_predicts_the_whole_model(smoke):
    _, res = smoke
    check = res["whole_model_check"]
    assert check["layers"] == 4 and check["phases"]
    for name, x in check["phases"].items():
        # a whole 4-layer model measured on real tensors against fixed + 4 x block from 1 and 2 blocks
        assert abs(x["rel_error"]) <= 0.01, (name, x)


def test_report_renders_from_the_json(smoke):
    out, res = smoke
    text = (out / "scale.md").read_text()
    assert mas.BEGIN in text and mas.END in text and "### tiny" in text
    mas.render(res, out / "scale.md")  # again: the generated part is replaced, not appended
    assert (out / "scale.md").read_text().count(mas.BEGIN) == 1
    assert (out / "scale.png").stat().st_size > 0


def test_the_fit_decision():
    gib = 2**30
    assert mas.smallest_setup(lambda n: 30 * gib) == "1 x 40 GB"
    assert mas.smallest_setup(lambda n: 20 * gib) == "1 x 24 GB"
    assert mas.smallest_setup(lambda n: 23 * gib) == "1 x 40 GB"  # above 90 % of 24 GiB
    assert mas.smallest_setup(lambda n: 100 * gib / n) == "2 x 80 GB"  # 50 GiB per GPU; 4 x 40 has the same total, fewer GPUs first
    assert mas.smallest_setup(lambda n: math.inf) is None
    model = {"fixed": {"intercept": 10.0, "slope": 1.0}, "block": {"intercept": 100.0, "slope": 2.0},
             "state_after": {"fixed": 8.0, "block": 80.0}, "resident": {"fixed": 8.0, "block": 40.0}}
    assert mas.predict(model, 3, 5) == 10 + 5 + 3 * (100 + 10)
    # sharded state over 4 GPUs, the rest whole, two gathered blocks of weights
    total, state = mas.predict(model, 3, 5), 8 + 3 * 80
    assert mas.per_device(model, 3, 5, 4) == state / 4 + (total - state) + 2 * 40
