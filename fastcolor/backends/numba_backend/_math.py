"""float32 exp and log that vectorise, and the tile load + max shared by the loss and the decode.

numba has no vector math library here (no SVML), and LLVM does not vectorise a call to
``expf``/``logf``: :func:`fexp` and :func:`flog` are branch-free Cephes polynomials (selects
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
_EXP_LO, _EXP_HI = _F(-87.0), _F(88.0)
_LOG2E, _MAGIC = _F(1.44269504088896341), _F(12582912.0)  # 1.5 * 2^23
_LN2_HI, _LN2_LO = _F(0.693359375), _F(-2.12194440e-4)
_E0, _E1, _E2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_E3, _E4, _E5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
ONE, ZERO, HALF = _F(1.0), _F(0.0), _F(0.5)
_SQRTHF = _F(0.707106781186547524)
_MIN_NORMAL, _TWO23, _23 = _F(1.17549435e-38), _F(8388608.0), _F(23.0)
_L0, _L1, _L2 = _F(7.0376836292e-2), _F(-1.1514610310e-1), _F(1.1676998740e-1)
_L3, _L4, _L5 = _F(-1.2420140846e-1), _F(1.4249322787e-1), _F(-1.6668057665e-1)
_L6, _L7, _L8 = _F(2.0000714765e-1), _F(-2.4999993993e-1), _F(3.3333331174e-1)
NINF, INF, NAN = _F(-np.inf), _F(np.inf), _F(np.nan)


@jit
def _exp_poly(xc, log2e, magic, ln2_hi, ln2_lo, e0, e1, e2, e3, e4, e5, one):
    """exp(xc) for float32 xc in [-87, 88] (clamped by the caller): round(xc / ln 2) by the
    1.5 * 2^23 trick, Cody-Waite ln 2 = C1 + C2, a degree-5 polynomial, the power of two put
    into the exponent bits. A NaN xc gives NaN. The constants are arguments only so that the
    hot loops can pass them from an array (see :func:`exp_constants`); every caller passes
    the module's constants, and this is the one place the polynomial is written."""
    t = xc * log2e + magic  # round(x / ln 2) lands in the low mantissa bits
    n = t - magic
    r = xc - n * ln2_hi
    r = r - n * ln2_lo
    p = ((((e0 * r + e1) * r + e2) * r + e3) * r + e4) * r + e5
    p = p * (r * r) + r + one
    return p * pow2_of_magic(t)


@jit
def _exp_reduced(xc):
    """:func:`_exp_poly` with the module's constants (folded in by LLVM)."""
    return _exp_poly(xc, _LOG2E, _MAGIC, _LN2_HI, _LN2_LO, _E0, _E1, _E2, _E3, _E4, _E5, ONE)


@ijit
def fexp(x):
    """float32 exp(x), branch-free (vectorises).

    The rule (shared with ``fc::exp_`` of kernels/fc_math.cuh, the C++ CPU path):
    Cephes-style polynomial, |rel err| <= 2 ulp on [-87, 88]; exactly 0 for x < -87 (and
    -inf): such terms are < 1.7e-38, nothing in a softmax; +inf for x > 88; NaN for NaN
    (the clamps and the polynomial keep a NaN: no select needed).
    """
    xc = _EXP_LO if x < _EXP_LO else x
    xc = _EXP_HI if xc > _EXP_HI else xc
    y = _exp_reduced(xc)
    y = ZERO if x < _EXP_LO else y
    return INF if x > _EXP_HI else y


@ijit
def fexp_nonpos(x):
    """:func:`fexp` without the clamp and select for x > 88: bit for bit the same for every
    x <= 88 and NaN (above 88, unspecified). For exponents that are <= 0 or NaN by
    construction, so the hot loops skip two instructions in ~20: the softmax's (x - max) / T
    (a +inf logit makes the max +inf and inf - inf NaN) and the weights' -(d_m^2 - d_0^2) / 2s^2."""
    xc = _EXP_LO if x < _EXP_LO else x
    y = _exp_reduced(xc)
    return ZERO if x < _EXP_LO else y


@jit
def exp_constants():
    """The constants of :func:`fexp_nonpos_from` (-87 and the polynomial's), a tuple of 12
    float32 that a worker makes once and passes down to its per-tile functions."""
    return (_EXP_LO, _LOG2E, _MAGIC, _LN2_HI, _LN2_LO, _E0, _E1, _E2, _E3, _E4, _E5, ONE)


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
    y = _exp_poly(xc, K[1], K[2], K[3], K[4], K[5], K[6], K[7], K[8], K[9], K[10], K[11])
    return ZERO if x < lo else y


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


@tjit
def tile_load_max(x, xb, P, tw, Y, mx):
    """Y[q * TILE + j] = x[xb + q * P + j] as float32 and mx[j] its max over the 313 classes
    (NaN skipped; caught later): one read of the tile's logits, into a contiguous buffer
    that the next passes find in L2."""
    for j in range(tw):
        mx[j] = NINF
    for q in range(Q):
        xq = x[xb + q * P: xb + q * P + tw]
        yq = Y[q * TILE: q * TILE + tw]
        for j in range(tw):
            v = widen(xq[j])
            yq[j] = v
            mx[j] = max_skip_nan(mx[j], v)


@jit
def prefetch_row(x, base, tw):
    """Prefetch ``x[base: base + tw]`` (one class row of a tile), a line (64 bytes) at a time;
    nothing when base < 0 (no next tile)."""
    if base >= 0:
        for c in range(0, tw, 64 // x.itemsize):
            prefetch(x, base + c)


@jit
def prefetch_row_for_write(x, base, tw):
    """:func:`prefetch_row` with the intent to write (the gradient's rows)."""
    for c in range(0, tw, 64 // x.itemsize):
        prefetch_write(x, base + c)
