"""Triton kernels of the triton backend (host code: :mod:`fastcolor.backends.triton_backend`).

Layout: every tensor is contiguous ``(N, C, P)`` (class / channel stride ``P``), so a tile is
``[classes, pixels]`` with pixels contiguous: every load and store is coalesced along pixels.
All pointer offsets are computed in int64.

The kernels:

* ``ce_kernel``: the fused, class-rebalanced soft-target cross-entropy and its gradient. One
  program owns ``BP`` pixels of one image and holds all 313 logits of each in registers (a
  ``[256, BP]`` and a ``[64, BP]`` tile: 320 rows, 7 masked). It reads the logits once, writes
  the per-pixel loss and the gradient ``c (softmax - Z)`` once: first ``c softmax`` densely, then,
  after a CTA barrier, the k target entries ``c (softmax_j - Z_j)`` on top of it (k scattered
  stores per pixel into lines it has just written), so no per-element work depends on k.
* ``encode_kernel``: the k nearest bins and their Gaussian weights.
* ``annealed_mean_kernel``: one read of the logits (or probabilities), two dot products.

The k nearest bins of a pixel are searched in a ``(2R+1) x (2R+1)`` window of grid cells around
it (R = 2 for k <= 5, else 3), by k rounds of argmin (ties: lower bin index). The window is
provably enough when the k-th distance found is below the distance from the pixel to any cell
outside the window (with a relative margin for float rounding); when a program holds a pixel for
which it is not, the program re-runs the selection over all 313 bins for its whole block. That
happens only for ab far outside the sRGB gamut: never for any sRGB colour (checked for k <= 16).

This module is imported twice: normally (``triton.jit``, GPU) and, for CPU tensors under the
interpreter, as a second module instance whose ``_FORCE_INTERPRET`` global is set before it
runs, which makes every function an ``InterpretedFunction`` whatever the environment said at
the time triton was first imported.
"""
import triton
import triton.language as tl

import os

if globals().get("_FORCE_INTERPRET", False):
    from triton.runtime.interpreter import InterpretedFunction

    def jit(fn):
        return InterpretedFunction(fn)

    _interp = True
else:
    jit = triton.jit
    _interp = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Interpreted: reductions go through tl.reduce with triton's own combine functions, which the
#: interpreter maps onto numpy, instead of tl.max / tl.min / tl.sum, which are @triton.jit
#: functions of triton.language that cannot be called from an interpreted kernel unless
#: TRITON_INTERPRET=1 was set before triton was first imported.
INTERP = tl.constexpr(_interp)

Q = tl.constexpr(313)
A_MIN = tl.constexpr(-90.0)
B_MIN = tl.constexpr(-110.0)
A_MAX = tl.constexpr(100.0)
B_MAX = tl.constexpr(100.0)
A_CELLS = tl.constexpr(20)
B_CELLS = tl.constexpr(22)
GRID = tl.constexpr(10.0)
INV_GRID = tl.constexpr(0.1)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
BIG = tl.constexpr(1 << 20)
#: bins table: (2, BINS_STRIDE) float32, row 0 = a, row 1 = b, zero beyond Q.
BINS_STRIDE = tl.constexpr(512)
#: relative margin of the window-sufficiency test against float32 rounding.
MARGIN = tl.constexpr(1.0e-5)


@jit
def _max(x, axis: tl.constexpr):
    if INTERP:
        return tl.reduce(x, axis, tl.standard._elementwise_max)
    else:
        return tl.max(x, axis=axis)


@jit
def _min(x, axis: tl.constexpr):
    if INTERP:
        return tl.reduce(x, axis, tl.standard._elementwise_min)
    else:
        return tl.min(x, axis=axis)


@jit
def _sum(x, axis: tl.constexpr):
    if INTERP:
        return tl.reduce(x, axis, tl.standard._sum_combine)
    else:
        return tl.sum(x, axis=axis)



