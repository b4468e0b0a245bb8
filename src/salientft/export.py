"""``salientft export``: a trained GIFT-SW adapter or a quantized model in the formats the Hugging Face
stack and serving engines load without salientft (docs/export.md).

* ``lora``: a trained GIFT-SW layer is exactly a rank-k update of its base,
  ``W' = W + (W'_S - W_S) A`` with ``A`` (k x in) the one-hot rows selecting the k salient columns
  (``A[j, idx_j] = 1``). That is a standard PEFT LoRA adapter: ``lora_A = A``,
  ``lora_B = W'_S - W_S`` (out x k, computed in fp32 against the base weights), ``lora_alpha = r``
  (scaling 1), per-layer ranks in ``rank_pattern``/``alpha_pattern``.
* ``merged``: the trained columns written into the base weights; a plain transformers model.
* ``compressed-tensors``: a model from ``salientft quantize`` (or a recovery run's ``model/``) as a
  pack-quantized int4/int8 checkpoint (symmetric, one scale per output channel, kept in fp32 so
  salientft's float32 steps are carried exactly), with the salient columns' codes set to zero and
  the 16-bit salient columns carried exactly by a rank-k LoRA adapter in ``salient_lora/``
  (``lora_B`` = the columns themselves, ``lora_A`` = the one-hot rows).

Accepted sources: a ``salientft train`` run directory or a GIFT-SW adapter folder of either format
and origin (``lora``, ``merged``; read by ``salientft.gift.read_adapter``); a quantized folder or a
recovery run (``compressed-tensors``).
Every output is written atomically, with the manifest of a salientft output folder; an existing
non-empty output is refused when it holds anything salientft did not write, and otherwise unless
``overwrite`` (``salientft.outputs.claim_dir``).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("lora", "merged", "compressed-tensors")
SALIENT_LORA_DIR = "salient_lora"
INSTALL_HINT = "pip install 'salientft[export]'"
# vLLM's --max-lora-rank accepts a fixed set of values; these are among them (check your version's docs).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Bit widths of compressed-tensors' integer weights that vLLM serves (its W4A16/W8A16 kernels).
CT_BITS = (4, 8)
RUN_CONFIG = "run_config.json"  # what makes a folder a salientft train run (salientft.train.RUN_CONFIG)


@dataclass(frozen=True)
class Exported:
    """What an export wrote: ``format``, the ``output`` folder, the base model the result goes on
    (None for a whole model) and the LoRA rank of every layer (``ranks``; empty for ``merged``)."""

    format: str
    output: Path
    base_model: str | None = None
    ranks: dict[str, int] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    def instructions(self) -> str:
        """How to load the result with transformers (+ PEFT) and serve it with vLLM."""
        out = str(self.output)
        if self.format == "merged":
            return "\n".join([
                f"wrote a plain transformers model (fp32) to {out}",
                "load it:  AutoModelForCausalLM.from_pretrained(" + repr(out) + ", dtype=torch.bfloat16)",
                f"serve it: vllm serve {out}",
            ])
        if self.format == "lora":
            base = self.base_model or "BASE_FOLDER"
            head = [f"wrote a PEFT LoRA adapter (rank {self._rank_text()}) for {self.base_model or 'its base'} "
                    f"to {out}"]
            load = [
                "import torch",
                "from transformers import AutoModelForCausalLM",
                "from peft import PeftModel",
                f"base = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.float32)",
                f"model = PeftModel.from_pretrained(base, {out!r})",
            ]
            serve = f"vllm serve {base} --enable-lora --lora-modules gift={out}"
            from .models import EMBEDDED_HUB_ID

            if self.base_model is None:
                head.append("its base has no name stock tools can load (tiny-random-llama is built in code): "
                            "save that model with save_pretrained and pass --base FOLDER when exporting")
            elif self.base_model == EMBEDDED_HUB_ID:
                head.append(f"the base is recorded as {EMBEDDED_HUB_ID}, the hub model salientft's embedded copy "
                            "comes from; that copy is its Q4_1 GGUF dequantized, so its weights differ slightly: "
                            "for the exact trained model, pass --base <folder of the embedded copy> when exporting")
        else:
            lora = str(self.output / SALIENT_LORA_DIR)
            head = [f"wrote a compressed-tensors model (pack-quantized) to {out}"]
            if not self.ranks:
                return "\n".join(head + ["it has no salient columns, hence no LoRA adapter: load and serve it as is"])
            head.append(f"and its salient columns as a LoRA adapter (rank {self._rank_text()}) to {lora}")
            load = [
                "import torch",
                "from transformers import AutoModelForCausalLM, CompressedTensorsConfig",
                "from peft import PeftModel",
                f"base = AutoModelForCausalLM.from_pretrained({out!r}, dtype=torch.bfloat16,",
                "    quantization_config=CompressedTensorsConfig(dequantize=True))  # PEFT needs dense weights",
                f"model = PeftModel.from_pretrained(base, {lora!r})",
            ]
            serve = f"vllm serve {out} --enable-lora --lora-modules salient={lora}"
        rank = next((r for r in VLLM_LORA_RANKS if r >= self.max_rank), None)
        if rank is None:
            serve = (f"# rank {self.max_rank} exceeds the largest --max-lora-rank vLLM accepts "
                     f"({VLLM_LORA_RANKS[-1]}): check your engine's docs\n{serve}")
        else:
            serve += f" --max-lora-rank {rank}"
        return "\n".join(head + ["load it with transformers + PEFT:"] + [f"    {line}" for line in load]
                         + ["serve it with vLLM (the adapter must be requested by its name; check the rank "
                            "values your engine accepts):", f"    {serve}"])

    def _rank_text(self) -> str:
        ks = sorted(set(self.ranks.values()))
        return str(ks[0]) if len(ks) == 1 else f"{ks[0]} to {ks[-1]} by layer"


def _require(module: str, what: str):
    """Import an optional package or say how to install it."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs the {module} package: {INSTALL_HINT}")
    return importlib.import_module(module)


