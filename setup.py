"""Build script for fastcolor: only the native extension.

The package metadata (name, version, dependencies, extras, entry point) is in
pyproject.toml ([project], PEP 621); this file adds the extension
``fastcolor._C``, built with CMake (+ ninja, pybind11) from CMakeLists.txt.
Building it is best effort: if CMake/compilation fails, installation still
succeeds, a loud warning is printed and the reason is written to
``fastcolor/_build_failure.txt``, which ``fastcolor._ext`` reports.

Environment variables:
  FASTCOLOR_NO_EXT=1        skip the extension entirely
  FASTCOLOR_NO_CUDA=1       never build the CUDA kernels (even if nvcc exists)
  FASTCOLOR_CUDA_ARCHS=...  CMAKE_CUDA_ARCHITECTURES, default "80;90"
  FASTCOLOR_CPU_FLAGS=...   extra CPU codegen flags (default: portable, none)
  FASTCOLOR_BUILD_TYPE=...  CMake build type, default Release
  FASTCOLOR_BUILD_JOBS=N    parallel compile jobs, default: all cores
  FASTCOLOR_EXT_REQUIRED=1  make a failed extension build a hard error
  FASTCOLOR_CMAKE=path      cmake executable (default: PyPI cmake, then PATH)
  FASTCOLOR_NINJA=path      ninja executable (default: PyPI ninja, then PATH)
  FASTCOLOR_BUILD_DIR=dir   CMake build tree (default: build/cmake-cpXY, kept
                            between builds so rebuilds are incremental)
"""

import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
FAILURE_FILE = "_build_failure.txt"


def _truthy(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


class CMakeExtension(Extension):
    def __init__(self, name, sourcedir=ROOT):
        # optional=True: setuptools' editable copy step skips a missing .so.
        super().__init__(name, sources=[], optional=True)
        self.sourcedir = str(sourcedir)


def _banner(msg, terminal_msg=None):
    line = "!" * 78
    sys.stderr.write(f"\n{line}\n{msg}\n{line}\n\n")
    sys.stderr.flush()
    # pip captures a build's output and shows it only with -v or when the build fails, so a build
    # that falls back to Python would install without a visible word: when stderr is captured, say
    # it on the controlling terminal too, if there is one (a CI log has none: `import fastcolor`
    # warns there, fastcolor._ext.warn_if_missing).
    if terminal_msg and not sys.stderr.isatty():
        try:
            with open("/dev/tty", "w") as tty:
                tty.write(f"\n{line}\n{terminal_msg}\n{line}\n\n")
        except OSError:
            pass


def _find_tool(name, module, bin_dir_attr):
    """Executable from the PyPI build requirement `module`, else from PATH."""
    override = os.environ.get(f"FASTCOLOR_{name.upper()}")
    if override:
        return override
    try:
        exe = Path(getattr(__import__(module), bin_dir_attr)) / name
        if exe.exists():
            return str(exe)
    except Exception:
        pass
    return shutil.which(name)


class CMakeBuild(build_ext):
    def _failure_paths(self, ext):
        # The package dir next to the built .so (build_lib for wheels) and, for
        # editable/inplace builds, the source package that is imported.
        paths = {Path(self.get_ext_fullpath(ext.name)).parent / FAILURE_FILE}
        if self.inplace or getattr(self, "editable_mode", False):
            paths.add(ROOT / "fastcolor" / FAILURE_FILE)
        return paths

    def build_extension(self, ext):
        if _truthy("FASTCOLOR_NO_EXT"):
            self._record_failure(ext, "disabled by FASTCOLOR_NO_EXT=1 at build time")
            return
        try:
            self._build_cmake(ext)
        except Exception as exc:  # noqa: BLE001 - anything: fall back to pure Python
            if _truthy("FASTCOLOR_EXT_REQUIRED"):
                raise
            detail = getattr(exc, "fastcolor_log", "") or traceback.format_exc(limit=3)
            reason = f"building the C++/CUDA extension failed: {exc}"
            headline = (
                "WARNING: fastcolor's native extension fastcolor._C could NOT be built.\n"
                f"{reason}\n"
                "fastcolor will still install and work with its torch/numba/triton backends;\n"
                "fastcolor.build_info()['reason'] tells why. Set FASTCOLOR_EXT_REQUIRED=1\n"
                "to make this a hard error."
            )
            _banner(headline + "\n\n" + detail[-4000:],
                    terminal_msg=headline + "\n'pip install -v' shows the build's log.")
            self._record_failure(ext, reason + "\n" + detail[-4000:])
            return
        for p in self._failure_paths(ext):
            if p.exists():
                p.unlink()

    def _record_failure(self, ext, reason):
        for p in self._failure_paths(ext):
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(reason + "\n")
            except OSError:
                pass
        # Remove stale modules so an old build is not picked up by mistake.
        stale = [Path(self.get_ext_fullpath(ext.name))]
        if self.inplace or getattr(self, "editable_mode", False):
            stale += (ROOT / "fastcolor").glob("_C.*.so")
        for so in stale:
            if so.exists():
                so.unlink()

    def _build_cmake(self, ext):
        import pybind11

        cmake = _find_tool("cmake", "cmake", "CMAKE_BIN_DIR")
        if not cmake:
            raise RuntimeError("cmake not found")
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # Persistent build tree (editable builds use a throw-away build_temp),
        # so re-running pip install only recompiles what changed.
        tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
        build_dir = Path(
            os.environ.get("FASTCOLOR_BUILD_DIR") or Path(ext.sourcedir) / "build" / f"cmake-{tag}"
        ).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        build_type = os.environ.get("FASTCOLOR_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{build_type.upper()}={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTCOLOR_WITH_CUDA={'OFF' if _truthy('FASTCOLOR_NO_CUDA') else 'ON'}",
            f"-DFASTCOLOR_CUDA_ARCHS={os.environ.get('FASTCOLOR_CUDA_ARCHS', '80;90')}",
            f"-DFASTCOLOR_CPU_FLAGS={os.environ.get('FASTCOLOR_CPU_FLAGS', '')}",
        ]
        ninja = _find_tool("ninja", "ninja", "BIN_DIR")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        jobs = os.environ.get("FASTCOLOR_BUILD_JOBS") or str(os.cpu_count() or 2)
        configure = [cmake, "-S", ext.sourcedir, "-B", str(build_dir), *args]
        build = [cmake, "--build", str(build_dir), "--parallel", jobs]
        try:
            self._run(configure)
        except RuntimeError:
            # A cache from another generator/toolchain: start from scratch once.
            shutil.rmtree(build_dir, ignore_errors=True)
            build_dir.mkdir(parents=True, exist_ok=True)
            self._run(configure)
        self._run(build)
        if not Path(self.get_ext_fullpath(ext.name)).exists():
            raise RuntimeError(f"CMake did not produce {self.get_ext_fullpath(ext.name)}")

    @staticmethod
    def _run(cmd):
        print("fastcolor:", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(proc.stdout)
        sys.stdout.flush()
        if proc.returncode != 0:
            err = RuntimeError(f"`{Path(cmd[0]).name} {cmd[1]}` exited with {proc.returncode}")
            err.fastcolor_log = proc.stdout
            raise err


# Metadata, packages and dependencies: pyproject.toml. Only what setuptools cannot take from it here.
setup(
    ext_modules=[CMakeExtension("fastcolor._C")],
    cmdclass={"build_ext": CMakeBuild},
)
