"""bench/scaling.py runs end to end on the tiny preset, and bench/lib's "gmt" (bench/step.py's) really masks."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def test_scaling_tiny_preset_writes_every_width_and_method(tmp_path):
    out = tmp_path / "scaling"
    proc = subprocess.run([sys.executable, str(BENCH / "scaling.py"), "--preset", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    methods = ["gift-weight", "gift-output", "gift-none", "lora", "dora", "full", "gmt"]
    assert res["settings"]["methods"] == methods and res["settings"]["widths"] == [64, 128]
    assert res["interleave"]["mode"] in ("all", "width")
    for key in ("python", "torch", "threads", "cpu_count", "loadavg_before", "loadavg_after"):
        assert key in res["machine"]
    assert "--preset tiny" in res["command"]
    prov = res["provenance"]  # bench/lib's block: what produced these numbers
    assert prov["dtype"] == "fp32" and prov["seed"] == 0 and prov["threads"] == 1 and prov["cpu_model"] is not None
    assert {"commit", "dirty", "omp_wait_policy", "torch", "gpu"} <= set(prov)
    assert list(res["widths"]) == ["64", "128"]
    for h, w in res["widths"].items():
        assert set(w["methods"]) == set(methods)
        for m, v in w["methods"].items():
            assert v["median_ms"] > 0 and v["q1_ms"] <= v["median_ms"] <= v["q3_ms"], (h, m)
            assert v["peak_mb"] > 0, (h, m, v.get("memory_error"))
            assert v["trainable"] > 0 and v["time_vs_lora"] > 0 and v["peak_vs_lora"] > 0
        assert w["methods"]["lora"]["time_vs_lora"] == 1.0
        # the rank matches GIFT-SW's budget: trainable counts within a factor 2 (tiny ranks are coarse)
        ratio = w["methods"]["lora"]["trainable"] / w["methods"]["gift-none"]["trainable"]
        assert 0.5 < ratio < 2
        assert w["methods"]["full"]["trainable"] == w["methods"]["gmt"]["trainable"] == w["params"]
    # width grows the models
    assert res["widths"]["128"]["params"] > res["widths"]["64"]["params"]
    md = out.with_suffix(".md").read_text()
    assert "| 128 | gmt |" in md and "scaling.png" in md and "{" not in md  # no unformatted field
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_gmt_method_masks_gradients_before_the_optimizer_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from lib import methods as step  # bench/lib/methods.py: bench/step.py's (and scaling's) methods
    from lib import models

    cfg = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=1,
               num_key_value_heads=1, max_position_embeddings=128)
    monkeypatch.setitem(models.RANDOM_LLAMAS, "test-llama", cfg)
    model, tok, opt, info = step.build("gmt", "test-llama", torch.float32, "cpu")
    assert info["gmt_ratio"] == 0.5 and info["trainable"] == sum(p.numel() for p in model.parameters())
    mask = opt.gradient_mask
    before = {n: p.detach().clone() for n, p in mask.params}
    batch = models.make_batch(tok, 1, 32)
    times = step.train_step(model, opt, batch)
    assert all(t > 0 for t in times)
    assert mask.step_count == 1 and abs(mask.last_stats["kept_fraction"] - 0.5) < 0.01
    zero = sum(int((p.grad == 0).sum()) for _, p in mask.params)
    total = sum(p.numel() for _, p in mask.params)
    assert abs(zero / total - 0.5) < 0.01  # the gradients AdamW saw were masked
    # first AdamW step, no weight decay: exactly the entries with a zero (masked) gradient stay put
    for n, p in mask.params:
        assert torch.equal(p.detach() == before[n], p.grad == 0), n
    # the embeddings/lm_head are excluded (trained densely), so the mask is not vacuous there either
    assert set(mask.excluded) == {"model.embed_tokens.weight", "lm_head.weight"}
    # and "full" (same model, no mask) keeps dense gradients: the masking is GMT's doing
    model, tok, opt, _ = step.build("full", "test-llama", torch.float32, "cpu")
    step.train_step(model, opt, batch)
    blocks = [p for n, p in model.named_parameters() if ".layers." in n]
    assert sum(int((p.grad == 0).sum()) for p in blocks) / sum(p.numel() for p in blocks) < 0.05
    assert not hasattr(opt, "gradient_mask")