@jit
def _clamped(a, b):
    """(finite, pa, pb, da, db): the pixel's projection (pa, pb) onto the box of bin centres and
    what is left over, (da, db) = (a, b) - (pa, pb) (zero inside the box; 0 for non-finite ab)."""
    ok = (tl.abs(a) < float("inf")) & (tl.abs(b) < float("inf"))
    a0 = tl.where(ok, a, 0.0)
    b0 = tl.where(ok, b, 0.0)
    pa = tl.minimum(tl.maximum(a0, A_MIN), A_MAX)
    pb = tl.minimum(tl.maximum(b0, B_MIN), B_MAX)
    return ok, pa, pb, a0 - pa, b0 - pb


@jit
def _rdist(pa, pb, da, db, ca, cb):
    """|p - c|^2 - |p - p_box|^2 = |e|^2 + 2 (p - p_box) . e with e = p_box - c.

    The same order as the distance (the subtracted term does not depend on the bin), but with no
    huge common term: far outside the gamut (ab = 1e6) the float32 distances of a whole column of
    bins would round to one value and tie, while these keep the small differences exactly."""
    ea = pa - ca
    eb = pb - cb
    return ea * ea + eb * eb + 2.0 * (da * ea + db * eb)


@jit
def _knn_window(a, b, cell_ptr, K: tl.constexpr, KP: tl.constexpr, R: tl.constexpr,
                SIDE: tl.constexpr, WIN: tl.constexpr, BP: tl.constexpr):
    """k nearest bins among a window of cells: (idx [KP, BP] int32, reduced d2 [KP, BP] f32, need_full [BP])."""
    ok, pa, pb, da_, db_ = _clamped(a, b)
    ta = (pa - A_MIN) * INV_GRID  # in [0, A_CELLS - 1]
    tb = (pb - B_MIN) * INV_GRID
    ca = (ta + 0.5).to(tl.int32)  # ta >= 0: truncation is floor, so this is the nearest cell
    cb = (tb + 0.5).to(tl.int32)
    c = tl.arange(0, WIN)
    da = c // SIDE - R
    db = c % SIDE - R
    ia = ca[None, :] + da[:, None]
    ib = cb[None, :] + db[:, None]
    inwin = (c < SIDE * SIDE)[:, None] & (ia >= 0) & (ia < A_CELLS) & (ib >= 0) & (ib < B_CELLS)
    q = tl.load(cell_ptr + ia * B_CELLS + ib, mask=inwin, other=-1)
    d = _rdist(pa[None, :], pb[None, :], da_[None, :], db_[None, :],
               A_MIN + GRID * ia.to(tl.float32), B_MIN + GRID * ib.to(tl.float32))
    d = tl.where(q >= 0, d, float("inf"))

    kk = tl.arange(0, KP)[:, None]
    sel_q = tl.full([KP, BP], 0, tl.int32)
    sel_d = tl.full([KP, BP], 0, tl.float32)
    dk = tl.full([BP], 0, tl.float32)
    for j in tl.static_range(K):
        dmin = _min(d, 0)
        qj = _min(tl.where(d == dmin[None, :], q, BIG), 0)
        d = tl.where(q == qj[None, :], float("inf"), d)
        sel_q = tl.where(kk == j, qj[None, :], sel_q)
        sel_d = tl.where(kk == j, dmin[None, :], sel_d)
        dk = dmin

    # Lower bound on the reduced distance of any bin outside the window: (p - p_box) . e >= 0 for
    # every bin, so it is at least |p_box - c|^2, at least the squared distance from p_box to the
    # nearest of the four half-planes beyond the window that still hold grid cells.
    inf = float("inf")
    g_alo = tl.where(ca - R - 1 >= 0, pa - (A_MIN + GRID * (ca - R - 1).to(tl.float32)), inf)
    g_ahi = tl.where(ca + R + 1 < A_CELLS, (A_MIN + GRID * (ca + R + 1).to(tl.float32)) - pa, inf)
    g_blo = tl.where(cb - R - 1 >= 0, pb - (B_MIN + GRID * (cb - R - 1).to(tl.float32)), inf)
    g_bhi = tl.where(cb + R + 1 < B_CELLS, (B_MIN + GRID * (cb + R + 1).to(tl.float32)) - pb, inf)
    gap = tl.maximum(tl.minimum(tl.minimum(g_alo, g_ahi), tl.minimum(g_blo, g_bhi)), 0.0)
    enough = dk * (1.0 + MARGIN) < gap * gap
    need_full = ok & (enough == 0)
    return sel_q, sel_d, need_full


