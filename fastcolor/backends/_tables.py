"""The candidate tables of :func:`fastcolor.gamut.candidate_table` as tensors on a device.

Written once for the backends that take the table as kernel arguments (cpp, cuda, triton):
``offsets`` int32 ``(n * n + 1,)`` and ``bins`` int16 ``(entries,)``, built from ``gamut.py``
(no backend holds a copy of the numbers), uploaded once per (k, device) and cached.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from fastcolor.gamut import ab_bins, candidate_table


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


def device_table(k: int, device: torch.device | str) -> DeviceTable:
    """The table for ``k`` on ``device`` (uploaded on first use, then cached)."""
    device = torch.device(device)
    key = (int(k), str(device))
    table = _cache.get(key)
    if table is None:
        t = candidate_table(k)
        with _lock:
            table = _cache.get(key)
            if table is None:
                table = DeviceTable(
                    offsets=torch.from_numpy(t.offsets.copy()).to(device),
                    bins=torch.from_numpy(t.bins.copy()).to(device),
                    lo=t.lo, cell=t.cell, n=t.n, max_len=t.max_len,
                )
                _cache[key] = table
    return table


def bin_centres(device: torch.device | str) -> torch.Tensor:
    """float32 ``(313, 2)`` bin centres on ``device``, cached (the decode's and encode's table)."""
    device = torch.device(device)
    key = str(device)
    t = _bins_cache.get(key)
    if t is None:
        with _lock:
            t = _bins_cache.setdefault(key, ab_bins(device))
    return t
