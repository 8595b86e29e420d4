"""Soft-encoding: the k nearest bins of every pixel of a tile, and their Gaussian weights.

One routine, :func:`encode_tile`, serves both ``soft_encode`` (the worker below writes its
tiles out as ``(N, k, P)``) and the fused loss, which encodes its target on the fly
(:mod:`.loss`). It follows the rule of :mod:`fastcolor.gamut` (three cases), searching
:func:`fastcolor.gamut.candidate_table`; the table and the bin centres come in as kernel
arguments (:func:`encoder_args`), so no number of the gamut is frozen into compiled code.
"""
from __future__ import annotations

import math

import numpy as np

from fastcolor.backends.numba_backend._jit import cjit, jit, pjit, prange, xjit
from fastcolor.backends.numba_backend._launch import TILE, claim, tile_at
from fastcolor.backends.numba_backend._math import INF, NAN, ONE, ZERO, fexp_nonpos
from fastcolor.gamut import AB_BINS, K_MAX, candidate_table

_F = np.float32
#: Bin centres, float32 for the in-box search (exact: multiples of 10) and float64 for the
#: far-off scan, passed to the kernels as arguments.
_BA = np.ascontiguousarray(AB_BINS[:, 0], dtype=np.float32)
_BB = np.ascontiguousarray(AB_BINS[:, 1], dtype=np.float32)
_BA64 = np.ascontiguousarray(AB_BINS[:, 0], dtype=np.float64)
_BB64 = np.ascontiguousarray(AB_BINS[:, 1], dtype=np.float64)


def encoder_args(k: int, sigma: float) -> tuple:
    """The tuple the jitted encoder takes (``enc``): k's candidate table, its geometry, the bin
    centres and the Gaussian width:
    ``(offsets, bins, lo, hi, inv_cell, n, ba, bb, ba64, bb64, inv2s2, two_s2)``.
    ``bins`` is the table's int16 array viewed as uint16 (no copy; the indices are < 313):
    unsigned indices spare numba's negative-index wraparound in the gathers (~20% of the
    search, measured)."""
    t = candidate_table(k)
    return (t.offsets, t.bins.view(np.uint16), _F(t.lo), _F(t.hi), _F(1.0 / t.cell), int(t.n), _BA, _BB, _BA64, _BB64,
            _F(1.0 / (2.0 * sigma * sigma)), float(2.0 * float(sigma) ** 2))


#: Above this float32 d_0^2 (the nearest bin over 10 ab units away: off the gamut, whose every
#: colour is within 5 * sqrt(2) of a bin) the float32 squared distances, ~1e2 to 1e4, leave
#: their differences and so the weights up to ~1e-5 off: such pixels get weights64. Below it the
#: float32 weights are within 4e-7 of the reference (measured over the box, k = 2, 5, 16).
W64_D2 = _F(100.0)


@xjit
def weights64(a, b, k, ba64, bb64, two_s2, bi, w, j, sd):
    """The weights of pixel j's k bins bi[m * TILE + j] (found), from float64 squared distances
    (a, b widened; no fused multiply-add) and their float64 differences, as the reference
    computes them, cast to float32 at the end. sd: float64 scratch of K_MAX."""
    a64 = np.float64(a)
    b64 = np.float64(b)
    for m in range(k):
        q = bi[m * TILE + j]
        da = a64 - ba64[q]
        db = b64 - bb64[q]
        sd[m] = da * da + db * db
    d0 = sd[0]
    tot = 0.0
    for m in range(k):
        g = math.exp(-(sd[m] - d0) / two_s2)
        sd[m] = g
        tot += g
    for m in range(k):
        w[m * TILE + j] = np.float32(sd[m] / tot)


@xjit
def far_scan(a, b, k, ba64, bb64, two_s2, bi, w, j, sd, si):
    """Rule 2 (a finite pixel outside the table's box), scalar: all 313 bins in float64.

    d^2 = (a - a_q) * (a - a_q) + (b - b_q) * (b - b_q) on the float32 value widened to
    float64, with no fused multiply-add (``xjit``: fastmath=False, so LLVM contracts nothing),
    the insertion of the table scan (q ascending, a strict "<": ties keep the lower index),
    and the weights of :func:`weights64`. Writes slot m of pixel j: bi[m * TILE + j],
    w[m * TILE + j]. sd, si: float64 / int32 scratch of K_MAX.
    (Written out: an inlined helper with an early return ran 20x slower.)
    """
    a64 = np.float64(a)
    b64 = np.float64(b)
    for m in range(k):
        sd[m] = np.inf
        si[m] = m
    for q in range(ba64.shape[0]):
        da = a64 - ba64[q]
        db = b64 - bb64[q]
        d = da * da + db * db
        if d < sd[k - 1]:
            i = k - 1
            while i > 0 and d < sd[i - 1]:
                sd[i] = sd[i - 1]
                si[i] = si[i - 1]
                i -= 1
            sd[i] = d
            si[i] = q
    for m in range(k):
        bi[m * TILE + j] = si[m]
    weights64(a, b, k, ba64, bb64, two_s2, bi, w, j, sd)


