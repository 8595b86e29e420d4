"""numba's on-disk cache of the CPU kernels (issue 22.3, 23.10, 23.11 and 23's "Also") and the
numba backend's availability under numba settings that it cannot run with (23.13, NUMBA_NUM_THREADS).

The cache mechanics are the same for every function compiled through ``_jit``'s decorators, so
they are tested on a tiny function (compiled in well under a second) in a fresh interpreter with
its own cache folder; the real kernels' cache is tested in ``tests/test_numba_backend.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")

#: Two functions of the package's decorators: the notice must come once for both.
_TINY = textwrap.dedent("""
    import json, sys
    from fastcolor.backends.numba_backend import _jit
    if sys.argv[1:] == ["enospc"]:  # numba's cache write fails as on a full disk
        import errno
        from numba.core.caching import IndexDataCacheFile
        def full(self, name, data):
            raise OSError(errno.ENOSPC, "No space left on device")
        IndexDataCacheFile._save_data = full

    @_jit.cjit
    def add_one(x):
        return x + 1

    @_jit.cjit
    def twice(x):
        return 2 * x

    warm_before = _jit.cache_status([add_one, twice])["warm"]
    values = [add_one(41), twice(21)]
    print(json.dumps({"values": values, "dir": str(_jit.CACHE_DIR), "cache": _jit.CACHE,
                      "problem": _jit.CACHE_PROBLEM, "hits": sum(len(f.stats.cache_hits) for f in (add_one, twice)),
                      "warm_before": warm_before, "warm_after": _jit.cache_status([add_one, twice])["warm"]}))
""")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NUMBA_") and k not in ("FASTCOLOR_CACHE_DIR", "FASTCOLOR_NUMBA_CACHE")}
    env.update(extra)
    return env


def _run(tmp_path: Path, env: dict, *args: str) -> tuple[dict, str]:
    """Run the tiny script; its JSON line and its stderr."""
    script = tmp_path / "tiny_kernels.py"
    script.write_text(_TINY)
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["values"] == [42, 42]
    return out, proc.stderr


def _notices(stderr: str) -> int:
    return stderr.count("fastcolor: compiling the numba CPU kernels")


def _warnings(stderr: str) -> int:
    return stderr.count("RuntimeWarning: numba's cache")


@pytest.mark.parametrize("where", ["xdg", "FASTCOLOR_CACHE_DIR", "NUMBA_CACHE_DIR"])
def test_cache_lives_in_a_user_folder_with_one_notice_at_the_first_compile(tmp_path, where):
    """The user cache folder ($XDG_CACHE_HOME/fastcolor/numba), FASTCOLOR_CACHE_DIR/numba, or an
    explicit NUMBA_CACHE_DIR/fastcolor: written there, announced once on stderr when compiled,
    silent when read back."""
    env = {"xdg": _env(XDG_CACHE_HOME=str(tmp_path / "xdg")),
           "FASTCOLOR_CACHE_DIR": _env(FASTCOLOR_CACHE_DIR=str(tmp_path / "fc"), XDG_CACHE_HOME=str(tmp_path / "no")),
           "NUMBA_CACHE_DIR": _env(NUMBA_CACHE_DIR=str(tmp_path / "nb"), XDG_CACHE_HOME=str(tmp_path / "no"))}[where]
    want = {"xdg": tmp_path / "xdg" / "fastcolor" / "numba", "FASTCOLOR_CACHE_DIR": tmp_path / "fc" / "numba",
            "NUMBA_CACHE_DIR": tmp_path / "nb" / "fastcolor"}[where]
    out, err = _run(tmp_path, env)
    assert Path(out["dir"]).parent == want and out["cache"] and out["hits"] == 0
    assert _notices(err) == 1 and str(want) in err, err
    assert len(list(Path(out["dir"]).glob("tiny_kernels.*.nbi"))) == 2
    assert not (tmp_path / "no").exists()
    assert (out["warm_before"], out["warm_after"]) == (False, True)
    out, err = _run(tmp_path, env)
    assert out["hits"] == 2 and _notices(err) == 0, err
    assert out["warm_before"]


@pytest.mark.parametrize("damage", ["empty index", "truncated data"])
def test_a_damaged_cache_is_compiled_again_with_one_warning(tmp_path, damage):
    """Zero-length index files or truncated data files (a full disk, a killed copy): before, every
    op failed with EOFError / UnpicklingError; now one warning, a compile, and a repaired cache."""
    env = _env(FASTCOLOR_CACHE_DIR=str(tmp_path / "c"))
    out, _ = _run(tmp_path, env)
    folder = Path(out["dir"])
    for f in folder.glob("tiny_kernels.*.nbi" if damage == "empty index" else "tiny_kernels.*.nbc"):
        data = f.read_bytes()
        f.write_bytes(b"" if damage == "empty index" else data[: len(data) // 2])
    out, err = _run(tmp_path, env)
    assert _warnings(err) == 1 and "is damaged" in err and str(folder) in err, err
    assert "compiling the kernels again" in err, err
    assert out["hits"] == 0
    out, err = _run(tmp_path, env)
    assert out["hits"] == 2 and "damaged" not in err and _notices(err) == 0, err


def test_a_failing_cache_write_runs_uncached_with_one_warning(tmp_path):
    """ENOSPC from numba's cache write: before, the op failed (and colorize blamed the output
    disk); now the functions run, one warning names the folder, the error and what to set."""
    env = _env(FASTCOLOR_CACHE_DIR=str(tmp_path / "c"))
    out, err = _run(tmp_path, env, "enospc")
    assert _warnings(err) == 1 and "cannot be written" in err, err
    assert "No space left on device" in err and out["dir"] in err and "FASTCOLOR_CACHE_DIR" in err, err
    assert not list(Path(out["dir"]).glob("*.nbc"))


@pytest.mark.parametrize("how", ["FASTCOLOR_CACHE_DIR", "HOME"])
def test_an_unwritable_cache_folder_is_named_once_with_how_to_set_one(tmp_path, how):
    """A read-only install with an unwritable HOME (or cache folder): the kernels compile in every
    process; say so once, where, and what to set."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = (_env(FASTCOLOR_CACHE_DIR=str(blocker / "cache")) if how == "FASTCOLOR_CACHE_DIR"
           else _env(HOME=str(blocker), XDG_CACHE_HOME=""))
    out, err = _run(tmp_path, env)
    assert not out["cache"] and str(blocker) in out["dir"] and "NotADirectoryError" in out["problem"]
    assert _warnings(err) == 1 and "cannot be written" in err, err
    assert "FASTCOLOR_CACHE_DIR" in err and str(blocker) in err, err
    assert "every process" in err, err


