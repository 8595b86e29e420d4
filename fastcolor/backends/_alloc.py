"""Allocation shared by the CPU backends (numba and cpp): the gradient buffer.

The fused loss's gradient is as large as the logits (205 MB at (40, 313, 64, 64) float32) and
written once. Two costs come with a fresh one, both paid by the operating system, not by the
kernel: a page fault at the first touch of every page, and the zeroing of each page the fault
maps. :func:`empty_cpu` takes the first down (2 MiB pages: 512x fewer faults); reusing the
previous call's pages (``reuse=True``, the loss's gradient) takes both away.
"""
from __future__ import annotations

import math
import mmap
import os
import sys
import threading

import torch

#: Gradients of at least this many bytes are allocated on transparent huge pages (Linux).
HUGE_PAGE_MIN_BYTES = 8 << 20
_HUGE_OK = hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("FASTCOLOR_HUGE_PAGES", "1") != "0"
_REUSE_OK = os.environ.get("FASTCOLOR_REUSE_GRADIENT", "1") != "0"

_lock = threading.Lock()
_kept: mmap.mmap | None = None  # the last mapping handed out with reuse=True


def _new_mapping(nbytes: int) -> mmap.mmap | None:
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError, AttributeError):
        return None
    return buf


def empty_cpu(shape: tuple[int, ...], dtype: torch.dtype, *, reuse: bool = False) -> torch.Tensor:
    """torch.empty, but a large buffer is an anonymous mmap advised MADV_HUGEPAGE, and with
    ``reuse`` the pages of the previous such buffer once nothing uses them any more.

    Huge pages: with 4 KiB pages the first touch of every page is a page fault, which on some
    machines (VMs) costs more than the kernel itself; 2 MiB pages make that 512x fewer faults.
    Without ``reuse`` the memory goes back to the OS when the tensor is freed (the tensor holds
    the mmap). ``FASTCOLOR_HUGE_PAGES=0`` turns huge pages (and so reuse) off.

    ``reuse`` (the fused loss's gradient): this module keeps the last mapping it handed out
    with ``reuse=True``; when the next request fits it (at least as large, at most twice) and no
    tensor, view or array uses it any more (its only reference is this module's: every torch
    storage made from it holds one), its pages are handed out again: no page faults, no
    zeroing by the kernel; the contents are the previous gradient's, and every caller
    overwrites all of it. Measured: the numba loss 41.8 -> 31.6 ms at (40, 313, 64, 64) float32
    (2026-12-01, Zen 3, 2 threads; bench/data/cpu_kernels_2026-12-01_second.md).
    The price is one gradient's memory held between calls (what PyTorch's CUDA caching
    allocator does for every tensor). It does not raise a training step's peak: the previous
    gradient is dead before the next loss call needs one of the same size, and the peak of a
    step comes at that call, where the memory is needed either way. In use a buffer is never
    handed out twice. :func:`release_kept` drops the kept mapping (its memory goes back to the
    OS once its last tensor is freed); ``FASTCOLOR_REUSE_GRADIENT=0`` turns reuse off.
    """
    global _kept
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if not _HUGE_OK or nbytes < HUGE_PAGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    reuse = reuse and _REUSE_OK
    if reuse:
        with _lock:
            kept = _kept
            # references: _kept, `kept`, getrefcount's argument; any storage made from it adds one
            if kept is not None and nbytes <= len(kept) <= 2 * nbytes and sys.getrefcount(kept) == 3:
                # made under the lock: a second thread then sees the new storage's reference
                return torch.frombuffer(kept, dtype=dtype, count=count).view(shape)
    buf = _new_mapping(nbytes)
    if buf is None:
        return torch.empty(shape, dtype=dtype)
    out = torch.frombuffer(buf, dtype=dtype, count=count).view(shape)
    if reuse:
        with _lock:
            _kept = buf  # the newest; an older one is freed with its last tensor
    return out


def release_kept() -> int:
    """Drop the gradient mapping kept for reuse (see :func:`empty_cpu`); returns its size in
    bytes (0 if none). Its memory goes back to the OS when no tensor uses it any more.

    >>> from fastcolor.backends._alloc import release_kept
    >>> release_kept() >= 0
    True
    """
    global _kept
    with _lock:
        buf, _kept = _kept, None
    return len(buf) if buf is not None else 0
