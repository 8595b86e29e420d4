"""Forked processes: the CPU backends (numba, cpp) run their kernels on the calling thread there.

GNU OpenMP (libgomp: numba's default threading layer and the cpp backend's, one copy shared with
torch) cannot run a parallel region in a process forked after its parent ran one: the child's
thread pool still lists the parent's threads, which fork did not copy, and the child waits for
them forever (issue 23.1: a DataLoader worker soft-encoding its batches hung once the parent had
run any multi-threaded torch op, a 1000 x 1000 matmul say). libgomp cannot be asked whether the
parent ran one, and any torch op may have, so a process forked after fastcolor was imported
(``os.fork``: DataLoader workers, ``multiprocessing``'s fork children, forkserver children of a
server that imported fastcolor) runs the CPU kernels on one thread: what PyTorch's DataLoader
does for torch's own ops (``torch.set_num_threads(1)`` in each worker). Children started with
``spawn`` keep their threads. The fork of a process that had not imported fastcolor is not seen here: import
fastcolor before forking workers that use it.
"""
from __future__ import annotations

import os

_forked = False


def _mark_forked() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(after_in_child=_mark_forked)


def forked() -> bool:
    """Whether this process was forked from one that had imported fastcolor (then the CPU
    kernels run on the calling thread).

    >>> from fastcolor.backends._fork import forked
    >>> forked()
    False
    """
    return _forked
