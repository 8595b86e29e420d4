"""The installed package's metadata (PEP 621 [project] in pyproject.toml): what pip and PyPI show,
the extras that `make test` installs, and the version."""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
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
    """The authors' tables (the 313 bins, the ImageNet prior) name their source and its licence."""
    import fastcolor.gamut

    doc = fastcolor.gamut.__doc__
    assert "pts_in_hull.npy" in doc and "richzhang/colorization" in doc and "BSD 2-Clause" in doc
    source = (ROOT / "fastcolor" / "data" / "prior.py").read_text()
    note = source[:source.index("_IMAGENET_PRIOR:")].rsplit("\n\n", 1)[-1]  # the comment above the table
    assert "prior_probs.npy" in note and "richzhang/colorization" in note and "BSD 2-Clause" in note


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


def test_sdist_holds_the_tests_the_readme_links_and_py_typed(tmp_path):
    """Issue 22.6: an sdist whose tests collect (conftest.py, host_reads.py), with py.typed, the
    licence and every file the README links; no compiled module or build record."""
    import tarfile

    proc = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                           f"print(b.build_sdist({str(tmp_path)!r}))"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdist = tmp_path / proc.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "x", filter="data")
    linked = set(re.findall(r"\]\(((?!https?:)[^)#\s]+)\)", (ROOT / "README.md").read_text()))
    tracked_tests = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("*.py")}
    expected = {"LICENSE", "fastcolor/py.typed", "docs/api.py", "pyproject.toml", "setup.py", *linked,
                *tracked_tests}
    assert expected - names == set(), sorted(expected - names)
    assert not [n for n in names if n.endswith(".so") or n.endswith("_build_failure.txt") or "__pycache__" in n]
    root = next((tmp_path / "x").iterdir())
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "tests"], cwd=root, capture_output=True, text=True, timeout=600)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-2000:]
    assert re.search(r"\d+ tests collected", collect.stdout), collect.stdout[-2000:]


def test_wheel_ships_py_typed_and_the_licence(tmp_path):
    """PEP 561 (mypy reads the annotations only with py.typed) and PEP 639 (the licence file in
    .dist-info/licenses/); built without the native extension, which this does not look at."""
    import zipfile

    env = dict(os.environ, FASTCOLOR_NO_EXT="1")
    proc = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                           f"print(b.build_wheel({str(tmp_path)!r}))"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / proc.stdout.strip().splitlines()[-1]) as whl:
        names = set(whl.namelist())
    assert "fastcolor/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)


def test_failed_native_build_speaks_on_the_terminal_when_pip_captures_stderr(tmp_path):
    """pip shows a build's output only with -v or on failure: a native build that fails (and falls
    back to Python) writes its headline on the controlling terminal too. Here a pseudo-terminal is
    that terminal and stderr is a pipe, as under pip."""
    import pty
    import select

    master, slave = pty.openpty()
    tty_name = os.ttyname(slave)
    env = dict(os.environ, FASTCOLOR_CMAKE=shutil.which("false") or "/bin/false",
               FASTCOLOR_BUILD_DIR=str(tmp_path / "cmake"))
    env.pop("FASTCOLOR_NO_EXT", None)
    env.pop("FASTCOLOR_EXT_REQUIRED", None)

    def own_the_terminal():  # a new session's first terminal opened becomes its controlling one
        os.close(os.open(tty_name, os.O_RDWR))

    try:
        proc = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
             str(tmp_path / "tmp")], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            start_new_session=True, preexec_fn=own_the_terminal, timeout=300)
        seen = b""
        while select.select([master], [], [], 0.5)[0]:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "could NOT be built" in proc.stderr  # the full log on stderr, as before
    terminal = seen.decode(errors="replace")
    assert "fastcolor._C could NOT be built" in terminal and "pip install -v" in terminal, terminal
    assert len(terminal) < 2000  # the headline, not the build log


def test_missing_extension_warns_once_at_import(tmp_path):
    """`import fastcolor` says when the cpp backend was expected but fastcolor._C is not there (a
    failed build installs quietly under pip), and is quiet when it was turned off."""
    code = textwrap.dedent("""
        import json, sys, warnings
        sys.modules["fastcolor._C"] = None      # importlib finds no fastcolor._C
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastcolor
            import fastcolor.ops
        print(json.dumps([f"{w.category.__name__}: {w.message}" for w in caught]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "FASTCOLOR_NO_EXT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    said = [w for w in json.loads(out.stdout.splitlines()[-1]) if "ExtensionMissingWarning" in w]
    assert len(said) == 1 and "'cpp' and 'cuda' backends cannot run" in said[0] and "FASTCOLOR_NO_EXT=1" in said[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "FASTCOLOR_NO_EXT": "1"}, timeout=240)
    assert not [w for w in json.loads(out.stdout.splitlines()[-1]) if "ExtensionMissingWarning" in w]


def test_missing_extension_warning_gives_the_failed_builds_reason(tmp_path, monkeypatch):
    from fastcolor import _ext

    record = tmp_path / "_build_failure.txt"
    record.write_text("building the C++/CUDA extension failed: `cmake --build` exited with 1\nlog...\n")
    monkeypatch.setattr(_ext, "_FAILURE_FILE", record)
    monkeypatch.setattr(_ext.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.warns(_ext.ExtensionMissingWarning, match=r"its build failed: building the C\+\+/CUDA extension "
                                                           r"failed: `cmake --build` exited with 1\)"):
        assert _ext.warn_if_missing() is True
    record.write_text("disabled by FASTCOLOR_NO_EXT=1 at build time\n")  # turned off on purpose: quiet
    assert _ext.warn_if_missing() is False
