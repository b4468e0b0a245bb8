import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_model():
    from salientft.models import tiny_random_llama

    return tiny_random_llama(seed=0)


@pytest.fixture
def tiny_tok():
    from salientft.models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M in bf16 (converted once into the user cache)."""
    from salientft.models import load_model

    return load_model("smollm2-135m", dtype="bf16")
