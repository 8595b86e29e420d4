"""The API reference (pdoc, built by docs/api.py, which ``make docs`` runs): it builds without a
warning, the landing page has the quickstart, the module map and the backends table and links
every public module, backend internals stay out, and the public names have docstrings with an
example."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pdoc")
import pdoc.doc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fastcolor_docs_api", ROOT / "docs" / "api.py")
docs_api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_api)
build_api_docs, public_modules = docs_api.build_api_docs, docs_api.public_modules

#: Modules whose public names the issue lists (issue 14, point 3): each name needs a docstring,
#: each function and class one with an example.
CHECKED = ["fastcolor", "fastcolor.models", "fastcolor.metrics", "fastcolor.io", "fastcolor.colorize"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    modules, problems = build_api_docs(out)
    return out, modules, problems


@pytest.fixture(scope="module")
def api(built):
    return built[1]


def test_reference_builds_without_a_warning(built):
    out, modules, problems = built
    assert not problems, "pdoc warned while building the API reference:\n" + "\n".join(problems)
    assert (out / "index.html").is_file() and (out / "fastcolor" / "models.html").is_file()


def test_reference_has_a_page_per_public_module(api):
    assert set(CHECKED) <= set(api)
    for name, module in api.items():
        assert module.docstring.strip(), f"module {name} has no docstring"


def test_landing_page_has_quickstart_module_map_and_backends(built):
    """Issue 22.7: the package's page is the landing page (its docstring, as pdoc shows it)."""
    out = built[0]
    html = (out / "fastcolor.html").read_text()
    for heading in ("Quickstart", "Module map", "Backends"):
        assert re.search(rf"<h2[^>]*>.*?{heading}.*?</h2>", html, flags=re.S), heading
    for backend in ("numba", "cpp", "triton", "cuda", "torch"):
        assert f"<code>{backend}</code>" in html, backend
    assert "RebalancedCrossEntropyLoss" in html and "AnnealedMeanDecoder" in html


def test_every_public_module_is_reachable_from_the_landing_page(built, api):
    """Following the links from fastcolor.html reaches every public module's page."""
    out = built[0]
    seen, todo = set(), [out / "fastcolor.html"]
    while todo:
        page = todo.pop()
        if page in seen or not page.is_file():
            continue
        seen.add(page)
        for href in re.findall(r'href="([^"#$]+\.html)', page.read_text()):
            todo.append((page.parent / href).resolve())
    reached = {p.relative_to(out.resolve()).with_suffix("").as_posix().replace("/", ".")
               for p in seen if p.resolve().is_relative_to(out.resolve())}
    assert set(api) - reached == set(), f"public modules no link leads to: {sorted(set(api) - reached)}"


def test_backend_internals_stay_out_of_the_reference(api):
    assert "fastcolor.backends" in api  # the registry a user calls stays
    assert not [name for name in api if name.startswith("fastcolor.backends.")]
    assert not any(".app" in name or name.endswith("__main__") for name in api)


def test_make_docs_needs_no_test_tools():
    """`make docs` runs docs/api.py: it must import with pytest and hypothesis unavailable."""
    code = ("import runpy, sys\n"
            "sys.modules['pytest'] = sys.modules['hypothesis'] = None\n"
            f"runpy.run_path({str(ROOT / 'docs' / 'api.py')!r}, run_name='not_main')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=240)
    assert "$(PY) docs/api.py $(DOCS_DIR)" in (ROOT / "Makefile").read_text()


def _members(module: pdoc.doc.Module):
    """(qualified name, pdoc Doc) of the module's public names (its __all__ where it has one)."""
    for name, member in module.members.items():
        if not name.startswith("_") or name == "__version__":
            yield f"{module.fullname}.{name}", member


def _needs_example(member) -> bool:
    if isinstance(member, pdoc.doc.Function):
        return True
    return isinstance(member, pdoc.doc.Class) and not (inspect.isclass(member.obj)
                                                        and issubclass(member.obj, BaseException))


def _has_example(docstring: str) -> bool:
    return ">>>" in docstring or "Example" in docstring


def _variable_comments() -> dict[str, str]:
    """name -> its documentation where it is assigned at the top of a public module: the
    ``#:`` comment above the assignment (the convention of this code, which pdoc does not read)
    or the string literal after it (which pdoc does)."""
    found: dict[str, str] = {}
    for modname in public_modules():
        source = inspect.getsource(importlib.import_module(modname))
        lines = source.splitlines()
        body = ast.parse(source).body
        for i, node in enumerate(body):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            else:
                continue
            after = body[i + 1] if i + 1 < len(body) else None
            for target in targets:
                if not isinstance(target, ast.Name):
                    continue
                comment, j = [], node.lineno - 2
                while j >= 0 and lines[j].lstrip().startswith("#:"):
                    comment.insert(0, lines[j].lstrip()[2:].strip())
                    j -= 1
                if (not comment and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str)):
                    comment = [after.value.value]
                if comment:
                    found.setdefault(target.id, " ".join(comment))
    return found


def test_public_names_have_docstrings(api):
    comments = _variable_comments()
    missing = []
    for mod in CHECKED:
        for name, member in _members(api[mod]):
            if (member.docstring or "").strip() or name.endswith(".__version__"):
                continue
            if isinstance(member, pdoc.doc.Variable) and comments.get(member.name):
                continue  # a constant documented where it is defined (a ``#:`` comment)
            missing.append(name)
    assert not missing, f"public names without a docstring: {missing}"


def test_public_functions_and_classes_have_an_example(api):
    missing = sorted({name for mod in CHECKED for name, member in _members(api[mod])
                      if _needs_example(member) and not _has_example(member.docstring or "")})
    assert not missing, f"{len(missing)} public functions/classes without an example ('>>>' or 'Example'): {missing}"
