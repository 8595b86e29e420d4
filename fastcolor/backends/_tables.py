"""The candidate tables of :func:`fastcolor.gamut.candidate_table` as tensors on a device.

Written once for the backends that take the table as kernel arguments (cpp, cuda, triton):
``offsets`` int32 ``(n * n + 1,)`` and ``bins`` int16 ``(entries,)``, built from ``gamut.py``
(no backend holds a copy of the numbers), uploaded once per (k, device) and cached, with the
float32 bin centres. :func:`warmup` uploads them all ahead (before a CUDA graph capture, where a
first upload is refused with a clear error).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from fastcolor.gamut import K_MAX, ab_bins, candidate_table


@dataclass(frozen=True)
class DeviceTable:
    """One k's candidate table on one device, with its geometry."""

    #: int32 ``(n * n + 1,)``: sub-cell c's candidates are ``bins[offsets[c]:offsets[c + 1]]``.
    offsets: torch.Tensor
    #: int16 ``(entries,)`` bin indices, ascending within each sub-cell.
    bins: torch.Tensor
    #: The box's low corner (both axes), the sub-cell side, sub-cells per axis, longest list.
    lo: float
    cell: float
    n: int
    max_len: int


_lock = threading.Lock()
_cache: dict[tuple[int, str], DeviceTable] = {}
_bins_cache: dict[str, torch.Tensor] = {}


def _key(device: torch.device) -> str:
    """The cache key of ``device``: ``cuda`` is the current CUDA device, named with its index."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _upload(what: str, device: torch.device, key: str):
    """Refuse the first upload of ``what`` while a CUDA graph is being captured: it would copy
    pageable host memory to the device, which capture forbids (and which could not be replayed)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"fastcolor: {what} not on {key} yet, and a CUDA graph is being captured (uploading it would be a "
            f"host-to-device copy of pageable memory, illegal during capture): call fastcolor.warmup({key!r}) "
            "(or run the op once) before capturing")


def device_table(k: int, device: torch.device | str) -> DeviceTable:
    """The table for ``k`` on ``device`` (uploaded on first use, then cached)."""
    device = torch.device(device)
    key = (int(k), _key(device))
    table = _cache.get(key)
    if table is None:
        _upload(f"the candidate table of k = {k} is", device, key[1])
        t = candidate_table(k)
        with _lock:
            table = _cache.get(key)
            if table is None:
                table = DeviceTable(
                    offsets=torch.from_numpy(t.offsets.copy()).to(device),
                    bins=torch.from_numpy(t.bins.copy()).to(device),
                    lo=t.lo, cell=t.cell, n=t.n, max_len=t.max_len,
                )
                if _plain(table.offsets):
                    _cache[key] = table
    return table


def _plain(t: torch.Tensor) -> bool:
    """Whether ``t`` may be cached: a plain tensor, not one made while torch.compile traces (a fake
    or functional tensor, which would be invalid outside that trace; it serves the trace only)."""
    return type(t) is torch.Tensor


def bin_centres(device: torch.device | str) -> torch.Tensor:
    """float32 ``(313, 2)`` bin centres on ``device``, cached (the decode's and encode's table).
    Shared: never write to it."""
    device = torch.device(device)
    key = _key(device)
    t = _bins_cache.get(key)
    if t is None:
        _upload("the bin centres are", device, key)
        t = ab_bins(device)
        if _plain(t):
            with _lock:
                t = _bins_cache.setdefault(key, t)
    return t


def centres_for(t: torch.Tensor) -> torch.Tensor:
    """The bin centres for an op on ``t``: the cached ones for a plain tensor, fresh ones (a
    constant of the graph) for a tensor torch.compile traces (fake or functional), which must not
    meet a real tensor (AOT autograd traces a custom op's backward that way)."""
    return bin_centres(t.device) if _plain(t) else ab_bins(t.device)


def warmup(device: torch.device | str = "cuda", ks=None) -> None:
    """Upload the bin centres and the candidate tables of every k in ``ks`` (default 1..16) to
    ``device`` now, so that no later op copies them from the host: what a CUDA graph capture needs
    (a first use inside ``torch.cuda.graph`` raises instead). Idempotent and cheap (~50 KB).

    >>> import fastcolor
    >>> fastcolor.warmup("cpu")
    """
    for k in ks if ks is not None else range(1, K_MAX + 1):
        device_table(k, device)
    bin_centres(device)
