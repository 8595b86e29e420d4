"""What ``import fastcolor`` and ``fastcolor --help`` import (issue 22.2), guarded by module lists, not
timings: each check runs in a fresh interpreter and reads its ``sys.modules``.

* ``import fastcolor`` and every public name: no ``torch._dynamo`` (1.5 s of the old 1.56 s, and an
  inductor cache folder: issue 23.12) and none of the optional heavy packages;
* ``fastcolor --help`` and ``--version``: no torch at all;
* ``torch.compile(fullgraph=True)`` still works after a plain ``import fastcolor`` (the backend
  choice is marked constant when dynamo is imported, not at import);
* no usable temporary directory (issue 23.12): import, the ops and ``--help`` still work.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

import fastcolor

#: Modules that `import fastcolor` (and its public names) must not import.
HEAVY = ("torch._dynamo", "kornia", "torchvision", "numba", "matplotlib", "onnx", "tensorboard")


def _run(code: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_and_public_names_import_no_heavy_module():
    out = _run(f"""
        import json, sys
        import fastcolor
        bare = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        values = [getattr(fastcolor, name) for name in fastcolor.__all__]   # imports the ops
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        print(json.dumps({{"bare_torch": bare, "heavy": heavy, "torch": "torch" in sys.modules}}))
    """)
    assert out["bare_torch"] == []  # the names are loaded on first use
    assert out["torch"]  # the ops did import torch: the check below looked at a real import
    assert out["heavy"] == []


#: The library's modules a user imports to load, colorize, evaluate or train: without torch._dynamo
#: too (torchvision imports it, so torchvision is imported where a resize, a decode or a fusion
#: backbone is needed; kornia where a colour conversion or the augmentation runs).
LIBRARY_MODULES = ("fastcolor.colorize", "fastcolor.models", "fastcolor.data", "fastcolor.train", "fastcolor.metrics",
                   "fastcolor.export", "fastcolor.io")


def test_library_modules_import_no_heavy_module():
    out = _run(f"""
        import importlib, json, sys
        for name in {LIBRARY_MODULES!r}:
            importlib.import_module(name)
        print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    assert out["heavy"] == []


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []])
def test_cli_help_and_version_import_no_torch(argv):
    out = _run(f"""
        import contextlib, io, json, sys
        from fastcolor.app.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as o, contextlib.redirect_stderr(io.StringIO()) as e:
            rc = main({argv!r})
        print(json.dumps({{"rc": rc, "text": o.getvalue() + e.getvalue(),
                          "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}}))
    """)
    assert out["torch"] == []
    if argv == ["--version"]:
        assert out["rc"] == 0 and out["text"].strip() == f"fastcolor {fastcolor.__version__}"
    elif argv:
        assert out["rc"] == 0 and "colorize" in out["text"] and "export" in out["text"]
    else:  # no command: the help on stderr and a usage error
        assert out["rc"] == 2 and "a command is required" in out["text"]


def test_compile_fullgraph_after_a_plain_import():
    """dynamo is imported after fastcolor here (the usual order): the backend choice must still be
    a constant to it, or fullgraph=True fails on a graph break."""
    out = _run("""
        import json, sys
        import torch
        import fastcolor
        assert "torch._dynamo" not in sys.modules
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(2, 313, 4, 4, generator=g, requires_grad=True)
        ab = torch.randn(2, 2, 4, 4, generator=g) * 40

        def step(logits, ab):
            return fastcolor.rebalanced_cross_entropy(logits, ab, backend="torch")

        eager = step(logits, ab)
        compiled = torch.compile(step, fullgraph=True, backend="eager")(logits, ab)
        print(json.dumps({"eager": eager.item(), "compiled": compiled.item()}))
    """)
    assert out["compiled"] == pytest.approx(out["eager"], rel=1e-6)


def test_no_usable_temporary_directory(tmp_path):
    """Issue 23.12: with every temporary directory unusable (tempfile's answer lies under a regular
    file, which fails even for root), import, the ops and --help worked only without dynamo."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = str(blocker / "tmp")
    out = _run(f"""
        import contextlib, io, json, sys, tempfile
        tempfile.tempdir = {bad!r}      # what tempfile.gettempdir() answers from now on
        import torch
        import fastcolor
        from fastcolor.app.cli import main
        names = [getattr(fastcolor, name) for name in fastcolor.__all__]
        loss = fastcolor.rebalanced_cross_entropy(torch.zeros(1, 313, 2, 2), torch.zeros(1, 2, 2, 2), backend="torch")
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["--help"])
        print(json.dumps({{"rc": rc, "loss": loss.item()}}))
    """, env={**os.environ, "TMPDIR": bad})
    assert out["rc"] == 0
    assert out["loss"] == pytest.approx(math.log(313), rel=1e-5)  # uniform logits: log(313)


def test_lazy_names_and_submodules():
    assert set(fastcolor.__all__) == set(fastcolor._LAZY) | {"__version__", "load_model"}
    for name in fastcolor.__all__:
        assert getattr(fastcolor, name) is not None
    assert fastcolor.soft_encode is fastcolor.ops.soft_encode
    assert fastcolor.metrics.__name__ == "fastcolor.metrics"  # a submodule after a bare import
    assert {"soft_encode", "metrics", "load_model"} <= set(dir(fastcolor))
    with pytest.raises(AttributeError, match="no attribute 'soft_encoder'"):
        fastcolor.soft_encoder  # noqa: B018 - the lookup is the test


def test_after_import_hook_runs_once_and_leaves_no_trace(tmp_path, monkeypatch):
    """The hook that marks resolve() when dynamo is imported, on a module of this test's own."""
    from fastcolor.backends import _AfterImport

    (tmp_path / "hookpkg").mkdir()
    (tmp_path / "hookpkg" / "__init__.py").write_text("")
    (tmp_path / "hookpkg" / "sub.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    hook = _AfterImport("hookpkg.sub", lambda: calls.append(sys.modules["hookpkg"].sub.VALUE))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    sub = importlib.import_module("hookpkg.sub")  # a module made here (not an import statement: no dependency)

    assert calls == [42]  # after the module ran, with the parent's attribute already set
    assert hook not in sys.meta_path
    assert type(sub.__loader__).__name__ == "SourceFileLoader"  # the real loader, not the hook's
    importlib.reload(sub)
    assert calls == [42]  # once
    for name in ("hookpkg.sub", "hookpkg"):
        monkeypatch.delitem(sys.modules, name)
