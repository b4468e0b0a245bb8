"""Salience metrics against slow reference loops; selection; score files; plot; the CLI."""
import math

import pytest
import torch
from torch import nn

from conftest import suite_device
from salientft.calibration import ActivationStats
from salientft.ops.grid import quantize_rows
from salientft.pipelines import calibrate
from salientft.saliency import (
    METRICS,
    load_scores,
    plot_scores,
    resolve_metric,
    saliency_scores,
    save_scores,
    select_salient,
)

DEVICE = suite_device()


def _setup(seed=0):
    """Two layers, random weights and random activations X (tokens x in) kept for the reference."""
    g = torch.Generator().manual_seed(seed)
    model = nn.ModuleDict({"a": nn.Linear(16, 8), "b": nn.Linear(12, 5, bias=False)})
    X = {}
    stats = {}
    for name, lin in model.items():
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
        x = (torch.randn(30, lin.in_features, generator=g) * torch.rand(lin.in_features, generator=g) * 3).to(DEVICE)
        X[name] = x.double()
        stats[name] = ActivationStats(x.abs().amax(0), (x.double() ** 2).sum(0), x.double().abs().sum(0), 30)
    return model.to(DEVICE), stats, X  # weights seeded on the CPU: the same on every device


def _norm(values, p):
    values = [abs(v) for v in values]
    if p == "inf":
        return max(values)
    if p == 2:
        return math.sqrt(sum(v * v for v in values))
    return sum(values)


def _reference(model, X, metric, bits=4, tau=None, rho=None, gamma=None):
    out = {}
    for name, lin in model.items():
        W = lin.weight.detach().float()
        D = W - quantize_rows(W, bits)[2]
        s = []
        for j in range(W.shape[1]):
            dcol = D[:, j].tolist()
            wcol = W[:, j].tolist()
            xcol = X[name][:, j].tolist()
            if metric == "gift":
                s.append(_norm(dcol, tau) * _norm(xcol, rho) ** gamma)
            elif metric == "owq":
                s.append(sum(x * x for x in xcol) * sum(d * d for d in dcol))
            elif metric == "wanda":
                s.append(sum(abs(w) for w in wcol) * math.sqrt(sum(x * x for x in xcol)))
            elif metric == "activation":
                s.append(max(abs(x) for x in xcol))
            elif metric == "magnitude":
                s.append(math.sqrt(sum(w * w for w in wcol)))
        out[name] = torch.tensor(s, dtype=torch.float32)
    return out


@pytest.mark.parametrize("tau", [1, 2, "inf"])
@pytest.mark.parametrize("rho", [1, 2, "inf"])
@pytest.mark.parametrize("gamma", [0.5, 1, 2])
@pytest.mark.numerics
def test_generalized_metric_matches_reference(tau, rho, gamma):
    model, stats, X = _setup()
    got = saliency_scores(model, stats, "gift", tau=tau, rho=rho, gamma=gamma)
    ref = _reference(model, X, "gift", tau=tau, rho=rho, gamma=gamma)
    for n in ref:
        assert got[n].dtype == torch.float32 and got[n].shape == (model[n].in_features,)
        assert torch.allclose(got[n], ref[n], rtol=1e-5), (n, tau, rho, gamma)


@pytest.mark.parametrize("metric", ["owq", "wanda", "activation", "magnitude"])
@pytest.mark.numerics
def test_presets_match_reference(metric):
    model, stats, X = _setup(1)
    got = saliency_scores(model, stats, metric, bits=3)
    ref = _reference(model, X, metric, bits=3)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-5), (metric, n)


@pytest.mark.numerics
def test_owq_records_the_gamma_it_computes():
    """owq's scores are the square of the generalized metric at the (tau, rho, gamma) its spec (and so
    a scores file's metadata) records: the same ranking, hence the same salient columns."""
    spec = resolve_metric("owq")
    assert (spec["tau"], spec["rho"], spec["gamma"]) == (2, 2, 1.0)
    model, stats, _ = _setup(3)
    owq = saliency_scores(model, stats, "owq", bits=3)
    gen = saliency_scores(model, stats, "gift", tau=spec["tau"], rho=spec["rho"], gamma=spec["gamma"], bits=3)
    for n in owq:
        assert torch.allclose(owq[n], gen[n].double().pow(2).float(), rtol=1e-4), n
        k = owq[n].numel() // 4
        assert torch.equal(select_salient(owq[n], k), select_salient(gen[n], k)), n