def _check_output(output, overwrite: bool, source) -> Path:
    """Refuse, before any work, an output that holds files (unless ``overwrite``) or would replace the source."""
    from .outputs import claim_dir

    out = Path(output)
    src, dst = Path(source).resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ValueError(f"--output {out} would replace the source {source}; choose another folder")
    claim_dir(out, flag="--output", overwrite=overwrite)  # nothing salientft did not write is replaced
    return out


# --------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class _Adapter:
    path: Path  # a GIFT-SW adapter folder (either format, either origin)
    base: str  # the base as salientft loads it
    stock_base: str | None  # the base as stock tools load it (recorded in the LoRA adapter)


@dataclass(frozen=True)
class _Columns:
    """One trained layer: its (out, in) base weight, salient indices and trained (out, k) columns."""

    weight: object
    idx: object
    columns: object
    conv1d: bool


def _quantized_folder(path: Path) -> Path | None:
    """The salientft quantized model in ``path`` (the folder itself, or a recovery run's model/)."""
    from .quant.model import QUANT_CONFIG_NAME

    if (path / QUANT_CONFIG_NAME).is_file():
        return path
    if (path / RUN_CONFIG).is_file() and (path / "model" / QUANT_CONFIG_NAME).is_file():
        return path / "model"
    return None


def _adapter_source(source, base: str | None) -> _Adapter:
    """Which adapter ``source`` names and the base it goes on; reads JSON only (no model)."""
    from ._io import read_json_object
    from .adapter_format import CONFIG_NAME, adapter_kind
    from .models import stock_name

    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: give a salientft train run or a GIFT-SW adapter folder")
    if _quantized_folder(path) is not None:
        raise ValueError(f"{path} is a quantized model: export it with --format compressed-tensors")
    run_base = None
    if (path / RUN_CONFIG).is_file():
        run = read_json_object(path / RUN_CONFIG, "the run's TrainConfig")
        if not (path / "adapter").is_dir():
            raise ValueError(f"{path} has no adapter/: method {run.get('method')!r} writes a whole model (model/), "
                             "which is already a transformers model")
        run_base, path = run.get("model"), path / "adapter"
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} holds no {CONFIG_NAME}: give a salientft train run or a GIFT-SW adapter "
                                "folder")
    kind = adapter_kind(path)
    if not kind.is_gift_sw:
        raise ValueError(f"{path} is a PEFT {kind.peft_type} adapter, already in PEFT's format: load it with "
                         "peft.PeftModel (salientft export converts GIFT-SW adapters)")
    base = base or run_base or kind.base_model
    if not base:
        raise ValueError(f"{path} does not name its base model: pass --base MODEL (the model it was trained on)")
    return _Adapter(path, str(base), stock_name(str(base)))


