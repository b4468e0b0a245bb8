"""The package is layered: no import cycle, no private name borrowed across subpackages, and no
module imports from a layer above its own.

Imports are read with ``ast`` (nothing is imported), at module level and inside functions alike.
``from . import x`` counts as importing the submodule ``x`` when ``x`` is a module, and
``from .pkg import name`` as importing the package ``pkg`` (its ``__init__``) when ``name`` is not
a submodule. A package's ``__init__`` may import its own submodules (it aggregates them); a
submodule must never import its parent package, which would close a cycle through that
``__init__``.
"""
from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "salientft"

# Bottom up: a module may import from its own layer or below, never from above.
LAYERS = [
    # 1. foundations: file helpers, embedded files and dependency checks, config base, targets,
    #    the tiny tokenizer, shared numeric ops (the labelled-rows LM head among them), data
    ["salientft._io", "salientft.outputs", "salientft._packages", "salientft.embedded_files", "salientft.deps",
     "salientft.adapter_format", "salientft.config_base", "salientft.targets", "salientft.devices",
     "salientft.labelled_logits",
     "salientft.tiny_tokenizer", "salientft.ops", "salientft.ops.*", "salientft.data", "salientft.data.*"],
    # 2. statistics and salience
    ["salientft.calibration", "salientft.saliency"],
    # 3. the methods' building blocks and model loading (models loads quantized folders)
    ["salientft.gift", "salientft.gift.*", "salientft.quant", "salientft.quant.*", "salientft.gmt",
     "salientft.gmt.*", "salientft.models"],
    # 4. the method registry
    ["salientft.methods", "salientft.methods.*", "salientft.peft", "salientft.peft.*"],
    # 5. training, evaluation, the end-to-end pipelines and the export to Hugging Face formats
    ["salientft.config", "salientft.preflight", "salientft.runfolder", "salientft.trainer", "salientft.train", "salientft.evaluation",
     "salientft.evaluation.*",
     "salientft.pipelines", "salientft.pipelines.*", "salientft.export"],
    # 6. the command line (its parser and flag declarations) and the public API
    ["salientft.cli", "salientft.cli_*", "salientft"],
]


def _module_files() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _module_files()
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def _package_of(module: str) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to itself)."""
    return module if module in PACKAGES else module.rpartition(".")[0]


def _imports(module: str):
    """Yield (imported module, line, [names]) for every salientft import in ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                if name != ROOT and not name.startswith(ROOT + "."):
                    continue
                while name not in MODULES:  # import a.b.c where c is not a module: depend on a.b
                    name = name.rpartition(".")[0]
                yield name, node.lineno, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module)
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
                if base != ROOT and not base.startswith(ROOT + "."):
                    continue
            plain = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    yield sub, node.lineno, []
                else:
                    plain.append(alias.name)
            if plain:
                assert base in MODULES, f"{module}:{node.lineno} imports from unknown module {base}"
                yield base, node.lineno, plain


def _edges() -> list[tuple[str, str, int, list[str]]]:
    edges = []
    for module in MODULES:
        for target, line, names in _imports(module):
            if target == module and module in PACKAGES:
                continue  # an __init__ naming its own children or attributes
            edges.append((module, target, line, names))
    return edges


EDGES = _edges()


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(SRC)}:{line}"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                out.append(sorted(comp))
    return out


def _layer_of(module: str) -> int | None:
    for i, patterns in enumerate(LAYERS):
        if any(fnmatchcase(module, p) for p in patterns):
            return i
    return None


def test_modules_were_found():
    assert {"salientft", "salientft.cli", "salientft.ops.grid", "salientft.gift.layer"} <= set(MODULES)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for src, dst, _, _ in EDGES:
        graph[src].add(dst)
    problems = []
    for comp in _strongly_connected(graph):
        members = set(comp)
        if len(comp) > 1:
            inner = sorted({f"{_where(s, line)}: {s} -> {d}" for s, d, line, _ in EDGES if s in members and d in members})
            problems.append(f"cycle among {', '.join(comp)}:\n    " + "\n    ".join(inner))
    for src, dst, line, _ in EDGES:
        if src == dst:
            problems.append(f"{_where(src, line)}: {src} imports itself")
    assert not problems, "import cycles:\n" + "\n".join(problems)


def test_no_submodule_imports_its_parent_package():
    bad = sorted(
        f"{_where(s, line)}: {s} -> {d}" for s, d, line, _ in EDGES if d in PACKAGES and s.startswith(d + ".")
    )
    assert not bad, "a submodule imports its own package's __init__ (import the submodule instead):\n  " + "\n  ".join(bad)


def test_no_private_names_across_subpackages():
    bad = []
    for src, dst, line, names in EDGES:
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and _package_of(src) != _package_of(dst):
            bad.append(f"{_where(src, line)}: {src} imports {', '.join(private)} from {dst}")
    assert not bad, "private names imported from another subpackage (make them public):\n  " + "\n  ".join(sorted(bad))


def test_layers_are_respected():
    unassigned = sorted(m for m in MODULES if _layer_of(m) is None)
    assert not unassigned, f"modules in no layer of LAYERS (add them): {', '.join(unassigned)}"
    upward = sorted(
        f"{_where(s, line)}: {s} (layer {_layer_of(s) + 1}) -> {d} (layer {_layer_of(d) + 1})"
        for s, d, line, _ in EDGES if _layer_of(d) > _layer_of(s)
    )
    assert not upward, "imports from a higher layer:\n  " + "\n  ".join(upward)
