"""The package's layering, read from the source: every import of a metabench module (at the
top of a file or inside a function) points to the same layer or one below, and no set of
modules imports each other in a circle. A new module must be given a layer here."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "metabench"

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS = [
    # shared maths, types, networks, parameter and record files, statistics
    {"metabench", "metabench.types", "metabench.rules", "metabench.rl", "metabench.nets",
     "metabench.params_io", "metabench.results", "metabench.scoring", "metabench.yamlfile",
     "metabench.signing", "metabench.caches", "metabench.progress"},
    {"metabench.envs"},                                   # environments and their backends
    {"metabench.families"},                               # agents and the rules they run
    {"metabench.tasks"},                                  # task specs: read, validate, calibrate
    {"metabench.harness"},                                # training and records
    {"metabench.submissions", "metabench.discover"},
    {"metabench.site"},                                   # the site
    {"metabench.bench"},                                  # the speed bench and its twins
    {"metabench.cli"},
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: metabench modules it imports}``, anywhere in the file."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # ``from pkg import sub`` imports the submodule when there is one, and reads
                # the package: a package that re-exports its own modules is then a cycle
                targets = [base] + [f"{base}.{a.name}" for a in node.names
                                    if f"{base}.{a.name}" in mods]
            for t in targets:
                if t.split(".")[0] == "metabench":
                    got = resolve(t)
                    if got and got != name:
                        edges[name].add(got)
    return edges


def layer(name: str) -> int:
    best = None
    for i, members in enumerate(LAYERS):
        for m in members:
            if (name == m or name.startswith(m + ".")) and (best is None or len(m) > best[1]):
                best = (i, len(m))
    assert best is not None, f"{name} has no layer: add it to LAYERS in {__file__}"
    return best[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_every_kind_of_import(tmp_path, monkeypatch):
    # The checker itself: top-level, function-level, relative and submodule imports.
    pkg = tmp_path / "metabench"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import metabench.b\n")
    (pkg / "b.py").write_text("def f():\n    from metabench.sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    edges = imports(modules())
    assert edges["metabench.a"] == {"metabench.b"}
    assert edges["metabench.b"] == {"metabench.sub", "metabench.sub.c"}
    assert edges["metabench.sub.c"] == {"metabench", "metabench.a"}
    assert cycles(edges) == [["metabench.a", "metabench.b", "metabench.sub.c"]]
    # A package whose __init__ re-exports a module that imports a sibling: a cycle too.
    (pkg / "sub" / "__init__.py").write_text("from metabench.sub.d import x\n")
    (pkg / "sub" / "d.py").write_text("from metabench.sub import e\nx = 1\n")
    (pkg / "sub" / "e.py").write_text("y = 2\n")
    edges = imports(modules())
    assert ["metabench.sub", "metabench.sub.d"] in cycles(edges)


def test_no_module_imports_a_layer_above_it():
    edges = imports(modules())
    upward = sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs
                    if layer(b) > layer(a))
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    assert cycles(imports(modules())) == []


def test_importing_a_leaf_module_loads_no_jax():
    # `import metabench` names its API lazily: the record format and the site's modules load
    # neither JAX nor the families.
    code = ("import sys, metabench, metabench.results, metabench.site.build, "
            "metabench.site.serve, metabench.tasks.schema\n"
            "assert 'classic-transfer-v1-quick' in metabench.list_tasks() and metabench.TaskSpec\n"
            "bad = sorted(m for m in ('jax', 'flax', 'metabench.families', 'metabench.harness')"
            " if m in sys.modules)\n"
            "assert not bad, bad\n"
            "import metabench as mb\n"
            "assert mb.UpdateRule.__module__ == 'metabench.rules'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