def _trained_model(adapter: _Adapter, device):
    """(model, tokenizer, {layer: _Columns}) of the adapter on its base, loaded in fp32 on ``device``."""
    from .gift import gift_layers, load_adapter
    from .models import load_model

    model, tok = load_model(adapter.base, dtype="fp32", device=device)
    load_adapter(model, adapter.path)
    layers = {n: _Columns(m.base_weight(), m.salient_idx, m.salient_weight, getattr(m, "is_conv1d", False))
              for n, m in gift_layers(model).items()}  # fused experts: [experts, ...] tensors, idx 2-D
    return model.eval(), tok, layers


# --------------------------------------------------------------------------- LoRA files

def _one_hot(idx, in_features: int, dtype):
    """(k, in) rows selecting the columns ``idx``: ``A[j, idx[j]] = 1``."""
    import torch

    a = torch.zeros(idx.numel(), in_features, dtype=dtype, device=idx.device)
    a[torch.arange(idx.numel(), device=idx.device), idx] = 1
    return a


def _write_lora(directory: Path, factors: dict, base_model: str, fan_in_fan_out: bool = False, *,
                experts: dict | None = None, model=None) -> dict[str, int]:
    """A PEFT LoRA adapter folder from ``{module name: (lora_A (k, in), lora_B (out, k))}``.

    ``r`` is the largest k, ``lora_alpha = r``, and the layers of another k are listed in
    ``rank_pattern`` with an equal ``alpha_pattern``: the scaling alpha/r is 1 in every layer, so an
    engine that reads only ``r`` and ``lora_alpha`` still applies the update exactly.
    ``experts`` (fused MoE expert projections: (lora_A, lora_B, k), :func:`_expert_factors`) go in
    ``target_parameters``; their tensor names (PEFT nests one wrapper per parameter) are PEFT's own, read from a PEFT
    model built over ``model`` (which this merges).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    experts = experts or {}
    ranks = {n: int(a.shape[0]) for n, (a, _) in factors.items()}
    ranks.update({n: k for n, (_, _, k) in experts.items()})
    r = max(ranks.values())
    pattern = {n: k for n, k in ranks.items() if k != r}
    config = LoraConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=list(factors),
        target_parameters=list(experts) or None,
        lora_dropout=0.0, bias="none", fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM",
        base_model_name_or_path=base_model, inference_mode=True,
    )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    if experts:
        tensors.update(_expert_lora_tensors(model, config, experts))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return ranks


def _expert_lora_tensors(model, config, experts: dict) -> dict:
    """The tensors of the ``target_parameters`` LoRA under PEFT's own names: a stock PEFT model is
    built over ``model`` (GIFT-SW merged first: only the names are read), its expert wrappers are
    filled with the factors, and PEFT's state dict of them is returned."""
    import copy

    import peft
    import torch

    from .gift import merge_gift

    merge_gift(model)
    cfg = copy.deepcopy(config)
    cfg.inference_mode = False
    pm = peft.get_peft_model(model, cfg)
    filled = set()
    with torch.no_grad():
        for name, m in pm.named_modules():
            if isinstance(m, peft.tuners.lora.ParamWrapper):
                path = ".".join(p for p in name.removeprefix("base_model.model.").split(".") if p != "base_layer")
                key = f"{path}.{m.parameter_name}"
                a, b, _ = experts[key]
                m.lora_A["default"].weight.copy_(a)
                m.lora_B["default"].weight.copy_(b)
                filled.add(key)
    if filled != set(experts):
        raise RuntimeError(f"PEFT did not wrap the expert parameters {sorted(set(experts) - filled)}")
    state = peft.get_peft_model_state_dict(pm)
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if "lora_" in k and
            any(k.startswith(f"base_model.model.{n.rpartition('.')[0]}.") for n in experts)}


def _fan_in_fan_out(layers: dict[str, _Columns]) -> bool:
    """PEFT's ``fan_in_fan_out`` is one flag per adapter: True for transformers' Conv1D (GPT-2), which
    stores its weight as (in, out). A model mixing Conv1D and Linear targets cannot be described."""
    kinds = {c.conv1d for c in layers.values() if c.idx.dim() == 1}
    if len(kinds) > 1:
        conv = sorted(n for n, c in layers.items() if c.conv1d)
        raise ValueError(f"the adapter targets both Conv1D ({conv[0]}, ...) and nn.Linear layers; a PEFT LoRA "
                         "adapter has one fan_in_fan_out flag for all of them, so it cannot hold this update: "
                         "export --format merged instead")
    return kinds == {True}