@xjit
def encode_tile(at, bt, tw, k, enc, bi, w):
    """Soft-encode the tw pixels (at[j], bt[j]) of a tile: the k nearest bins into
    bi[m * TILE + j] (m = 0 nearest; ties: lower index first), Gaussian weights summing to 1
    into w[m * TILE + j].

    Rule 1 (in the box), vectorised across the tile's pixels: per pixel, its sub-cell's list
    (start, length); then for jj < the longest list of the tile, every pixel's jj-th candidate
    (a masked gather: past its list a pixel gets distance +inf, which inserts nowhere), its
    float32 d^2 (``xjit``: no contraction), and a branch-free insertion into k sorted slots
    held as k rows of TILE (one select chain per slot, across the pixels). A pixel's list is
    in ascending bin index and only a strictly smaller distance moves ahead, so ties keep the
    lower index, as in the reference's stable sort. Then the weights, vectorised, from the
    float32 differences; a pixel whose nearest bin is over 10 units away (d_0^2 > W64_D2: off
    the gamut) gets them again from float64 differences (:func:`weights64`), so that every
    weight is within 1e-6 of the reference's. Rules 2 (finite, outside the box:
    :func:`far_scan`) and 3 (NaN / Inf: bins 0..k-1, NaN weights) overwrite their pixels
    afterwards (such pixels have an empty list above).
    """
    offsets, bins, lo, hi, inv_cell, n, ba, bb, ba64, bb64, inv2s2, two_s2 = enc
    st = np.empty(TILE, np.uint32)  # scratch: ~8 KB per tile of 128 pixels (unsigned: see encoder_args)
    ln = np.empty(TILE, np.int32)
    cd = np.empty(TILE, np.float32)
    cq = np.empty(TILE, np.int32)
    bd = np.empty(K_MAX * TILE, np.float32)  # squared distances of the k best so far
    # -- per pixel: its sub-cell's list (start, length; length 0 outside the box / NaN)
    top = n - 1
    longest = 0
    outside = 0
    for j in range(tw):
        a = at[j]
        b = bt[j]
        inb = (a >= lo) & (a < hi) & (b >= lo) & (b < hi)  # False for NaN
        fa = (a - lo) * inv_cell if inb else ZERO  # (the table's slack covers the rounding)
        fb = (b - lo) * inv_cell if inb else ZERO
        c = min(np.int32(fa), top) * n + min(np.int32(fb), top)
        o0 = offsets[c]
        ll = offsets[c + 1] - o0
        ll = ll if inb else 0
        st[j] = o0
        ln[j] = ll
        longest = max(longest, ll)
        outside += 0 if inb else 1
    for m in range(k):
        bdm = bd[m * TILE: m * TILE + tw]
        bim = bi[m * TILE: m * TILE + tw]
        for j in range(tw):
            bdm[j] = INF
            bim[j] = m
    # -- the jj-th candidate of every pixel; branch-free insertion across the pixels
    for jj in range(longest):
        for j in range(tw):
            ok = jj < ln[j]
            q = np.uint32(bins[st[j] + np.uint32(jj if ok else 0)])
            da = at[j] - ba[q]
            db = bt[j] - bb[q]
            d = da * da + db * db
            cd[j] = d if ok else INF
            cq[j] = q
        for m in range(k - 1, 0, -1):
            bdm = bd[m * TILE: m * TILE + tw]
            bim = bi[m * TILE: m * TILE + tw]
            bdp = bd[(m - 1) * TILE: (m - 1) * TILE + tw]
            bip = bi[(m - 1) * TILE: (m - 1) * TILE + tw]
            # (Loads first, then one-level selects: a nested conditional expression
            # keeps LLVM from if-converting, and the loop would stay scalar.)
            for j in range(tw):
                d = cd[j]
                c = cq[j]
                dp = bdp[j]
                dm = bdm[j]
                ip = bip[j]
                im = bim[j]
                lt_p = d < dp
                lt_m = d < dm
                nd = d if lt_m else dm
                nd = dp if lt_p else nd
                ni = c if lt_m else im
                ni = ip if lt_p else ni
                bdm[j] = nd
                bim[j] = ni
        bd0 = bd[0:tw]
        bi0 = bi[0:tw]
        for j in range(tw):
            d = cd[j]
            c = cq[j]
            d0 = bd0[j]
            i0 = bi0[j]
            lt = d < d0
            bi0[j] = c if lt else i0
            bd0[j] = d if lt else d0
    # -- Gaussian weights, normalised (float32; pixels off the gamut: float64, below)
    bd0 = bd[0:tw]
    tot = cd  # reuse as the running sum
    off_gamut = 0
    for j in range(tw):
        tot[j] = ZERO
        off_gamut += 1 if (bd0[j] > W64_D2) & (bd0[j] < INF) else 0
    for m in range(k):
        bdm = bd[m * TILE: m * TILE + tw]
        wm = w[m * TILE: m * TILE + tw]
        for j in range(tw):
            g = fexp_nonpos(-(bdm[j] - bd0[j]) * inv2s2)
            wm[j] = g
            tot[j] += g
    for j in range(tw):
        tot[j] = ONE / tot[j]
    for m in range(k):
        wm = w[m * TILE: m * TILE + tw]
        for j in range(tw):
            wm[j] *= tot[j]
    if off_gamut > 0:
        sd = np.empty(K_MAX, np.float64)
        for j in range(tw):
            if (bd0[j] > W64_D2) & (bd0[j] < INF):
                weights64(at[j], bt[j], k, ba64, bb64, two_s2, bi, w, j, sd)
    # -- rules 2 and 3: the pixels outside the box (rare), scalar
    if outside > 0:
        sd = np.empty(K_MAX, np.float64)
        si = np.empty(K_MAX, np.int32)
        for j in range(tw):
            a = at[j]
            b = bt[j]
            if (a >= lo) & (a < hi) & (b >= lo) & (b < hi):
                continue
            if abs(a) < INF and abs(b) < INF:
                far_scan(a, b, k, ba64, bb64, two_s2, bi, w, j, sd, si)
            else:  # NaN or infinite: what the reference's stable sort of NaN / inf rows gives
                for m in range(k):
                    bi[m * TILE + j] = m
                    w[m * TILE + j] = NAN


