"""One rule for every path a salientft command writes: nothing that salientft did not write is
replaced or deleted, and what it did write is known from a manifest, never guessed from a name.

The manifest, ``.salientft-manifest.json`` in a folder, lists the entries (files and folders,
one level) that salientft wrote there. A name is recorded *before* it is written (so that a
write killed halfway is still known to be salientft's), and the manifest itself is rewritten
atomically under an OS lock on its folder (two commands writing into one folder never lose each
other's entries).

- a file output (``eval --output``, ``calibrate --output/--plot/--stats-output``,
  ``compare --plot/--output/--plot-diffs``, ``--log-samples``): :func:`claim_file` refuses, before
  any work, a path that exists and is not listed in its folder's manifest; :func:`output_file`
  records the name and writes it atomically.
- a folder output (``quantize --output``, ``export --output``): the folder holds its own
  manifest listing everything in it (written first into the temporary folder, so a killed write
  is recognisable too). :func:`claim_dir` refuses a non-empty folder holding anything its manifest
  does not list, and a folder of salientft's own unless ``overwrite``.
- a run folder (``train --output``): see ``salientft.runfolder``; it adds :class:`FolderLock`.

Temporaries of killed atomic writes (``.<name>.<random>.tmp``, ``.<name>.old``) are removed only
when ``<name>`` is listed in the folder's manifest, or when they are folders holding a manifest
of their own (a killed ``quantize``/``export``): :func:`remove_stale`.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ._io import atomic_dir, atomic_path, check_writable, remove_entry, sweep_temporaries, temporary_target

MANIFEST = ".salientft-manifest.json"
LOCK = ".salientft.lock"
INTERNAL = frozenset({MANIFEST, LOCK})  # salientft's own bookkeeping in a folder
_FORMAT = 1


# ----------------------------------------------------------------------------- the manifest


@contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on ``folder`` itself (its directory descriptor) for a
    read-modify-write of its manifest; released when the block ends or the process dies."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def listed(folder: str | os.PathLike) -> set[str] | None:
    """The names the manifest of ``folder`` lists; None when the folder has no manifest."""
    path = Path(folder) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    try:
        data = json.loads(text)
        names = data["entries"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is corrupt (salientft's list of what it wrote in {Path(folder)}); "
                         "nothing there is replaced or deleted: remove the folder's outputs yourself") from None
    return set(names)


def _write_manifest(folder: Path, names: set[str]) -> None:
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps({"salientft_manifest": _FORMAT, "entries": sorted(names)}, indent=1) + "\n")


def record(folder: str | os.PathLike, *names: str) -> None:
    """Add ``names`` (entries of ``folder``, one level) to its manifest, creating both if needed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_locked(folder):
        have = listed(folder) or set()
        if not set(names) <= have:
            _write_manifest(folder, have | set(names))


