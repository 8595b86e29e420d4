"""Loader and build report for the optional native extension ``fastcolor._C``.

``load_extension()`` returns the compiled module or ``None`` (never raises);
``build_info()`` returns a dict that always has ``"extension"`` (bool) and
``"reason"`` (why ``_C`` is missing, or None), the ``_C.build_info()`` fields
when the module is present, and the ``"torch"``, ``"numba"``, ``"triton"``
versions (None when not importable). Nothing here touches CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from pathlib import Path

__all__ = ["load_extension", "build_info", "ExtensionMissingWarning", "warn_if_missing"]

_FAILURE_FILE = Path(__file__).with_name("_build_failure.txt")

_module = None
_error: str | None = None
_loaded = False


class ExtensionMissingWarning(UserWarning):
    """``import fastcolor`` found no native extension ``fastcolor._C`` although it was not turned
    off: the ``cpp`` and ``cuda`` backends cannot run (``auto`` uses the others)."""


def _disabled() -> bool:
    return os.environ.get("FASTCOLOR_NO_EXT", "").strip().lower() not in ("", "0", "false", "no", "off")


def warn_if_missing() -> bool:
    """Warn (:class:`ExtensionMissingWarning`, once: ``import fastcolor`` calls this) when
    ``fastcolor._C`` is not in the package and nobody turned it off (``FASTCOLOR_NO_EXT=1`` at build
    or run time); returns whether it warned. Finds the module without loading it (no cost at import).
    """
    if _disabled():
        return False
    failure = _build_failure_text()
    if failure and failure.startswith("disabled by FASTCOLOR_NO_EXT"):
        return False
    try:
        if importlib.util.find_spec("fastcolor._C") is not None:
            return False
    except (ImportError, ValueError):
        pass
    why = f"its build failed: {failure.splitlines()[0]}" if failure else "it was not built"
    warnings.warn(f"fastcolor's native extension fastcolor._C is missing ({why}): the 'cpp' and 'cuda' backends "
                  f"cannot run, backend='auto' uses numba, triton or torch. fastcolor.build_info()['reason'] says "
                  f"more; reinstall with a C++ compiler and CMake ('pip install -v .' shows the build), or set "
                  f"FASTCOLOR_NO_EXT=1 to run without it and silence this", ExtensionMissingWarning, stacklevel=3)
    return True


def _build_failure_text() -> str | None:
    try:
        text = _FAILURE_FILE.read_text().strip()
    except OSError:
        return None
    return text or None


def load_extension(force: bool = False):
    """Return ``fastcolor._C`` or None if it is unavailable.

    The environment variable ``FASTCOLOR_NO_EXT=1`` disables the extension at
    runtime too (useful to test the pure-Python fallbacks). The result is
    cached; ``force=True`` retries. Never raises: the reason for a missing
    module is in :func:`build_info`'s ``"reason"``.

    Example:
        >>> from fastcolor._ext import load_extension
        >>> mod = load_extension()
        >>> mod is None or mod.__name__ == "fastcolor._C"
        True
    """
    global _module, _error, _loaded
    if _loaded and not force:
        return _module
    _module, _error = None, None
    if _disabled():
        _error = "disabled by FASTCOLOR_NO_EXT=1"
    else:
        try:
            _module = importlib.import_module("fastcolor._C")
        except Exception as exc:  # ImportError, OSError from the loader, ...
            _error = f"{type(exc).__name__}: {exc}"
            failure = _build_failure_text()
            if failure:
                _error = f"{failure}\n(import error: {_error})"
    _loaded = True
    return _module


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        pass
    try:
        return getattr(importlib.import_module(name), "__version__", None)
    except Exception:
        return None


def build_info() -> dict:
    """How fastcolor was built and which backends are importable, as a dict.

    Always present: ``"extension"`` (bool: whether the native module ``fastcolor._C`` loaded),
    ``"reason"`` (why it did not, or None), ``"cuda"`` and ``"openmp"`` (bools: what ``_C``
    was compiled with; False without it), and ``"torch"``, ``"numba"``, ``"triton"`` (version
    strings, None where not installed). With ``_C`` loaded, every field of its own
    ``build_info()`` is added. Nothing here initialises CUDA.

    Example:
        >>> import fastcolor
        >>> info = fastcolor.build_info()
        >>> isinstance(info["extension"], bool), sorted(k for k in ("torch", "numba", "triton") if k in info)
        (True, ['numba', 'torch', 'triton'])
        >>> info["extension"] or info["reason"] is not None    # loaded, or says why not
        True
    """
    mod = load_extension()
    info: dict = {"extension": mod is not None, "reason": None if mod is not None else _error}
    if mod is not None:
        try:
            info.update(mod.build_info())
        except Exception as exc:  # pragma: no cover - defensive
            info["build_info_error"] = f"{type(exc).__name__}: {exc}"
    else:
        info.setdefault("cuda", False)
        info.setdefault("openmp", False)
    for name in ("torch", "numba", "triton"):
        info[name] = _version(name)
    return info
