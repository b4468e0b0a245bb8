"""A quantized model's fingerprint names exactly what quantization decided, and the code version
the benchmarks key their cached quantized models on changes with the deciding code only
(salientft.quant.fingerprint; docs/quantization.md#determinism-the-same-integers-for-any-thread-count)."""
import sys
from pathlib import Path

import torch

from salientft.models import tiny_random_llama
from salientft.quant import fingerprint as fp
from salientft.quant.model import quantize, quantized_layers

ROOT = Path(__file__).resolve().parents[1]


def _quantized(bits=3, seed=0):
    model = tiny_random_llama(seed=seed)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (2, 16), generator=g)
    quantize(model, bits, n_salient=2, quantizer="rtn", calibration=[{"input_ids": ids}], progress=False)
    return model


def test_the_fingerprint_is_the_same_for_the_same_model_and_moves_with_any_decision():
    a, b = _quantized(), _quantized()
    assert fp.quantized_fingerprint(a) == fp.quantized_fingerprint(b)
    assert fp.quantized_fingerprint(_quantized(bits=4)) != fp.quantized_fingerprint(a)
    layer = next(iter(quantized_layers(b).values()))
    for name in ("qweight", "scale", "salient_weight"):
        t = getattr(layer, name)
        before = fp.quantized_fingerprint(b)
        with torch.no_grad():
            flat = t.view(-1)
            old = flat[0].clone()
            flat[0] = old + 1
        assert fp.quantized_fingerprint(b) != before, f"a changed {name} left the fingerprint unchanged"
        with torch.no_grad():
            flat[0] = old
    assert fp.quantized_fingerprint(b) == fp.quantized_fingerprint(a)
    # moving a salient column (same weights otherwise) is another model
    with torch.no_grad():
        layer.salient_idx[0] = int(layer.salient_idx[0]) ^ 1
    assert fp.quantized_fingerprint(b) != fp.quantized_fingerprint(a)


def test_a_model_without_quantized_layers_has_the_empty_fingerprint():
    import hashlib

    assert fp.quantized_fingerprint(tiny_random_llama(seed=0)) == hashlib.sha256().hexdigest()[:16]


def test_the_code_version_ignores_docstrings_and_comments_but_not_code(tmp_path, monkeypatch):
    pkg = tmp_path / "salientft"
    for rel in fp.DECIDING_MODULES:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text('"""doc"""\n\ndef f(x):\n    """why"""\n    return x + 1  # note\n')
    (pkg / "quant" / "fingerprint.py").write_text("")
    monkeypatch.setattr(fp, "__file__", str(pkg / "quant" / "fingerprint.py"))
    base = fp.code_version()
    target = pkg / fp.DECIDING_MODULES[0]
    target.write_text('"""another doc"""\n\n\ndef f(x):\n    """another why"""\n    # new comment\n    return x + 1\n')
    assert fp.code_version() == base
    target.write_text('def f(x):\n    return x + 2\n')
    assert fp.code_version() != base


def test_the_real_deciding_modules_exist():
    pkg = Path(fp.__file__).resolve().parents[1]
    assert all((pkg / rel).is_file() for rel in fp.DECIDING_MODULES)
    assert len(fp.code_version()) == 16


def test_the_bench_keys_a_quantized_model_on_the_code_version(monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import _suite as S

    qs = S.QUANT["smoke"]
    spec = S.spec_for(qs, "gptq+salient", 3)
    assert spec["quant_code"] == fp.code_version()
    assert "quant_code" not in S.spec_for(qs, "bf16", 16)  # nothing quantized: no code decides it
    key = S.run_key(S.PRESETS["smoke"], spec)
    monkeypatch.setattr(fp, "code_version", lambda: "0" * 16)
    assert S.run_key(S.PRESETS["smoke"], S.spec_for(qs, "gptq+salient", 3)) != key


def test_quant_threads_smoke_finds_identical_models(tmp_path):
    import json
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "quant_threads.py"), "--smoke", "--bits", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads((tmp_path / "quant_threads.json").read_text())
    assert r["all_identical"] and len(r["rows"]) == 1
    prints = {v["fingerprint"] for v in r["rows"][0]["by_threads"].values()}
    assert len(prints) == 1 and r["provenance"]["threads"] == [1, 2]