def forget(folder: str | os.PathLike, *names: str) -> None:
    """Remove ``names`` from the manifest of ``folder`` (after they were deleted)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    with _folder_locked(folder):
        have = listed(folder)
        if have is not None and have & set(names):
            _write_manifest(folder, have - set(names))


def _holds_manifest(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / MANIFEST).is_file()


def _ours(folder: Path, name: str, names: set[str]) -> bool:
    if name in names or name in INTERNAL:
        return True
    target = temporary_target(name)
    return target is not None and (target in names or target in INTERNAL or _holds_manifest(folder / name))


def foreign(folder: str | os.PathLike, known: set[str] | None = None) -> list[str]:
    """The entries of ``folder`` that salientft did not write (not in its manifest, nor ``known``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = (listed(folder) or set()) | (known or set())
    return sorted(p.name for p in folder.iterdir() if not _ours(folder, p.name, names))


def remove_stale(folder: str | os.PathLike, only: str | None = None) -> list[Path]:
    """Delete what killed atomic writes of salientft's entries left in ``folder`` (one level);
    ``only``: just the temporaries of that name. A ``.<name>.old`` whose ``<name>`` is missing
    (killed between the two renames of an atomic folder swap) is put back. Returns what went."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = listed(folder) or set()

    def ours(entry: Path, target: str) -> bool:  # else a user's file that happens to look like a temporary
        if only is not None and target != only:
            return False
        return target in names or target in INTERNAL or _holds_manifest(entry)

    return sweep_temporaries(folder, ours)


def clear(folder: str | os.PathLike) -> None:
    """Delete every entry the manifest of ``folder`` lists (and their temporaries); nothing else."""
    folder = Path(folder)
    names = listed(folder) or set()
    remove_stale(folder)
    for name in sorted(names):
        remove_entry(folder / name)
    forget(folder, *names)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


# ----------------------------------------------------------------------------- file outputs


def claim_file(path: str | os.PathLike, flag: str = "--output") -> None:
    """Refuse, before any work, a file output that cannot be written or that would replace a file
    salientft did not write (one its folder's manifest does not list). Writes nothing."""
    p = Path(path)
    check_writable(p, kind="file", flag=flag)
    if (p.exists() or p.is_symlink()) and p.name not in (listed(p.parent) or set()):
        raise FileExistsError(
            f"{flag} {p} already exists and salientft did not write it (it is not in {p.parent / MANIFEST}); "
            "move it away or choose another path")


def prepare_file(path: str | os.PathLike) -> Path:
    """Just before writing the file ``path``: refuse it if salientft did not write what is there,
    record its name in its folder's manifest and remove what killed writes of it left."""
    p = Path(path)
    if (p.exists() or p.is_symlink()) and p.name not in (listed(p.parent) or set()):
        raise FileExistsError(f"{p} already exists and salientft did not write it; it is not replaced")
    record(p.parent, p.name)
    remove_stale(p.parent, only=p.name)
    return p


@contextmanager
def output_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write the file ``path`` atomically (yields the temporary to write), after
    :func:`prepare_file`."""
    with atomic_path(prepare_file(path)) as tmp:
        yield tmp


def write_json(path: str | os.PathLike, obj) -> None:
    """:func:`salientft._io.write_json` through :func:`output_file`."""
    with output_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------- folder outputs


def claim_dir(path: str | os.PathLike, flag: str = "--output", overwrite: bool = False,
              overwrite_flag: str = "--overwrite") -> None:
    """Refuse, before any work, a folder output that cannot be written, that holds anything its
    manifest does not list, or (without ``overwrite``) that holds an earlier output. Otherwise
    removes what a killed write of the folder left beside it (a hidden temporary folder holding a
    manifest) and writes nothing."""
    p = Path(path)
    check_writable(p, kind="dir", flag=flag)
    if not p.is_dir() or not any(p.iterdir()):
        remove_stale(p.parent, only=p.name)  # what a killed write of this folder left (it holds a manifest)
        return
    if listed(p) is None:
        entries = sorted(q.name for q in p.iterdir())
        raise FileExistsError(
            f"{flag} {p} is not empty and salientft did not write it (no {MANIFEST}; it holds {_listing(entries)}); "
            "nothing there is replaced: choose a new or empty folder")
    others = foreign(p)
    if others:
        raise FileExistsError(
            f"{flag} {p} also holds files salientft did not write ({_listing(others)}), so it is not replaced; "
            "move them away or choose another folder")
    if not overwrite:
        raise FileExistsError(f"{flag} {p} holds an earlier output of salientft; replace it with {overwrite_flag} "
                              "or choose another folder")
    remove_stale(p.parent, only=p.name)


@contextmanager
def output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Write the folder ``path`` atomically (yields the temporary folder to fill). Its manifest is
    written first, so that even a killed write is recognisable as salientft's (and cleaned by the
    next :func:`remove_stale` of the parent), and lists everything in the folder at the end.
    Commands check ``path`` with :func:`claim_dir` before any work."""
    p = Path(path)
    remove_stale(p.parent, only=p.name)
    with atomic_dir(p) as tmp:
        _write_manifest(tmp, set())
        yield tmp
        _write_manifest(tmp, {q.name for q in tmp.iterdir() if q.name not in INTERNAL})


# ----------------------------------------------------------------------------- the lock of a folder


class FolderLock:
    """An OS file lock (``flock``) on ``<folder>/.salientft.lock``, held while a command writes the
    folder. The lock file holds the holder's PID. The OS releases the lock when its process dies,
    so a lock file left by a killed run is simply lockable again: it is taken over (``stale_pid``
    names the dead holder)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None
        self.stale_pid: int | None = None

    @staticmethod
    def holder(folder: str | os.PathLike) -> int | None:
        """The PID holding the lock of ``folder`` now, None if it is free (nothing is created)."""
        path = Path(folder) / LOCK
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_pid(fd) or -1
            return None
        finally:
            os.close(fd)

    def acquire(self, what: str = "--output") -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise FileExistsError(
                f"{what} {self.folder} is in use by another salientft process (PID {pid or 'unknown'}); wait for it "
                "to finish, stop it, or choose another folder") from None
        self.stale_pid = _read_pid(fd)  # a PID left in a lockable file: a killed run's
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # empty: nobody holds it (the file stays: deleting it would race)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc):
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- write failures

_WRITE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EIO: "Input/output error",
                 errno.EDQUOT: "Disk quota exceeded", errno.EFBIG: "File too large", errno.EROFS:
                 "Read-only file system"}
# What libraries say when a write fails without an OSError: safetensors (SafetensorError "I/O error: No
# space left on device (os error 28)"), torch.save's C++ zip writer (RuntimeError "PytorchStreamWriter
# failed writing file ...", "unexpected pos N vs M" when the disk fills mid-record).
_WRITE_MESSAGES = ("No space left on device", "Input/output error", "Disk quota exceeded", "os error 28",
                   "os error 5", "PytorchStreamWriter failed", "file write failed", "unexpected pos ")


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed when ``exc`` (or an exception it was raised from) is a storage failure
    (a full disk, an I/O error, a quota), whatever library raised it; None for any other error."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return _WRITE_ERRNOS[e.errno]
        text = str(e)
        for m in _WRITE_MESSAGES:
            if m in text:
                if m.startswith(("PytorchStreamWriter", "file write", "unexpected pos")):
                    return "the writer failed: is the disk full?"
                return _WRITE_ERRNOS[errno.ENOSPC] if m in ("os error 28",) else (
                    _WRITE_ERRNOS[errno.EIO] if m == "os error 5" else m)
        e = e.__cause__ or e.__context__
    return None
