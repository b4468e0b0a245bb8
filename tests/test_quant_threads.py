"""GPTQ and RTN give the same integers whatever the CPU thread count (issue: a 2-bit GPTQ of
SmolLM2 once differed between 1 and 2 threads because LAPACK's Cholesky blocks its work by the
thread count; docs/quantization.md#determinism-the-same-integers-for-any-thread-count)."""
import pytest
import torch

from salientft.quant.gptq import gptq_quantize, inverse_hessian_factor, rtn_quantize
from salientft.quant.model import quantize, quantized_layers

THREADS = (1, 2, 4)


def _adversarial(seed, n=2000, d=576, out=96):
    """Correlated inputs with outlier channels (an ill-conditioned Hessian, as in a real LLM) and
    weights with outlier columns: the case where the Cholesky's last bits reach 2-bit integers."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X[:, :5] *= 50
    X = X @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d**0.5)
    W = torch.randn(out, d, generator=g) * 0.05
    W[:, 7] *= 20
    H = torch.zeros(d, d)
    H.addmm_(X.T, X)
    return W, H


def _under_threads(fn):
    """fn() run with 1, 2 and 4 torch threads (the suite's count restored after)."""
    before = torch.get_num_threads()
    out = {}
    try:
        for t in THREADS:
            torch.set_num_threads(t)
            out[t] = fn()
    finally:
        torch.set_num_threads(before)
    return out


@pytest.mark.numerics
def test_gptq_and_rtn_integers_do_not_depend_on_the_thread_count():
    cases = [_adversarial(seed) for seed in range(2)]
    salient = torch.arange(0, 576, 72)

    def run():
        res = {}
        for c, (W, H) in enumerate(cases):
            res[f"U{c}"] = inverse_hessian_factor(H, 0.01)
            for bits in (2, 3, 4):
                res[f"gptq{bits}.{c}"] = gptq_quantize(W, H, bits, salient, H.diagonal())
                res[f"rtn{bits}.{c}"] = rtn_quantize(W, bits, salient)
        return res

    runs = _under_threads(run)
    for t in THREADS[1:]:
        for key, ref in runs[1].items():
            got = runs[t][key]
            for a, b in zip(ref if isinstance(ref, tuple) else (ref,), got if isinstance(got, tuple) else (got,)):
                assert torch.equal(a, b), f"{key} differs between 1 and {t} threads"


@pytest.mark.numerics
def test_inverse_hessian_factor_is_the_cholesky_of_the_inverse():
    W, H = _adversarial(0, n=800, d=96, out=8)
    U = inverse_hessian_factor(H.double(), 0.01)
    Hd = H.double() + 0.01 * H.diagonal().double().mean() * torch.eye(96, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    # fp64 on both sides, two factorizations of a matrix of condition ~1e4: 1e-9 is far from a bug
    assert torch.allclose(U, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    assert torch.equal(U, torch.triu(U)) and bool((U.diagonal() > 0).all())


@pytest.mark.numerics
def test_quantize_a_model_gives_the_same_integers_for_any_thread_count():
    from salientft.models import tiny_random_llama

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (4, 48), generator=g)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]

    def run():
        res = {}
        for bits, method in ((2, "gptq"),):  # RTN's integers: the test above (its grid search dominates here)
            model = tiny_random_llama(seed=3, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=512)
            with torch.no_grad():  # outlier input channels, as in a trained LLM
                model.model.embed_tokens.weight[:, :4] *= 30
            quantize(model, bits, n_salient=16, method=method, calibration=batches, progress=False,
                     target_modules=["q_proj", "gate_proj"])  # two layers keep the test short
            for n, layer in quantized_layers(model).items():
                res[f"{method}{bits}.{n}"] = (layer.qweight, layer.scale, layer.salient_idx, layer.salient_weight)
        return res

    runs = _under_threads(run)
    for t in THREADS[1:]:
        for key, ref in runs[1].items():
            assert all(torch.equal(a, b) for a, b in zip(ref, runs[t][key])), f"{key} differs between 1 and {t} threads"