@jit
def _knn_full(a, b, bins_ptr, K: tl.constexpr, KP: tl.constexpr, BP: tl.constexpr):
    """k nearest bins over all 313, by k rounds of 'lexicographic successor' of (d2, index)."""
    kk = tl.arange(0, KP)[:, None]
    sel_q = tl.full([KP, BP], 0, tl.int32)
    sel_d = tl.full([KP, BP], 0, tl.float32)
    _, pa, pb, da, db = _clamped(a, b)
    prev_d = tl.full([BP], float("-inf"), tl.float32)
    prev_q = tl.full([BP], -1, tl.int32)
    for j in tl.static_range(K):
        best_d = tl.full([BP], float("inf"), tl.float32)
        best_q = tl.full([BP], BIG, tl.int32)
        for c0 in range(0, 320, 32):
            qc = c0 + tl.arange(0, 32)
            qm = qc < Q
            ba = tl.load(bins_ptr + qc, mask=qm, other=0.0)
            bb = tl.load(bins_ptr + BINS_STRIDE + qc, mask=qm, other=0.0)
            d = _rdist(pa[None, :], pb[None, :], da[None, :], db[None, :], ba[:, None], bb[:, None])
            q2 = qc[:, None]
            after = (d > prev_d[None, :]) | ((d == prev_d[None, :]) & (q2 > prev_q[None, :]))
            valid = after & qm[:, None]
            dm = tl.where(valid, d, float("inf"))
            cmin = _min(dm, 0)
            cq = _min(tl.where(valid & (dm == cmin[None, :]), q2, BIG), 0)
            better = (cmin < best_d) | ((cmin == best_d) & (cq < best_q))
            best_d = tl.where(better, cmin, best_d)
            best_q = tl.where(better, cq, best_q)
        sel_q = tl.where(kk == j, best_q[None, :], sel_q)
        sel_d = tl.where(kk == j, best_d[None, :], sel_d)
        prev_d = best_d
        prev_q = best_q
    return sel_q, sel_d


@jit
def _encode(a, b, cell_ptr, bins_ptr, inv_two_sigma2, K: tl.constexpr, KP: tl.constexpr,
            R: tl.constexpr, SIDE: tl.constexpr, WIN: tl.constexpr, BP: tl.constexpr):
    """(idx [KP, BP] int32, unnormalised weights g [KP, BP] f32 (0 beyond K), 1 / sum g [BP])."""
    sel_q, sel_d, need_full = _knn_window(a, b, cell_ptr, K, KP, R, SIDE, WIN, BP)
    if _max(need_full.to(tl.int32), 0) > 0:
        f_q, f_d = _knn_full(a, b, bins_ptr, K, KP, BP)
        sel_q = tl.where(need_full[None, :], f_q, sel_q)
        sel_d = tl.where(need_full[None, :], f_d, sel_d)
    kk = tl.arange(0, KP)[:, None]
    d0 = _sum(tl.where(kk == 0, sel_d, 0.0), 0)
    g = tl.exp2(tl.where(kk < K, d0[None, :] - sel_d, float("-inf")) * (inv_two_sigma2 * LOG2E))
    inv_g = 1.0 / _sum(g, 0)
    # NaN or infinite ab: numpy's stable argsort order (0, 1, ..., k-1) and NaN weights.
    ok = (tl.abs(a) < float("inf")) & (tl.abs(b) < float("inf"))
    sel_q = tl.where(ok[None, :], sel_q, kk + tl.full([KP, BP], 0, tl.int32))
    inv_g = tl.where(ok, inv_g, float("nan"))
    return sel_q, g, inv_g


