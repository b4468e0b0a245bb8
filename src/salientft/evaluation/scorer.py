"""Batched log-likelihood scoring of (context, continuation) requests, as lm-eval's HFLM does it.

Tokenization follows lm-eval's ``TemplateLM._encode_pair``: trailing whitespace of the context
moves to the start of the continuation, the whole string is encoded, and the continuation is
what follows the separately-encoded context. Inputs are left-truncated to ``max_length + 1``.

Speed: all requests of one item are packed into *one* sequence shaped like a tree. Their longest
common token prefix (the shared context) appears once, followed by each request's remaining tokens
as a branch that attends to the prefix and to itself only, with its true position ids. Every
scored token sees exactly the tokens and positions it would see alone, so the log-likelihoods are
those of separate sequences (up to float summation order), while the context is computed once:
for BoolQ (one-token answers) an item is a single forward of its passage. Items are sorted by
packed length (longest first, like lm-eval) and batched; logits are computed only at scored
positions (``logits_to_keep``) and normalised in float32.

Where the time goes (SmolLM2-135M, bf16, 2 CPU threads; ``bench/eval_throughput.py``,
``docs/results/eval_throughput.md``): matmuls are 66-77 % of it, attention 11-18 %, the
normalisation of the kept logits 1-2 %. So the two levers besides sharing contexts are padding
and the attention kernel:

- batches are cut by padded tokens as well as by sequences (``max_batch_tokens``, default 4096):
  the long tail of BoolQ passages (up to 1291 tokens) no longer pads 15 shorter sequences to its
  length (23 % padding on the 500-item BoolQ subset with 16 sequences per batch);
- a batch in which no sequence branches (BoolQ and every single-request item) takes the plain
  causal path with a 2D padding mask, as lm-eval does, instead of the 4D tree mask, which the
  CPU attention kernel processes about 2x slower per call.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer say
DEFAULT_MAX_BATCH_TOKENS = 4096  # padded tokens per batch (sequences x longest); see the module docstring


def batch_bounds(lengths: Sequence[int], max_seqs: int, max_tokens: int | None) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive sequences (``lengths`` sorted longest first) per batch:
    at most ``max_seqs`` sequences and, when ``max_tokens`` is set, at most ``max_tokens`` padded
    tokens (count x the batch's first, longest length), but always at least one sequence."""
    out, i, n = [], 0, len(lengths)
    while i < n:
        cap = max_seqs if max_tokens is None else max(1, min(max_seqs, max_tokens // max(1, lengths[i])))
        out.append((i, min(n, i + cap)))
        i += cap
    return out


@dataclass
class _Encoded:
    inputs: list[list[int]]  # per request: (ctx + cont)[-(max_len + 1):][:-1]
    targets: list[list[int]]  # per request: the continuation tokens
    prefix: int  # length of the token prefix shared by all inputs


def model_max_length(model, tokenizer) -> int:
    """The context length lm-eval's HFLM would use (config first, then tokenizer, else 2048)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10**9:
        return v
    return DEFAULT_MAX_LENGTH


class PairEncoder:
    """lm-eval's context/continuation tokenization, batched through the fast tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        pid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prefix_token_id = pid
        self.bos_text = tokenizer.decode([pid]) if pid is not None else None

    def _encode_many(self, strings: list[str]) -> list[list[int]]:
        out: list[list[int] | None] = [None] * len(strings)
        # lm-eval's tok_encode: no special tokens for a string that already starts with BOS
        starts = [bool(self.bos_text) and s.startswith(self.bos_text) for s in strings]
        plain = [i for i, b in enumerate(starts) if not b]
        with_bos = [i for i, b in enumerate(starts) if b]
        for idx, special in ((plain, True), (with_bos, False)):
            if idx:
                enc = self.tok([strings[i] for i in idx], add_special_tokens=special)["input_ids"]
                for i, e in zip(idx, enc):
                    out[i] = list(e)
        return out  # type: ignore[return-value]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        ctxs, wholes, empty = [], [], []
        for i, (ctx, cont) in enumerate(pairs):
            if ctx == "":
                empty.append(i)
                ctxs.append("")
                wholes.append(cont)
                continue
            n = len(ctx) - len(ctx.rstrip())
            if n:
                ctx, cont = ctx[:-n], ctx[-n:] + cont
            ctxs.append(ctx)
            wholes.append(ctx + cont)
        ctx_enc = self._encode_many(ctxs)
        whole_enc = self._encode_many(wholes)
        out = []
        empty_set = set(empty)
        for i in range(len(pairs)):
            if i in empty_set:  # lm-eval: condition on BOS/EOS when the context is empty
                cont = self.tok(pairs[i][1], add_special_tokens=False)["input_ids"]
                if cont and cont[0] == self.prefix_token_id:
                    out.append((cont[:1], cont[1:]))
                else:
                    out.append(([self.prefix_token_id], cont))
            else:
                out.append((ctx_enc[i], whole_enc[i][len(ctx_enc[i]):]))
        return out


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def _encode_groups(encoder: PairEncoder, groups: Sequence[Sequence[tuple[str, str]]], max_length: int,
                   share: bool) -> list[_Encoded]:
    flat = [p for g in groups for p in g]
    pairs = encoder.encode_pairs(flat)
    out, k = [], 0
    for g in groups:
        inputs, targets = [], []
        for ctx, cont in pairs[k:k + len(g)]:
            if not cont:
                raise ValueError(f"empty continuation after tokenization in request {flat[k]!r}")
            if len(cont) > max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's {max_length}")
            whole = (ctx + cont)[-(max_length + 1):]
            inputs.append(whole[:-1])
            targets.append(cont)
        k += len(g)
        out.append(_Encoded(inputs, targets, _common_prefix(inputs) if share and len(inputs) > 1 else 0))
    return out


def _supports_tree(model) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in (None, "eager", "sdpa")


class LoglikScorer:
    """Scores groups of requests; a group (an item's choices) shares its common token prefix."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None,
                 share_context: bool = True, progress: bool = True, logprob_dtype: str = "model",
                 max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self.model = model
        self.encoder = PairEncoder(tokenizer)
        self.batch_size = batch_size
        self.max_length = max_length or model_max_length(model, tokenizer)
        self.share = share_context and _supports_tree(model)
        self.progress = progress
        if logprob_dtype not in ("model", "float32"):
            raise ValueError(f"logprob_dtype must be 'model' (lm-eval's default) or 'float32', got {logprob_dtype!r}")
        self.logprob_dtype = logprob_dtype
        self._keep_mode = "mask"  # "mask" (2D bool logits_to_keep), then "full" if unsupported

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, groups: Sequence[Sequence[tuple[str, str]]], desc: str = "scoring") -> list[list[float]]:
        """Log-likelihood of each continuation given its context, per group, in input order."""
        from tqdm.auto import tqdm

        encoded = _encode_groups(self.encoder, groups, self.max_length, self.share)
        units = self._units(encoded)
        order = sorted(range(len(units)), key=lambda u: -units[u][0])  # longest first, as lm-eval
        results: list[list[float]] = [[math.nan] * len(e.inputs) for e in encoded]
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(groups), desc=desc, disable=not self.progress, unit="item")
        try:
            with torch.inference_mode():
                for s, e in batch_bounds([units[u][0] for u in order], self.batch_size, self.max_batch_tokens):
                    batch = [units[u] for u in order[s:e]]
                    self._run_batch(batch, results)
                    bar.update(sum(1 for b in batch if b[3]))
        finally:
            bar.close()
            self.model.train(was_training)
        return results

    def _units(self, encoded: list[_Encoded]):
        """Packed sequences: (length, tokens, positions/segments/targets, counts-as-item-done)."""
        units = []
        for g, e in enumerate(encoded):
            if self.share:
                units.append(self._pack(g, e, range(len(e.inputs)), e.prefix, True))
            else:
                for r in range(len(e.inputs)):
                    units.append(self._pack(g, e, [r], 0, r == len(e.inputs) - 1))
        return units

    @staticmethod
    def _pack(g: int, e: _Encoded, reqs, prefix: int, last: bool):
        reqs = list(reqs)
        base = e.inputs[reqs[0]][:prefix]
        tokens, positions, segments = list(base), list(range(prefix)), [0] * prefix
        scored = []  # (group, request, packed indices, target ids)
        for j, r in enumerate(reqs, start=1):
            inp, tgt = e.inputs[r], e.targets[r]
            offset = len(tokens)
            tokens += inp[prefix:]
            positions += range(prefix, len(inp))
            segments += [j] * (len(inp) - prefix)
            # the target token k of the continuation is predicted at input position q
            first_q = len(inp) + 1 - len(tgt) - 1
            idx = [q if q < prefix else offset + q - prefix for q in range(first_q, len(inp))]
            scored.append((g, r, idx, tgt))
        return len(tokens), tokens, (positions, segments, scored), last

    def _run_batch(self, batch, results) -> None:
        dev = self.device
        T = max(u[0] for u in batch)
        B = len(batch)
        ids = torch.full((B, T), 0, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        seg = torch.full((B, T), -1, dtype=torch.long)
        keep = torch.zeros((B, T), dtype=torch.bool)
        for b, (n, tokens, (positions, segments, scored), _) in enumerate(batch):
            ids[b, :n] = torch.tensor(tokens)
            pos[b, :n] = torch.tensor(positions)
            seg[b, :n] = torch.tensor(segments)
            for _, _, idx, _ in scored:
                keep[b, idx] = True
        kwargs = {}
        # the tree mask only where a sequence has two non-empty branches; a prefix followed by one
        # branch is an ordinary causal sequence
        if self.share and any(len(set(u[2][1]) - {0}) > 1 for u in batch):
            ar = torch.arange(T)
            causal = ar[None, :] <= ar[:, None]  # [q, k]
            same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])  # [B, q, k]
            allowed = causal[None] & same & (seg[:, None, :] >= 0)
            allowed |= torch.eye(T, dtype=torch.bool)[None]  # padding rows attend to themselves
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros((B, 1, T, T), dtype=dtype)
            mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
            kwargs.update(attention_mask=mask.to(dev), position_ids=pos.to(dev))
        else:  # no branches: plain causal sequences, right-padded (positions 0..n-1 as by default)
            kwargs.update(attention_mask=(seg >= 0).long().to(dev))
        flat_logits = self._logits(ids.to(dev), keep, kwargs)  # [num kept, V] in keep's row-major order
        # lm-eval (softmax_dtype=None) normalises and sums in the model's dtype: in bf16 the sums are
        # rounded to bf16, which decides near-ties. "model" reproduces that; "float32" is exact.
        exact = self.logprob_dtype == "float32" or flat_logits.dtype == torch.float32
        logprobs = torch.log_softmax(flat_logits.float() if exact else flat_logits, dim=-1)
        rank = torch.full((B, T), -1, dtype=torch.long)
        rank[keep] = torch.arange(int(keep.sum()))
        for b, (_, _, (_, _, scored), _) in enumerate(batch):
            for g, r, idx, tgt in scored:
                rows = rank[b, idx].to(logprobs.device)
                lp = logprobs[rows, torch.tensor(tgt, device=logprobs.device)]
                results[g][r] = float(lp.sum() if exact else lp.sum(dtype=torch.float32).to(lp.dtype))

    def _logits(self, ids: torch.Tensor, keep: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if self._keep_mode == "mask":
            try:
                out = self.model(input_ids=ids, logits_to_keep=keep.to(ids.device), use_cache=False, **kwargs)
                logits = out.logits
                if logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
                    return logits
            except TypeError:
                pass
            log.debug("model does not take a boolean logits_to_keep; computing full logits")
            self._keep_mode = "full"
        out = self.model(input_ids=ids, use_cache=False, **kwargs)
        return out.logits[keep.to(out.logits.device)]


def choose(lls: Sequence[float], norm_chars: Sequence[int]) -> tuple[int, int]:
    """(pred, pred_norm) exactly as lm-eval: np.argmax (first of ties) of ll and ll / len(choice)."""
    import numpy as np

    lls_a = np.asarray(lls, dtype=np.float64)
    return int(np.argmax(lls_a)), int(np.argmax(lls_a / np.asarray(norm_chars, dtype=np.float64)))
