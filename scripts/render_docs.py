"""Render the figures the documents quote from the results files, and check every quoted figure.

Two mechanisms, both checked by ``--check`` (and tests/test_doc_figures.py):

- **Rendered regions.** ``<!-- figures:NAME [ARGS] -->`` ... ``<!-- /figures -->`` in README.md or
  docs/*.md is replaced by what renderer NAME (``RENDERERS`` below) makes from the JSON files under
  ``docs/results/``; ``table FILE N [without NAME...]`` copies the N-th table (from 0) of a report a benchmark
  script wrote from its JSON (``docs/results/**/*.md``), less the rows named. ``--check`` fails when a region differs from a
  fresh rendering.
- **Inline references.** A figure in running text is followed by
  ``<!-- = FILE:PATH|FORMAT -->``: FILE a results file (relative to the repository root), PATH
  the keys (and list indices) to the value, separated by ``/``, FORMAT how it is written:
  ``interval`` (a ``{diff, lo, hi}`` entry as "+1.8 [+0.6, +3.0]" points), ``verdict`` (the word
  ``salientft.evaluation.paired.verdict`` gives that entry) or a Python format with an optional
  scale, e.g. ``100*{:+.1f}`` or ``{:.2f}x`` (``exp:{:.1f}``: e to the value, a loss quoted as a
  perplexity). ``--check`` fails when the text just before the
  comment is not the value so written, or the file or path does not exist.

    PYTHONPATH=src .venv/bin/python scripts/render_docs.py           # rewrite the regions
    PYTHONPATH=src .venv/bin/python scripts/render_docs.py --check   # exit 1 on any stale figure
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGION = re.compile(r"(<!-- figures:(?P<name>[\w.-]+)(?: (?P<args>[^>]*?))? -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)
REFERENCE = re.compile(r"<!-- = (?P<file>[^:\s]+):(?P<path>[^|]*)\|(?P<fmt>.+?) -->")
PAIRED = "docs/results/paper500/paired_exact.json"


def documents(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


class Sources:
    """The results files, read once each (paths relative to the repository root)."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, object] = {}

    def get(self, file: str, path: str = ""):
        if file not in self._cache:
            p = self.root / file
            if not p.is_file():
                raise LookupError(f"{file} does not exist")
            self._cache[file] = json.loads(p.read_text())
        value = self._cache[file]
        for key in filter(None, path.split("/")):
            try:
                value = value[int(key)] if isinstance(value, list) else value[key]
            except (KeyError, IndexError, ValueError, TypeError):
                raise LookupError(f"{file} has no {path!r} (no {key!r})") from None
        return value


def interval(c: dict) -> str:
    return f"{100 * c['diff']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"


def _verdict(c: dict) -> str:
    from salientft.evaluation.paired import verdict

    return verdict(c["lo"], c["hi"])


def write_value(value, fmt: str) -> str:
    if fmt == "interval":
        return interval(value)
    if fmt == "verdict":
        return _verdict(value)
    if fmt.startswith("exp:"):  # a loss quoted as a perplexity
        return fmt[4:].format(math.exp(value))
    scale, _, spec = fmt.rpartition("*")
    return spec.format(float(scale) * value if scale else value)


# --------------------------------------------------------------------------- region renderers

def _paired_rows(rows: list[tuple[list[str], dict]], head: list[str]) -> str:
    """One row per paired entry: its cells, diff, interval, verdict, the five tasks without BoolQ
    (post hoc: no verdict of its own), seeds, items."""
    lines = ["| " + " | ".join(head + ["diff", "95 % interval", "verdict", "without BoolQ (post hoc)", "seeds",
                                       "items"]) + " |",
             "|" + "---|" * (len(head) + 6)]
    for cells, c in rows:
        five = c.get("without_boolq")
        lines.append("| " + " | ".join(cells + [
            f"{100 * c['diff']:+.1f}", f"[{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]", f"**{_verdict(c)}**",
            interval(five) if five else "-", str(c.get("seeds", "-")), str(c.get("items", "-"))]) + " |")
    return "\n".join(lines)


def paired_quality(src: Sources) -> str:
    q = src.get(PAIRED, "quality")
    rows = [([f"{m} - gift-sw"], c) for m, c in q["paired_vs_gift_sw"].items()]
    rows += [([pair], c) for pair, c in q["paired_claims"].items()]
    return _paired_rows(rows, ["comparison"])


def paired_noise(src: Sources) -> str:
    rows = [([f"{label} - no noise"], c) for label, c in src.get(PAIRED, "noise_scale/paired_vs_none").items()]
    return _paired_rows(rows, ["comparison"])


