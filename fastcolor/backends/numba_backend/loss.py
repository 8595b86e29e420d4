"""The fused class-rebalanced cross-entropy (forward and gradient in one pass over the logits).

Per tile of ``TILE`` pixels: (1) the target of each pixel, encoded on the fly by
:func:`.encode.encode_tile` (or copied from a precomputed one); (2) the tile's logits read once
from memory into a per-thread ``313 x TILE`` float32 buffer ``E`` (160 KB: fits L2) with their
running max, and the k target logits ``x_j - max`` set aside; (3) ``e = exp(x - max)`` in
place in ``E`` and its sum; (4) per pixel: the loss from the k target logits only, computed
from the shifted logits, ``-sum_j z_j ((x_j - max) - log sum)``, never as
``x_j - (max + log sum)`` (in float32, ``max + log sum`` rounds log 313 away from |max| ~ 1e7
on and loses it at 1e30; ``x_j - max`` cannot overflow unless the two are more than float32's
max apart, and then it is -inf: a +inf loss, the gradient stays finite), and the target
subtracted in the buffer (``e -= z * sum``); (5) ``grad = scale / sum * e`` written once in
the logits' dtype. float32 gradients with aligned rows are streamed (non-temporal stores: no
read of the gradient's lines before they are written) and software-pipelined over three tiles
(:func:`_ce_tile_streamed`): a worker keeps two tile buffers, and the exp pass of tile t takes
the class rows in turn, after each of its own rows writing tile t-1's gradient row from the
other buffer and reading tile t+1's logits row into the row just freed, so the reading and the
stores overlap the exp (a worker's last tile is written at its end, :func:`_flush`; the first
tile of each chunk is loaded by a pass of its own). Other gradients: :func:`_ce_tile`. The
logits are read from memory once and the gradient written once; nothing of size
``N x 313 x P`` is allocated besides the gradient itself, whose pages are the previous call's
when nothing uses those any more (:func:`fastcolor.backends._alloc.empty_cpu`).

Why the buffer: the class rows of one tile lie ``P`` floats apart (16 KB at 64 x 64), so they
share a few cache sets and a second pass over ``x`` itself finds them in L3, not L2. With it,
the tile max of :func:`._math.tile_load_max`, the exp constants as values
(:func:`._math.fexp_nonpos_from`) and prefetching, the kernel went from 60.4 to 36.9 ms with a
reused gradient, 67.8 to 46.3 ms with a fresh one (2026-12-01, Zen 3 AVX2, 2 threads,
(40, 313, 64, 64) float32, ``bench/data/cpu_kernels_2026-12-01.md``). Then the exp rule's
6-FMA polynomial without a select (``_math.fexp``), the reused gradient pages, streamed and
pipelined gradient stores: 29.3 ms as a user calls it against 50.4 before; the pipelining alone
34.3 -> 29.3 ms (``bench/data/cpu_kernels_2026-12-01_second.md``).
"""
from __future__ import annotations

import numpy as np

from fastcolor.backends.numba_backend._jit import cjit, jit, narrow, pjit, prange, store_fence, stream_product8, tjit
from fastcolor.backends.numba_backend._launch import TILE, claim, next_tile_base, tile_at
from fastcolor.backends.numba_backend._math import (
    NAN,
    ONE,
    ZERO,
    begin_next_tile,
    exp_constants,
    fexp_nonpos_from,
    flog,
    load_row_max,
    prefetch_ahead,
    prefetch_row,
    prefetch_row_for_write,
    tile_load_max,
)
from fastcolor.backends.numba_backend.encode import copy_slots, encode_tile
from fastcolor.gamut import K_MAX, Q


@tjit
def _target_logits(E, mx, ti, xt, k, tw):
    """The k shifted target logits x_j - max of every pixel, read from E before exp overwrites
    it (a bad precomputed index gives NaN: a NaN loss, never a wild read or write)."""
    for i in range(k):
        for j in range(tw):
            q = ti[i * TILE + j]
            v = NAN
            if q >= 0 and q < Q:
                v = E[q * TILE + j] - mx[j]
            xt[i * TILE + j] = v


@tjit
def _pixel_terms(k, tw, tz, xt, sm, sc, gscale, loss, ls, acc):
    """(4) the loss from the k target logits only, and the gradient factor (sc becomes
    gscale * s * m * v / sum), as vectorised loops over the tile's pixels (the log is flog, the
    CPU rule shared with the C++ code; it was a scalar libm logf per pixel)."""
    for j in range(tw):
        ls[j] = flog(sm[j])
        acc[j] = ZERO
    for i in range(k):
        zi = tz[i * TILE: i * TILE + tw]
        xi = xt[i * TILE: i * TILE + tw]
        for j in range(tw):
            acc[j] += zi[j] * (xi[j] - ls[j])  # shifted: see (4) of the module docstring
    for j in range(tw):
        loss[j] = -(sc[j] * acc[j])
        sc[j] = gscale * sc[j] / sm[j]


