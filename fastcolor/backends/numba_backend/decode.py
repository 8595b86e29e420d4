"""The annealed-mean decode: per tile, one read of the logits into a contiguous per-thread
``313 x TILE`` buffer with their max (:func:`._math.tile_load_max`; probabilities: their log in
place), then one pass over the buffer (in L2) of ``exp((y - max) / T)`` that accumulates the
sum and the two dot products with the bin centres (``ba``, ``bb``, arguments). A second pass
over ``x`` itself would find the tile in L3: its class rows lie ``P`` apart and share cache sets.
Pipelined: each worker keeps two such buffers, and the exp pass of a tile reads the next tile's
logits (and their max) into the other one a class row at a time between its own rows, so the
reading overlaps the exp; only a worker's first tile of a chunk has a load pass of its own.
"""
from __future__ import annotations

import numpy as np

from fastcolor.backends.numba_backend._jit import cjit, pjit, prange, tjit
from fastcolor.backends.numba_backend._launch import TILE, claim, next_tile_base, tile_at
from fastcolor.backends.numba_backend._math import (
    ONE,
    ZERO,
    begin_next_tile,
    exp_constants,
    fexp_nonpos_from,
    flog,
    load_row_max,
    prefetch_ahead,
    tile_load_max,
)
from fastcolor.gamut import Q


@tjit
def _am_accumulate(Y, tw, inv_t, ba, bb, mx, sm, sa, sb, K, x, xn, twn, P, Yn, mxn):
    """sm[j] = sum_q e, sa/sb[j] = sum_q e * (a_q, b_q), e = exp((y_qj - mx[j]) / T), where
    y_qj = Y[q * TILE + j] (the tile's logits, or their logs for probabilities). Between two
    class rows, the next tile's row (``twn`` pixels at ``x[xn + q * P]``; ``xn < 0``: none) is
    read into Yn with its running max in mxn (prefetched ``AHEAD`` rows ahead), so the logits
    are read while the exp computes and no pass of its own loads a tile."""
    for j in range(tw):
        sm[j] = ZERO
        sa[j] = ZERO
        sb[j] = ZERO
    begin_next_tile(x, xn, twn, P, mxn)
    for q in range(Q):
        prefetch_ahead(x, xn, P, q)
        yq = Y[q * TILE: q * TILE + tw]
        ca = ba[q]
        cb = bb[q]
        for j in range(tw):
            e = fexp_nonpos_from((yq[j] - mx[j]) * inv_t, K)
            sm[j] += e
            sa[j] += e * ca
            sb[j] += e * cb
        if xn >= 0:
            load_row_max(x, xn + q * P, twn, Yn, q * TILE, mxn)


@tjit
def _am_tile(x, xb, xn, twn, P, tw, inv_t, is_probs, ba, bb, mx, mxn, sm, sa, sb, Y, Yn, K, oa, ob, loaded):
    # the tile into Y (contiguous: x's class rows lie P apart and alias in L1/L2, so a second
    # pass over x itself would come from L3) and its max, unless the previous tile's exp pass
    # read it already (``loaded``)
    if not loaded:
        tile_load_max(x, xb, P, tw, Y, mx)
    if is_probs:
        # softmax(log(x) / T) = exp((log x - log max) / T) / sum; log x in place in Y
        for j in range(tw):
            mx[j] = flog(mx[j])
        for q in range(Q):
            yq = Y[q * TILE: q * TILE + tw]
            for j in range(tw):
                yq[j] = flog(yq[j])
    _am_accumulate(Y, tw, inv_t, ba, bb, mx, sm, sa, sb, K, x, xn, twn, P, Yn, mxn)
    for j in range(tw):
        inv = ONE / sm[j]
        oa[j] = sa[j] * inv
        ob[j] = sb[j] * inv


@cjit
def annealed_worker(counter, nchunks, x, inv_t, is_probs, ba, bb, out, N, P):
    """Tiles of the worker's chunks, two tile buffers swapped after each: the next tile's logits
    are read during this tile's exp pass (:func:`_am_accumulate`)."""
    tpi = (P + TILE - 1) // TILE
    ntiles = N * tpi
    mx = np.empty(TILE, np.float32)
    mxn = np.empty(TILE, np.float32)
    sm = np.empty(TILE, np.float32)
    sa = np.empty(TILE, np.float32)
    sb = np.empty(TILE, np.float32)
    Y = np.empty(Q * TILE, np.float32)
    Yn = np.empty(Q * TILE, np.float32)
    K = exp_constants()
    loaded = False
    t0, t1 = claim(counter, nchunks, ntiles)
    while t0 < t1:
        for t in range(t0, t1):
            n, p0, tw = tile_at(t, tpi, P)
            o = n * 2 * P + p0
            xn = next_tile_base(t, t1, tpi, P)
            twn = tile_at(t + 1, tpi, P)[2] if xn >= 0 else 0
            _am_tile(x, n * Q * P + p0, xn, twn, P, tw, inv_t, is_probs, ba, bb, mx, mxn, sm, sa, sb, Y, Yn, K,
                     out[o: o + tw], out[o + P: o + P + tw], loaded)
            Y, Yn = Yn, Y
            mx, mxn = mxn, mx
            loaded = xn >= 0
        t0, t1 = claim(counter, nchunks, ntiles)


@pjit
def annealed_kernel(nworkers, counter, nchunks, x, inv_t, is_probs, ba, bb, out, N, P):
    for _ in prange(nworkers):
        annealed_worker(counter, nchunks, x, inv_t, is_probs, ba, bb, out, N, P)
