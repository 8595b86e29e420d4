"""float32 exp and log that vectorise, and the tile load + max shared by the loss and the decode.

numba has no vector math library here (no SVML), and LLVM does not vectorise a call to
``expf``/``logf``: :func:`fexp` and :func:`flog` are branch-free polynomials (selects
only), the same as ``exp_``/``log_`` of ``kernels/fc_math.cuh`` (the C++ CPU code), so the
two CPU backends follow one rule (see each function). Only ``contract`` fast-math (FMA) is on:
no ``nnan``/``reassoc``, so NaN/Inf propagate as in PyTorch.
"""
from __future__ import annotations

import numpy as np

from fastcolor.backends.numba_backend._jit import (
    ijit,
    jit,
    mant_expo,
    max_skip_nan,
    pow2_of_magic,
    prefetch,
    prefetch_write,
    tjit,
    widen,
)
from fastcolor.backends.numba_backend._launch import TILE
from fastcolor.gamut import Q

_F = np.float32
_EXP_LO, _EXP_HI = _F(-88.0), _F(88.0)
_LOG2E, _MAGIC = _F(1.44269504088896341), _F(12582912.0)  # 1.5 * 2^23
_LN2_HI, _LN2_LO = _F(0.693359375), _F(-2.12194440e-4)
# exp(r) ~ 1 + r (P1 + r (P2 + r (P3 + r (P4 + r (P5 + r P6))))) on |r| <= ln 2 / 2, fitted
# here for relative error (Lawson's iteration, 2026-12-01: 0.03 * 2^-24 before rounding); the
# same numbers as fc::exp_ of kernels/fc_math.cuh. (Degree 5 would save one FMA more but its
# own error is 1.54 * 2^-24: 2.06 ulp measured over every float32, past the rule's 2.)
_P1, _P2, _P3 = _F(1.0), _F(0.4999999403953552), _F(0.16666430234909058)
_P4, _P5, _P6 = _F(0.04166800528764725), _F(0.008374195545911789), _F(0.001384360482916236)
ONE, ZERO, HALF = _F(1.0), _F(0.0), _F(0.5)
_SQRTHF = _F(0.707106781186547524)
_MIN_NORMAL, _TWO23, _23 = _F(1.17549435e-38), _F(8388608.0), _F(23.0)
_L0, _L1, _L2 = _F(7.0376836292e-2), _F(-1.1514610310e-1), _F(1.1676998740e-1)
_L3, _L4, _L5 = _F(-1.2420140846e-1), _F(1.4249322787e-1), _F(-1.6668057665e-1)
_L6, _L7, _L8 = _F(2.0000714765e-1), _F(-2.4999993993e-1), _F(3.3333331174e-1)
NINF, INF, NAN = _F(-np.inf), _F(np.inf), _F(np.nan)


@jit
def _exp_poly(xc, log2e, magic, ln2_hi, ln2_lo, p1, p2, p3, p4, p5, p6, one):
    """exp(xc) for float32 xc in [-88, 88] (clamped by the caller): n = round(xc / ln 2) by
    the 1.5 * 2^23 trick, r = xc - n ln 2 by Cody-Waite (ln 2 = C1 + C2), exp(r) by a degree-6
    polynomial in Horner form (6 FMAs), 2^n put into the exponent bits. n = -127 (xc below
    about -87.68, -88 included) makes 2^n's bits 0, so the result is exactly 0 there with no
    select; for n = -126 the product rounds into the subnormals as IEEE does. A NaN xc gives
    NaN. The constants are arguments only so that the hot loops can pass them as values (see
    :func:`exp_constants`); every caller passes the module's constants, and this is the one
    place the polynomial is written."""
    t = xc * log2e + magic  # round(x / ln 2) lands in the low mantissa bits
    n = t - magic
    r = xc - n * ln2_hi
    r = r - n * ln2_lo
    p = (((((p6 * r + p5) * r + p4) * r + p3) * r + p2) * r + p1) * r + one
    return p * pow2_of_magic(t)


@jit
def _exp_reduced(xc):
    """:func:`_exp_poly` with the module's constants (folded in by LLVM)."""
    return _exp_poly(xc, _LOG2E, _MAGIC, _LN2_HI, _LN2_LO, _P1, _P2, _P3, _P4, _P5, _P6, ONE)


@ijit
def fexp(x):
    """float32 exp(x), branch-free (vectorises).

    The rule (shared with ``fc::exp_`` of kernels/fc_math.cuh, the C++ CPU path):
    |rel err| <= 2 ulp on [-87, 88]; below -87 (results under 1.7e-38, nothing in a
    softmax) exp(x) within 2 ulp of float32's subnormal spacing, down to where x / ln 2 rounds
    to -127 (x < -87.68..), and exactly +0 from there down (-inf included); +inf for x > 88;
    NaN for NaN (the clamps and the polynomial keep a NaN: no select needed).

    (Until 2026-12-01 the polynomial was Cephes' (8 operations against 6) and a select made
    every x < -87 exactly 0: 2 + 2 vector operations more per exp in the softmax loops.)
    """
    xc = _EXP_LO if x < _EXP_LO else x
    xc = _EXP_HI if xc > _EXP_HI else xc
    y = _exp_reduced(xc)
    return INF if x > _EXP_HI else y


