"""float32 exp and log that vectorise, and the per-tile max shared by the loss and the decode.

numba has no vector math library here (no SVML), and LLVM does not vectorise a call to
``expf``/``logf``: :func:`fexp` and :func:`flog` are branch-free Cephes polynomials (selects
only), the same as ``exp_``/``log_`` of ``kernels/fc_math.cuh`` (the C++ CPU code), so the
two CPU backends follow one rule (see each function). Only ``contract`` fast-math (FMA) is on:
no ``nnan``/``reassoc``, so NaN/Inf propagate as in PyTorch.
"""
from __future__ import annotations

import numpy as np

from fastcolor.backends.numba_backend._jit import ijit, jit, mant_expo, pow2_of_magic, tjit, widen
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
def _exp_reduced(xc):
    """exp(xc) for float32 xc in [-87, 88] (clamped by the caller): round(xc / ln 2) by the
    1.5 * 2^23 trick, Cody-Waite ln 2 = C1 + C2, a degree-5 polynomial, the power of two put
    into the exponent bits. A NaN xc gives NaN."""
    t = xc * _LOG2E + _MAGIC  # round(x / ln 2) lands in the low mantissa bits
    n = t - _MAGIC
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = ((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5
    p = p * (r * r) + r + ONE
    return p * pow2_of_magic(t)


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
def tile_max(x, xb, P, tw, mx):
    """mx[j] = max over the 313 classes of x[xb + q * P + j] (NaN skipped; caught later)."""
    for j in range(tw):
        mx[j] = NINF
    for q in range(Q):
        xq = x[xb + q * P: xb + q * P + tw]
        for j in range(tw):
            v = widen(xq[j])
            m = mx[j]
            mx[j] = v if v > m else m
