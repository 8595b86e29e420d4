"""The layers of fastcolor, checked from the source: the import graph of every module under
``fastcolor/`` (built with :mod:`ast`, function-local imports included) has no cycle, and no
library module imports the application (:mod:`fastcolor.app`).

An edge ``M -> T`` means that importing ``M`` may import ``T``. Importing ``fastcolor.a.b``
imports the package ``fastcolor.a`` first, so it is an edge to both, except to the packages
that contain ``M`` itself: those are being imported already when ``M`` runs (which is why a
package's ``__init__`` importing its own submodules is an ordinary edge, and a submodule
importing a sibling is not an edge to their package). Naming a package itself (``import
fastcolor``, ``from fastcolor import __version__``) is an edge to it wherever it is written.
``importlib.import_module`` with a literal name counts as an import; a name computed at run
time (the backend registry's) cannot be seen from the source and does not.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fastcolor"
APP = "fastcolor.app"
#: modules outside the app that may import it: the entry points
ENTRY_POINTS = {"fastcolor.__main__", "fastcolor.bench"}
_EXTENSION_SUFFIXES = (".so", ".pyd")


def module_files(root: Path) -> dict[str, tuple[Path, bool]]:
    """dotted module name -> (file, is a package) for every module below ``root`` (the package
    ``root.name``); compiled extensions are modules without a source (file None)."""
    mods: dict[str, tuple[Path, bool]] = {}
    for f in sorted(root.rglob("*")):
        if "__pycache__" in f.parts or not f.is_file():
            continue
        rel = f.relative_to(root.parent)
        if f.suffix == ".py":
            parts = list(rel.with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts.pop()
            mods[".".join(parts)] = (f, is_pkg)
        elif f.suffix in _EXTENSION_SUFFIXES:
            parts = list(rel.parts[:-1]) + [f.name.split(".")[0]]
            mods[".".join(parts)] = (None, False)
    return mods


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _known(name: str, mods) -> str | None:
    """The longest prefix of ``name`` that is a module of ours (None: not ours)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return None


def imported_modules(name: str, tree: ast.AST, is_pkg: bool, mods) -> set[str]:
    """The modules of ours that the import statements of module ``name`` (at any depth) name."""
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                t = _known(alias.name, mods)
                if t:
                    targets.add(t)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                t = sub if sub in mods else _known(base, mods)
                if t:
                    targets.add(t)
        elif (isinstance(node, ast.Call) and _called_name(node.func) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            t = _known(node.args[0].value, mods)  # importlib.import_module("fastcolor.x"), a literal name
            if t:
                targets.add(t)
    return targets


def _called_name(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def build_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules importing it may import (see the module docstring)."""
    mods = module_files(root)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        edges: set[str] = set()
        if path is not None:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            own = set(_ancestors(name)) | {name}
            for t in imported_modules(name, tree, is_pkg, mods):
                edges.add(t)
                edges.update(a for a in _ancestors(t) if a not in own)
            edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0

    def connect(v: str) -> None:  # iterative Tarjan: no recursion limit on deep graphs
        nonlocal counter
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == node:
                            break
                    if len(comp) > 1 or node in graph.get(node, ()):
                        components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(comp, graph) for comp in components]


def _cycle_in(comp: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A concrete cycle through the smallest name of a strongly connected component."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    return paths[v] + [start]
                if w in comp and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def is_app(name: str) -> bool:
    return name == APP or name.startswith(APP + ".")


# ----------------------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return build_graph()


def test_the_graph_sees_the_package(graph):
    assert {"fastcolor", "fastcolor.io", "fastcolor.app.cli", "fastcolor.app.bench", "fastcolor.bench"} <= set(graph)
    assert "fastcolor.app.cli" in graph["fastcolor.__main__"]
    assert "fastcolor.app.bench.driver" in graph["fastcolor.app.bench"]  # a package's __init__ -> its submodule


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in fastcolor/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_library_never_imports_the_app(graph):
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if not is_app(m) and m not in ENTRY_POINTS
                 for t in ts if is_app(t))
    assert not bad, "library modules that import the application:\n" + "\n".join(bad)


def test_io_imports_nothing_of_fastcolor(graph):
    assert graph["fastcolor.io"] == set()


# ----------------------------------------------------------------------------- the checker can fail


def test_find_cycles_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    cycles = find_cycles(g)
    assert sorted(tuple(c) for c in cycles) == [("a", "b", "c", "a"), ("e", "e")]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    pkg = tmp_path / "fastcolor"
    (pkg / "models").mkdir(parents=True)
    (pkg / "app").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "io.py").write_text("def load():\n    from fastcolor.models import build\n    return build()\n")
    (pkg / "models" / "__init__.py").write_text("from .fusion import Net\n\ndef build():\n    return Net()\n")
    (pkg / "models" / "fusion.py").write_text("from fastcolor import io\n\nclass Net:\n    pass\n")
    (pkg / "models" / "zhang.py").write_text("from . import fusion\nfrom fastcolor.models import build\n")
    (pkg / "app" / "__init__.py").write_text("")
    (pkg / "app" / "cli.py").write_text("import fastcolor.models.zhang\n")
    (pkg / "color.py").write_text("if True:\n    import fastcolor.app.cli\n")
    (pkg / "gamut.py").write_text("import importlib\n\ndef f():\n    return importlib.import_module('fastcolor.io')\n")
    g = build_graph(pkg)
    assert g["fastcolor.io"] == {"fastcolor.models"}
    assert g["fastcolor.models"] == {"fastcolor.models.fusion"}
    assert g["fastcolor.models.fusion"] == {"fastcolor.io"}
    assert g["fastcolor.models.zhang"] == {"fastcolor.models.fusion", "fastcolor.models"}  # names from the package
    assert g["fastcolor.app.cli"] == {"fastcolor.models.zhang", "fastcolor.models"}  # and the package it is in
    assert g["fastcolor.color"] == {"fastcolor.app.cli", "fastcolor.app"}
    assert g["fastcolor.gamut"] == {"fastcolor.io"}
    assert find_cycles(g) == [["fastcolor.io", "fastcolor.models", "fastcolor.models.fusion", "fastcolor.io"]]
