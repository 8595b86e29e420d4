"""The annealed-mean decode: per tile, one read of the logits into a contiguous per-thread
``313 x TILE`` buffer with their max (:func:`._math.tile_load_max`; probabilities: their log in
place), then one pass over the buffer (in L2) of ``exp((y - max) / T)`` that accumulates the
sum and the two dot products with the bin centres (``ba``, ``bb``, arguments). A second pass
over ``x`` itself would find the tile in L3: its class rows lie ``P`` apart and share cache sets.
"""
from __future__ import annotations

import numpy as np

from fastcolor.backends.numba_backend._jit import cjit, pjit, prange, tjit
from fastcolor.backends.numba_backend._launch import TILE, claim, next_tile_base, tile_at
from fastcolor.backends.numba_backend._math import (
    ONE,
    ZERO,
    exp_constants,
    fexp_nonpos_from,
    flog,
    prefetch_row,
    tile_load_max,
)
from fastcolor.gamut import Q


@tjit
def _am_accumulate(Y, tw, inv_t, ba, bb, mx, sm, sa, sb, K, x, xn, P):
    """sm[j] = sum_q e, sa/sb[j] = sum_q e * (a_q, b_q), e = exp((y_qj - mx[j]) / T), where
    y_qj = Y[q * TILE + j] (the tile's logits, or their logs for probabilities). Meanwhile the
    next tile's logits (at x[xn + q * P], xn < 0: none) are prefetched, a class row per class."""
    for j in range(tw):
        sm[j] = ZERO
        sa[j] = ZERO
        sb[j] = ZERO
    for q in range(Q):
        prefetch_row(x, xn + q * P if xn >= 0 else -1, TILE)
        yq = Y[q * TILE: q * TILE + tw]
        ca = ba[q]
        cb = bb[q]
        for j in range(tw):
            e = fexp_nonpos_from((yq[j] - mx[j]) * inv_t, K)
            sm[j] += e
            sa[j] += e * ca
            sb[j] += e * cb


@tjit
def _am_tile(x, xb, xn, P, tw, inv_t, is_probs, ba, bb, mx, sm, sa, sb, Y, K, oa, ob):
    # the tile into Y (contiguous: x's class rows lie P apart and alias in L1/L2, so a second
    # pass over x itself would come from L3) and its max
    tile_load_max(x, xb, P, tw, Y, mx)
    if is_probs:
        # softmax(log(x) / T) = exp((log x - log max) / T) / sum; log x in place in Y
        for j in range(tw):
            mx[j] = flog(mx[j])
        for q in range(Q):
            yq = Y[q * TILE: q * TILE + tw]
            for j in range(tw):
                yq[j] = flog(yq[j])
    _am_accumulate(Y, tw, inv_t, ba, bb, mx, sm, sa, sb, K, x, xn, P)
    for j in range(tw):
        inv = ONE / sm[j]
        oa[j] = sa[j] * inv
        ob[j] = sb[j] * inv


@cjit
def annealed_worker(counter, nchunks, x, inv_t, is_probs, ba, bb, out, N, P):
    tpi = (P + TILE - 1) // TILE
    ntiles = N * tpi
    mx = np.empty(TILE, np.float32)
    sm = np.empty(TILE, np.float32)
    sa = np.empty(TILE, np.float32)
    sb = np.empty(TILE, np.float32)
    Y = np.empty(Q * TILE, np.float32)
    K = exp_constants()
    t0, t1 = claim(counter, nchunks, ntiles)
    while t0 < t1:
        for t in range(t0, t1):
            n, p0, tw = tile_at(t, tpi, P)
            o = n * 2 * P + p0
            _am_tile(x, n * Q * P + p0, next_tile_base(t, t1, tpi, P), P, tw, inv_t, is_probs, ba, bb, mx, sm, sa,
                     sb, Y, K, out[o: o + tw], out[o + P: o + P + tw])
        t0, t1 = claim(counter, nchunks, ntiles)


@pjit
def annealed_kernel(nworkers, counter, nchunks, x, inv_t, is_probs, ba, bb, out, N, P):
    for _ in prange(nworkers):
        annealed_worker(counter, nchunks, x, inv_t, is_probs, ba, bb, out, N, P)
