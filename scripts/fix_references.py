#!/usr/bin/env python3
"""Make every reference in the repository resolve inside the repository.

Code and docs used to cite a methods reference that is not part of the repository
("METHODS.md §1.4", "METHODS.md 1.3", "(§1.8)", "METHODS.md section 2") and the numbers of
an issue tracker a reader does not have ("(issue 17)", "issue 27 item 5"). This script:

- rewrites each methods citation to the section of ``docs/methods.md`` it stood for: in
  Markdown as a relative link from the file's folder (``[docs/methods.md#gift-noise](methods.md#gift-noise)``),
  everywhere else (code, comments, docstrings, JSON, shell) as the plain path
  ``docs/methods.md#gift-noise``, so one grep for an anchor finds every place that relies on it;
- removes tracker citations where the surrounding text already says what they stood for, or
  replaces them with that requirement (the rules in ``ISSUE_RULES``), and reports the rest;
- ``--check``: rewrites nothing, lists every reference that does not resolve (a ``docs/methods.md``
  anchor that does not exist, a citation of the old reference or of a tracker number, a relative
  Markdown link to a missing file or heading) and exits 1 if there is any.

Idempotent: a rewritten file no longer matches any rewrite pattern. Usage (from anywhere):

    python scripts/fix_references.py            # rewrite in place, then report what is left
    python scripts/fix_references.py --dry-run  # show the rewrites as a unified diff, write nothing
    python scripts/fix_references.py --check    # exit 1 listing unresolved references
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS_DOC = "docs/methods.md"
# What is searched: the folders and files a reader of the repository reads.
SCOPE = ("src", "bench", "tests", "docs", "examples", "scripts", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".json", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".rst"}
SKIP_DIRS = {".git", ".venv", "__pycache__", "node_modules", ".pytest_cache", "build", "dist"}
# Files that talk about references (their patterns and examples are data, not references).
EXEMPT = {"scripts/fix_references.py", "tests/test_references.py"}

# Section of the former reference -> anchor of docs/methods.md (one per section it had).
SECTIONS = {
    "1": "gift-sw",
    "1.1": "gift-targets",
    "1.2": "sensitivity-metric",
    "1.3": "gift-noise",
    "1.4": "row-quantizer",
    "1.5": "gift-merge",
    "1.6": "quantization-recovery",
    "1.7": "gift-paper-results",
    "1.8": "authors-code",
    "2": "gmt",
    "2.1": "gmt-algorithm",
    "2.2": "gmt-open-choices",
    "2.3": "gmt-peers",
}

_SEC = r"(?P<sec>\d+(?:\.\d+)?)(?!\.?\d)"
_PARA = r"(?:§|\\u00a7)"  # JSON files hold the section sign escaped
# "METHODS.md", optionally followed by a section: "§1.4", "1.3", "section 2", "sec. 2", "\u00a71.3";
# the section may sit on the next line of a wrapped comment ("(METHODS.md\n§1.8)").
METHODS_REF = re.compile(
    r"(?P<open>\()?METHODS\.md(?:(?P<gap>[ \t]*(?:\n[ \t]*(?:#[ \t]*)?)?)"
    r"(?:" + _PARA + r"[ \t]?|[Ss]ections?[ \t]+|[Ss]ec\.[ \t]*)?" + _SEC + r")?")
# A bare section sign without the file name ("the §1.4 quantizer", "(§1.6, §1.7)"): in this
# repository every such sign pointed at the former reference.
BARE_REF = re.compile(r"(?<![\w#/])(?<!METHODS\.md )(?<!METHODS\.md)" + _PARA + r"[ \t]?" + _SEC)
# "the §1.4 quantizer" reads better as "the quantizer of docs/methods.md#row-quantizer".
BARE_NOUN = re.compile(
    r"\b(?P<art>[Tt]he) " + _PARA + r"[ \t]?" + _SEC +
    r" (?P<noun>row quantizer|quantizer|MSE clip search|search|rounding|noise|metric)\b")

# Tracker citations. Rewrite rules first (each leaves text that says what the number stood for),
# then the pattern that finds any that remain.
ISSUE_RULES: tuple[tuple[re.Pattern, str], ...] = (
    # the 500-item refresh of the benchmarks (bench/suite.py --paper500, docs/RESULTS.md section 7)
    (re.compile(r"\bthe refresh of issue 17\b"), "the 500-item refresh"),
    (re.compile(r"\bissue 17's refresh\b"), "the 500-item refresh"),
    (re.compile(r"\bIssue 17's refresh\b"), "The 500-item refresh"),
    (re.compile(r"\b[Ii]ssue 17: (?=the 500-item subset)"), ""),
    # "(issue 15, ``ops/noise.py``)" -> "(``ops/noise.py``)": the rest of the parenthesis says it
    (re.compile(r"\((?:see )?issues? #?\d+(?: item \d+)?[,;] *"), "("),
    # "(issue item 5: keep Philox if <= 1.05)" -> "(keep Philox if <= 1.05)"
    (re.compile(r"\((?:see )?(?:issues? #?\d+ )?(?:issue )?item \d+: *"), "("),
    # "Targets (issue 2):", "## 7. ... (issue 17)", "(issue 27 item 5)": the sentence stands alone
    (re.compile(r"[ \t]*\((?:see )?issues? #?\d+(?: item \d+)?\)"), ""),
)
# Relative Markdown links whose heading was renamed (GitHub's anchor of a heading keeps the
# letters of its code spans: "`bench/step.py`" -> "benchsteppy").
LINK_FIXES = (
    ("RESULTS.md#5-speed-and-memory-benchstepy-benchscalingpy",
     "RESULTS.md#5-speed-and-memory-benchsteppy-benchscalingpy"),
    ("RESULTS.md#distributed-training-fsdp2-vs-ddp)",
     "RESULTS.md#distributed-training-fsdp2-vs-ddp-benchdistributedpy)"),
)
ISSUE_REF = re.compile(r"\b(?:[Ii]ssues? ?#?\d+(?: item \d+)?|[Ii]ssue item \d+)")
# Tracker mentions without a number ("the issue's targets"): reported, never a failure.
ISSUE_WORDS = re.compile(r"\b(?:the|this|that) issue(?:'s)?\b", re.IGNORECASE)
PRIVATE_REF = re.compile(r"(?:\.\./)*\bshared/[A-Z][A-Z_]*\.md\b")
DOC_ANCHOR = re.compile(r"docs/methods\.md#(?P<anchor>[A-Za-z0-9_-]+)")
UPPER_MD = re.compile(r"(?<![\w/.-])(?P<name>[A-Z][A-Z_]+\.md)\b")
MD_LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
ANCHOR_ID = re.compile(r"""<a\s+(?:id|name)=["']([^"']+)["']""")
LONG_LINE = 120  # a rewritten code line longer than this is listed for re-wrapping
FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    kind: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.text}"


def files(root: Path = ROOT):
    """The text files in SCOPE, as (path, repository-relative posix path), sorted."""
    out = []
    for entry in SCOPE:
        p = root / entry
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
                out += [Path(dirpath) / f for f in filenames if Path(f).suffix in TEXT_SUFFIXES]
    return sorted((p, p.relative_to(root).as_posix()) for p in out)


def _code_mask(text: str, markdown: bool) -> list[bool]:
    """Per character of ``text``: True inside Markdown code (fenced block or inline span)."""
    mask = [not markdown] * len(text)
    if not markdown:
        return mask
    pos, fenced = 0, False
    for line in text.splitlines(keepends=True):
        if FENCE.match(line):
            fenced = not fenced
            inside = [True] * len(line)
        elif fenced:
            inside = [True] * len(line)
        else:
            inside, ticks = [], 0
            for ch in line:
                if ch == "`":
                    ticks += 1
                inside.append(ticks % 2 == 1 or ch == "`")
        mask[pos:pos + len(line)] = inside
        pos += len(line)
    return mask


def _reference(anchor: str | None, rel: str, markdown_link: bool, root: Path) -> str:
    plain = METHODS_DOC + (f"#{anchor}" if anchor else "")
    if not markdown_link:
        return plain
    target = os.path.relpath(root / METHODS_DOC, (root / rel).parent).replace(os.sep, "/")
    return f"[{plain}]({target}{'#' + anchor if anchor else ''})"


def rewrite_text(text: str, rel: str, root: Path = ROOT) -> tuple[str, list[Problem]]:
    """``text`` of the file at ``rel`` with every methods citation pointed at docs/methods.md and
    every tracker citation that ISSUE_RULES knows rewritten; plus the citations it could not map."""
    if rel in EXEMPT or rel == METHODS_DOC:
        return text, []
    markdown = rel.endswith(".md")
    problems: list[Problem] = []

    def line_of(s: str, i: int) -> int:
        return s.count("\n", 0, i) + 1

    def sub(pattern: re.Pattern, make, s: str) -> str:
        code = _code_mask(s, markdown)
        out, last = [], 0
        for m in pattern.finditer(s):
            sec = m.groupdict().get("sec")
            if sec is not None and sec not in SECTIONS:
                problems.append(Problem(rel, line_of(s, m.start()), "unknown section", m.group(0)))
                continue
            as_link = markdown and not code[m.start()]
            before, repl = s[last:m.start()], make(m, SECTIONS.get(sec) if sec else None, as_link)
            if repl.startswith("\n"):  # the reference moved to the next line: no trailing blanks
                before = before.rstrip(" \t")
            out += [before, repl]
            last = m.end()
        return "".join(out) + s[last:]

    def methods_ref(m, anchor, as_link):
        gap = m.group("gap") or ""
        ref = (m.group("open") or "") + _reference(anchor, rel, as_link, root)
        # a wrapped "(METHODS.md\n§1.8)": keep the line break (and a comment's "# "); the
        # reference and its opening parenthesis move to the start of the next line
        return gap[gap.index("\n"):] + ref if "\n" in gap else ref

    text = sub(BARE_NOUN, lambda m, a, link: f"{m.group('art')} {m.group('noun')} of {_reference(a, rel, link, root)}",
               text)
    text = sub(METHODS_REF, methods_ref, text)
    text = sub(BARE_REF, lambda m, a, link: _reference(a, rel, link, root), text)
    for pattern, repl in ISSUE_RULES:
        text = pattern.sub(repl, text)
    text = text.replace("The pipeline follows `shared/DESIGN.md`:", "The pipeline:")  # a private sketch
    if markdown:
        for old, new in LINK_FIXES:
            text = text.replace(f"]({old}", f"]({new}").replace(f"](docs/{old}", f"](docs/{new}")
    return text, problems


# ---------------------------------------------------------------------------------------------
# Checking


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (without duplicate suffixes)."""
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link counts by its text
    h = re.sub(r"<[^>]+>", "", h).lower()
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def anchors_of(markdown_text: str) -> set[str]:
    """Every anchor a Markdown file defines: explicit ``<a id=...>`` and its headings' slugs."""
    found = set(ANCHOR_ID.findall(markdown_text))
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown_text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def check(root: Path = ROOT) -> list[Problem]:
    """Every reference in SCOPE that does not resolve inside the repository."""
    problems: list[Problem] = []
    methods_path = root / METHODS_DOC
    anchor_cache: dict[Path, set[str]] = {}

    def anchors(p: Path) -> set[str]:
        if p not in anchor_cache:
            anchor_cache[p] = anchors_of(p.read_text(encoding="utf-8")) if p.is_file() else set()
        return anchor_cache[p]

    if not methods_path.is_file():
        problems.append(Problem(METHODS_DOC, 0, "missing", "the methods reference itself is absent"))
    existing_upper = {p.name for p, _ in files(root)} | {p.name for p in root.glob("*.md")}
    for path, rel in files(root):
        if rel in EXEMPT:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, line in enumerate(text.splitlines(), 1):
            problems += _line_problems(line, rel, i, lambda a: a in anchors(methods_path), existing_upper)
        if rel.endswith(".md"):
            code = _code_mask(text, True)
            for m in MD_LINK.finditer(text):
                if not code[m.start()]:
                    problems += _check_link(m.group("target"), path, rel, text.count("\n", 0, m.start()) + 1,
                                            root, anchors)
    return problems