@pytest.mark.numerics
def test_gift_presets_are_their_definitions():
    model, stats, X = _setup(2)
    assert all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(
        saliency_scores(model, stats, "gift").values(),
        _reference(model, X, "gift", tau="inf", rho="inf", gamma=1).values()))
    assert all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(
        saliency_scores(model, stats, "gift-g2").values(),
        _reference(model, X, "gift", tau="inf", rho="inf", gamma=2).values()))
    assert set(METRICS) == {"gift", "gift-g2", "owq", "wanda", "activation", "magnitude", "random"}


@pytest.mark.numerics
def test_bits_matter_and_bf16_weights_quantize_in_fp32():
    model, stats, X = _setup(3)
    s4 = saliency_scores(model, stats, "gift", bits=4)
    s2 = saliency_scores(model, stats, "gift", bits=2)
    assert not torch.allclose(s4["a"], s2["a"])
    model16 = nn.ModuleDict({k: nn.Linear(v.in_features, v.out_features).to(torch.bfloat16) for k, v in model.items()})
    model16.to(DEVICE)
    for k in model:
        with torch.no_grad():
            model16[k].weight.copy_(model[k].weight)
    s16 = saliency_scores(model16, stats, "gift")
    W = model16["a"].weight.float()
    D = W - quantize_rows(W, 4)[2]
    assert torch.allclose(s16["a"], (D.abs().amax(0).double() * stats["a"].max_abs.double()).float().cpu(), rtol=1e-6)


@pytest.mark.numerics
def test_random_and_magnitude_need_no_stats(tiny_model):
    r0 = saliency_scores(tiny_model, None, "random", seed=0)
    assert len(r0) == 14
    r0b = saliency_scores(tiny_model, None, "random", seed=0)
    r1 = saliency_scores(tiny_model, None, "random", seed=1)
    names = list(r0)
    assert all(torch.equal(r0[n], r0b[n]) for n in names)
    assert not torch.equal(r0[names[0]], r1[names[0]])
    assert not torch.equal(r0[names[0]][:64], r0[names[1]][:64])  # layers differ
    m = saliency_scores(tiny_model, None, "magnitude")
    w = tiny_model.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(m[names[0]], w.norm(dim=0).cpu())  # scores come back on the host


def test_select_salient_top_k_and_ties(device):
    s = torch.tensor([0.5, 2.0, 1.0, 2.0, 2.0, -1.0], device=device)
    assert select_salient(s, 2).tolist() == [1, 3]  # three tie at 2.0: lower indices win
    assert select_salient(s, 4).tolist() == [1, 2, 3, 4]
    assert select_salient(s, 0).tolist() == []
    idx = select_salient(s, 6)
    assert idx.dtype == torch.long and idx.tolist() == list(range(6))
    g = torch.Generator().manual_seed(0)
    r = torch.rand(100, generator=g).to(device)
    assert set(select_salient(r, 10).tolist()) == set(torch.topk(r, 10).indices.tolist())
    with pytest.raises(ValueError, match="k must be"):
        select_salient(s, 7)
    with pytest.raises(ValueError, match="k must be"):
        select_salient(s, -1)
    with pytest.raises(ValueError, match="NaN"):
        select_salient(torch.tensor([1.0, float("nan")], device=device), 1)


def test_bad_metric_arguments_are_rejected():
    model, stats, _ = _setup()
    with pytest.raises(ValueError, match="unknown salience metric 'foo'; choose one of gift"):
        saliency_scores(model, stats, "foo")
    with pytest.raises(ValueError, match="tau must be 1, 2 or 'inf', got 3"):
        saliency_scores(model, stats, "gift", tau=3)
    with pytest.raises(ValueError, match="rho must be"):
        saliency_scores(model, stats, "gift", rho="two")
    with pytest.raises(ValueError, match="gamma must be one of"):
        saliency_scores(model, stats, "gift", gamma=3)
    with pytest.raises(ValueError, match="fixed definition"):
        saliency_scores(model, stats, "owq", tau=2)
    with pytest.raises(ValueError, match="needs activation statistics"):
        saliency_scores(model, None, "gift")
    with pytest.raises(ValueError, match="bits"):
        saliency_scores(model, stats, "gift", bits=1)
    assert resolve_metric("GIFT", tau="2", rho=math.inf, gamma="0.5") == {
        "name": "gift", "tau": 2, "rho": "inf", "gamma": 0.5}


