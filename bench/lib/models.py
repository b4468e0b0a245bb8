"""The benchmark models and their batch, built one way for every script.

``load_base(name, dtype, device)``: ``smollm2-135m`` (the embedded SmolLM2-135M) or a random
Llama registered by name in ``RANDOM_LLAMAS`` (``wide-llama``; bench/scaling.py registers its
widths). ``random_llama(shape, dtype, device)`` builds one directly on ``device`` (the GPU
benchmark's models are too large to build on the host first), seeded, with
``salientft.models.tiny_random_llama``'s defaults for what ``shape`` leaves out.
"""
from __future__ import annotations

import torch

# The wide random Llama: layers wider than SmolLM2's, few of them, tiny vocabulary so that the
# linear layers (not lm_head) dominate. tokens per micro-batch (512) < in_features (1536).
WIDE = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=12,
            num_key_value_heads=4, max_position_embeddings=1024)
# Random Llamas by name -> tiny_random_llama overrides; scripts may register more (scaling.py's widths).
RANDOM_LLAMAS = {"wide-llama": WIDE}
MODELS = ("smollm2-135m", "wide-llama")
# (batch, seq_len) per model, default and --quick. The defaults are small because the 2-core
# machine is shared (a 4 x 256 SmolLM2 step took minutes under load); --batch/--seq override.
SHAPES = {"smollm2-135m": ((2, 256), (2, 64)), "wide-llama": ((2, 128), (2, 64))}
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30}


def batch_shape_for(model_name: str, quick: bool, override=(None, None)) -> tuple[int, int]:
    """(sequences, tokens) of a model's benchmark batch (``quick``: the smoke run's), ``override``'s
    entries replacing it where not None."""
    b, s = SHAPES[model_name][1 if quick else 0]
    return (override[0] or b, override[1] or s)


def random_llama(shape: dict, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """(a randomly initialised Llama of ``shape``, built on ``device`` in ``dtype``, its tiny tokenizer)."""
    from salientft.models import tiny_random_llama, tiny_tokenizer

    with torch.device(device):
        model = tiny_random_llama(seed=seed, dtype=dtype, **shape)
    return model, tiny_tokenizer()


def llama_built_in(shape: dict, dtype: torch.dtype, seed: int = 0):
    """A random Llama of ``shape`` whose parameters are created in ``dtype`` (no float32 copy first,
    which at 7B widths would double the host memory): bench/memory_at_scale.py's models, also
    built under fake tensors. The model only (no tokenizer), in train mode as transformers makes it."""
    from salientft.models import tiny_random_llama

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return tiny_random_llama(seed=seed, dtype=dtype, **shape).train()
    finally:
        torch.set_default_dtype(before)


def load_base(model_name: str, dtype: torch.dtype, device: str = "cpu"):
    """(model, tokenizer) of a benchmark model by name, in eval mode."""
    from salientft.models import load_model

    if model_name == "smollm2-135m":
        model, tok = load_model("smollm2-135m", dtype=dtype)
        return model.to(device), tok
    if model_name in RANDOM_LLAMAS:
        return random_llama(RANDOM_LLAMAS[model_name], dtype, device)
    raise ValueError(f"unknown model {model_name!r}; choose from {', '.join(('smollm2-135m', *RANDOM_LLAMAS))}")


def describe_model(model_name: str) -> dict:
    """How a report names a benchmark model and where it comes from."""
    if model_name in RANDOM_LLAMAS:
        return {"name": model_name, "source": f"salientft.models.tiny_random_llama(**{model_name}), random init",
                "vocab_size": 320, **RANDOM_LLAMAS[model_name]}
    return {"name": model_name, "source": "salientft.models.load_model('smollm2-135m')", **SMOLLM2}


def make_batch(tok, batch: int, seq: int) -> torch.Tensor:
    """batch x seq token ids of real text: SciQ support paragraphs, concatenated and chunked."""
    from salientft.data.embedded import read_records

    need = batch * seq
    ids: list[int] = []
    for row in read_records("sciq"):
        text = (row.get("support") or "").strip()
        if text:
            ids.extend(tok(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise RuntimeError(f"not enough SciQ text for {batch}x{seq} tokens")
    return torch.tensor(ids[:need], dtype=torch.long).view(batch, seq)


def random_batch(vocab_size: int, shape: tuple[int, int], device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """Random token ids (from 3, past the special tokens), drawn from a generator seeded ``seed`` on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(3, vocab_size, tuple(shape), device=device, generator=gen)


def storage_bytes(model) -> int:
    """Bytes of all parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total