@jit
def copy_slots(si, sw, so, sstride, di, dw, do, dstride, k, tw):
    """Copy k rows of tw (index, weight) pairs: rows start at so + m * sstride in (si, sw)
    and at do + m * dstride in (di, dw) (the (N, k, P) layout <-> a tile's k x TILE)."""
    for m in range(k):
        src_i = si[so + m * sstride: so + m * sstride + tw]
        src_w = sw[so + m * sstride: so + m * sstride + tw]
        dst_i = di[do + m * dstride: do + m * dstride + tw]
        dst_w = dw[do + m * dstride: do + m * dstride + tw]
        for j in range(tw):
            dst_i[j] = src_i[j]
            dst_w[j] = src_w[j]


@cjit
def soft_encode_worker(counter, nchunks, ab, k, enc, idx, w, N, P):
    """Encode chunks of tiles (TILE pixels of one image each) until none is left."""
    tpi = (P + TILE - 1) // TILE
    ntiles = N * tpi
    bi = np.empty(K_MAX * TILE, np.int32)
    wt = np.empty(K_MAX * TILE, np.float32)
    t0, t1 = claim(counter, nchunks, ntiles)
    while t0 < t1:
        for t in range(t0, t1):
            n, p0, tw = tile_at(t, tpi, P)
            ab0 = n * 2 * P + p0
            encode_tile(ab[ab0: ab0 + tw], ab[ab0 + P: ab0 + P + tw], tw, k, enc, bi, wt)
            copy_slots(bi, wt, 0, TILE, idx, w, n * k * P + p0, P, k, tw)
        t0, t1 = claim(counter, nchunks, ntiles)


@pjit
def soft_encode_kernel(nworkers, counter, nchunks, ab, k, enc, idx, w, N, P):
    for _ in prange(nworkers):
        soft_encode_worker(counter, nchunks, ab, k, enc, idx, w, N, P)
