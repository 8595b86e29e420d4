"""Backend registry and dispatch.

A backend is a module (or package) that implements the three hot paths on flat tensors, with
the typed contract written down in :mod:`fastcolor.backends.contract`. The public ops in
:mod:`fastcolor.ops` validate and reshape the user's tensors, pick a backend here
(:func:`resolve`), and call it. ``backends/README.md`` says how to add one.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable
from functools import cache
from types import ModuleType

#: backend name -> (module, device types it runs on)
BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch": ("fastcolor.backends.torch_backend", ("cpu", "cuda")),
    "numba": ("fastcolor.backends.numba_backend", ("cpu",)),
    "cpp": ("fastcolor.backends.compiled_backend", ("cpu",)),
    # CPU tensors only under TRITON_INTERPRET=1 (the backend says so otherwise); auto never
    # picks it on the CPU, where the interpreter is for tests.
    "triton": ("fastcolor.backends.triton_backend", ("cuda", "cpu")),
    "cuda": ("fastcolor.backends.compiled_backend", ("cuda",)),
}

#: The order ``backend="auto"`` tries, fastest measured first (bench/RESULTS.md): on the CPU
#: numba's fused loss forward+backward and soft-encoding beat cpp's in the same runs (cpp's
#: decode is level); numba costs a one-off JIT compile (~15 s, ~1 s from its on-disk cache).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("numba", "cpp", "torch"),
    "cuda": ("triton", "cuda", "torch"),
}

ENV_VAR = "FASTCOLOR_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


@cache
def _module(name: str) -> ModuleType | str:
    try:
        return importlib.import_module(BACKENDS[name][0])
    except ImportError as exc:  # a missing optional dependency
        return f"importing {BACKENDS[name][0]} failed: {exc}"


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot run on ``device_type``, or None if it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {sorted(BACKENDS)} or 'auto'"
    if device_type not in BACKENDS[name][1]:
        return f"backend {name!r} runs on {'/'.join(BACKENDS[name][1])} tensors, not {device_type}"
    mod = _module(name)
    if isinstance(mod, str):
        return mod
    return mod.unavailable_reason(device_type)


def available(device_type: str) -> list[str]:
    """The backends that can run on ``device_type`` here, in auto order."""
    return [n for n in AUTO_ORDER.get(device_type, ("torch",)) if unavailable_reason(n, device_type) is None]


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then()`` once the module ``name`` has been imported (by anyone), then leaves
    ``sys.meta_path``: it finds nothing itself, it only wraps the loader the other finders give."""

    def __init__(self, name: str, then: Callable[[], object]):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, then = spec.loader, self.then

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                module.__loader__ = module.__spec__.loader = loader  # as if this hook were not there
                loader.exec_module(module)
                parent, _, child = module.__name__.rpartition(".")
                if parent:  # what importlib does next, done first so that then() can reach it
                    setattr(sys.modules[parent], child, module)
                then()

        spec.loader = Loader()
        return spec


def _assume_constant(fn):
    # The backend chosen for a device is fixed for the life of a compiled graph: dynamo calls
    # resolve() while tracing and bakes its answer in, instead of tracing imports. Marking fn needs
    # torch._dynamo, whose import took 1.5 s of `import fastcolor`'s 1.56 s (and an inductor cache
    # folder: issue 23.12), so it is marked when dynamo is imported: torch.compile imports it before
    # it traces anything (tests/test_import.py compiles with fullgraph after a plain import).
    def mark() -> None:
        import torch

        torch.compiler.assume_constant_result(fn)

    if "torch._dynamo" in sys.modules:
        mark()
    else:
        sys.meta_path.insert(0, _AfterImport("torch._dynamo", mark))
    return fn


@_assume_constant
def resolve(backend: str, device_type: str) -> str:
    """Turn ``backend`` ("auto" or a name) into the name of a backend that runs on ``device_type``.

    ``"auto"`` honours the ``FASTCOLOR_BACKEND`` environment variable, then takes the first
    available backend of :data:`AUTO_ORDER` (``torch`` under a ``torch.func`` transform such as
    ``vmap`` or ``grad``, which the other backends' kernels cannot run under). A named backend
    that cannot run raises :class:`BackendUnavailable` with the reason.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    transformed = _in_func_transform()
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            backend = env
        else:
            return "torch" if transformed else (available(device_type) or ["torch"])[0]
    reason = unavailable_reason(backend, device_type)
    if reason is None and transformed and backend != "torch":
        reason = ("its kernels read the tensors' memory, which the wrapped tensors of torch.func transforms (vmap, "
                  "grad, jacrev, ...) do not have; backend='torch' (or 'auto', which takes it there) runs under them")
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} is unavailable: {reason}")
    return backend


def _in_func_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, ...) is active here: then only the
    torch backend runs (``auto`` takes it)."""
    torch = sys.modules.get("torch")
    level = getattr(getattr(getattr(torch, "_C", None), "_functorch", None), "maybe_current_level", None)
    return level is not None and level() is not None


def get(name: str) -> ModuleType:
    """The module of an available backend (call :func:`resolve` first)."""
    mod = _module(name)
    if isinstance(mod, str):
        raise BackendUnavailable(mod)
    return mod


def release_cpu_gradient() -> int:
    """Let go of the CPU gradient buffer the numba and cpp losses keep for reuse; returns its
    size in bytes (0 if none). Its memory goes back to the OS once no tensor uses it.

    The fused loss on the CPU hands the previous call's gradient pages out again once nothing
    uses them (no page faults, no zeroing by the OS: ~10 ms of a 40 ms call at
    (40, 313, 64, 64)), at the price of one gradient's memory held between calls, like
    PyTorch's CUDA caching allocator; ``FASTCOLOR_REUSE_GRADIENT=0`` turns that off (see
    :func:`fastcolor.backends._alloc.empty_cpu`). Call this after training, in a long-lived
    process that needs the memory back.

    >>> import fastcolor.backends as fb
    >>> fb.release_cpu_gradient() >= 0
    True
    """
    from fastcolor.backends._alloc import release_kept

    return release_kept()
