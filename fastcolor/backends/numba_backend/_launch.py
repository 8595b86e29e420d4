"""Threads: how a kernel's tiles are spread over numba's threads (or run on the caller's).

A kernel is a ``prange`` over one worker per numba thread; the workers take chunks (runs of
tiles) from a shared atomic counter until none is left. Tiny inputs run on the calling
thread, and so does everything in a forked process (a DataLoader worker): GNU OpenMP, numba's
default layer, hangs or is terminated there once the parent ran any parallel region, numba's or
torch's (see :mod:`fastcolor.backends._fork`).
"""
from __future__ import annotations

import numpy as np

from fastcolor.backends._fork import forked
from fastcolor.backends.numba_backend import _jit
from fastcolor.backends.numba_backend._jit import jit, numba
from fastcolor.gamut import Q

claim_index = getattr(_jit, "claim_index", None)  # (None where numba is unusable: nothing is compiled then)

#: Pixels per tile (the inner, vectorised loop length).
TILE = 128
#: Work of at most this many tiles (of the loss / decode; 8x more for soft-encode, which is
#: ~10x cheaper per tile) runs on the calling thread: waking a sleeping pool thread costs
#: ~10 us on an idle machine but a scheduler tick (4 ms here) or more on a busy one.
SERIAL_MAX_TILES = 16
#: Chunks (runs of tiles) per thread, taken from a shared counter.
CHUNKS_PER_THREAD = 16


def launch(parallel_kernel, worker, ntiles: int, *args, serial_max: int = SERIAL_MAX_TILES) -> None:
    """Run the tiles through ``worker(counter, nchunks, *args)``.

    Parallel: ``parallel_kernel`` starts one worker per numba thread, and the workers take
    chunks of tiles from a shared atomic counter until none is left (dynamic scheduling:
    numba's prange splits statically, so one thread descheduled by a busy machine, e.g. by
    DataLoader workers, would hold up the whole call). Serial, on the calling thread: tiny
    work, one thread, or a forked process (a DataLoader worker: :mod:`fastcolor.backends._fork`).
    """
    counter = np.zeros(1, np.int64)
    # forked() first: numba.get_num_threads() starts numba's threading layer, whose OpenMP start
    # in a forked child also sets the child's torch thread count back up (omp_set_num_threads).
    if forked() or ntiles <= serial_max or (threads := numba.get_num_threads()) == 1:
        worker(counter, 1, *args)
        return
    parallel_kernel(threads, counter, max(1, min(ntiles, threads * CHUNKS_PER_THREAD)), *args)


@jit
def claim(counter, nchunks, ntiles):
    """The next unclaimed chunk of tiles [t0, t1), or t0 == t1 when all are taken."""
    c = claim_index(counter)
    if c >= nchunks:
        return ntiles, ntiles
    return c * ntiles // nchunks, (c + 1) * ntiles // nchunks


@jit
def tile_at(t, tpi, P):
    """Tile t (tpi tiles per image) -> (image n, first pixel p0, width tw <= TILE)."""
    n = t // tpi
    p0 = (t - n * tpi) * TILE
    return n, p0, min(TILE, P - p0)


@jit
def next_tile_base(t, t1, tpi, P):
    """Where the logits of the worker's next tile (t + 1, if < t1, the chunk's end) start:
    ``n * 313 * P + p0``, or -1 when this is the chunk's last tile (see ``_jit.prefetch``)."""
    if t + 1 >= t1:
        return -1
    n, p0, _ = tile_at(t + 1, tpi, P)
    return n * Q * P + p0
