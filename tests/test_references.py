"""Every reference in the repository resolves inside it (scripts/fix_references.py).

The first test runs the script's check over the real tree: a citation of the former out-of-tree
methods reference, a ``docs/methods.md#anchor`` without that anchor, a tracker number or a broken
relative Markdown link fails it. The others pin the rewriting on small samples.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fix_references", ROOT / "scripts" / "fix_references.py")
fr = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("fix_references", fr)  # dataclasses look their module up there
_spec.loader.exec_module(fr)

OLD = "METHODS" + ".md"  # spelled in two parts so that a grep for the old name finds only real citations


def test_every_reference_in_the_repository_resolves():
    problems = fr.check(ROOT)
    assert not problems, ("unresolved references (run `python scripts/fix_references.py`, then hand-edit "
                          "what it lists):\n" + "\n".join(map(str, problems)))


def test_every_section_of_the_mapping_has_its_anchor_in_docs_methods():
    anchors = fr.anchors_of((ROOT / fr.METHODS_DOC).read_text(encoding="utf-8"))
    missing = {sec: a for sec, a in fr.SECTIONS.items() if a not in anchors}
    assert not missing


@pytest.mark.parametrize("before, after", [
    (f"# the quantizer of {OLD} §1.4.", "# the quantizer of docs/methods.md#row-quantizer."),
    (f"(docs/ARCHITECTURE.md, {OLD} 1.3): x", "(docs/ARCHITECTURE.md, docs/methods.md#gift-noise): x"),
    (f"mask ratio ({OLD} 2: 0.5 is", "mask ratio (docs/methods.md#gmt: 0.5 is"),
    (f"see {OLD} section 2.1 for", "see docs/methods.md#gmt-algorithm for"),
    (f"GIFT-SW ({OLD} 1): train", "GIFT-SW (docs/methods.md#gift-sw): train"),
    (f"a claim ({OLD})", "a claim (docs/methods.md)"),
    ("(quantize_rows, §1.4)", "(quantize_rows, docs/methods.md#row-quantizer)"),
    ("from the §1.4 quantizer at bits", "from the quantizer of docs/methods.md#row-quantizer at bits"),
    ("by the §1.4 MSE clip search on", "by the MSE clip search of docs/methods.md#row-quantizer on"),
    # a citation wrapped over two lines moves, with its parenthesis, to the second
    (f"out of it ({OLD}\n§1.8). Here", "out of it\n(docs/methods.md#authors-code). Here"),
    (f"    # out of it ({OLD}\n    # §1.8). Here", "    # out of it\n    # (docs/methods.md#authors-code). Here"),
    # tracker citations whose context says what they stood for
    ("the cost of a step (issue 15, ``ops/noise.py``). This", "the cost of a step (``ops/noise.py``). This"),
    ('lines += ["", "Targets (issue 2):", ""]', 'lines += ["", "Targets:", ""]'),
    ("# issue 17's refresh (hours)", "# the 500-item refresh (hours)"),
    ("(issue item 5: keep Philox if <= 1.05)", "(keep Philox if <= 1.05)"),
    ("done (issue 27 item 5).", "done."),
])
def test_code_citations_become_the_plain_path(before, after):
    new, problems = fr.rewrite_text(before, "src/salientft/x.py")
    assert (new, problems) == (after, [])
    assert fr.rewrite_text(new, "src/salientft/x.py") == (new, [])  # idempotent


def test_markdown_citations_become_links_relative_to_the_file():
    text = (f"## Noise ({OLD} §1.3)\n\nClaims (§1.6, §1.7).\n\nIn code: `{OLD} §1.4` and\n\n"
            f"```\n# {OLD} §2\n```\n")
    new, problems = fr.rewrite_text(text, "docs/results/quick/ablations.md")
    assert problems == []
    assert new == ("## Noise ([docs/methods.md#gift-noise](../../methods.md#gift-noise))\n\n"
                   "Claims ([docs/methods.md#quantization-recovery](../../methods.md#quantization-recovery), "
                   "[docs/methods.md#gift-paper-results](../../methods.md#gift-paper-results)).\n\n"
                   "In code: `docs/methods.md#row-quantizer` and\n\n```\n# docs/methods.md#gmt\n```\n")
    assert fr.rewrite_text(f"x ({OLD} §1.8).", "README.md")[0] == \
        "x ([docs/methods.md#authors-code](docs/methods.md#authors-code))."
    assert fr.rewrite_text(new, "docs/results/quick/ablations.md") == (new, [])


def test_json_keeps_valid_json_with_the_escaped_section_sign():
    text = json.dumps({"title": f"GIFT-SW noise ({OLD} §1.3)"})
    assert "\\u00a7" in text
    new, _ = fr.rewrite_text(text, "docs/results/ablations.json")
    assert json.loads(new) == {"title": "GIFT-SW noise (docs/methods.md#gift-noise)"}


def test_an_unknown_section_is_left_alone_and_reported():
    new, problems = fr.rewrite_text(f"see {OLD} §9.9 here", "src/a.py")
    assert new == f"see {OLD} §9.9 here"
    assert [(p.line, p.kind) for p in problems] == [(1, "unknown section")]


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / fr.METHODS_DOC).write_text("".join(f'<a id="{a}"></a>\n## {sec}\n' for sec, a in fr.SECTIONS.items()))
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    return tmp_path


def test_check_lists_each_kind_of_unresolved_reference(tmp_path):
    root = _tree(tmp_path, {
        "src/a.py": (f"# {OLD} §1.4\n# docs/methods.md#row-quantizer\n# docs/methods.md#no-such-anchor\n"
                     "# see issue #12\n# as in shared/DESIGN.md\n# the §1.2 metric, DESIGN.md\n"),
        "docs/b.md": ("[ok](methods.md#gmt) [bad](methods.md#nope) [gone](missing.md) "
                      "[head](b.md#title) [web](https://example.com/x.md#y)\n\n# Title\n"),
    })
    got = sorted((p.path, p.line, p.kind) for p in fr.check(root))
    assert got == [
        ("docs/b.md", 1, "link to a missing file"),
        ("docs/b.md", 1, "link to a missing heading"),
        ("src/a.py", 1, "former reference"),
        ("src/a.py", 3, "no such anchor in docs/methods.md"),
        ("src/a.py", 4, "issue-tracker citation"),
        ("src/a.py", 5, "file outside the repository"),
        ("src/a.py", 6, "no such file in the repository"),
        ("src/a.py", 6, "section of the former reference"),
    ]


def test_fix_then_check_resolves_a_tree_and_a_second_run_changes_nothing(tmp_path):
    root = _tree(tmp_path, {
        "src/a.py": f'"""Noise ({OLD} §1.3), step (issue 15, ``x``)."""\n',
        "docs/c.md": f"The metric (§1.2) and GMT ({OLD} §2).\n",
        "bench/b.py": 'HELP = "issue 17\'s refresh: x"\n',
    })
    assert fr.main(["--root", str(root)]) == 0
    assert (root / "docs/c.md").read_text() == ("The metric ([docs/methods.md#sensitivity-metric]"
                                                "(methods.md#sensitivity-metric)) and GMT "
                                                "([docs/methods.md#gmt](methods.md#gmt)).\n")
    assert fr.fix(root, write=False)[0] == {}
    assert fr.main(["--root", str(root), "--check"]) == 0
