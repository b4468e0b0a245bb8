"""bench/memory_at_scale.py's accounting, on tiny shapes (seconds): fake tensors count what real
ones do, peaks are affine in tokens, per block x layers + fixed parts gives a whole model's peak,
and the fit decision picks the right setup."""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import memory_at_scale as mas  # noqa: E402

# with their +ckpt variants; "checkpoint": the FSDP saves
PHASES = ["load", "gift-sw output noise", "qlora (4-bit lora)", "checkpoint", "calibration, block by block",
          "gptq 4-bit, block by block"]


@contextlib.contextmanager
def accelerator_paths_undone():
    """``mas.accelerator_paths()`` (GMT's device engine, torch's noise generator) for the block only:
    the switches and the environment variable are put back, so later tests see the defaults."""
    import salientft.gmt.strategies as strategies
    import salientft.ops.noise as noise

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(strategies, "_HOST_ENGINE_DEVICES", strategies._HOST_ENGINE_DEVICES)
        mp.setattr(noise, "_HOST_NOISE_DEVICES", noise._HOST_NOISE_DEVICES)
        mp.delenv("SALIENTFT_NOISE_GENERATOR", raising=False)
        mas.accelerator_paths()
        yield


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    threads = torch.get_num_threads()
    try:
        with accelerator_paths_undone():
            assert mas.main(["--smoke", "--only", *PHASES, "--out", str(out)]) == 0
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


def test_report_is_written_with_its_provenance_and_tables(smoke):
    out, res = smoke
    text = (out / "scale.md").read_text()
    assert "## tiny" in text and "## Checkpoints under FSDP2" in text and "Provenance: commit" in text
    assert res["provenance"]["seed"] == mas.SEED and set(res["phase_commits"]) >= {"load", "gift-sw checkpoint (FSDP)"}
    assert (out / "scale.png").stat().st_size > 0


def test_checkpoint_gathers_the_trained_columns_or_the_largest_parameter(smoke):
    """GIFT-SW gathers all its trainable parameters at once (a small part of the model); full and
    GMT gather parameter by parameter (the largest one) into rank 0's host, which gets everything."""
    _, res = smoke
    plan = res["models"]["tiny"]["plan"]
    gift, full = plan["gift-sw checkpoint (FSDP)"]["checkpoint"], plan["full checkpoint (FSDP)"]["checkpoint"]
    weights = res["models"]["tiny"]["measured"]["load"]["2"]
    assert gift["gathered_gpu_bytes"] < 0.2 * full["host_rank0_bytes"]
    assert full["host_rank0_bytes"] > 4 * gift["host_rank0_bytes"]  # fp32 weights + two AdamW states, all of them
    shape = mas.TINY["tiny"]
    assert full["gathered_gpu_bytes"] == shape["vocab_size"] * shape["hidden_size"] * 4  # lm_head in fp32
    assert weights  # the load phase ran alongside
    for n in ("2", "8"):  # sharded state plus the gathered part
        assert gift["per_device_bytes"][n] < full["per_device_bytes"][n]


def test_block_by_block_holds_one_block_on_the_device(smoke):
    """Block by block, the device holds the modules outside the blocks and one block at a time: the
    peak hardly grows with the number of blocks (calibration keeps each target's statistics, GPTQ
    releases each quantized block to the host), while the model's weights grow a block per block."""
    _, res = smoke
    plan = res["models"]["tiny"]["plan"]
    weights_per_block = plan["load"]["model"]["block"]["intercept"]
    assert weights_per_block > 0
    assert plan["gptq 4-bit, block by block"]["model"]["block"]["intercept"] == 0
    calib = plan["calibration, block by block"]["model"]["block"]["intercept"]
    # the statistics vectors of a block's targets: 13 % of a tiny block's weights (widths 64/160), ~0.01 % of a 7B one
    assert 0 < calib < 0.25 * weights_per_block


def test_gmt_strict_snapshot_holds_the_same_entries_on_fake_tensors(monkeypatch):
    """Strict mode reads each tensor's masked count on the host; on fake tensors the plan answers it
    as a real run does, so the snapshot held across the step has the real one's bytes (not empty)."""
    from salientft.gmt.mask import GradientMask

    sizes = {}
    original = GradientMask.snapshot_

    def spy(self, optimizer):
        snap = original(self, optimizer)
        sizes.setdefault(fake, []).append(snap.nbytes)
        return snap

    monkeypatch.setattr(GradientMask, "snapshot_", spy)
    with accelerator_paths_undone():
        for fake in (False, True):
            mas.phase_step("gmt strict", False, mas.TINY["tiny"], 2, 32, 1, fake)
    assert sizes[True] == sizes[False] and sizes[False][0] > 0


def test_update_keeps_the_phases_not_remeasured_with_their_commits(smoke):
    _, res = smoke
    old = json.loads(json.dumps(res))
    old["phase_commits"] = {k: "old0000" for k in old["phase_commits"]}
    new = json.loads(json.dumps(res))
    new["phase_commits"] = {"load": "new1111"}
    for m in new["models"].values():
        for key in ("measured", "measured_at_targets", "plan"):
            m[key] = {k: v for k, v in m[key].items() if k == "load"}
    new["models"]["tiny"]["plan"]["load"] = {"marker": 1}
    new["whole_model_check"]["phases"] = {}
    new["failed"] = {}
    out = mas.merged(old, new)
    assert out["phase_commits"]["load"] == "new1111" and out["phase_commits"]["gift-sw output noise"] == "old0000"
    assert out["models"]["tiny"]["plan"]["load"] == {"marker": 1}
    assert list(out["models"]["tiny"]["plan"]) == list(res["models"]["tiny"]["plan"])  # order kept
    assert "gift-sw output noise" in out["whole_model_check"]["phases"] and "provenance" not in out


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
    # a peak that is the state itself (no transient part) is never counted below it
    flat = {**model, "state_after": {"fixed": 100.0, "block": 200.0}}
    assert mas.per_device(flat, 3, 5, 4) == (100 + 3 * 200) / 4 + 2 * 40
