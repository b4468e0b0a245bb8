"""Regenerates configs/quickstart_measures/: the quick start's base model measured before training
(held-out loss, the six-task evaluation), as the measure-cache entries that ``salientft train``
would write (src/salientft/evaluation/cache.py). scripts/quickstart.sh points
``SALIENTFT_MEASURE_SEED`` at that folder, so even its first run on a new machine reads them
instead of spending minutes measuring an unchanged base; an entry is used only when its key
(every weight's bytes, the settings, the measuring code, torch's version, the data pin) matches,
else it is measured as usual.

    .venv/bin/python scripts/quickstart_measures.py       # about as long as one "before" evaluation

Rerun after changing the evaluation code, the data reader, the held-out loss, configs/quickstart.yaml's
measuring settings or torch's pin: stale entries are not wrong, only unused (the quick start then
measures its base as before). The check at the end reads every entry back through the cache.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "configs" / "quickstart_measures"
MANIFEST = "manifest.txt"  # not *.json: SALIENTFT_MEASURE_SEED copies only the entries


def code_versions() -> dict:
    """The measuring code's hashes the shipped entries were keyed with (tests/test_measure_cache.py
    compares them with the current code: a mismatch means this script must be rerun)."""
    import inspect

    from salientft.evaluation import cache
    from salientft.train import heldout_loss

    return {"eval": cache.code_version("eval"), "heldout": cache.code_version("heldout", inspect.getsource(heldout_loss))}


def write_manifest(dest: Path, **facts) -> None:
    import json

    entries = sorted(p.name for p in dest.glob("*.json"))
    (dest / MANIFEST).write_text(json.dumps({"code": code_versions(), "entries": entries, **facts}, indent=2) + "\n")


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="quickstart-measures."))
    os.environ.pop("SALIENTFT_NO_MEASURE_CACHE", None)
    from salientft.data.chat import ChatCollator, dataset_from_conversations
    from salientft.data.instruct import load_conversations
    from salientft.evaluation import cache
    from salientft.models import load_model
    from salientft.train import _evaluate, heldout_loss, resolve_train_config

    config = resolve_train_config(str(ROOT / "configs" / "quickstart.yaml"), {})
    model, tok = load_model(config.training_method.base_source(config),
                            dtype=config.training_method.master_dtype(config))
    held = load_conversations(config.data, split="heldout", limit=200, seed=0)  # as train() does
    held_ds = dataset_from_conversations(held, tok, max_length=config.max_length)
    fp = cache.ModelFingerprint(model)
    # the entries go to a fresh folder (not the user's cache), then replace DEST whole
    measures = tmp / "measures"
    orig_root = cache.cache_root
    cache.cache_root = lambda: measures
    try:
        loss = heldout_loss(model, held_ds, ChatCollator(tok), fingerprint=fp)
        report = _evaluate(model, tok, config, tmp / "run", "eval_before", fingerprint=fp)
        # read back: both must now be hits with the same values
        assert heldout_loss(model, held_ds, ChatCollator(tok), fingerprint=fp) == loss
        again = _evaluate(model, tok, config, tmp / "run", "eval_before", fingerprint=fp)
        assert again.get("from_cache") and again["results"] == report["results"]
    finally:
        cache.cache_root = orig_root
    if DEST.exists():
        shutil.rmtree(DEST)
    shutil.copytree(measures, DEST)
    import torch

    write_manifest(DEST, model_fingerprint=fp.value, torch=torch.__version__, heldout_loss=loss,
                   paper_avg=report["paper_avg"])
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"held-out loss {loss:.4f}, six-task average {report['paper_avg']:.4f}; wrote "
          f"{', '.join(sorted(p.name for p in DEST.iterdir()))} into {DEST.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