def paired_recovery(src: Sources, key: str, label: str) -> str:
    rows = [([str(r["bits"]), label.format(m)], c) for r in src.get(PAIRED, "recovery/rows")
            for m, c in (r.get(key) or {}).items()]
    return _paired_rows(rows, ["bits", "comparison"])


def paired_order(src: Sources) -> str:
    rows = []
    for r in src.get(PAIRED, "quantize_order/rows"):
        for group in ("paired", "quantization_cost"):
            rows += [([str(r["bits"]), name], c) for name, c in r[group].items()]
    return _paired_rows(rows, ["bits", "comparison"])


def _ms(pair, scale: float = 100, digits: int = 1) -> str:
    """A [mean, std] pair as "mean ± std"."""
    return f"{scale * pair[0]:.{digits}f} ± {scale * pair[1]:.{digits}f}"


QUALITY = "docs/results/paper500/quality.json"
NOISE = "docs/results/paper500/noise_scale.json"
TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "boolq", "winogrande")


def quality_methods(src: Sources) -> str:
    """Section 7.1: each method at its chosen rate, mean ± std over seeds."""
    base, methods = src.get(QUALITY, "base"), src.get(QUALITY, "methods")
    lines = ["| method | lr (grid's choice) | seeds | six-task avg (%) | held-out ppl |", "|---|---|---|---|---|",
             f"| base (no training) | - | - | {100 * base['paper_avg']:.1f} | {base['heldout_ppl']:.1f} |"]
    lines += [f"| {m} | {r['learning_rate']:g} | {r['n_seeds']} | {_ms(r['paper_avg'])} | {_ms(r['heldout_ppl'], 1, 2)} |"
              for m, r in methods.items()]
    return "\n".join(lines)


