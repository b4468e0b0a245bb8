import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests measure afresh: no run reads a base measured by an earlier one (tests/test_measure_cache.py
# turns the cache on in a folder of its own).
os.environ.setdefault("SALIENTFT_NO_MEASURE_CACHE", "1")
# SALIENTFT_TEST_THREADS pins the thread count (scripts/check_determinism.sh runs the numerics tests
# with 1 and 2 threads); otherwise at most 2, on a shared machine.
TEST_THREADS = int(os.environ.get("SALIENTFT_TEST_THREADS") or min(2, torch.get_num_threads()))
torch.set_num_threads(TEST_THREADS)

# SALIENTFT_TEST_DEVICE puts every test's models and inputs on a device (docs/testing.md): cpu (the
# default), cuda or cuda:N. Anything else (meta, auto, a misspelling, cuda on a machine without one)
# stops the run before any test: a suite that silently ran elsewhere would prove nothing.
DEVICE_ENV = "SALIENTFT_TEST_DEVICE"


def _test_device() -> torch.device:
    value = os.environ.get(DEVICE_ENV, "cpu")
    from salientft.devices import check_device_spec, resolve_device

    try:
        spec = check_device_spec(value, flag=DEVICE_ENV)
        if spec == "auto":
            raise ValueError(f"{DEVICE_ENV}=auto: name the device the suite is to run on (cpu, cuda or cuda:N)")
        return resolve_device(spec, flag=DEVICE_ENV)
    except ValueError as e:
        raise pytest.UsageError(f"{DEVICE_ENV}={value!r} refused ({e}); set it to cpu (the default), cuda or "
                                "cuda:N, on a machine with that device") from None


TEST_DEVICE = torch.device("cpu")  # set from the environment by pytest_configure


def pytest_configure(config):
    global TEST_DEVICE
    TEST_DEVICE = _test_device()


def pytest_report_header(config):
    return f"salientft test device: {TEST_DEVICE} ({DEVICE_ENV})"


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``cpu_only`` (with their reason) when the suite runs on another device."""
    if TEST_DEVICE.type == "cpu":
        return
    for item in items:
        mark = item.get_closest_marker("cpu_only")
        if mark is not None:
            why = mark.args[0] if mark.args else "tests a CPU-only code path"
            item.add_marker(pytest.mark.skip(reason=f"CPU only ({why}); {DEVICE_ENV}={TEST_DEVICE}"))


def suite_device() -> torch.device:
    """The suite's device for module-level helpers (``from conftest import suite_device``); tests
    take the ``device`` fixture."""
    return TEST_DEVICE


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device every test's models and inputs go to (SALIENTFT_TEST_DEVICE, default cpu)."""
    return TEST_DEVICE


@pytest.fixture
def tiny_model(device):
    from salientft.models import tiny_random_llama

    return tiny_random_llama(seed=0).to(device)


@pytest.fixture
def tiny_gpt2():
    """A 2-layer GPT-2 (seed 0, eval mode): its projections are transformers' Conv1D, which stores the
    weight transposed; every wrapper must handle it as well as nn.Linear."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
                     eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval().to(TEST_DEVICE)


@pytest.fixture
def tiny_tok():
    from salientft.models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M in bf16 (converted once into the user cache)."""
    from salientft.models import load_model

    return load_model("smollm2-135m", dtype="bf16", device=TEST_DEVICE)


@pytest.fixture(scope="session")
def embedded_fp32():
    """The embedded SmolLM2-135M in fp32, for comparisons that must not depend on bf16 rounding.

    bf16 keeps 8 mantissa bits: the same choices scored in other batch shapes (native vs lm-eval) or
    with another CPU's kernels get log-likelihoods up to 2 nats apart, and answers and accuracies
    change from machine to machine. In fp32 the same differences stay below 1e-4 nats, so a stated
    tolerance separates them from real bugs (docs/testing.md).
    """
    from salientft.models import load_model

    return load_model("smollm2-135m", dtype="fp32", device=TEST_DEVICE)


@pytest.fixture
def docs_copy(tmp_path):
    """README.md and docs/ (results JSON included, figures and run caches left out) in a scratch
    folder: tests that change a results file under a quoted figure edit this copy, never the repo."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "README.md", tmp_path / "README.md")
    shutil.copytree(root / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("*.png", "runs", "*.jsonl"))
    return tmp_path