@jit
def _load_classes(xbase, p, pm2, P, other):
    """The 313 classes of pixels p as a [256, BP] and a [64, BP] float32 tile (rows >= 313: other)."""
    qa = tl.arange(0, 256)
    qb = 256 + tl.arange(0, 64)
    qbm = (qb < Q)[:, None]
    offs_a = qa.to(tl.int64)[:, None] * P + p[None, :]
    offs_b = qb.to(tl.int64)[:, None] * P + p[None, :]
    xa = tl.load(xbase + offs_a, mask=pm2, other=other).to(tl.float32)
    xb = tl.load(xbase + offs_b, mask=qbm & pm2, other=other).to(tl.float32)
    return xa, xb, offs_a, offs_b, qbm


@jit
def encode_kernel(ab_ptr, idx_ptr, w_ptr, cell_ptr, bins_ptr, P, inv_two_sigma2,
                  K: tl.constexpr, KP: tl.constexpr, R: tl.constexpr, SIDE: tl.constexpr,
                  WIN: tl.constexpr, BP: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    pm = p < P
    abase = ab_ptr + n * 2 * P
    a = tl.load(abase + p, mask=pm, other=0.0)
    b = tl.load(abase + P + p, mask=pm, other=0.0)
    sel_q, g, inv_g = _encode(a, b, cell_ptr, bins_ptr, inv_two_sigma2, K, KP, R, SIDE, WIN, BP)
    kk = tl.arange(0, KP)[:, None]
    offs = n * K * P + kk.to(tl.int64) * P + p[None, :]
    m = (kk < K) & pm[None, :]
    tl.store(idx_ptr + offs, sel_q, mask=m)
    tl.store(w_ptr + offs, g * inv_g[None, :], mask=m)


@jit
def ce_kernel(x_ptr, ab_ptr, idx_ptr, w_ptr, cw_ptr, mask_ptr, ps_ptr, cell_ptr, bins_ptr,
              loss_ptr, grad_ptr, P, inv_two_sigma2, grad_scale,
              K: tl.constexpr, KP: tl.constexpr, R: tl.constexpr, SIDE: tl.constexpr,
              WIN: tl.constexpr, ENCODE: tl.constexpr, HAS_CW: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_PS: tl.constexpr, WRITE_GRAD: tl.constexpr,
              BP: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    pm = p < P
    pm2 = pm[None, :]
    xbase = x_ptr + n * Q * P
    # The target: k bins and weights per pixel, encoded here or read.
    kk = tl.arange(0, KP)[:, None]
    if ENCODE:
        abase = ab_ptr + n * 2 * P
        a = tl.load(abase + p, mask=pm, other=0.0)
        b = tl.load(abase + P + p, mask=pm, other=0.0)
        sel_q, g, inv_g = _encode(a, b, cell_ptr, bins_ptr, inv_two_sigma2, K, KP, R, SIDE, WIN, BP)
    else:
        toffs = n * K * P + kk.to(tl.int64) * P + p[None, :]
        tm = (kk < K) & pm2
        sel_q = tl.load(idx_ptr + toffs, mask=tm, other=0)
        g = tl.load(w_ptr + toffs, mask=tm, other=0.0)
        inv_g = tl.full([BP], 1.0, tl.float32)
    valid = (kk < K) & (sel_q >= 0) & (sel_q < Q) & pm2
    # The logits tile: all 313 classes of BP pixels (loaded after the encoding, so that the
    # encoding's registers are free again: fewer registers, more programs per SM).
    xa, xb, offs_a, offs_b, qbm = _load_classes(xbase, p, pm2, P, 0.0)
    xb = tl.where(qbm, xb, float("-inf"))
    # The logits at the target bins (lines this program is reading anyway: cache hits).
    x_sel = tl.load(xbase + sel_q.to(tl.int64) * P + p[None, :], mask=valid, other=0.0).to(tl.float32)

    # log-sum-exp
    m = tl.maximum(_max(xa, 0), _max(xb, 0))
    ml = (m * LOG2E)[None, :]
    ea = tl.exp2(tl.fma(xa, LOG2E, -ml))
    eb = tl.exp2(tl.fma(xb, LOG2E, -ml))
    s = _sum(ea, 0) + _sum(eb, 0)
    lse = m + tl.log2(s) * LN2

    # per-pixel scale s * m * v
    scale = tl.full([BP], 1.0, tl.float32)
    if HAS_CW:
        q0 = _sum(tl.where(kk == 0, sel_q, 0), 0)
        v = tl.load(cw_ptr + q0, mask=pm & (q0 >= 0) & (q0 < Q), other=0.0)
        scale = scale * v
    if HAS_MASK:
        scale = scale * tl.load(mask_ptr + n)
    if HAS_PS:
        scale = scale * tl.load(ps_ptr + n * P + p, mask=pm, other=0.0)

    ce = _sum(tl.where(valid, g * (lse[None, :] - x_sel), 0.0), 0) * inv_g
    tl.store(loss_ptr + n * P + p, scale * ce, mask=pm)

    if WRITE_GRAD:
        gbase = grad_ptr + n * Q * P
        c = grad_scale * scale
        c1 = c / s
        tl.store(gbase + offs_a, (ea * c1[None, :]).to(grad_ptr.dtype.element_ty), mask=pm2)
        tl.store(gbase + offs_b, (eb * c1[None, :]).to(grad_ptr.dtype.element_ty), mask=qbm & pm2)
        # The k target entries, written over the dense ones after every thread of the program
        # has stored its part (same addresses, other threads: the barrier orders them).
        tl.debug_barrier()
        e_sel = tl.exp2(tl.fma(x_sel, LOG2E, -ml))  # bit for bit the dense entries' softmax
        corr = c1[None, :] * e_sel - (c * inv_g)[None, :] * g
        tl.store(gbase + sel_q.to(tl.int64) * P + p[None, :], corr.to(grad_ptr.dtype.element_ty), mask=valid)


@jit
def annealed_mean_kernel(x_ptr, out_ptr, bins_ptr, P, inv_t, IS_PROBS: tl.constexpr, BP: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    pm = p < P
    xa, xb, _, _, qbm = _load_classes(x_ptr + n * Q * P, p, pm[None, :], P, 1.0)
    if IS_PROBS:
        # softmax(log(x) / T) = exp2(log2(x) / T) / sum
        ya = tl.log2(xa)
        yb = tl.log2(xb)
        k = inv_t
    else:
        ya = xa
        yb = xb
        k = inv_t * LOG2E
    yb = tl.where(qbm, yb, float("-inf"))
    m = tl.maximum(_max(ya, 0), _max(yb, 0))
    ea = tl.exp2((ya - m[None, :]) * k)
    eb = tl.exp2((yb - m[None, :]) * k)
    qa = tl.arange(0, 256)
    qb = 256 + tl.arange(0, 64)
    ba_a = tl.load(bins_ptr + qa)[:, None]
    bb_a = tl.load(bins_ptr + BINS_STRIDE + qa)[:, None]
    ba_b = tl.load(bins_ptr + qb)[:, None]
    bb_b = tl.load(bins_ptr + BINS_STRIDE + qb)[:, None]
    s = _sum(ea, 0) + _sum(eb, 0)
    sa = _sum(ea * ba_a, 0) + _sum(eb * ba_b, 0)
    sb = _sum(ea * bb_a, 0) + _sum(eb * bb_b, 0)
    inv_s = 1.0 / s
    obase = out_ptr + n * 2 * P
    tl.store(obase + p, sa * inv_s, mask=pm)
    tl.store(obase + P + p, sb * inv_s, mask=pm)