@ijit
def fexp_nonpos(x):
    """:func:`fexp` without the clamp and select for x > 88: bit for bit the same for every
    x <= 88 and NaN (above 88, unspecified). For exponents that are <= 0 or NaN by
    construction, so the hot loops skip two instructions of ~15: the softmax's (x - max) / T
    (a +inf logit makes the max +inf and inf - inf NaN) and the weights' -(d_m^2 - d_0^2) / 2s^2."""
    xc = _EXP_LO if x < _EXP_LO else x
    return _exp_reduced(xc)


@jit
def exp_constants():
    """The constants of :func:`fexp_nonpos_from` (-88 and the polynomial's), a tuple of 12
    float32 that a worker makes once and passes down to its per-tile functions."""
    return (_EXP_LO, _LOG2E, _MAGIC, _LN2_HI, _LN2_LO, _P1, _P2, _P3, _P4, _P5, _P6, ONE)


@jit
def fexp_nonpos_from(x, K):
    """:func:`fexp_nonpos` bit for bit, its constants taken from ``K = exp_constants()``.

    Why: with constants, LLVM has more values than AVX2's 16 vector registers in the exp
    loops and re-creates each constant in every iteration from the constant pool (numba's
    large code model: an address load and a broadcast, two instructions each, ~24 of the ~52
    per 8 logits). A per-tile function (a real call: see ``_jit.tjit``) receives ``K`` as
    arguments, values that cannot be re-created, so they stay in registers or are spilled
    once and read by the FMA itself. (Read from an array instead, they could alias the
    loop's stores, and LLVM no longer vectorised the loop.)"""
    lo = K[0]
    xc = lo if x < lo else x
    return _exp_poly(xc, K[1], K[2], K[3], K[4], K[5], K[6], K[7], K[8], K[9], K[10], K[11])


@ijit
def flog(x):
    """float32 natural log(x), branch-free (vectorises).

    The rule (shared with ``fc::log_`` of kernels/fc_math.cuh): Cephes logf polynomial, about
    1 ulp on normal numbers; subnormals are scaled by 2^23 first (their exponent lowered by 23)
    and so handled exactly like normal numbers (the log of their true value, within 2 ulp);
    log(0) = -inf, log(x < 0) = NaN, log(+inf) = +inf, log(NaN) = NaN.
    """
    sub = x < _MIN_NORMAL  # subnormal (or zero / negative: replaced below)
    xs = x * _TWO23 if sub else x
    m, e = mant_expo(xs)
    e = e - _23 if sub else e
    small = m < _SQRTHF
    e = e - ONE if small else e
    m = (m + m - ONE) if small else (m - ONE)
    z = m * m
    y = ((((((((_L0 * m + _L1) * m + _L2) * m + _L3) * m + _L4) * m + _L5) * m + _L6) * m + _L7) * m + _L8)
    y = y * m * z
    y = y + e * _LN2_LO
    y = y - HALF * z
    r = m + y + e * _LN2_HI
    r = NINF if x == ZERO else r
    r = x if x == INF else r
    r = NAN if not (x >= ZERO) else r  # negative or NaN
    return r


@jit
def load_row_max(x, xb, tw, Y, yb, mx):
    """Y[yb + j] = x[xb + j] as float32 and mx[j] = max(mx[j], it) (NaN skipped) for j < tw:
    one class row of a tile."""
    xq = x[xb: xb + tw]
    yq = Y[yb: yb + tw]
    for j in range(tw):
        v = widen(xq[j])
        yq[j] = v
        mx[j] = max_skip_nan(mx[j], v)


@tjit
def tile_load_max(x, xb, P, tw, Y, mx):
    """Y[q * TILE + j] = x[xb + q * P + j] as float32 and mx[j] its max over the 313 classes
    (NaN skipped; caught later): one read of the tile's logits, into a contiguous buffer
    that the next passes find in L2."""
    for j in range(tw):
        mx[j] = NINF
    for q in range(Q):
        load_row_max(x, xb + q * P, tw, Y, q * TILE, mx)


@jit
def prefetch_row(x, base, tw):
    """Prefetch ``x[base: base + tw]`` (one class row of a tile), a line (64 bytes) at a time;
    nothing when base < 0 (no next tile). (A while loop: ``range(0, tw, 64 // x.itemsize)``
    made LLVM divide by the run-time step for the trip count, an ``idiv`` per class row; the
    decode measured no faster without it, 2026-12-01.)"""
    if base >= 0:
        step = 64 // x.itemsize
        c = 0
        while c < tw:
            prefetch(x, base + c)
            c += step


@jit
def prefetch_row_for_write(x, base, tw):
    """:func:`prefetch_row` with the intent to write (the gradient's rows)."""
    step = 64 // x.itemsize
    c = 0
    while c < tw:
        prefetch_write(x, base + c)
        c += step


#: Class rows of the next tile prefetched ahead of the row being read into the other buffer
#: (the pipelined loss and decode: one row's exp takes ~60 ns, a DRAM access ~100-150).
AHEAD = 4


@jit
def begin_next_tile(x, xn, twn, P, mxn):
    """Before a pipelined exp pass: the next tile's running max reset (``twn`` pixels) and its
    first ``AHEAD`` class rows prefetched; nothing when xn < 0 (no next tile in the chunk)."""
    if xn >= 0:
        for j in range(twn):
            mxn[j] = NINF
        for q in range(min(AHEAD, Q)):
            prefetch_row(x, xn + q * P, TILE)


@jit
def prefetch_ahead(x, xn, P, q):
    """During row q of a pipelined exp pass: prefetch the next tile's row q + AHEAD."""
    if xn >= 0 and q + AHEAD < Q:
        prefetch_row(x, xn + (q + AHEAD) * P, TILE)