@tjit
def _subtract_target(E, ti, tz, sm, k, tw):
    """The target subtracted in E (softmax - z = (e - z * sum) / sum), so the gradient pass is
    a plain scaling (a bad index subtracts nothing: its loss is NaN)."""
    for i in range(k):
        for j in range(tw):
            q = ti[i * TILE + j]
            if q >= 0 and q < Q:
                E[q * TILE + j] -= tz[i * TILE + j] * sm[j]


@tjit
def _ce_tile(x, xb, xn, P, tw, k, ti, tz, sc, gscale, need_grad, loss, g, E, mx, sm, xt, ls, acc, K):
    """One tile of the fused loss with plain stores (16-bit or unaligned gradients, or none),
    the target (ti, tz) already in place; sc[j] holds the per-pixel loss scale s * m * v and
    becomes the gradient factor. The next tile's logits (at x[xn + q * P], xn < 0: none) are
    prefetched during the exp pass, a class row per class, and so are this tile's gradient
    rows, for writing (* the whole tile, one thread, logits and a reused gradient in DRAM,
    Zen 3, 2026-12-01)."""
    # -- (2) the tile's logits into E (float32, contiguous: see the module docstring) and
    #    their running max; the k shifted target logits before E is overwritten by exp
    tile_load_max(x, xb, P, tw, E, mx)
    _target_logits(E, mx, ti, xt, k, tw)
    # -- (3) e = exp(x - max) (kept in E when the gradient is wanted) and its sum
    for j in range(tw):
        sm[j] = ZERO
    if need_grad:
        for q in range(Q):
            prefetch_row(x, xn + q * P if xn >= 0 else -1, TILE)
            prefetch_row_for_write(g, xb + q * P, tw)  # for (5): 3.78 -> 3.25 cycles per logit*
            eq = E[q * TILE: q * TILE + tw]
            for j in range(tw):
                e = fexp_nonpos_from(eq[j] - mx[j], K)
                eq[j] = e
                sm[j] += e
    else:
        for q in range(Q):
            prefetch_row(x, xn + q * P if xn >= 0 else -1, TILE)
            eq = E[q * TILE: q * TILE + tw]
            for j in range(tw):
                sm[j] += fexp_nonpos_from(eq[j] - mx[j], K)
    _pixel_terms(k, tw, tz, xt, sm, sc, gscale, loss, ls, acc)
    if need_grad:
        _subtract_target(E, ti, tz, sm, k, tw)
        # -- (5) the gradient, written once
        for q in range(Q):
            gq = g[xb + q * P: xb + q * P + tw]
            eq = E[q * TILE: q * TILE + tw]
            for j in range(tw):
                gq[j] = narrow(eq[j] * sc[j], g)


@jit
def _stream_grad_row(gs, gb, Ep, eb, scp, ptw):
    """One class row of a tile's gradient, ``gs[gb + j] = Ep[eb + j] * scp[j]`` for j < ptw (a
    multiple of 8), streamed (non-temporal stores)."""
    for j in range(0, ptw, 8):
        stream_product8(gs, gb + j, Ep, eb + j, scp, j)


@tjit
def _ce_tile_streamed(x, xn, twn, P, tw, k, ti, tz, sc, gscale, gs, loss, E, mx, mxn, sm, xt, ls, acc, K,
                      Ep, scp, pb, ptw):
    """One tile of the fused loss whose float32 gradient is streamed (non-temporal stores,
    :func:`._jit.stream_product8`), software-pipelined over three tiles: E and mx already hold
    this tile's logits and their max; Ep and scp the previous tile's gradient numerators and
    factors (``ptw`` pixels, written at ``gs[pb + q * P]``; ``pb < 0``: none). The exp pass
    takes the class rows in turn: row q's exp, then the previous tile's gradient row q out of
    Ep (streamed), then the next tile's logits row q (``twn`` pixels at ``x[xn + q * P]``;
    ``xn < 0``: none) into the row of Ep just freed, with its running max in mxn. So the logits
    are read and the gradient written while the exp computes, and no pass of its own loads a
    tile. The caller then swaps E/Ep, mx/mxn and sc/scp."""
    _target_logits(E, mx, ti, xt, k, tw)
    for j in range(tw):
        sm[j] = ZERO
    begin_next_tile(x, xn, twn, P, mxn)
    for q in range(Q):
        prefetch_ahead(x, xn, P, q)
        eq = E[q * TILE: q * TILE + tw]
        for j in range(tw):
            e = fexp_nonpos_from(eq[j] - mx[j], K)
            eq[j] = e
            sm[j] += e
        if pb >= 0:
            _stream_grad_row(gs, pb + q * P, Ep, q * TILE, scp, ptw)
        if xn >= 0:
            load_row_max(x, xn + q * P, twn, Ep, q * TILE, mxn)
    _pixel_terms(k, tw, tz, xt, sm, sc, gscale, loss, ls, acc)
    _subtract_target(E, ti, tz, sm, k, tw)


