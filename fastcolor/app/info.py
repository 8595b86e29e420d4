"""What ``fastcolor info`` reports: the version, how the native extension was built, which
backend each device has and picks, and where numba's cache of the CPU kernels is."""
from __future__ import annotations

import os
import platform
from typing import Any

import torch

from fastcolor import __version__, backends, build_info

__all__ = ["info_dict", "numba_cache"]


def info_dict() -> dict[str, Any]:
    """The version, platform, ``FASTCOLOR_BACKEND``, :func:`fastcolor.build_info`, per device
    whether it is present, every backend's availability (with the reason when not) and the one
    ``auto`` picks, and :func:`numba_cache`."""
    devices: dict[str, Any] = {}
    for dev in ("cpu", "cuda"):
        present = dev == "cpu" or torch.cuda.is_available()
        rows = {}
        for name in backends.AUTO_ORDER[dev]:
            reason = backends.unavailable_reason(name, dev) if present else "no CUDA device here"
            rows[name] = {"available": reason is None, "reason": reason}
        try:
            auto = backends.resolve("auto", dev) if present else None
        except backends.BackendUnavailable as exc:
            auto = f"error: {exc}"
        devices[dev] = {"present": present, "auto_order": list(backends.AUTO_ORDER[dev]), "auto": auto,
                        "backends": rows}
    if torch.cuda.is_available():
        devices["cuda"]["name"] = torch.cuda.get_device_name()
    return {"version": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "env": {backends.ENV_VAR: os.environ.get(backends.ENV_VAR)},
            "build_info": build_info(), "devices": devices, "numba_cache": numba_cache()}


def numba_cache() -> dict[str, Any] | None:
    """Where numba's on-disk cache of the CPU kernels is and whether it is warm (every kernel
    compiled there already: no ~15 s compile at the first op), or None without the numba backend
    module (see :func:`fastcolor.backends.numba_backend.cache_status`)."""
    mod = backends._module("numba")
    return None if isinstance(mod, str) else mod.cache_status()
