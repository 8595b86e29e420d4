"""Build the API reference (pdoc) of fastcolor's public modules: ``make docs`` runs this file
(``python docs/api.py OUT_DIR``; it needs only the ``docs`` extra, pdoc), and tests/test_docs.py
checks the pages it writes.

Left out: the application (``fastcolor.app``, documented by ``fastcolor COMMAND --help``), the
entry points, private modules (``_name``) and the backends' internals (every module below
``fastcolor.backends``: each backend's kernels and launch code; ``fastcolor.backends`` itself,
the registry a user calls, stays).
"""
from __future__ import annotations

import pkgutil
import sys
import warnings
from pathlib import Path

import pdoc.doc
import pdoc.render

import fastcolor

#: Module name parts left out of the reference: the application and the entry points.
SKIPPED_PARTS = {"app", "bench", "__main__"}
#: Packages whose submodules are internals: the package's own page stays.
INTERNAL_BELOW = ("fastcolor.backends",)


def public_modules() -> list[str]:
    """fastcolor and every submodule of it that is not private (``_name``), the application or a
    backend's internals."""
    names = ["fastcolor"]
    for info in pkgutil.walk_packages(fastcolor.__path__, "fastcolor."):
        parts = info.name.split(".")[1:]
        if any(p.startswith("_") or p in SKIPPED_PARTS for p in parts):
            continue
        if any(info.name.startswith(pkg + ".") for pkg in INTERNAL_BELOW):
            continue
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


if __name__ == "__main__":  # make docs
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/docs")
    modules, problems = build_api_docs(out)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"API reference ({len(modules)} modules): {out / 'index.html'}")
    sys.exit(1 if problems else 0)
