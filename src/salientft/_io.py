"""File helpers: atomic writing (a crash never leaves a half-written output behind), checking an
output path before any work, cleaning what a killed write left, and reading a safetensors file
with clear errors.

Atomic writes go through a temporary sibling named ``.<name>.<8 random chars>.tmp`` (a file or a
folder) that is renamed onto ``<name>`` only once complete; ``atomic_dir`` moves an existing
folder aside as ``.<name>.old`` for the instant of the swap. A process killed mid-write leaves
these behind and never a half-written ``<name>``; :func:`remove_temporaries` cleans them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; it replaces ``path`` (a directory) only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _test_delay()
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# Test hook (fault injection): seconds to sleep once a folder is written and before it is renamed into
# place, so a test can kill the process while a checkpoint is being written. Unset in normal use.
TEST_DELAY_ENV = "SALIENTFT_TEST_ATOMIC_DELAY"

# ``.<name>.<random>.tmp`` of atomic_path/atomic_dir (tempfile's 8 random characters), and
# ``.<name>.old`` of atomic_dir's swap.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")
_OLD = re.compile(r"\.(?P<name>.+)\.old")


def _test_delay() -> None:
    delay = os.environ.get(TEST_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def is_temporary(name: str) -> bool:
    """Whether a file name is a leftover of an atomic write (``.<name>.<random>.tmp``, ``.<name>.old``)."""
    return temporary_target(name) is not None


def temporary_target(name: str) -> str | None:
    """``<name>`` of a temporary ``.<name>.<random>.tmp`` / ``.<name>.old``; None for other names."""
    if _TEMPORARY.fullmatch(name):
        return name[1:-len(".xxxxxxxx.tmp")]
    old = _OLD.fullmatch(name)
    return old["name"] if old else None


def remove_entry(p: Path) -> None:
    """Delete a file, link or folder (a link, never what it points to); nothing if absent."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def sweep_temporaries(directory: str | os.PathLike,
                      ours: Callable[[Path, str], bool] = lambda entry, target: True) -> list[Path]:
    """Delete what killed atomic writes left in ``directory`` (not below it); returns what went.

    Only the temporaries ``ours(entry, target)`` accepts (``target``: the ``<name>`` it was the
    temporary of) are touched: a checkpoint folder is salientft's whole, a folder shared with a
    user only for the names salientft wrote (``outputs.remove_stale``). A ``.<name>.old`` whose
    ``<name>`` is missing (killed between the two renames of ``atomic_dir``) is the previous
    complete folder: it is put back rather than deleted.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in sorted(directory.iterdir()):
        target = temporary_target(p.name)
        if target is None or not ours(p, target):
            continue
        if _OLD.fullmatch(p.name) and not (directory / target).exists():
            os.replace(p, directory / target)
            continue
        remove_entry(p)
        removed.append(p)
    return removed


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Every temporary of a killed atomic write in ``directory``, a folder only salientft writes
    (a checkpoint): :func:`sweep_temporaries` of all names."""
    return sweep_temporaries(directory)


def check_writable(path: str | os.PathLike, kind: str = "file", flag: str = "--output") -> None:
    """Refuse, before any work, an output path that cannot be written.

    ``kind="file"``: ``path`` will be a file (an existing directory there is an error);
    ``kind="dir"``: a folder (an existing file there is an error). Creates the missing parent
    folders and a probe file, then removes both: nothing is left behind. Errors name ``flag``.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    p = Path(path)
    what = f"{flag} {p}"
    if kind == "dir" and p.exists() and not p.is_dir():
        raise NotADirectoryError(f"{what} is a file; give a directory path")
    if kind == "file" and p.is_dir():
        raise IsADirectoryError(f"{what} is a directory; give a file path (e.g. {p / 'results.json'})")
    folder = p if kind == "dir" else p.parent
    missing = []
    existing = folder
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what}: {existing} is a file, so no folder can be made inside it")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, probe = tempfile.mkstemp(prefix=".salientft-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = f" ({e.strerror}: {e.filename})" if e.strerror and e.filename else f" ({e})"
        raise PermissionError(f"{what} cannot be written{where}; choose a writable location") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object stored in ``path`` (``what`` it should hold); errors name the file."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:  # invalid JSON or not UTF-8
        raise ValueError(f"{p} is corrupt (not valid JSON: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{p} must hold a JSON object ({what})")
    return obj


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict, dict]:
    """Every tensor and the metadata of a safetensors file, with clear errors naming ``what``."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt/truncated files
        raise ValueError(f"{p} is not a readable safetensors file (corrupt or truncated?): {e}") from None
    return tensors, meta


def is_path_like(source: str) -> bool:
    """Whether a data source names a local file rather than a Hugging Face dataset.

    A path: anything that exists; a name with an extension (``x.jsonl``, ``data.txt``); an
    absolute or ``./``, ``../``, ``~`` path; more than one ``/``; or ``dir/name`` whose ``dir``
    is a local folder. A hub dataset: ``name`` or ``owner/name`` otherwise, and anything written
    ``hf:owner/name`` (checked by the caller).
    """
    p = Path(source)
    if p.exists() or p.suffix or "\\" in source:
        return True
    if source.startswith(("/", "./", "../", "~")) or source.count("/") > 1:
        return True
    return "/" in source and p.parent.is_dir()


def iter_jsonl(path) -> Iterator[tuple[str, Any]]:
    """(``path:line``, record) for every non-blank line of a JSONL file, read as UTF-8 (a BOM on
    line 1 is fine). Errors name ``path:line`` and the problem: not UTF-8, invalid JSON."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
