"""Give every results file written before the provenance block existed the block, from what it recorded.

bench/lib/provenance.py's block (commit, CPU model, torch threads, ``OMP_WAIT_POLICY``, dtype, seed,
...) is written by every benchmark since; older files recorded some of these facts under their own
keys (top level, ``machine``, ``settings``, ``config``) and not others. This script moves what a
file recorded into the block and writes ``"not recorded"`` for the rest, never a guess, and lists
those keys under ``backfilled`` so a reader (and tests/test_results_provenance.py) can tell a
measured fact from a missing one. ``committed_in`` adds the commit that first added the file: the
measured code is at most that new. Files that already have a block are left alone; a benchmark
re-run replaces a backfilled block with a complete one.

    .venv/bin/python scripts/backfill_provenance.py           # rewrite the files that lack a block
    .venv/bin/python scripts/backfill_provenance.py --check   # exit 1 when one lacks it
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from lib.provenance import KEYS  # noqa: E402

NOT_RECORDED = "not recorded"
# where older files kept each fact, in the order they are looked for
SOURCES = {
    "commit": ("commit",),
    "cpu_model": ("cpu_model",),
    "torch": ("torch",),
    "threads": ("threads", "threads_per_process"),
    "omp_wait_policy": ("omp_wait_policy",),
    "dtype": ("dtype",),
    "seed": ("seed", "seeds"),
}
SECTIONS = ("", "machine", "settings", "config", "versions")


def results_files(root: Path | None = None) -> list[Path]:
    """Every JSON file under docs/results: the reports and the suite's cached runs."""
    return sorted(p for p in ((root or ROOT) / "docs" / "results").rglob("*.json") if p.is_file())


def _find(data: dict, keys: tuple[str, ...]):
    for section in SECTIONS:
        block = data if not section else data.get(section)
        if isinstance(block, dict):
            for key in keys:
                if block.get(key) is not None:
                    return block[key]
    return NOT_RECORDED


def _gpu(data: dict):
    device = _find(data, ("device",))
    if device == NOT_RECORDED:
        return NOT_RECORDED
    return None if not str(device).startswith("cuda") else _find(data, ("gpu", "gpu_name"))


def _dumps_like(data: dict, original: str) -> str:
    """``data`` as JSON in the layout of the file it came from (its indent; non-ASCII kept as it
    was), so that a backfilled file's diff is the block alone."""
    second = original.split("\n", 2)[1] if original.count("\n") > 1 else ""
    indent = (len(second) - len(second.lstrip(" "))) or None
    ascii_only = original.isascii()
    return json.dumps(data, indent=indent, ensure_ascii=ascii_only) + "\n"


def first_commit(path: Path) -> str | None:
    """The short hash of the commit that added ``path`` (None when git does not know it)."""
    try:
        out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%h", "--", str(path)], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out[-1] if out else None


def backfilled_block(data: dict, committed_in: str | None) -> dict:
    """The provenance block of an old file: its recorded facts, ``"not recorded"`` for the others."""
    block = {key: _find(data, SOURCES[key]) if key in SOURCES else NOT_RECORDED for key in KEYS}
    block["gpu"] = _gpu(data)
    block["dirty_paths"] = []
    missing = [key for key in KEYS if block[key] == NOT_RECORDED]
    block["backfilled"] = {"by": "scripts/backfill_provenance.py", "not_recorded": missing,
                           "committed_in": committed_in}
    return block


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report files without a block")
    args = p.parse_args(argv)
    from salientft._io import atomic_path

    lacking = []
    for path in results_files():
        original = path.read_text()
        data = json.loads(original)
        if not isinstance(data, dict) or "provenance" in data:
            continue
        lacking.append(path)
        if not args.check:
            data["provenance"] = backfilled_block(data, first_commit(path))
            with atomic_path(path) as tmp:
                tmp.write_text(_dumps_like(data, original))
    for path in lacking:
        print(("lacks a provenance block: " if args.check else "backfilled: ") + str(path.relative_to(ROOT)))
    return 1 if args.check and lacking else 0


if __name__ == "__main__":
    raise SystemExit(main())