def test_scores_file_roundtrip_and_corruption(tmp_path, device):
    model, stats, _ = _setup()
    scores = saliency_scores(model, stats, "gift")
    path = tmp_path / "s.safetensors"
    save_scores(scores, path, {"metric": "gift", "bits": 4, "tau": "inf"})
    assert list(tmp_path.iterdir()) == [path]  # atomic: no temporary left behind
    back, meta = load_scores(path, return_metadata=True)
    assert list(back) == list(scores) and all(torch.equal(back[n], scores[n]) for n in scores)
    assert meta == {"metric": "gift", "bits": 4, "tau": "inf"}
    assert set(load_scores(path)) == {"a", "b"}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_scores(bad)
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_scores(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(bad))
    with pytest.raises(ValueError, match="not a salientft scores file"):
        load_scores(bad)
    with pytest.raises(FileNotFoundError):
        load_scores(tmp_path / "missing.safetensors")


def test_plot_writes_png(tiny_model, tmp_path):
    scores = saliency_scores(tiny_model, None, "magnitude")
    plot_scores(scores, 8, tmp_path / "k.png")
    sel = {n: select_salient(s, 5) for n, s in scores.items()}
    plot_scores(scores, sel, tmp_path / "sel.png", title="x")
    for f in ("k.png", "sel.png"):
        data = (tmp_path / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ValueError, match="no scores"):
        plot_scores({}, 3, tmp_path / "e.png")


def test_calibrate_statless_metric_skips_data(tiny_model, tiny_tok, tmp_path):
    # the data source does not exist: a metric that needs no activations never reads it
    s = calibrate(tiny_model, tiny_tok, str(tmp_path / "missing.txt"), metric="magnitude",
                  output=tmp_path / "m.safetensors", progress=False)
    assert len(s) == 14 and (tmp_path / "m.safetensors").is_file()


def test_scores_file_of_before_the_rename_reads_calib_samples(tmp_path):
    """A scores file written when the key was "n_samples" reads as "calib_samples"; a new file
    writes "calib_samples" only (docs/configuration.md#names)."""
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_scores({"a": torch.ones(3)}, old, {"metric": "gift", "n_samples": 16})
    assert load_scores(old, return_metadata=True)[1] == {"metric": "gift", "calib_samples": 16}
    save_scores({"a": torch.ones(3)}, new, {"metric": "gift", "calib_samples": 8})
    assert load_scores(new, return_metadata=True)[1] == {"metric": "gift", "calib_samples": 8}


def test_cli_end_to_end(tmp_path, capsys):
    from salientft.cli import main

    out, png, st = tmp_path / "scores.safetensors", tmp_path / "scores.png", tmp_path / "stats.safetensors"
    rc = main(["calibrate", "--model", "tiny-random-llama", "--metric", "gift-g2", "--calib-samples", "4",
               "--seq-len", "32", "--batch-size", "2", "--n-salient", "6", "--output", str(out),
               "--plot", str(png), "--stats-output", str(st), "--dtype", "fp32", "--tau", "2"])
    assert rc == 0
    scores, meta = load_scores(out, return_metadata=True)
    assert len(scores) == 14 and all(s.shape in ((64,), (128,)) for s in scores.values())
    assert meta["metric"] == "gift-g2" and meta["tau"] == 2 and meta["tokens"] == 128 and meta["model"] == "tiny-random-llama"
    assert meta["calib_samples"] == 4 and "n_samples" not in meta  # one name per concept, in files too
    assert png.read_bytes()[:4] == b"\x89PNG" and st.is_file()
    assert "wrote gift-g2 scores of 14 layers" in capsys.readouterr().out
    rc = main(["calibrate", "--model", "tiny-random-llama", "--metric", "owq", "--tau", "2", "--output", str(out)])
    assert rc == 2 and "fixed definition" in capsys.readouterr().err
    rc = main(["calibrate", "--model", "tiny-random-llama", "--data", str(tmp_path / "none.jsonl"), "--output", str(out)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", "tiny-random-llama", "--metric", "nope", "--output", str(out)])
