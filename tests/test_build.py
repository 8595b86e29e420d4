"""Build/packaging checks for the native extension fastcolor._C."""

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastcolor
from fastcolor import _ext

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
MUST_HAVE_EXT = bool(os.environ.get("CI")) or NVCC is not None

BASE_KEYS = {"extension", "reason", "torch", "numba", "triton"}
C_KEYS = {
    "compiler",
    "compiler_id",
    "compiler_version",
    "cxx_standard",
    "openmp",
    "cuda",
    "cuda_archs",
    "nvcc_version",
}


@pytest.fixture
def fresh_ext(monkeypatch):
    """Let a test change how _C loads; restore the real state afterwards."""
    monkeypatch.delenv("FASTCOLOR_NO_EXT", raising=False)
    yield _ext
    monkeypatch.undo()
    _ext.load_extension(force=True)


def test_build_info_keys():
    info = fastcolor.build_info()
    assert isinstance(info, dict)
    assert BASE_KEYS <= info.keys()
    assert isinstance(info["extension"], bool)
    assert info["reason"] is None or isinstance(info["reason"], str)
    if info["extension"]:
        assert info["reason"] is None
        assert C_KEYS <= info.keys()
    else:
        assert info["reason"]


def test_version_single_source():
    from fastcolor._version import __version__

    assert __version__ == "0.1.0"
    if hasattr(fastcolor, "__version__"):
        assert fastcolor.__version__ == __version__


@pytest.mark.skipif(not MUST_HAVE_EXT, reason="extension optional here (no CI env, no nvcc)")
def test_extension_built():
    info = fastcolor.build_info()
    assert info["extension"], f"fastcolor._C missing: {info['reason']}"
    assert _ext.load_extension() is not None
    assert info["cxx_standard"] in ("c++17", "c++20")
    assert info["compiler_id"] and info["compiler_version"]
    assert isinstance(info["openmp"], bool)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_compiled_when_nvcc_present():
    info = fastcolor.build_info()
    if os.environ.get("FASTCOLOR_NO_CUDA"):
        pytest.skip("FASTCOLOR_NO_CUDA set")
    assert info["extension"], info["reason"]
    assert info["cuda"] is True
    assert info["cuda_archs"]
    assert info["nvcc_version"]
    assert info["cudart_version"] >= 11000


def test_cuda_symbols_match_build_info():
    C = _ext.load_extension()
    if C is None:
        pytest.skip("extension not built")
    assert C.has_cuda == C.build_info()["cuda"]
    if C.has_cuda:
        for name in ("cuda_runtime_version", "cuda_driver_version", "cuda_device_count"):
            assert callable(getattr(C, name))
        # Safe without a GPU/driver: statically linked runtime answers, device
        # count degrades to 0.
        assert C.cuda_runtime_version() >= 11000
        assert C.cuda_device_count() >= 0
    else:
        assert not hasattr(C, "cuda_runtime_version")


def test_extension_does_not_link_torch_or_cudart():
    C = _ext.load_extension()
    readelf = shutil.which("readelf")
    if C is None or readelf is None:
        pytest.skip("extension not built or readelf missing")
    out = subprocess.run([readelf, "-d", C.__file__], capture_output=True, text=True).stdout
    needed = [line for line in out.splitlines() if "(NEEDED)" in line]
    assert needed
    for bad in ("libtorch", "libc10", "libcudart", "libpython"):
        assert not any(bad in line for line in needed), needed


