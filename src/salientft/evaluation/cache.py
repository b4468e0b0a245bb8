"""Reports of unchanged models, kept: ``salientft train`` measures its base before training (the
held-out loss and the "before" evaluation), and the same weights measured the same way give the
same numbers, so a rerun reads them instead of spending minutes recomputing (the quick start:
about a fifth of its time on a 2-core CPU).

An entry is found only when everything that could change a number matches, hashed into its key:

- the model: SHA-256 of every parameter and buffer (name, dtype, shape, bytes, in name order), its
  class and its config (``model_fingerprint``), so a single changed weight misses;
- what was measured: the tasks, ``limit``/``subset``, batch size, padded-token budget,
  log-probability dtype (evaluation), or the tokenized held-out examples themselves and the batch
  size (held-out loss);
- the code that measures: a hash of the source files that compute the number (``CODE_FILES``:
  the scorer, tasks, runner and embedded-data reader for an evaluation; the held-out loss
  function's own source and the chat collator for the held-out loss), salientft's version,
  torch's version (its kernels), and the embedded data's pinned requirement. Any edit there
  misses every entry of that kind, including shipped ones.

Entries live in ``<salientft cache>/measures/<kind>-<key>.json`` (``$SALIENTFT_CACHE``), written
atomically; a corrupt entry is ignored and rewritten. ``SALIENTFT_NO_MEASURE_CACHE=1`` turns the
cache off. ``seed_dir``: a folder of entries to copy in first (``scripts/quickstart.sh`` ships
the quick start's, so the first run on a new machine reads it too; its key still has to match).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

FORMAT = 1
DISABLE_ENV = "SALIENTFT_NO_MEASURE_CACHE"
# per kind, the source files whose code decides a cached number (relative to the salientft package)
CODE_FILES = {
    "eval": ("evaluation/scorer.py", "evaluation/tasks.py", "evaluation/runner.py", "data/embedded.py"),
    "heldout": ("data/chat.py",),
}


def cache_root() -> Path:
    from .._packages import cache_dir

    return cache_dir() / "measures"


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes")


# config fields that say where a model was read from, not what it is
WHERE_FROM = ("_name_or_path", "_commit_hash")


def model_fingerprint(model) -> str:
    """SHA-256 of the model's class, config and every parameter and buffer (exact bytes).

    The config's record of where the model was read from (``_name_or_path``, ``_commit_hash``) is
    left out: the same weights read from another folder (another user's cache directory, a copy)
    are the same model, and must find the same entries."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        fields = {k: v for k, v in config.to_dict().items() if k not in WHERE_FROM}
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    seen = set()
    for name, t in sorted(list(model.named_parameters()) + list(model.named_buffers()), key=lambda kv: kv[0]):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:  # tied weights: the name says it, the bytes were hashed once
            h.update(b"tied")
            continue
        seen.add(key)
        h.update(t.contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def code_version(kind: str, extra_source: str = "") -> str:
    """Hash of the code measuring ``kind`` (its ``CODE_FILES`` and ``extra_source``: a function's
    own source), salientft's and torch's versions and the embedded data's pin."""
    from .. import embedded_files

    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(extra_source.encode())
    for rel in CODE_FILES[kind]:
        h.update(rel.encode())
        h.update((pkg / rel).read_bytes())
    try:
        from importlib.metadata import version

        h.update(version("salientft").encode())
    except Exception:  # running from a source tree without installed metadata
        h.update(b"source")
    h.update(torch.__version__.encode())
    h.update(json.dumps([getattr(p, "requirement", str(p)) for p in embedded_files.PACKAGES], default=str).encode())
    return h.hexdigest()


def key_for(kind: str, fields: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, "kind": kind, "fields": fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def seed_from(seed_dir: str | Path | None) -> None:
    """Copy the entries of ``seed_dir`` that the cache lacks (never overwriting one)."""
    if not seed_dir or not enabled():
        return
    from .._io import atomic_path

    src = Path(seed_dir)
    if not src.is_dir():
        return
    for f in sorted(src.glob("*.json")):
        dest = cache_root() / f.name
        if not dest.exists():
            with atomic_path(dest) as tmp:
                tmp.write_bytes(f.read_bytes())


def cached(kind: str, fields: dict[str, Any], compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(value, hit): the stored value for (``kind``, ``fields``), else ``compute()``, stored."""
    if not enabled():
        return compute(), False
    from .._io import write_json

    key = key_for(kind, fields)
    path = cache_root() / f"{kind}-{key}.json"
    try:
        entry = json.loads(path.read_text())
        if entry.get("format") == FORMAT and entry.get("key") == key:
            log.info("%s: read from the cache (%s): the same model, settings and code were measured before",
                     kind, path)
            return entry["value"], True
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError) as e:
        log.warning("ignoring a broken cache entry %s (%s); measuring again", path, e)
    value = compute()
    try:
        write_json(path, {"format": FORMAT, "key": key, "kind": kind, "value": value})
    except OSError as e:  # a read-only cache costs time, not the result
        log.warning("could not write the cache entry %s (%s)", path, e)
    return value, False
