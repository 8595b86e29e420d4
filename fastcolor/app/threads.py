"""How many CPU threads the application gives torch: the idle cores, not every core.

On a busy machine fewer threads than torch's default are much faster: OpenMP threads that
wait for each other at every barrier while other processes hold the cores made a training
step five times slower than a single thread (measured on 2 busy cores).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from fastcolor.app.messages import note


def cpu_threads(reserve: int = 0) -> tuple[int, float | None]:
    """(torch CPU threads to use, 1-minute load average): the idle cores, less ``reserve``."""
    import torch

    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    cpus = os.cpu_count() or 1
    return max(1, min(n, cpus - reserve - int(load or 0))), load


@contextlib.contextmanager
def idle_cpu_threads(device: str, log: Callable[[str], None] | None = note, reserve: int = 0,
                     threads: int | None = None) -> Iterator[None]:
    """On the CPU, run the block with torch using only the idle cores less ``reserve`` (see
    :func:`cpu_threads`); ``log`` (None: silent) is told when that is fewer threads than usual.
    ``threads`` (``--threads``), when given, is the number of threads instead, on any device."""
    if threads is None and not str(device).startswith("cpu"):
        yield
        return
    import torch

    default = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected a positive int, got {threads!r}")
        n, load = threads, None
    else:
        n, load = cpu_threads(reserve)
    if threads is None and n < default and log is not None:
        why = f"load {load:.1f} on {os.cpu_count()} cores" if load is not None else f"{os.cpu_count()} cores"
        log(f"using {n} of {default} CPU threads ({why}{', one core left free' if reserve else ''}): busy cores "
            f"slow every thread down")
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(default)
