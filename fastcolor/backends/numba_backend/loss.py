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
read of the gradient's lines before they are written) and software-pipelined: a worker keeps
two tile buffers, and the exp pass of tile t writes tile t-1's gradient a class row at a time
between its own rows, so the stores drain while the exp computes (the worker's last tile is
written at its end, :func:`_flush`). The logits are read from memory once and the gradient
written once; nothing of size ``N x 313 x P`` is allocated besides the gradient itself, whose pages are
the previous call's when nothing uses those any more (:func:`fastcolor.backends._alloc.empty_cpu`).

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

from fastcolor.backends.numba_backend._jit import cjit, narrow, pjit, prange, store_fence, stream_product8, tjit
from fastcolor.backends.numba_backend._launch import TILE, claim, next_tile_base, tile_at
from fastcolor.backends.numba_backend._math import (
    NAN,
    ONE,
    ZERO,
    exp_constants,
    fexp_nonpos_from,
    flog,
    prefetch_row,
    prefetch_row_for_write,
    tile_load_max,
)
from fastcolor.backends.numba_backend.encode import copy_slots, encode_tile
from fastcolor.gamut import K_MAX, Q


@tjit
def _ce_tile(x, xb, xn, P, tw, k, ti, tz, sc, gscale, need_grad, gs, loss, g, E, mx, sm, xt, ls, acc, K,
             Ep, scp, pb, ptw):
    """One tile of the fused loss, the target (ti, tz) already in place; sc[j] holds the
    per-pixel loss scale s * m * v and becomes the gradient factor. The next tile's logits
    (at x[xn + q * P], xn < 0: none) are prefetched during the exp pass, a class row per class.
    ``gs``: the gradient again as a float32 array when it is written with non-temporal stores
    (:func:`._jit.stream_product8`; float32, 32-byte aligned rows, ``tw % 8 == 0``), else
    empty: then its rows are prefetched for writing during the exp pass and written with plain
    stores into ``g`` at the end (* the whole tile, one thread, logits and a reused gradient in
    DRAM, Zen 3, 2026-12-01). (Two arrays, not a flag: ``g`` may hold 16-bit bits, and numba
    types both branches.) Streaming, this tile's gradient is left in ``E``/``sc`` for the next
    call, which writes it during its exp pass from ``Ep``/``scp`` (the previous tile's, at
    ``gs[pb + q * P]``, ``ptw`` pixels; ``pb < 0``: none)."""
    stream = gs.size > 0
    # -- (2) the tile's logits into E (float32, contiguous: see the module docstring) and
    #    their running max
    tile_load_max(x, xb, P, tw, E, mx)
    # -- the k shifted target logits (x_j - max), before E is overwritten by exp
    for i in range(k):
        for j in range(tw):
            q = ti[i * TILE + j]
            v = NAN  # a bad precomputed index: NaN loss, never a wild read or write
            if q >= 0 and q < Q:
                v = E[q * TILE + j] - mx[j]
            xt[i * TILE + j] = v
    # -- (3) e = exp(x - max) (kept in E when the gradient is wanted) and its sum
    for j in range(tw):
        sm[j] = ZERO
    if need_grad:
        for q in range(Q):
            prefetch_row(x, xn + q * P if xn >= 0 else -1, TILE)
            if not stream:
                prefetch_row_for_write(g, xb + q * P, tw)  # for (5): 3.78 -> 3.25 cycles per logit*
            eq = E[q * TILE: q * TILE + tw]
            for j in range(tw):
                e = fexp_nonpos_from(eq[j] - mx[j], K)
                eq[j] = e
                sm[j] += e
            if pb >= 0:  # streaming: the previous tile's gradient row q, between two exp rows
                for j in range(0, ptw, 8):
                    stream_product8(gs, pb + q * P + j, Ep, q * TILE + j, scp, j)
    else:
        for q in range(Q):
            prefetch_row(x, xn + q * P if xn >= 0 else -1, TILE)
            eq = E[q * TILE: q * TILE + tw]
            for j in range(tw):
                sm[j] += fexp_nonpos_from(eq[j] - mx[j], K)
    # -- (4) the loss from the k target logits only, and the gradient factor, over the tile's
    #    pixels (vectorised loops: the log is flog, the CPU rule shared with the C++ code,
    #    which also takes log_ here; it was a scalar libm logf per pixel)
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
    # -- the target subtracted in E (softmax - z = (e - z * sum) / sum), so the gradient
    #    pass is a plain scaling (a bad index subtracts nothing: its loss is NaN)
    if need_grad:
        for i in range(k):
            for j in range(tw):
                q = ti[i * TILE + j]
                if q >= 0 and q < Q:
                    E[q * TILE + j] -= tz[i * TILE + j] * sm[j]
    # -- (5) the gradient, written once (streaming: by the next tile's exp pass, or _flush)
    if need_grad and not stream:
        for q in range(Q):
            gq = g[xb + q * P: xb + q * P + tw]
            eq = E[q * TILE: q * TILE + tw]
            for j in range(tw):
                gq[j] = narrow(eq[j] * sc[j], g)


@tjit
def _flush(gs, pb, P, ptw, Ep, scp):
    """The last tile's streamed gradient, which no next tile's exp pass wrote."""
    for q in range(Q):
        for j in range(0, ptw, 8):
            stream_product8(gs, pb + q * P + j, Ep, q * TILE + j, scp, j)


@cjit
def ce_worker(counter, nchunks, x, ab, idx_in, w_in, use_ab, k, enc, cw, mask, ps, gscale,
              need_grad, gs, loss, g, N, P):
    """Fused soft-encoding + cross-entropy + gradient. Flat arrays; ``x``/``g`` float32, or
    the bits of float16 (int16) / bfloat16 (uint16). ``cw``/``mask``/``ps`` empty when absent.
    ``gs``: ``g`` itself when it is to be written with non-temporal stores (the caller has
    checked: float32, 32-byte aligned, ``P % 8 == 0``, so every tile's rows are aligned), else
    an empty float32 array.
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
    Ep = np.empty(Q * TILE if piped else 0, np.float32)  # the previous tile's E and factor
    scp = np.empty(TILE if piped else 0, np.float32)
    pb, ptw = -1, 0
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
            _ce_tile(x, n * Q * P + p0, next_tile_base(t, t1, tpi, P), P, tw, k, ti, tz, sc, gscale, need_grad,
                     gs, loss[n * P + p0: n * P + p0 + tw], g, E, mx, sm, xt, ls, acc, K, Ep, scp, pb, ptw)
            if piped:
                E, Ep = Ep, E
                sc, scp = scp, sc
                pb, ptw = n * Q * P + p0, tw
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
