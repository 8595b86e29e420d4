"""The installed package's metadata (PEP 621 [project] in pyproject.toml): what pip and PyPI show,
the extras that `make test` installs, and the version."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

import fastcolor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def meta():
    return md.metadata("fastcolor")


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def _requires(meta, extra: str | None) -> set[str]:
    out = set()
    for req in meta.get_all("Requires-Dist") or []:
        marker = re.search(r";\s*extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if (marker.group(1) if marker else None) == extra:
            out.add(_name(req))
    return out


def test_version_is_the_packages(meta):
    assert meta["Version"] == fastcolor.__version__
    assert md.version("fastcolor") == fastcolor.__version__


def test_description_readme_classifiers_urls(meta):
    assert "Colorization" in meta["Summary"] and "\n" not in meta["Summary"]
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().lstrip().startswith("# fastcolor")  # the README is the long description
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert any(c.startswith("Topic :: Scientific/Engineering") for c in classifiers)
    assert all(c.count(" :: ") >= 1 for c in classifiers)
    urls = meta.get_all("Project-URL") or []
    assert urls and all(re.fullmatch(r"[^,]+, https://\S+", u) for u in urls), urls
    assert meta["Requires-Python"] == ">=3.11"


def test_licence_is_bsd_3_clause_in_the_file_and_the_metadata(meta):
    """Issue 22.1: BSD-3-Clause (the owners' choice), in LICENSE and the metadata (PEP 639)."""
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert re.search(r"Copyright \(c\) \d{4}, the fastcolor authors", text)
    assert "3. Neither the name of the copyright holder" in text  # the third clause
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    # PEP 639: a License-Expression excludes the legacy field and "License ::" classifiers.
    assert not meta["License"]
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    readme = (ROOT / "README.md").read_text()
    assert "## Licence" in readme and "BSD 3-Clause" in readme and "BSD 2-Clause" in readme


def test_published_tables_say_where_they_come_from():
    """The authors' bin table names its source and that source's licence."""
    import fastcolor.gamut

    doc = fastcolor.gamut.__doc__
    assert "pts_in_hull.npy" in doc and "richzhang/colorization" in doc and "BSD 2-Clause" in doc


def test_extras(meta):
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"dev", "onnx", "tensorboard", "docs"} <= extras
    assert {"onnx", "onnxscript", "onnxruntime"} <= _requires(meta, "onnx")
    assert _requires(meta, "tensorboard") == {"tensorboard"}
    assert _requires(meta, "docs") == {"pdoc"}
    dev = _requires(meta, "dev")
    assert {"pytest", "pytest-benchmark", "pytest-timeout", "hypothesis", "ruff"} <= dev
    # dev holds every other extra, so that `make test` (pip install -e '.[dev]') runs every test
    for extra in ("onnx", "tensorboard", "docs"):
        assert _requires(meta, extra) <= dev, extra


def _closure(names: set[str]) -> set[str]:
    """``names`` and everything they require (installed distributions, extras left out)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [_name(r) for r in reqs if not re.search(r"extra\s*==", r)]
    return seen


def _third_party_imports(paths: list[Path]) -> set[str]:
    tops = set()
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                tops.add(str(node.args[0].value).split(".")[0])
    local = {p.stem for p in paths} | {"tests", "bench", "fastcolor"}
    return {t for t in tops if t not in sys.stdlib_module_names and t not in local}


def test_dependencies_and_dev_extra_cover_what_the_tests_import(meta):
    files = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    allowed = _closure(_requires(meta, None) | _requires(meta, "dev"))
    dists = md.packages_distributions()
    missing = {}
    for top in sorted(_third_party_imports(files)):
        owners = {_name(d) for d in dists.get(top, [])}
        if not owners or not owners & allowed:
            missing[top] = sorted(owners) or "not installed"
    assert not missing, f"imported by tests/ or bench/ but not in the dependencies or the dev extra: {missing}"


def test_console_script(meta):
    (ep,) = [e for e in md.entry_points(group="console_scripts") if e.name == "fastcolor"]
    assert ep.value == "fastcolor.app.cli:main"