def quality_tasks(src: Sources) -> str:
    """Section 7.1: per task, mean ± std over seeds, and the base."""
    base, methods = src.get(QUALITY, "base"), src.get(QUALITY, "methods")
    lines = ["| method | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    lines += [f"| {m} | " + " | ".join(_ms(r["tasks"][t]) for t in TASKS) + " |" for m, r in methods.items()]
    lines.append("| base | " + " | ".join(f"{100 * base['tasks'][t]:.1f}" for t in TASKS) + " |")
    return "\n".join(lines)


NOISE_LABELS = {"gift-sw none": "GIFT-SW columns, no noise (salient)", "gift-sw 4-bit": "4-bit noise (the paper's GIFT-SW)",
                "full none": "full fine-tuning, no noise", "full 4-bit": "full fine-tuning, 4-bit noise"}


def noise_variants(src: Sources) -> str:
    """Section 7.2: each noise setting, mean ± std over seeds."""
    base, variants = src.get(NOISE, "base"), src.get(NOISE, "variants")
    lines = ["| variant | seeds | six-task avg (%) | held-out ppl |", "|---|---|---|---|",
             f"| base (no training) | - | {100 * base['paper_avg']:.1f} | {base['heldout_ppl']:.1f} |"]
    for key, r in variants.items():
        label = NOISE_LABELS.get(key, key.replace("gift-sw ", "") + " noise")
        lines.append(f"| {label} | {r['n_seeds']} | {_ms(r['paper_avg'])} | {_ms(r['heldout_ppl'], 1, 2)} |")
    return "\n".join(lines)


def _tables(text: str) -> list[str]:
    out, cur = [], []
    for line in text.split("\n") + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    return out


def report_table(src: Sources, file: str, index: str, *without: str) -> str:
    """The ``index``-th table of a report a benchmark script wrote (from its JSON) under docs/results/;
    ``without NAME...`` leaves out the rows whose first cell is NAME (e.g. rows measured before a
    change to the code they measure)."""
    p = src.root / file
    if not file.startswith("docs/results/") or not p.is_file():
        raise LookupError(f"{file} does not exist (a report under docs/results/ is expected)")
    found = _tables(p.read_text())
    if not index.isdigit() or int(index) >= len(found):
        raise LookupError(f"{file} has no table {index} (it has {len(found)})")
    drop = set(without[1:]) if without[:1] == ("without",) else set()
    if without and not drop:
        raise LookupError(f"table {file} {index}: extra arguments must be 'without NAME...', got {' '.join(without)}")
    rows = [r for r in found[int(index)].split("\n") if r.split("|")[1].strip() not in drop]
    return "\n".join(rows)


THROUGHPUT = "docs/results/eval_throughput.json"
BACKENDS = {"native": "native (tree-packed shared context, token-budget batches)",
            "native-unshared": "native, one sequence per choice (`share_context=False`)",
            "lm-eval": "lm-eval 0.4.13 (HFLM on the same model object)"}


def eval_throughput(src: Sources) -> str:
    """docs/evaluation.md: each backend's throughput on the same items, and native / lm-eval."""
    runs = src.get(THROUGHPUT, "runs")
    lines = ["| backend | wall s | items / s | items per CPU-second |", "|---|---:|---:|---:|"]
    for key, label in BACKENDS.items():
        r = runs[key]
        n = sum(t["n"] for t in r["results"].values())
        bold = "**" if key == "native" else ""
        lines.append(f"| {label} | {r['wall_s']:.1f} | {bold}{r['items_per_s']:.1f}{bold} | {bold}{n / r['cpu_s']:.2f}{bold} |")
    nat, lm = runs["native"], runs["lm-eval"]
    per_task = ", ".join(f"{t} {r['items_per_s'] / lm['results'][t]['items_per_s']:.2f}x"
                         for t, r in nat["results"].items())
    lines += ["", f"**{nat['items_per_s'] / lm['items_per_s']:.2f}x lm-eval's throughput** (items per second; "
              f"{lm['cpu_s'] / nat['cpu_s']:.2f}x in CPU time). Per task, native / lm-eval: {per_task}."]
    return "\n".join(lines)


RENDERERS = {
    "table": report_table,
    "paired-quality": paired_quality,
    "paired-noise": paired_noise,
    "paired-recovery-vs-quantized": lambda s: paired_recovery(s, "paired_vs_quantized", "{} - quantized"),
    "paired-recovery-vs-gift-sw": lambda s: paired_recovery(s, "paired_vs_gift_sw", "{} - gift-sw"),
    "paired-order": paired_order,
    "quality-methods": quality_methods,
    "quality-tasks": quality_tasks,
    "noise-variants": noise_variants,
    "eval-throughput": eval_throughput,
}


# --------------------------------------------------------------------------- render and check

def render_text(text: str, src: Sources, where: str = "") -> tuple[str, list[str]]:
    """The text with every region rendered afresh, and the problems met (unknown renderer or source)."""
    problems: list[str] = []

    def fill(m: re.Match) -> str:
        name = m["name"]
        if name not in RENDERERS:
            problems.append(f"{where}: unknown figures region {name!r} (known: {', '.join(RENDERERS)})")
            return m[0]
        try:
            body = RENDERERS[name](src, *(m["args"] or "").split())
        except LookupError as e:
            problems.append(f"{where}: region {name}: {e}")
            return m[0]
        old_head, new_head = m["body"].split("\n", 1)[0], body.split("\n", 1)[0]
        if m["body"].strip() and old_head != new_head:  # a report gained or lost a table: never swap silently
            problems.append(f"{where}: region {name} {m['args'] or ''}: its first line would change from {old_head!r} "
                            f"to {new_head!r}; check the region's arguments (a table's index may have moved)")
            return m[0]
        return f"{m[1]}{body}\n{m[5]}"

    return REGION.sub(fill, text), problems


def check_references(text: str, src: Sources, where: str = "") -> list[str]:
    problems = []
    for m in REFERENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        try:
            want = write_value(src.get(m["file"], m["path"]), m["fmt"])
        except LookupError as e:
            problems.append(f"{where}:{line}: {e}")
            continue
        if not text[:m.start()].endswith(want):
            got = text[max(0, m.start() - len(want)):m.start()]
            problems.append(f"{where}:{line}: quotes {got!r} where {m['file']}:{m['path']} gives {want!r}")
    return problems


def check(root: Path = ROOT) -> list[str]:
    """Every problem of every document: stale regions, figures that differ from their source, missing
    sources."""
    src = Sources(root)
    problems = []
    for doc in documents(root):
        text = doc.read_text()
        where = str(doc.relative_to(root))
        fresh, found = render_text(text, src, where)
        problems += found
        if fresh != text:
            stale = [m["name"] for m, n in zip(REGION.finditer(text), REGION.finditer(fresh)) if m[0] != n[0]]
            problems.append(f"{where}: region(s) {', '.join(stale)} out of date: run scripts/render_docs.py")
        problems += check_references(text, src, where)
    return problems


def render(root: Path = ROOT) -> list[Path]:
    """Rewrite every document's regions; returns the documents changed."""
    from salientft._io import atomic_path

    src = Sources(root)
    changed = []
    for doc in documents(root):
        text = doc.read_text()
        fresh, problems = render_text(text, src, str(doc.relative_to(root)))
        if problems:
            raise SystemExit("\n".join(problems))
        if fresh != text:
            with atomic_path(doc) as tmp:
                Path(tmp).write_text(fresh)
            changed.append(doc)
    return changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 listing every stale figure")
    args = p.parse_args(argv)
    if args.check:
        problems = check()
        print("\n".join(problems) if problems else "every quoted figure matches its results file")
        return 1 if problems else 0
    for doc in render():
        print(f"rendered {doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
