"""The lent GPU machines' image (issue 21, point 1): Python 3.12, torch 2.11, triton 3.6, and no
kornia, no webdataset, no network. The device script must import and run there; so must the ops.

A child process makes kornia and webdataset unimportable (a meta-path finder that refuses them,
as an image without them would) and imports the benchmark driver, runs every op on every CPU
backend, and one quick provider of the benchmark end to end. The supported versions are stated
in pyproject.toml and the README, and checked against what is installed here."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

from fastcolor.app.bench import common

ROOT = Path(__file__).resolve().parents[1]

#: Python run in the child before anything else: kornia and webdataset cannot be imported.
_BLOCK = textwrap.dedent("""
    import sys

    class _Missing:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("kornia", "webdataset"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: the lent GPUs' image)")
            return None

    sys.meta_path.insert(0, _Missing())
""")


def _run_child(body: str, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    return subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(body)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(ROOT))


def test_the_block_works():
    proc = _run_child("import kornia\n")
    assert proc.returncode != 0 and "blocked: the lent GPUs' image" in proc.stderr


def test_driver_and_ops_import_and_run_without_kornia(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run_child(f"""
        import json, sys, torch
        import fastcolor as fc
        from fastcolor.app.bench import driver  # the device script's whole import chain
        from fastcolor.app.bench import train_step  # -> fastcolor.models -> fusion -> color
        from fastcolor import backends
        assert "kornia" not in sys.modules
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(2, 313, 3, 4, generator=g).requires_grad_(True)
        ab = torch.rand(2, 2, 3, 4, generator=g) * 200 - 100
        done = []
        for name in backends.available("cpu"):
            labels = fc.soft_encode(ab, backend=name)
            fc.rebalanced_cross_entropy(logits, labels, backend=name).backward()
            fc.rebalanced_cross_entropy(logits, ab, torch.rand(313) + 0.5, backend=name).backward()
            fc.annealed_mean(logits, backend=name).sum().backward()
            done.append(name)
        rc = driver.main(["--device", "cpu", "--quick", "--parts", "providers", "--providers", "torch",
                          "--json", {str(out)!r}])
        assert "kornia" not in sys.modules
        print(json.dumps(dict(done=done, rc=rc)))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0 and "torch" in res["done"] and len(res["done"]) >= 2, res
    part = json.loads(out.read_text())["providers"][0]
    assert part["provider"] == "torch" and part["correctness"] and all(c["ok"] for c in part["correctness"])


def test_color_says_what_is_missing_when_it_is_used():
    proc = _run_child("""
        import torch
        from fastcolor import color
        try:
            color.rgb_to_lab(torch.rand(3, 2, 2))
        except ImportError as exc:
            print(exc)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fastcolor.color needs kornia" in proc.stdout and "pip install kornia" in proc.stdout


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", text).groups())


def test_supported_versions_are_stated_and_met():
    """torch >= 2.11, triton >= 3.6, Python 3.11-3.12: in pyproject.toml, the README and the
    device script's check, and met by what runs here."""
    sup = common.SUPPORTED
    assert sup == {"python": ((3, 11), (3, 12)), "torch": (2, 11), "triton": (3, 6)}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch>=2.11" in project["dependencies"]
    assert project["requires-python"].startswith(">=3.11")
    for minor in (11, 12):
        assert f"Programming Language :: Python :: 3.{minor}" in project["classifiers"]
    readme = (ROOT / "README.md").read_text()
    assert "torch >= 2.11, triton >= 3.6, Python 3.11-3.12" in readme
    assert common.version_problems() == []
    assert _version(torch.__version__) >= sup["torch"]
    assert sup["python"][0] <= sys.version_info[:2] <= sup["python"][1]
    triton = pytest.importorskip("triton")
    assert _version(triton.__version__) >= sup["triton"]


def test_version_problems_name_what_is_too_old(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    monkeypatch.setattr(common, "_python_version", lambda: (3, 13))
    probs = common.version_problems()
    assert any("torch 2.9.1+cu128" in p and ">= 2.11" in p for p in probs), probs
    assert any("Python 3.13" in p and "3.11-3.12" in p for p in probs), probs
