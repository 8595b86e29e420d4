"""Allocation shared by the CPU backends (numba and cpp)."""
from __future__ import annotations

import math
import mmap
import os

import torch

#: Gradients of at least this many bytes are allocated on transparent huge pages (Linux).
HUGE_PAGE_MIN_BYTES = 8 << 20
_HUGE_OK = hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("FASTCOLOR_HUGE_PAGES", "1") != "0"


def empty_cpu(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, but a large buffer is an anonymous mmap advised MADV_HUGEPAGE.

    The gradient is as large as the logits and written once; with 4 KiB pages the first
    touch of every page is a page fault, which on some machines (VMs) costs more than the
    kernel itself. 2 MiB pages make that 512x fewer faults. The memory goes back to the OS
    when the tensor is freed (the tensor holds the mmap). FASTCOLOR_HUGE_PAGES=0 turns it off.
    """
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if not _HUGE_OK or nbytes < HUGE_PAGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError, AttributeError):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)
