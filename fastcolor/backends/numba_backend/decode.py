"""The annealed-mean decode: per tile, a max pass, then one pass of ``exp((x - max) / T)`` that
accumulates the sum and the two dot products with the bin centres (probabilities: their log
first, into a tile buffer). The bin centres come in as arguments (``ba``, ``bb``)."""
from __future__ import annotations

import numpy as np

from fastcolor.backends.numba_backend._jit import cjit, pjit, prange, tjit, widen
from fastcolor.backends.numba_backend._launch import TILE, claim, tile_at
from fastcolor.backends.numba_backend._math import ONE, ZERO, fexp_nonpos, flog, tile_max
from fastcolor.gamut import Q


@tjit
def _am_accumulate(src, base, stride, tw, inv_t, ba, bb, mx, sm, sa, sb):
    """sm[j] = sum_q e, sa/sb[j] = sum_q e * (a_q, b_q), e = exp((y_qj - mx[j]) / T), where
    y_qj = src[base + q * stride + j] (the logits, or a tile of log-probabilities)."""
    for j in range(tw):
        sm[j] = ZERO
        sa[j] = ZERO
        sb[j] = ZERO
    for q in range(Q):
        yq = src[base + q * stride: base + q * stride + tw]
        ca = ba[q]
        cb = bb[q]
        for j in range(tw):
            e = fexp_nonpos((widen(yq[j]) - mx[j]) * inv_t)
            sm[j] += e
            sa[j] += e * ca
            sb[j] += e * cb


@tjit
def _am_tile(x, xb, P, tw, inv_t, is_probs, ba, bb, mx, sm, sa, sb, Y, oa, ob):
    tile_max(x, xb, P, tw, mx)
    if is_probs:
        # softmax(log(x) / T) = exp((log x - log max) / T) / sum; log x into the tile Y first
        for j in range(tw):
            mx[j] = flog(mx[j])
        for q in range(Q):
            xq = x[xb + q * P: xb + q * P + tw]
            yq = Y[q * TILE: q * TILE + tw]
            for j in range(tw):
                yq[j] = flog(widen(xq[j]))
        _am_accumulate(Y, 0, TILE, tw, inv_t, ba, bb, mx, sm, sa, sb)
    else:
        _am_accumulate(x, xb, P, tw, inv_t, ba, bb, mx, sm, sa, sb)
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
    Y = np.empty(Q * TILE if is_probs else 0, np.float32)
    t0, t1 = claim(counter, nchunks, ntiles)
    while t0 < t1:
        for t in range(t0, t1):
            n, p0, tw = tile_at(t, tpi, P)
            o = n * 2 * P + p0
            _am_tile(x, n * Q * P + p0, P, tw, inv_t, is_probs, ba, bb, mx, sm, sa, sb, Y,
                     out[o: o + tw], out[o + P: o + P + tw])
        t0, t1 = claim(counter, nchunks, ntiles)


@pjit
def annealed_kernel(nworkers, counter, nchunks, x, inv_t, is_probs, ba, bb, out, N, P):
    for _ in prange(nworkers):
        annealed_worker(counter, nchunks, x, inv_t, is_probs, ba, bb, out, N, P)