_AVAILABILITY = textwrap.dedent("""
    import json, torch, fastcolor
    from fastcolor import backends
    reason = backends.unavailable_reason("numba", "cpu")
    try:
        fastcolor.soft_encode(torch.zeros(1, 2, 3), backend="numba")
        named = None
    except backends.BackendUnavailable as exc:
        named = str(exc)
    labels = fastcolor.soft_encode(torch.tensor([[[0.0], [0.0]]]))  # auto
    print(json.dumps({"reason": reason, "named": named, "auto": backends.resolve("auto", "cpu"),
                      "bin": int(labels.indices[0, 0, 0])}))
""")


@pytest.mark.parametrize("setting, words", [
    ({"NUMBA_DISABLE_JIT": "1"}, "NUMBA_DISABLE_JIT"),  # 23.13: auto picked numba, whose intrinsics failed as Python
    ({"NUMBA_NUM_THREADS": "0"}, "NUMBA_NUM_THREADS='0'"),  # numba's own ValueError escaped every CPU op
])
def test_numba_settings_it_cannot_run_with_make_it_unavailable_and_auto_skips_it(setting, words):
    proc = subprocess.run([sys.executable, "-c", _AVAILABILITY], capture_output=True, text=True, timeout=240,
                          env=_env(FASTCOLOR_BACKEND="", **setting))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["reason"] and words in out["reason"], out
    assert out["named"] and words in out["named"], out
    assert out["auto"] != "numba" and out["bin"] == 120, out  # ab (0, 0) is bin 120's centre


def test_fastcolor_info_says_where_the_cache_is_and_whether_it_is_warm(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for cache_dir, want in ((tmp_path / "c", "(cold: 0 of 6 kernels compiled there"),
                            (blocker / "c", "(off: NotADirectoryError")):
        proc = subprocess.run([sys.executable, "-m", "fastcolor", "info"], capture_output=True, text=True,
                              timeout=240, env=_env(FASTCOLOR_CACHE_DIR=str(cache_dir)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("numba cache: "))
        assert line.startswith(f"numba cache: {cache_dir / 'numba'}{os.sep}") and want in line, line
        assert "chosen by FASTCOLOR_CACHE_DIR" in line, line


def test_pip_uninstall_leaves_nothing_importable(tmp_path):
    """A wheel installed with pip into a fresh virtual environment (torch and numba reached
    through a .pth file), a numba op run, then ``pip uninstall``: ``import fastcolor`` must fail.
    Before, numba's cache files stayed in the package's folders and ``import fastcolor`` found them
    as a namespace package (and failed later with an AttributeError). Built without the native
    extension, which this does not look at."""
    import site
    import sysconfig

    root = Path(__file__).resolve().parents[1]
    build = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                            f"print(b.build_wheel({str(tmp_path)!r}))"], cwd=root, capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, FASTCOLOR_NO_EXT="1"))
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = tmp_path / build.stdout.strip().splitlines()[-1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, capture_output=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}  # torch, numba, ... (not fastcolor's)
    (Path(purelib) / "outer.pth").write_text("\n".join(sorted(ours)) + "\n")
    env = _env(FASTCOLOR_BACKEND="", PYTHONPATH="", FASTCOLOR_NO_EXT="1")
    env.pop("PYTHONPATH")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(py), *args], capture_output=True, text=True, timeout=600, env=env,
                              cwd=tmp_path)

    pip = run("-m", "pip", "install", "--no-deps", "--no-index", str(wheel))
    assert pip.returncode == 0, pip.stderr[-3000:]
    op = run("-c", "import torch, fastcolor; print(fastcolor.__file__); "
                   "print(fastcolor.soft_encode(torch.zeros(1, 2, 3), backend='numba').indices[0, 0].tolist())")
    assert op.returncode == 0, op.stderr[-3000:]
    assert op.stdout.splitlines()[0].startswith(purelib) and op.stdout.splitlines()[1] == "[120, 120, 120]"
    pip = run("-m", "pip", "uninstall", "-y", "fastcolor")
    assert pip.returncode == 0, pip.stderr[-3000:]
    left = sorted(str(p.relative_to(purelib)) for p in (Path(purelib) / "fastcolor").rglob("*")) \
        if (Path(purelib) / "fastcolor").exists() else []
    assert left == []
    gone = run("-c", "import fastcolor")
    assert gone.returncode != 0 and "ModuleNotFoundError: No module named 'fastcolor'" in gone.stderr, gone.stderr