def _line_problems(line: str, rel: str, i: int, has_anchor, existing_upper: set[str]) -> list[Problem]:
    """The unresolved references on one line (``has_anchor(a)``: docs/methods.md defines ``a``)."""
    found = [(m, "former reference") for m in METHODS_REF.finditer(line)]
    if rel != METHODS_DOC:
        found += [(m, "section of the former reference") for m in BARE_REF.finditer(line)]
    found += [(m, "file outside the repository") for m in PRIVATE_REF.finditer(line)]
    found += [(m, "no such file in the repository") for m in UPPER_MD.finditer(line)
              if m.group("name") not in existing_upper | {"METHODS.md"}]
    found += [(m, "no such anchor in docs/methods.md") for m in DOC_ANCHOR.finditer(line)
              if not has_anchor(m.group("anchor"))]
    found += [(m, "issue-tracker citation") for m in ISSUE_REF.finditer(line)]
    return [Problem(rel, i, kind, m.group(0)) for m, kind in found]


def _check_link(target: str, path: Path, rel: str, line: int, root: Path, anchors) -> list[Problem]:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, ...
        return []
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    try:
        dest.relative_to(root.resolve())
    except ValueError:
        return [Problem(rel, line, "link outside the repository", target)]
    if not dest.exists():
        return [Problem(rel, line, "link to a missing file", target)]
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return [Problem(rel, line, "link to a missing heading", target)]
    return []