@tjit
def _flush(gs, pb, P, ptw, Ep, scp):
    """The last tile's streamed gradient, which no next tile's exp pass wrote."""
    for q in range(Q):
        _stream_grad_row(gs, pb + q * P, Ep, q * TILE, scp, ptw)


@cjit
def ce_worker(counter, nchunks, x, ab, idx_in, w_in, use_ab, k, enc, cw, mask, ps, gscale,
              need_grad, gs, loss, g, N, P):
    """Fused soft-encoding + cross-entropy + gradient. Flat arrays; ``x``/``g`` float32, or
    the bits of float16 (int16) / bfloat16 (uint16). ``cw``/``mask``/``ps`` empty when absent.
    ``gs``: ``g`` itself when it is to be written with non-temporal stores (the caller has
    checked: float32, 32-byte aligned, ``P % 8 == 0``, so every tile's rows are aligned), else
    an empty float32 array: then each tile runs :func:`_ce_tile`, else
    :func:`_ce_tile_streamed`, which needs the two buffers swapped after each tile and the
    last tile flushed.
    (Inner loops index slices from 0, so LLVM sees non-negative contiguous indices: a signed
    offset index would make numba's negative-index wraparound turn them into gathers.)"""
    tpi = (P + TILE - 1) // TILE
    ntiles = N * tpi
    use_cw = cw.size > 0
    E = np.empty(Q * TILE, np.float32)
    xt = np.empty(K_MAX * TILE, np.float32)
    mx = np.empty(TILE, np.float32)
    sm = np.empty(TILE, np.float32)
    sc = np.empty(TILE, np.float32)
    ls = np.empty(TILE, np.float32)
    acc = np.empty(TILE, np.float32)
    K = exp_constants()
    ti = np.empty(K_MAX * TILE, np.int32)
    tz = np.empty(K_MAX * TILE, np.float32)
    piped = need_grad and gs.size > 0
    Ep = np.empty(Q * TILE if piped else 0, np.float32)  # the previous tile's E, then the next's logits
    scp = np.empty(TILE if piped else 0, np.float32)
    mxn = np.empty(TILE if piped else 0, np.float32)
    pb, ptw = -1, 0
    loaded = False  # E and mx hold this tile's logits already (loaded by the previous tile)
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
            xb = n * Q * P + p0
            xn = next_tile_base(t, t1, tpi, P)
            lt = loss[n * P + p0: n * P + p0 + tw]
            if piped:
                if not loaded:
                    tile_load_max(x, xb, P, tw, E, mx)
                twn = tile_at(t + 1, tpi, P)[2] if xn >= 0 else 0
                _ce_tile_streamed(x, xn, twn, P, tw, k, ti, tz, sc, gscale, gs, lt, E, mx, mxn, sm, xt, ls, acc,
                                  K, Ep, scp, pb, ptw)
                E, Ep = Ep, E
                mx, mxn = mxn, mx
                sc, scp = scp, sc
                pb, ptw = xb, tw
                loaded = xn >= 0
            else:
                _ce_tile(x, xb, xn, P, tw, k, ti, tz, sc, gscale, need_grad, lt, g, E, mx, sm, xt, ls, acc, K)
        t0, t1 = claim(counter, nchunks, ntiles)
    if piped and pb >= 0:
        _flush(gs, pb, P, ptw, Ep, scp)
    if gs.size > 0:
        store_fence()


@pjit
def ce_kernel(nworkers, counter, nchunks, x, ab, idx_in, w_in, use_ab, k, enc, cw, mask, ps,
              gscale, need_grad, gs, loss, g, N, P):
    for _ in prange(nworkers):
        ce_worker(counter, nchunks, x, ab, idx_in, w_in, use_ab, k, enc, cw, mask, ps, gscale,
                  need_grad, gs, loss, g, N, P)
