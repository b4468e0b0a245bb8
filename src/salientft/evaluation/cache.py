"""Reports of unchanged models, kept: ``salientft train`` measures its base before training (the
held-out loss and the "before" evaluation), and the same weights measured the same way give the
same numbers, so a rerun reads them instead of spending minutes recomputing (the quick start:
about a fifth of its time on a 2-core CPU).

An entry is found only when everything that could change a number matches, hashed into its key:

- the model: SHA-256 of every parameter and buffer (name, dtype, shape, bytes, in name order), its
  class and its config (``model_fingerprint``; a device's weights cross to the host in a few large
  copies), so a single changed weight misses;
- what was measured: the tasks, ``limit``/``subset``, batch size, padded-token budget,
  log-probability dtype (evaluation), or the tokenized held-out examples themselves and the batch
  size (held-out loss);
- the code that measures: a hash of the source files that compute the number (``CODE_FILES``:
  the scorer, tasks, runner and embedded-data reader for an evaluation; the held-out loss
  function's own source, the chat collator and the labelled-rows head for the held-out loss), salientft's version,
  torch's version (its kernels), and the embedded data's pinned requirement. Any edit there
  misses every entry of that kind, including shipped ones.

Reading every weight is the costly part of a key (a 7B model: 14 GB through the host), so it is
done only when it can pay: an entry's file name starts with a probe, the key of everything but the
weights' bytes (``probe_for``; the model by class, config and every tensor's name, dtype and shape:
``ModelFingerprint.identity``). No file with the probe: nothing can match, the weights are not read
before measuring. They are read once per run (``ModelFingerprint``, shared by both measures), when
an entry could match or to key the entry written after a measure: an exact entry needs them.

Entries live in ``<salientft cache>/measures/<kind>-<probe>-<key>.json`` (``$SALIENTFT_CACHE``), written
atomically (format 2; the probe-less files of format 1 are ignored: measured again, never misread); a corrupt entry is ignored and rewritten. ``SALIENTFT_NO_MEASURE_CACHE=1`` turns the
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

# The entry file's layout: ``<kind>-<probe>-<key>.json``. Format-1 files (``<kind>-<key>.json``,
# no probe) are never read: they do not match the probe's pattern, and their "format" differs.
FORMAT = 2
KEY_SCHEME = 1  # hashed into every key and probe: bump when what a key covers changes
DISABLE_ENV = "SALIENTFT_NO_MEASURE_CACHE"
# per kind, the source files whose code decides a cached number (relative to the salientft package)
CODE_FILES = {
    "eval": ("evaluation/scorer.py", "evaluation/tasks.py", "evaluation/runner.py", "data/embedded.py"),
    "heldout": ("data/chat.py", "labelled_logits.py"),
}


def cache_root() -> Path:
    from .._packages import cache_dir

    return cache_dir() / "measures"


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes")


# config fields that say where a model was read from, not what it is
WHERE_FROM = ("_name_or_path", "_commit_hash")


CHUNK_BYTES = 256 << 20  # staging buffer per device: a 7B bf16 model crosses to the host in ~56 copies
MIN_STAGING = 1 << 20  # ... or smaller, down to this, on a device too full for it


def _describe(model) -> bytes:
    """The class and config (without ``WHERE_FROM``): what the weights are the weights of."""
    config = getattr(model, "config", None)
    out = type(model).__name__.encode()
    if config is not None and hasattr(config, "to_dict"):
        fields = {k: v for k, v in config.to_dict().items() if k not in WHERE_FROM}
        out += json.dumps(fields, sort_keys=True, default=str).encode()
    return out


def _tensors(model) -> list[tuple[bytes, torch.Tensor | None]]:
    """(header, tensor or None) per parameter and buffer in name order: ``name|dtype|shape``, and
    None with ``tied`` appended for a tensor already listed under another name (tied weights);
    metadata only, nothing is read."""
    out, seen = [], set()
    for name, t in sorted(list(model.named_parameters()) + list(model.named_buffers()), key=lambda kv: kv[0]):
        t = t.detach()
        header = f"{name}|{t.dtype}|{tuple(t.shape)}".encode()
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:  # tied weights: the name says it, the bytes were hashed once
            out.append((header + b"tied", None))
            continue
        seen.add(key)
        out.append((header, t if t.numel() else None))
    return out


def _staging(size: int, device: torch.device) -> torch.Tensor:
    """A staging buffer of ``size`` bytes on ``device``; halved while the device is too full for
    it (down to ``MIN_STAGING``: more transfers, the same digest)."""
    while True:
        try:
            return torch.empty(size, dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError:
            if size <= MIN_STAGING:
                raise
            size //= 2


class _Stream:
    """Feeds one SHA-256, in order, with headers and tensors' bytes. Host tensors are hashed in
    place; a device's tensors are packed into one staging buffer on that device (device-side
    copies, no sync) that crosses to the host only when full: a few large transfers, not one host
    copy and sync per tensor."""

    def __init__(self, h, chunk_bytes: int, device_bytes: dict, stage_host: bool = False):
        self.h, self.chunk, self.left, self.stage_host = h, chunk_bytes, device_bytes, stage_host
        self.buf: torch.Tensor | None = None
        self.used = 0
        self.pending: list[tuple[bytes, int, int]] = []  # (header, offset, length) in the buffer
        self.transfers = 0

    def header(self, b: bytes) -> None:
        if self.pending:
            self.pending.append((b, 0, 0))
        else:
            self.h.update(b)

    def tensor(self, t: torch.Tensor) -> None:
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        if flat.device.type == "cpu" and not self.stage_host:
            self.flush()
            self.h.update(memoryview(flat.numpy()))
            return
        if self.buf is not None and self.buf.device != flat.device:
            self.flush()
            self.buf = None
        if self.buf is None:
            self.buf = _staging(min(self.chunk, self.left[flat.device]), flat.device)
        pos, n = 0, flat.numel()
        while pos < n:
            if self.used == self.buf.numel():
                self.flush()
            take = min(n - pos, self.buf.numel() - self.used)
            self.buf[self.used:self.used + take].copy_(flat[pos:pos + take])
            self.pending.append((b"", self.used, take))
            self.used += take
            pos += take
        self.left[flat.device] -= n

    def flush(self) -> None:
        if not self.pending:
            return
        view = None
        if self.used:
            view = memoryview(self.buf[:self.used].cpu().numpy())  # the one transfer (and sync) per chunk
            self.transfers += 1
        for header, offset, length in self.pending:
            self.h.update(header)
            if length:
                self.h.update(view[offset:offset + length])
        self.pending.clear()
        self.used = 0


def model_fingerprint(model, chunk_bytes: int = CHUNK_BYTES, stage_host: bool = False) -> str:
    """SHA-256 of the model's class, config and every parameter and buffer (exact bytes).

    The config's record of where the model was read from (``_name_or_path``, ``_commit_hash``) is
    left out: the same weights read from another folder (another user's cache directory, a copy)
    are the same model, and must find the same entries.

    Exact bytes, hashed on the host: a collision-resistant hash, so one changed weight misses, and
    the same digest wherever the model lives (a checksum reduced on the device would be cheaper,
    but its collisions are easy to build). Weights on an accelerator reach the host through a
    staging buffer of ``chunk_bytes`` (``_Stream``), not one copy and sync per tensor; host
    weights are read in place. The digest is the one of the per-tensor hashing it replaced, so
    entries written before stay found. ``stage_host``: route host tensors through the staging
    buffer too (tests check that path on a CPU). Costly on a large model: ``ModelFingerprint``
    computes it only when an entry is to be read or written."""
    h = hashlib.sha256(_describe(model))
    tensors = _tensors(model)
    device_bytes: dict = {}
    for _, t in tensors:
        if t is not None:
            device_bytes[t.device] = device_bytes.get(t.device, 0) + t.numel() * t.element_size()
    stream = _Stream(h, chunk_bytes, device_bytes, stage_host)
    for header, t in tensors:
        stream.header(header)
        if t is not None:
            stream.tensor(t)
    stream.flush()
    return h.hexdigest()


class ModelFingerprint:
    """A model's fingerprint for the cache's keys, computed when first needed and then kept: the
    cheap ``identity`` (class, config, every tensor's name, dtype, shape and ties; no bytes read)
    picks the entries that could match, and only then, or to write an entry, is ``value``
    (``model_fingerprint``, every byte) computed, once per object. Pass one object to every
    measure of the same unchanged model."""

    def __init__(self, model):
        self._model = model
        self._identity: str | None = None
        self._value: str | None = None

    @property
    def identity(self) -> str:
        if self._identity is None:
            h = hashlib.sha256(_describe(self._model))
            for header, _ in _tensors(self._model):
                h.update(header + b"\n")
            self._identity = h.hexdigest()
        return self._identity

    @property
    def computed(self) -> bool:
        return self._value is not None

    @property
    def value(self) -> str:
        if self._value is None:
            self._value = model_fingerprint(self._model)
        return self._value


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


def _resolved(fields: dict[str, Any], part: str) -> dict[str, Any]:
    return {k: getattr(v, part) if isinstance(v, ModelFingerprint) else v for k, v in fields.items()}


def key_for(kind: str, fields: dict[str, Any]) -> str:
    """The entry's key: every field, a ``ModelFingerprint`` by its ``value`` (all its bytes)."""
    blob = json.dumps({"format": KEY_SCHEME, "kind": kind, "fields": _resolved(fields, "value")},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def probe_for(kind: str, fields: dict[str, Any]) -> str:
    """The key's cheap part, first in the entry's file name: every field, a ``ModelFingerprint``
    by its ``identity`` (no weight read). No file with it: no entry can match."""
    blob = json.dumps({"probe": KEY_SCHEME, "kind": kind, "fields": _resolved(fields, "identity")},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def _read(path: Path, key: str) -> tuple[bool, Any]:
    """(found, value) of the entry at ``path`` (a broken one is not found: it is measured again)."""
    try:
        entry = json.loads(path.read_text())
        if entry.get("format") == FORMAT and entry.get("key") == key:
            return True, entry["value"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError, KeyError) as e:
        log.warning("ignoring a broken cache entry %s (%s); measuring again", path, e)
    return False, None


def cached(kind: str, fields: dict[str, Any], compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(value, hit): the stored value for (``kind``, ``fields``), else ``compute()``, stored.

    A ``ModelFingerprint`` among ``fields`` reads the weights only when an entry with the same
    probe exists, or to write the new entry's key (after ``compute``)."""
    if not enabled():
        return compute(), False
    from .._io import write_json

    root = cache_root()
    probe = probe_for(kind, fields)
    if any(root.glob(f"{kind}-{probe}-*.json")):  # an entry could match: now the weights count
        key = key_for(kind, fields)
        path = root / f"{kind}-{probe}-{key}.json"
        found, value = _read(path, key)
        if found:
            log.info("%s: read from the cache (%s): the same model, settings and code were measured before",
                     kind, path)
            return value, True
    value = compute()
    key = key_for(kind, fields)  # the weights as measured: compute() does not change them
    path = root / f"{kind}-{probe}-{key}.json"
    try:
        write_json(path, {"format": FORMAT, "key": key, "probe": probe, "kind": kind, "value": value})
    except OSError as e:  # a read-only cache costs time, not the result
        log.warning("could not write the cache entry %s (%s)", path, e)
    return value, False