# --------------------------------------------------------------------------- the formats

def export_lora(source, output, base: str | None = None, *, overwrite: bool = False, device="auto") -> Exported:
    """Write a trained GIFT-SW adapter (run dir, salientft or PEFT GIFT-SW adapter) as a PEFT LoRA adapter."""
    import torch

    out = _check_output(output, overwrite, source)
    _require("peft", "--format lora")
    adapter = _adapter_source(source, base)
    model, _, layers = _trained_model(adapter, device)
    fan_in_fan_out = _fan_in_fan_out(layers)
    factors, experts = {}, {}
    with torch.no_grad():
        for name, c in layers.items():
            if c.idx.dim() == 2:
                experts[name] = _expert_factors(c)
                continue
            w = c.weight.float()
            delta = c.columns.float() - w.index_select(1, c.idx)
            factors[name] = (_one_hot(c.idx, w.shape[1], torch.float32), delta)
    if experts and fan_in_fan_out:
        raise ValueError("the adapter targets transformers' Conv1D layers and fused MoE experts; PEFT's LoRA "
                         "cannot hold both (fan_in_fan_out is one flag and target_parameters refuse it): "
                         "export --format merged")
    from .outputs import output_dir

    with output_dir(out) as tmp:
        ranks = _write_lora(tmp, factors, adapter.stock_base, fan_in_fan_out, experts=experts, model=model)
    return Exported("lora", out, adapter.stock_base, ranks)


def _expert_factors(c: _Columns):
    """PEFT's ``target_parameters`` LoRA factors of a fused expert projection: lora_A (experts * k, in),
    row e * k + j selecting expert e's column idx[e, j]; lora_B (out, k * experts), column j * experts + e
    holding that column's change (PEFT reshapes A to (experts, k, in) and B to (out, k, experts))."""
    import torch

    w = c.weight.float()  # [experts, out, in]
    n_exp, out_f, in_f = w.shape
    k = c.idx.shape[1]
    delta = c.columns.float() - torch.gather(w, 2, c.idx[:, None, :].expand(-1, out_f, -1))  # [experts, out, k]
    a = torch.zeros(n_exp, k, in_f)
    a.scatter_(2, c.idx.cpu()[:, :, None], 1.0)
    return a.reshape(n_exp * k, in_f), delta.permute(1, 2, 0).reshape(out_f, k * n_exp).cpu(), k


def export_merged(source, output, base: str | None = None, *, overwrite: bool = False, device="auto") -> Exported:
    """Write the trained columns merged into the base (fp32) as a plain transformers model + tokenizer."""
    from .methods.base import save_plain_model

    out = _check_output(output, overwrite, source)
    adapter = _adapter_source(source, base)
    model, tok, _ = _trained_model(adapter, device)
    from .gift import merge_gift

    save_plain_model(merge_gift(model), tok, out)
    return Exported("merged", out)


def _check_representable(source, layers: dict) -> None:
    """Refuse what compressed-tensors' pack-quantized channel format cannot carry exactly."""
    for name, spec in layers.items():
        if spec.get("group_size") is not None:
            g = spec["group_size"]
            raise ValueError(
                f"{source} is quantized with group_size={g} ({name}): salientft's groups are runs of {g} "
                f"consecutive NON-salient columns (the salient columns are skipped), so they do not line up with "
                f"compressed-tensors' groups of {g} consecutive columns of the whole row and the scales have no "
                "exact counterpart; quantize without --group-size (one scale per row) to export it"
            )
        if spec.get("bits") not in CT_BITS:
            raise ValueError(
                f"{source} is quantized to {spec.get('bits')} bits ({name}): vLLM's kernels for compressed-tensors "
                f"integer weights take {' or '.join(map(str, CT_BITS))} bits only, so a {spec.get('bits')}-bit "
                "checkpoint would have no servable counterpart; quantize with --bits 4 to export it"
            )


