"""The API reference (pdoc): it builds without a warning, and the public names have docstrings
with an example.

``make docs`` runs this file as a script (``python tests/test_docs.py OUT_DIR``), so the pages it
writes are the pages this test builds.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("pdoc")
import pdoc.doc  # noqa: E402
import pdoc.render  # noqa: E402

import fastcolor  # noqa: E402

#: Modules whose public names the issue lists (issue 14, point 3): each name needs a docstring,
#: each function and class one with an example.
CHECKED = ["fastcolor", "fastcolor.models", "fastcolor.metrics", "fastcolor.io", "fastcolor.colorize"]
#: Left out of the reference: the application (the command line is documented by --help) and the
#: entry points.
SKIPPED_PARTS = {"app", "bench", "__main__"}


def public_modules() -> list[str]:
    """fastcolor and every submodule of it that is not private (``_name``) or the application."""
    names = ["fastcolor"]
    for info in pkgutil.walk_packages(fastcolor.__path__, "fastcolor."):
        parts = info.name.split(".")[1:]
        if not any(p.startswith("_") or p in SKIPPED_PARTS for p in parts):
            names.append(info.name)
    return names


def build_api_docs(out_dir: Path) -> tuple[dict[str, pdoc.doc.Module], list[str]]:
    """Write the HTML reference of :func:`public_modules` into ``out_dir``; returns the pdoc modules
    and the warnings pdoc emitted (a name in ``__all__`` that does not resolve, a docstring it
    cannot parse, ...), which the test counts as errors."""
    pdoc.render.configure(docformat="google")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Each module by name (not pdoc's own walk, which hides submodules missing from a
        # package's __all__): every public module gets its page.
        modules = {name: pdoc.doc.Module.from_name(name) for name in public_modules()}
        for module in modules.values():
            html = pdoc.render.html_module(module, modules)
            page = out_dir / f"{module.fullname.replace('.', '/')}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(html)
        (out_dir / "index.html").write_text(pdoc.render.html_index(modules))
        (out_dir / "search.js").write_text(pdoc.render.search_index(modules))
    return modules, sorted({f"{w.category.__name__}: {w.message}" for w in caught})


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
    assert not any(".app" in name or name.endswith("__main__") for name in api)
    for name, module in api.items():
        assert module.docstring.strip(), f"module {name} has no docstring"


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


if __name__ == "__main__":  # make docs
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/docs")
    modules, problems = build_api_docs(out)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"API reference ({len(modules)} modules): {out / 'index.html'}")
    sys.exit(1 if problems else 0)