def test_import_C_does_not_import_torch():
    C = _ext.load_extension()
    if C is None:
        pytest.skip("extension not built")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fastcolor._C', {C.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "m.build_info()\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extension_is_reported(fresh_ext, monkeypatch):
    real_import = importlib.import_module

    def failing_import(name, *args, **kwargs):
        if name == "fastcolor._C":
            raise ImportError("simulated: no _C here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_ext.importlib, "import_module", failing_import)
    assert fresh_ext.load_extension(force=True) is None
    info = fresh_ext.build_info()
    assert info["extension"] is False
    assert "simulated: no _C here" in info["reason"]
    assert info["cuda"] is False
    assert BASE_KEYS <= info.keys()


def test_no_ext_env_var_at_runtime(fresh_ext, monkeypatch):
    monkeypatch.setenv("FASTCOLOR_NO_EXT", "1")
    assert fresh_ext.load_extension(force=True) is None
    info = fresh_ext.build_info()
    assert info["extension"] is False
    assert "FASTCOLOR_NO_EXT" in info["reason"]


def test_import_fastcolor_without_extension_subprocess():
    env = dict(os.environ, FASTCOLOR_NO_EXT="1")
    code = (
        "import fastcolor\n"
        "from fastcolor._ext import build_info\n"
        "i = build_info()\n"
        "assert i['extension'] is False and 'FASTCOLOR_NO_EXT' in i['reason'], i\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(ROOT))


def test_setup_records_build_failure(tmp_path):
    """A failing CMake must not fail setup.py; the reason lands next to _C."""
    env = dict(
        os.environ,
        FASTCOLOR_CMAKE=shutil.which("false") or "/bin/false",
        FASTCOLOR_BUILD_DIR=str(tmp_path / "cmake"),
    )
    env.pop("FASTCOLOR_NO_EXT", None)
    env.pop("FASTCOLOR_EXT_REQUIRED", None)
    lib = tmp_path / "lib"
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=str(ROOT), env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "could NOT be built" in proc.stderr
    failure = lib / "fastcolor" / "_build_failure.txt"
    assert failure.exists()
    assert "failed" in failure.read_text()
    assert not list((lib / "fastcolor").glob("_C.*.so"))


def test_cuda_selftest_never_crashes():
    C = _ext.load_extension()
    if C is None or not C.has_cuda:
        pytest.skip("extension without CUDA")
    res = C.cuda_selftest()
    assert isinstance(res, str)
    if C.cuda_device_count() > 0:
        assert res == "ok"


@pytest.mark.gpu
def test_cuda_selftest_on_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    C = _ext.load_extension()
    assert C is not None and C.has_cuda, fastcolor.build_info()["reason"]
    assert C.cuda_device_count() >= 1
    assert C.cuda_driver_version() > 0
    assert C.cuda_selftest() == "ok"


NATIVE_SOURCES = sorted([*(ROOT / "csrc").glob("*"), *(ROOT / "kernels").glob("*"), ROOT / "CMakeLists.txt",
                         ROOT / "setup.py"])


def test_native_sources_hold_no_gamut_tables():
    """The gamut reaches the kernels from fastcolor/gamut.py at run time (the candidate table and
    bin centres of fastcolor/backends/_tables.py, as arguments): no hand-copied bin tables, cell
    tables or window search in the C++/CUDA sources."""
    banned = ("FC_B_LO_INIT", "FC_B_HI_INIT", "FC_Q_START_INIT", "kBLo", "kQStart", "dQStart", "dBins",
              "make_cell_table", "make_bin_coords", "A_CELLS", "window_bound", "gamut_bins")
    for path in NATIVE_SOURCES:
        text = path.read_text()
        found = [b for b in banned if b in text]
        assert not found, f"{path.relative_to(ROOT)}: {found}"


def test_native_sources_name_existing_paths():
    """Comments in the C++/CUDA sources and build files that name a file or folder of the
    repository name one that exists."""
    pattern = re.compile(r"\b((?:csrc|kernels|fastcolor|tests|bench|docs)/[A-Za-z0-9_./-]*[A-Za-z0-9_])")
    generated = {"fastcolor/_build_failure.txt"}
    for path in NATIVE_SOURCES:
        for name in set(pattern.findall(path.read_text())) - generated:
            assert (ROOT / name).exists(), f"{path.relative_to(ROOT)} names {name}, which does not exist"