def remaining_issue_words(root: Path = ROOT) -> list[Problem]:
    """Mentions of "the issue" without a number: not broken, but a reader has no tracker."""
    out = []
    for path, rel in files(root):
        if rel in EXEMPT:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            out += [Problem(rel, i, "mentions a tracker issue", m.group(0)) for m in ISSUE_WORDS.finditer(line)]
    return out


def fix(root: Path = ROOT, write: bool = True) -> tuple[dict[str, tuple[str, str]], list[Problem]]:
    """Rewrite every file in SCOPE; returns {rel: (old, new)} of the changed files and problems."""
    changed, problems = {}, []
    for path, rel in files(root):
        old = path.read_text(encoding="utf-8")
        new, probs = rewrite_text(old, rel, root)
        problems += probs
        if new != old:
            changed[rel] = (old, new)
            if write:
                tmp = path.with_name(path.name + ".fixref.tmp")
                tmp.write_text(new, encoding="utf-8")
                os.replace(tmp, path)
    return changed, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 listing unresolved references")
    g.add_argument("--dry-run", action="store_true", help="print the rewrites as a diff; write nothing")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this script's)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if not args.check:
        changed, problems = fix(root, write=not args.dry_run)
        for rel, (old, new) in changed.items():
            if args.dry_run:
                sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                           f"a/{rel}", f"b/{rel}"))
        print(f"{'would rewrite' if args.dry_run else 'rewrote'} {len(changed)} file(s)", file=sys.stderr)
        for rel, (old, new) in changed.items():  # candidates for re-wrapping by hand
            before = set(old.splitlines())
            for i, line in enumerate(new.splitlines(), 1):
                if len(line) > LONG_LINE and line not in before and not rel.endswith((".md", ".json")):
                    print(f"note: {rel}:{i}: rewritten line has {len(line)} characters", file=sys.stderr)
        for p in problems:
            print(f"cannot rewrite: {p}", file=sys.stderr)
        if args.dry_run:
            return 0
    unresolved = check(root)
    for p in unresolved:
        print(f"unresolved: {p}")
    for p in remaining_issue_words(root):
        print(f"note (hand-edit if it cites the tracker): {p}")
    if unresolved:
        print(f"{len(unresolved)} unresolved reference(s)", file=sys.stderr)
        return 1
    print("every reference resolves", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