def _check_linear(model, names) -> None:
    """compressed-tensors quantizes nn.Linear layers; refuse a model whose targets were Conv1D (GPT-2)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    bad = [n for n in names if not isinstance(skeleton.get_submodule(n), torch.nn.Linear)]
    if bad:
        raise ValueError(f"{bad[0]} is a {type(skeleton.get_submodule(bad[0])).__name__}, not nn.Linear: "
                         "compressed-tensors' integer formats (and vLLM's kernels for them) quantize nn.Linear only")


def _dense_int_linear(layer):
    """An fp32 nn.Linear holding scale * q in the integer columns and zeros in the salient ones."""
    import torch

    lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=torch.float32,
                          device=layer.qweight.device)
    with torch.no_grad():
        w = torch.zeros_like(lin.weight)
        w.index_copy_(1, layer.int_idx, layer.dequantized_int_weight(torch.float32))
        lin.weight.copy_(w)
    if layer.bias is not None:
        lin.bias = torch.nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return lin


def _verify_packed(model, layers: dict, bits: int) -> None:
    """The packed codes and scales must be salientft's integers (zeros in the salient columns) and steps."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    for name, layer in layers.items():
        module = model.get_submodule(name)
        shape = (layer.out_features, layer.in_features)
        codes = unpack_from_int32(module.weight_packed.data, bits, torch.Size(shape))
        want = torch.zeros(shape, dtype=torch.int8)
        want.index_copy_(1, layer.int_idx.cpu(), layer.integers().cpu())
        if not torch.equal(codes.cpu().to(torch.int8), want) or not torch.equal(module.weight_scale.data.cpu(),
                                                                                layer.scale.cpu()):
            raise RuntimeError(f"compressed-tensors did not store {name}'s integers and steps exactly; "
                               "this compressed-tensors version is not supported by salientft export")


def export_compressed_tensors(source, output, *, overwrite: bool = False, device="auto") -> Exported:
    """Write a salientft quantized model as compressed-tensors pack-quantized + a salient-column LoRA adapter."""
    import torch

    from ._io import read_json_object
    from .outputs import output_dir
    from .quant.model import QUANT_CONFIG_NAME, load_quantized, quantized_layers
    from .targets import set_module

    out = _check_output(output, overwrite, source)
    path = Path(source)
    folder = _quantized_folder(path) if path.is_dir() else None
    if folder is None:
        raise ValueError(f"{source} is not a model written by salientft quantize (no {QUANT_CONFIG_NAME}) nor a "
                         "recovery run with one in model/; --format compressed-tensors exports quantized models "
                         "(use --format lora or merged for an adapter)")
    meta = read_json_object(folder / QUANT_CONFIG_NAME, "salientft's quantization config")
    _check_representable(source, meta.get("layers", {}))
    what = "--format compressed-tensors"
    _require("compressed_tensors", what)
    _require("peft", what)
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    from .devices import resolve_device

    model, tok = load_quantized(folder, device=resolve_device(device), return_tokenizer=True)
    layers = quantized_layers(model)
    _check_representable(source, {n: {"bits": m.bits, "group_size": m.group_size} for n, m in layers.items()})
    _check_linear(model, list(layers))
    bits = next(iter(layers.values())).bits
    if any(m.bits != bits for m in layers.values()):
        raise ValueError(f"{source} mixes bit widths; the compressed-tensors export writes one scheme")
    factors = {}
    for name, layer in layers.items():
        set_module(model, name, _dense_int_linear(layer))
        if layer.k:
            sw = layer.salient_weight.detach()
            factors[name] = (_one_hot(layer.salient_idx, layer.in_features, sw.dtype), sw)
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in layers]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, strategy="channel"))
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format="pack-quantized")
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for name, layer in layers.items():  # the weights are fp32, so their scales are: salientft's steps exactly
            model.get_submodule(name).weight_scale.copy_(layer.scale)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    _verify_packed(model, layers, bits)
    with output_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        compressor.update_config(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))
        ranks = _write_lora(tmp / SALIENT_LORA_DIR, factors, str(out.resolve())) if factors else {}
    return Exported("compressed-tensors", out, str(out.resolve()), ranks)


def export(source, output, format: str, base: str | None = None, *, overwrite: bool = False,
           device="auto") -> Exported:
    """Export ``source`` to ``output`` in ``format`` (one of :data:`FORMATS`); see the module docstring.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``): where the model loads and the work runs;
    the files do not depend on it (copies, exact differences and integer packing)."""
    from .devices import resolve_device

    device = resolve_device(device)  # before any work
    if format == "compressed-tensors":
        if base is not None:
            raise ValueError("--base does not apply to --format compressed-tensors: the quantized model is the base")
        return export_compressed_tensors(source, output, overwrite=overwrite, device=device)
    exporters = {"lora": export_lora, "merged": export_merged}
    if format not in exporters:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    return exporters[format](source, output, base, overwrite=overwrite, device=device)
