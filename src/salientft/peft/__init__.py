"""GIFT-SW as a PEFT tuner, without a PEFT fork: ``GiftSWConfig`` works with ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and TRL's ``SFTTrainer``.

``import salientft`` makes sure the tuner is in PEFT's mappings whenever PEFT is used: at once if
PEFT is already imported, else right after PEFT's own import (an import hook), so that salientft
does not pay PEFT's import time (seconds) in commands that never use it. PEFT is an optional
extra: without it this module imports, and its names say how to install it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

PEFT_HINT = "salientft.peft needs PEFT: pip install 'salientft[peft]'"
__all__ = ["GiftSWConfig", "GiftSWModel", "preprocess_gift_sw", "PEFT_TYPE", "register"]
log = logging.getLogger(__name__)


def register() -> None:
    """Put GIFT-SW into PEFT's mappings now (imports PEFT)."""
    if importlib.util.find_spec("peft") is None:
        raise ImportError(PEFT_HINT)
    from .model import register as _register_tuner

    _register_tuner()


class _RegisterAfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``peft`` is imported, it wraps the real loader so that GIFT-SW is
    registered as soon as PEFT has finished importing.

    A ``find_spec("peft")`` that only probes (``importlib.util.find_spec``, which transformers'
    ``is_peft_available`` runs) also reaches this finder; so the hook stays installed until the
    wrapped loader has really executed PEFT, and each spec it hands out is wrapped on its own.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        spec = None
        for finder in list(sys.meta_path):  # the spec the rest of the import system would give
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_peft = spec.loader.exec_module

        def exec_module(module):
            exec_peft(module)
            uninstall_import_hook()
            try:
                register()
            except Exception as e:  # never break the user's import of PEFT
                log.warning("could not register GIFT-SW with PEFT %s: %s", getattr(module, "__version__", "?"), e)

        spec.loader.exec_module = exec_module
        return spec


_HOOK = _RegisterAfterPeftImport()


def install_import_hook() -> None:
    """Register GIFT-SW with PEFT now if PEFT is imported, else when it is (idempotent)."""
    if "peft" in sys.modules:
        register()
    elif importlib.util.find_spec("peft") is not None and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall_import_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def __getattr__(name):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if importlib.util.find_spec("peft") is None:
        raise ImportError(PEFT_HINT)
    register()
    from . import config, model, preprocess

    value = {"GiftSWConfig": config.GiftSWConfig, "PEFT_TYPE": config.PEFT_TYPE, "GiftSWModel": model.GiftSWModel,
             "preprocess_gift_sw": preprocess.preprocess_gift_sw}[name]
    globals()[name] = value
    return value
