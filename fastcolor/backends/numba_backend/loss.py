"""The fused class-rebalanced cross-entropy (forward and gradient in one pass over the logits).

Per tile: (1) the target of each pixel, encoded on the fly by :func:`.encode.encode_tile`
(or copied from a precomputed one), (2) running max over the 313 logits, (3)
``e = exp(x - max)`` into a per-thread ``313 x TILE`` float32 buffer (fits L2) and its sum,
(4) per pixel: the loss from the k target logits only, computed from the shifted logits,
``-sum_j z_j ((x_j - max) - log sum)``, never as ``x_j - (max + log sum)`` (in float32,
``max + log sum`` rounds log 313 away from |max| ~ 1e7 on and loses it at 1e30; ``x_j - max``
cannot overflow unless the two are more than float32's max apart, and then it is -inf: a
+inf loss, the gradient stays finite), and the target subtracted in the buffer
(``e -= z * sum``), (5) ``grad = scale / sum * e`` written once in the logits' dtype.
The logits are read from memory once (pass 3 re-reads the tile from cache); nothing of size
``N x 313 x P`` is allocated besides the gradient itself.
"""
from __future__ import annotations

import math

import numpy as np

from fastcolor.backends.numba_backend._jit import cjit, narrow, pjit, prange, tjit, widen
from fastcolor.backends.numba_backend._launch import TILE, claim, tile_at
from fastcolor.backends.numba_backend._math import NAN, ONE, ZERO, fexp_nonpos, tile_max
from fastcolor.backends.numba_backend.encode import copy_slots, encode_tile
from fastcolor.gamut import K_MAX, Q


@tjit
def _ce_tile(x, xb, P, tw, k, ti, tz, sc, gscale, need_grad, loss, g, E, mx, sm):
    """One tile of the fused loss, the target (ti, tz) already in place; sc[j] holds the
    per-pixel loss scale s * m * v and becomes the gradient factor."""
    tile_max(x, xb, P, tw, mx)
    # -- e = exp(x - max) (kept in E when the gradient is wanted) and its sum
    for j in range(tw):
        sm[j] = ZERO
    if need_grad:
        for q in range(Q):
            xq = x[xb + q * P: xb + q * P + tw]
            eq = E[q * TILE: q * TILE + tw]
            for j in range(tw):
                e = fexp_nonpos(widen(xq[j]) - mx[j])
                eq[j] = e
                sm[j] += e
    else:
        for q in range(Q):
            xq = x[xb + q * P: xb + q * P + tw]
            for j in range(tw):
                sm[j] += fexp_nonpos(widen(xq[j]) - mx[j])
    # -- per pixel: the loss from the k target logits only; the target subtracted in E
    #    (softmax - z = (e - z * sum) / sum), so the gradient pass is a plain scaling
    for j in range(tw):
        ssum = sm[j]
        m = mx[j]
        lsum = math.log(ssum)
        acc = ZERO
        for i in range(k):
            q = ti[i * TILE + j]
            if q < 0 or q >= Q:  # a bad precomputed index: NaN loss, never a wild write
                acc = NAN
                continue
            z = tz[i * TILE + j]
            acc += z * ((widen(x[xb + q * P + j]) - m) - lsum)  # shifted: see (4) above
            if need_grad:
                E[q * TILE + j] -= z * ssum
        loss[j] = -(sc[j] * acc)
        sc[j] = gscale * sc[j] / ssum
    # -- the gradient, written once
    if need_grad:
        for q in range(Q):
            gq = g[xb + q * P: xb + q * P + tw]
            eq = E[q * TILE: q * TILE + tw]
            for j in range(tw):
                gq[j] = narrow(eq[j] * sc[j], g)


@cjit
def ce_worker(counter, nchunks, x, ab, idx_in, w_in, use_ab, k, enc, cw, mask, ps, gscale,
              need_grad, loss, g, N, P):
    """Fused soft-encoding + cross-entropy + gradient. Flat arrays; ``x``/``g`` float32, or
    the bits of float16 (int16) / bfloat16 (uint16). ``cw``/``mask``/``ps`` empty when absent.
    (Inner loops index slices from 0, so LLVM sees non-negative contiguous indices: a signed
    offset index would make numba's negative-index wraparound turn them into gathers.)"""
    tpi = (P + TILE - 1) // TILE
    ntiles = N * tpi
    use_cw = cw.size > 0
    E = np.empty(Q * TILE, np.float32)
    mx = np.empty(TILE, np.float32)
    sm = np.empty(TILE, np.float32)
    sc = np.empty(TILE, np.float32)
    ti = np.empty(K_MAX * TILE, np.int32)
    tz = np.empty(K_MAX * TILE, np.float32)
    t0, t1 = claim(counter, nchunks, ntiles)
    while t0 < t1:
        for t in range(t0, t1):
            n, p0, tw = tile_at(t, tpi, P)
            # -- the target of every pixel of the tile: k (index, weight) pairs
            if use_ab:
                ab0 = n * 2 * P + p0
                encode_tile(ab[ab0: ab0 + tw], ab[ab0 + P: ab0 + P + tw], tw, k, enc, ti, tz)
            else:
                copy_slots(idx_in, w_in, n * k * P + p0, P, ti, tz, 0, TILE, k, tw)
            # -- per-pixel scale s * m * v
            m_n = mask[n] if mask.size > 0 else ONE
            for j in range(tw):
                v = m_n
                if ps.size > 0:
                    v *= ps[n * P + p0 + j]
                if use_cw:
                    q = ti[j]
                    v *= cw[q] if (q >= 0 and q < Q) else ONE
                sc[j] = v
            _ce_tile(x, n * Q * P + p0, P, tw, k, ti, tz, sc, gscale, need_grad,
                     loss[n * P + p0: n * P + p0 + tw], g, E, mx, sm)
        t0, t1 = claim(counter, nchunks, ntiles)


@pjit
def ce_kernel(nworkers, counter, nchunks, x, ab, idx_in, w_in, use_ab, k, enc, cw, mask, ps,
              gscale, need_grad, loss, g, N, P):
    for _ in prange(nworkers):
        ce_worker(counter, nchunks, x, ab, idx_in, w_in, use_ab, k, enc, cw, mask, ps, gscale,
                  need_grad, loss, g, N, P)
