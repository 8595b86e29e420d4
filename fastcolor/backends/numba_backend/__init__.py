"""The numba backend: fused, tiled CPU kernels compiled by numba (``@njit(parallel=True)``).

Layout (the backend contract, :mod:`fastcolor.backends`): ``(N, C, P)`` contiguous, class
stride ``P``. Every kernel walks *tiles* of ``TILE`` contiguous pixels of one image; a thread
takes a contiguous run of tiles. Inside a tile the loops run over classes (outer) and pixels
(inner), so the inner loops are contiguous and LLVM vectorises them (AVX2 / AVX-512).

* Fused loss (``ce_forward``): per tile, (1) encode the target of each pixel on the fly
  (k nearest bins by a grid-window search, see :func:`_encode_tile`), (2) running max over
  the 313 logits, (3) ``e = exp(x - max)`` into a per-thread ``313 x TILE`` float32 buffer
  (fits L2) and its sum, (4) per pixel: the loss from the k target logits only, and the
  target subtracted in the buffer (``e -= z * sum``), (5) ``grad = scale / sum * e`` written
  once in the logits' dtype. The logits are read from memory once (pass 3 re-reads the tile
  from cache); nothing of size ``N x 313 x P`` is allocated besides the gradient itself.
* ``annealed_mean``: per tile, a max pass, then one pass of ``exp((x - max) / T)`` that
  accumulates the sum and the two dot products with the bin centres (probabilities: log
  first, into a tile buffer).
* ``soft_encode``: the same tile encoding as the loss, written out as (N, k, P).

The encoding is vectorised across the pixels of a tile too: a window of s x s grid points
around each pixel (s from k), a branch-free insertion of each candidate into k sorted slots,
a proof that the window holds the true k nearest (else a scalar float64 scan of all 313 bins
for that pixel); see :func:`_encode_tile`.

Threads: a kernel is a ``prange`` over chunks of tiles (8 per numba thread). Tiny inputs run
on the calling thread, and so does everything in a process forked after this one ran a
parallel kernel (GNU OpenMP, numba's default layer, cannot run in such a child: numba would
terminate it; think DataLoader workers that soft-encode).

Memory: the gradient is the only array of size ``N x 313 x P``; it is allocated on
transparent huge pages when large (see :func:`fastcolor.backends._alloc.empty_cpu`), other buffers are per thread
(``313 x TILE`` floats) or per pixel.

Exponentials: numba has no vector math library here (no SVML), and LLVM does not vectorise a
call to ``expf``; :func:`_fexp` is a branch-free Cephes-style exp (round-to-nearest range
reduction by the 1.5*2^23 trick, a degree-5 polynomial, the power of two put in the exponent
bits), which vectorises. It keeps NaN (NaN in, NaN out). Only ``contract`` fast-math (FMA)
is on: no ``nnan``/``reassoc``, so NaN/Inf propagate as in PyTorch.

Half precision: numba has no bfloat16. 16-bit logits are passed as their bits, float16 as
int16 and bfloat16 as uint16; :func:`_widen` turns them into float32 (``fpext half``,
``bits << 16``) and :func:`_narrow` rounds float32 back (``fptrunc`` / round to nearest even
on the bits, NaN kept). So each kernel has one specialisation per logits dtype.

Caching: kernels use numba's on-disk cache (``cache=True``) when numba finds a writable cache
folder (``NUMBA_CACHE_DIR``, the package's ``__pycache__`` or the user-wide cache); when none
is writable they are compiled without a cache instead of failing at import.
"""
from __future__ import annotations

import math
import os

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError as _exc:  # pragma: no cover - numba is an optional dependency
    numba = None
    _IMPORT_ERROR = f"numba is not installed ({_exc})"
else:
    _IMPORT_ERROR = None

import torch

from fastcolor.backends._alloc import empty_cpu
from fastcolor.gamut import A_CELLS, A_MIN, AB_BINS, B_CELLS, B_MIN, CELL_TO_BIN, GRID, Q

#: Pixels per tile (the inner, vectorised loop length).
TILE = 128
#: Largest k the kernels take (the ops layer checks 1 <= k <= 16).
K_MAX = 16


def unavailable_reason(device_type: str) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device_type != "cpu":
        return f"numba kernels run on cpu tensors, not {device_type}"
    return None


# ----------------------------------------------------------------------------- jit setup


def _cache_works() -> bool:
    """Whether numba can cache functions of this file (some writable cache folder exists).

    numba looks for a locator when a function is decorated with ``cache=True`` and raises
    RuntimeError when no cache folder is writable; probe with a throwaway function.
    """
    if os.environ.get("FASTCOLOR_NUMBA_CACHE", "1") == "0":
        return False
    try:
        njit(cache=True)(lambda: 0)
    except Exception:  # RuntimeError("cannot cache function ...: no locator available")
        return False
    return True


if numba is not None:
    CACHE = _cache_works()
    _FM = {"contract"}  # FMA contraction only: NaN/Inf semantics stay IEEE
    # Helpers that take arrays are inlined at numba IR level: a real call would cost an
    # atomic incref/decref of every array argument per pixel.
    _jit = njit(fastmath=_FM, cache=CACHE, inline="always", nogil=True)
    _ijit = njit(fastmath=_FM, cache=CACHE, nogil=True)
    # Per-tile bodies: real calls (one per tile of TILE pixels, so the argument refcounts
    # cost nothing), compiled once and shared by the kernels: less to compile.
    _tjit = njit(fastmath=_FM, cache=CACHE, nogil=True, no_cpython_wrapper=True)
    # Workers: called by the parallel kernels, and directly (serially) from Python.
    _cjit = njit(fastmath=_FM, cache=CACHE, nogil=True)
    _pjit = njit(parallel=True, fastmath=_FM, cache=CACHE, nogil=True)
else:  # pragma: no cover
    CACHE = False

    def _identity(f):
        return f

    _jit = _ijit = _tjit = _cjit = _pjit = _identity

    def prange(*a):
        return range(*a)


# ----------------------------------------------------------------------------- intrinsics
# Bit-level conversions numba does not offer on scalars; all are plain LLVM instructions,
# so the loops around them still vectorise.

if numba is not None:
    _I32 = ir.IntType(32)
    _I16 = ir.IntType(16)
    _F32 = ir.FloatType()

    def _c32(v):
        return ir.Constant(_I32, v)

    @intrinsic
    def _pow2_of_magic(typingctx, t):
        """``t = n + 1.5 * 2^23`` (n an integer in [-126, 127]) -> the float32 ``2^n``."""
        sig = types.float32(types.float32)

        def codegen(context, builder, signature, args):
            b = builder.bitcast(args[0], _I32)
            b = builder.add(b, _c32(127 - 0x4B400000))
            return builder.bitcast(builder.shl(b, _c32(23)), _F32)

        return sig, codegen

    @intrinsic
    def _claim_index(typingctx, counter):
        """Atomically counter[0] += 1; returns the old value (an int64 array of one)."""
        if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
            return None
        sig = types.int64(counter)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            return builder.atomic_rmw("add", ary.data, ir.Constant(ir.IntType(64), 1), "monotonic")

        return sig, codegen

    @intrinsic
    def _mant_expo(typingctx, x):
        """float32 x > 0 -> (m in [0.5, 1), e) with x = m * 2^e (normal numbers), e as float32."""
        sig = types.UniTuple(types.float32, 2)(types.float32)

        def codegen(context, builder, signature, args):
            b = builder.bitcast(args[0], _I32)
            m = builder.or_(builder.and_(b, _c32(0x807FFFFF)), _c32(0x3F000000))
            e = builder.sub(builder.and_(builder.lshr(b, _c32(23)), _c32(0xFF)), _c32(126))
            mf = builder.bitcast(m, _F32)
            ef = builder.sitofp(e, _F32)
            return context.make_tuple(builder, signature.return_type, (mf, ef))

        return sig, codegen

    @intrinsic
    def _widen(typingctx, v):
        """One logit element -> float32: float32 passes through; int16 holds float16 bits,
        uint16 bfloat16 bits (two array dtypes, so each is its own specialisation)."""
        if v == types.float32:
            def codegen(context, builder, signature, args):
                return args[0]
        elif v == types.int16:
            def codegen(context, builder, signature, args):
                return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)
        elif v == types.uint16:
            def codegen(context, builder, signature, args):
                return builder.bitcast(builder.shl(builder.zext(args[0], _I32), _c32(16)), _F32)
        else:
            return None
        return types.float32(v), codegen

    @intrinsic
    def _narrow(typingctx, f, like):
        """float32 -> the element type of array ``like``: float32 as is; int16: float16 bits
        (IEEE rounding); uint16: bfloat16 bits (round to nearest even, NaN kept)."""
        if like.dtype == types.float32:
            def codegen(context, builder, signature, args):
                return args[0]
        elif like.dtype == types.int16:
            def codegen(context, builder, signature, args):
                return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)
        elif like.dtype == types.uint16:
            def codegen(context, builder, signature, args):
                x = args[0]
                b = builder.bitcast(x, _I32)
                lsb = builder.and_(builder.lshr(b, _c32(16)), _c32(1))
                r = builder.lshr(builder.add(builder.add(b, _c32(0x7FFF)), lsb), _c32(16))
                r = builder.select(builder.fcmp_unordered("uno", x, x), _c32(0x7FC0), r)
                return builder.trunc(r, _I16)
        else:
            return None
        return like.dtype(types.float32, like), codegen


# ----------------------------------------------------------------------------- math

_F = np.float32
_EXP_LO, _EXP_HI = _F(-87.0), _F(88.0)
_LOG2E, _MAGIC = _F(1.44269504088896341), _F(12582912.0)  # 1.5 * 2^23
_LN2_HI, _LN2_LO = _F(0.693359375), _F(-2.12194440e-4)
_E0, _E1, _E2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_E3, _E4, _E5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
_ONE, _ZERO, _HALF = _F(1.0), _F(0.0), _F(0.5)
_SQRTHF = _F(0.707106781186547524)
_L0, _L1, _L2 = _F(7.0376836292e-2), _F(-1.1514610310e-1), _F(1.1676998740e-1)
_L3, _L4, _L5 = _F(-1.2420140846e-1), _F(1.4249322787e-1), _F(-1.6668057665e-1)
_L6, _L7, _L8 = _F(2.0000714765e-1), _F(-2.4999993993e-1), _F(3.3333331174e-1)
_NINF, _INF, _NAN = _F(-np.inf), _F(np.inf), _F(np.nan)


@_ijit
def _fexp(x):
    """exp(x) for float32, vectorisable; about 1 ulp on [-87, 88]. Below -87 it returns
    exp(-87) ~ 1.6e-38 instead of a subnormal or 0 (harmless in a softmax); NaN stays NaN."""
    x = _EXP_LO if x < _EXP_LO else x
    x = _EXP_HI if x > _EXP_HI else x
    t = x * _LOG2E + _MAGIC  # round(x / ln 2) lands in the low mantissa bits
    n = t - _MAGIC
    r = x - n * _LN2_HI
    r = r - n * _LN2_LO
    p = ((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5
    p = p * (r * r) + r + _ONE
    return p * _pow2_of_magic(t)


@_ijit
def _flog(x):
    """log(x) for float32, vectorisable (Cephes logf); log(0) = -inf, log(<0) = NaN,
    log(inf) = inf. Subnormals are read as 2^-126-ish (their log is ~ -87 anyway)."""
    m, e = _mant_expo(x)
    small = m < _SQRTHF
    e = e - _ONE if small else e
    m = (m + m - _ONE) if small else (m - _ONE)
    z = m * m
    y = ((((((((_L0 * m + _L1) * m + _L2) * m + _L3) * m + _L4) * m + _L5) * m + _L6) * m + _L7) * m + _L8)
    y = y * m * z
    y = y + e * _LN2_LO
    y = y - _HALF * z
    r = m + y + e * _LN2_HI
    r = _NINF if x == _ZERO else r
    r = x if x == _INF else r
    r = _NAN if not (x >= _ZERO) else r  # negative or NaN
    return r


# ----------------------------------------------------------------------------- encoding

#: Bin centres as float32 (exact: multiples of 10) and the grid -> bin table, flattened.
_BA = np.ascontiguousarray(AB_BINS[:, 0], dtype=np.float32)
_BB = np.ascontiguousarray(AB_BINS[:, 1], dtype=np.float32)
_BA64 = np.ascontiguousarray(AB_BINS[:, 0], dtype=np.float64)
_BB64 = np.ascontiguousarray(AB_BINS[:, 1], dtype=np.float64)
_CELL = np.ascontiguousarray(CELL_TO_BIN.reshape(-1), dtype=np.int32)
_AMIN, _BMIN, _GRID = _F(A_MIN), _F(B_MIN), _F(GRID)
_INV_GRID = _F(1.0 / GRID)
_FAR = _F(1e5)
# A window's proof tolerates float32 rounding of the squared distances (a few ulp).
_SAFE = _F(1.0 - 1e-5)


def _window_size(k: int) -> int:
    """Side (in grid points) of the search window for k, from the bound proven below.

    Pixel at grid coordinates (fa, fb). An even window of side s = 2r takes the lattice
    points floor(f) - r + 1 .. floor(f) + r on each axis; every lattice point outside is at
    least r grid steps away on one axis (the point lies in [floor(f), floor(f) + 1)). An odd
    window s = 2r + 1 centred on round(f) leaves every outside point at least r + 1/2 away.
    Inside the full lattice, the open disc of that radius always holds >= kmax points
    (checked numerically in tests/test_numba_backend.py over a dense grid of positions):
        s=2: radius 1,   kmax 1;   s=3: radius 1.5, kmax 4;
        s=4: radius 2,   kmax 9;   s=5: radius 2.5, kmax 16.
    Near the gamut edge or outside it the window can hold fewer than k bins closer than its
    bound; the kernel then detects that and scans all 313 bins (see _encode_tile).
    """
    for s, kmax in ((2, 1), (3, 4), (4, 9), (5, 16)):
        if k <= kmax:
            return s
    return 5


@_jit
def _window_lo(f, s, cells):
    """First lattice index of the size-s window around grid coordinate f (|f| < 1e4),
    shifted to lie inside [0, cells). Even s: floor(f) - s/2 + 1 (the pixel's cell in the
    middle); odd s: round(f) - (s - 1)/2 (the nearest lattice point in the middle)."""
    if s % 2 == 0:
        lo = np.int64(math.floor(f)) - (s // 2) + 1
    else:
        lo = np.int64(math.floor(f + _HALF)) - (s // 2)
    lo = max(lo, 0)
    lo = min(lo, cells - s)
    return lo


@_jit
def _full_scan(a, b, k, bd, bi, m0, sd, si):
    """The k nearest of all 313 bins of (a, b), scalar (the rare fallback), in float64 so
    that far-off ab (|ab| ~ 1e6: squared distances ~ 1e12) still ranks the bins and weighs
    them as the reference does. Writes bi[m0 + m * TILE] and bd[...] = d_m - d_0 (what the
    weights need). Unfilled slots keep +inf and indices 0..k-1: NaN/Inf ab gives indices
    0..k-1 and (inf - inf) NaN weights, as the reference does. sd, si: float64/int32 scratch."""
    a64 = np.float64(a)
    b64 = np.float64(b)
    for m in range(k):
        sd[m] = np.inf
        si[m] = m
    for q in range(Q):
        # Insertion into the sorted list: q increases and only a strictly smaller distance
        # moves ahead, so ties keep the lower bin index first; NaN is never inserted.
        # (Written out: an inlined helper with an early return ran 20x slower.)
        da = a64 - _BA64[q]
        db = b64 - _BB64[q]
        d = da * da + db * db
        if d < sd[k - 1]:
            j = k - 1
            while j > 0 and d < sd[j - 1]:
                sd[j] = sd[j - 1]
                si[j] = si[j - 1]
                j -= 1
            sd[j] = d
            si[j] = q
    for m in range(k):
        bd[m0 + m * TILE] = np.float32(sd[m] - sd[0])
        bi[m0 + m * TILE] = si[m]


@_tjit
def _encode_tile(at, bt, tw, k, s, inv2s2, bi, w):
    """Soft-encode the tw pixels (at[j], bt[j]) of a tile: the k nearest bins into
    bi[m * TILE + j] (m = 0 nearest; ties: lower index first), Gaussian weights summing to 1
    into w[m * TILE + j]. Vectorised across the pixels of the tile.

    Grid-window search, and why it is exact. Grid coordinates fa = (a + 90) / 10,
    fb = (b + 110) / 10; lattice point (ia, ib) is bin CELL_TO_BIN[ia, ib] when in gamut. The
    window W is s x s lattice points [ia0, ia0 + s) x [ib0, ib0 + s) placed around the pixel
    (see _window_lo) and shifted to lie inside the grid. A bin outside W has its a-index
    < ia0 or >= ia0 + s, or likewise for b, so its distance to the pixel is at least the
    distance along that axis to the first lattice line beyond the side of W it is past:
        10 * (fa - (ia0 - 1)),  10 * (ia0 + s - fa),  same for b;
    a side on the grid's border has no bin beyond it (+inf). So every bin outside W is at
    least `bound` (the smallest of the four, when positive) away. If the k-th best squared
    distance found in W is strictly below bound^2 (less a relative 1e-5 for float32
    rounding), no bin outside W can be among the k nearest nor tie with the k-th, so W's
    top-k is the global top-k, ties inside W resolved by index as in a full scan. Otherwise
    (fewer than k in-gamut bins in W, a pixel near the gamut's edge or far off, NaN/Inf)
    that pixel is re-done by a full scan of the 313 bins.
    """
    ia0 = np.empty(TILE, np.int64)  # scratch: ~10 KB per tile of 128 pixels
    ib0 = np.empty(TILE, np.int64)
    bnd = np.empty(TILE, np.float32)
    cd = np.empty(TILE, np.float32)
    cq = np.empty(TILE, np.int32)
    bd = np.empty(K_MAX * TILE, np.float32)  # squared distances of the k best so far
    # -- per pixel: window origin and the bound (squared, with margin; -1: must scan)
    for j in range(tw):
        a = at[j]
        b = bt[j]
        ok = abs(a) < _FAR and abs(b) < _FAR  # False for NaN / Inf / far off
        fa = (a - _AMIN) * _INV_GRID if ok else _ZERO
        fb = (b - _BMIN) * _INV_GRID if ok else _ZERO
        la = _window_lo(fa, s, A_CELLS)
        lb = _window_lo(fb, s, B_CELLS)
        ia0[j] = la
        ib0[j] = lb
        bound = _INF
        if la > 0:
            bound = min(bound, fa - np.float32(la - 1))
        if la + s < A_CELLS:
            bound = min(bound, np.float32(la + s) - fa)
        if lb > 0:
            bound = min(bound, fb - np.float32(lb - 1))
        if lb + s < B_CELLS:
            bound = min(bound, np.float32(lb + s) - fb)
        bound = bound * _GRID
        bnd[j] = bound * bound * _SAFE if (ok and bound > _ZERO) else _F(-1.0)
    for m in range(k):
        bdm = bd[m * TILE: m * TILE + tw]
        bim = bi[m * TILE: m * TILE + tw]
        for j in range(tw):
            bdm[j] = _INF
            bim[j] = m
    # -- candidates in increasing bin index; branch-free insertion across the pixels
    for c in range(s * s):
        di = c // s
        dj = c - di * s
        for j in range(tw):
            ia = ia0[j] + di
            ib = ib0[j] + dj
            q = _CELL[ia * B_CELLS + ib]
            da = at[j] - (_AMIN + _GRID * np.float32(ia))
            db = bt[j] - (_BMIN + _GRID * np.float32(ib))
            d = da * da + db * db
            cd[j] = d if q >= 0 else _INF
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
    # -- the window was not provably enough: full scan (rare)
    bdk = bd[(k - 1) * TILE: (k - 1) * TILE + tw]
    sd = np.empty(K_MAX, np.float64)
    si = np.empty(K_MAX, np.int32)
    for j in range(tw):
        if not (bdk[j] < bnd[j]):
            _full_scan(at[j], bt[j], k, bd, bi, j, sd, si)
    # -- Gaussian weights, normalised (inf - inf = NaN for NaN/Inf ab, as the reference)
    bd0 = bd[0:tw]
    tot = cd  # reuse as the running sum
    for j in range(tw):
        tot[j] = _ZERO
    for m in range(k):
        bdm = bd[m * TILE: m * TILE + tw]
        wm = w[m * TILE: m * TILE + tw]
        for j in range(tw):
            g = _fexp(-(bdm[j] - bd0[j]) * inv2s2)
            wm[j] = g
            tot[j] += g
    for j in range(tw):
        tot[j] = _ONE / tot[j]
    for m in range(k):
        wm = w[m * TILE: m * TILE + tw]
        for j in range(tw):
            wm[j] *= tot[j]


#: The process that first ran a parallel kernel (GNU OpenMP cannot run in a child forked
#: after that: numba would terminate the child), see _launch.
_PARALLEL_PID: int | None = None
#: Work of at most this many tiles (of the loss / decode; 8x more for soft-encode, which is
#: ~10x cheaper per tile) runs on the calling thread: waking a sleeping pool thread costs
#: ~10 us on an idle machine but a scheduler tick (4 ms here) or more on a busy one.
SERIAL_MAX_TILES = 16
#: Chunks (runs of tiles) per thread, taken from a shared counter.
CHUNKS_PER_THREAD = 16


def _launch(parallel_kernel, worker, ntiles: int, *args, serial_max: int = SERIAL_MAX_TILES) -> None:
    """Run the tiles through ``worker(counter, nchunks, *args)``.

    Parallel: ``parallel_kernel`` starts one worker per numba thread, and the workers take
    chunks of tiles from a shared atomic counter until none is left (dynamic scheduling:
    numba's prange splits statically, so one thread descheduled by a busy machine, e.g. by
    DataLoader workers, would hold up the whole call). Serial, on the calling thread: tiny
    work, one thread, or a process forked after this one ran parallel code (a DataLoader
    worker: GNU OpenMP would be terminated there).
    """
    global _PARALLEL_PID
    pid = os.getpid()
    forked = _PARALLEL_PID is not None and _PARALLEL_PID != pid
    threads = numba.get_num_threads()
    counter = np.zeros(1, np.int64)
    if forked or ntiles <= serial_max or threads == 1:
        worker(counter, 1, *args)
        return
    _PARALLEL_PID = pid
    parallel_kernel(threads, counter, max(1, min(ntiles, threads * CHUNKS_PER_THREAD)), *args)


@_jit
def _claim(counter, nchunks, ntiles):
    """The next unclaimed chunk of tiles [t0, t1), or t0 == t1 when all are taken."""
    c = _claim_index(counter)
    if c >= nchunks:
        return ntiles, ntiles
    return c * ntiles // nchunks, (c + 1) * ntiles // nchunks


@_tjit
def _tile_max(x, xb, P, tw, mx):
    """mx[j] = max over the 313 classes of x[xb + q * P + j] (NaN skipped; caught later)."""
    for j in range(tw):
        mx[j] = _NINF
    for q in range(Q):
        xq = x[xb + q * P: xb + q * P + tw]
        for j in range(tw):
            v = _widen(xq[j])
            m = mx[j]
            mx[j] = v if v > m else m


@_jit
def _tile_at(t, tpi, P):
    """Tile t (tpi tiles per image) -> (image n, first pixel p0, width tw <= TILE)."""
    n = t // tpi
    p0 = (t - n * tpi) * TILE
    return n, p0, min(TILE, P - p0)


@_jit
def _copy_slots(si, sw, so, sstride, di, dw, do, dstride, k, tw):
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


@_cjit
def _soft_encode_worker(counter, nchunks, ab, k, s, inv2s2, idx, w, N, P):
    """Encode chunks of tiles (TILE pixels of one image each) until none is left."""
    tpi = (P + TILE - 1) // TILE
    ntiles = N * tpi
    bi = np.empty(K_MAX * TILE, np.int32)
    wt = np.empty(K_MAX * TILE, np.float32)
    t0, t1 = _claim(counter, nchunks, ntiles)
    while t0 < t1:
        for t in range(t0, t1):
            n, p0, tw = _tile_at(t, tpi, P)
            ab0 = n * 2 * P + p0
            _encode_tile(ab[ab0: ab0 + tw], ab[ab0 + P: ab0 + P + tw], tw, k, s, inv2s2, bi, wt)
            _copy_slots(bi, wt, 0, TILE, idx, w, n * k * P + p0, P, k, tw)
        t0, t1 = _claim(counter, nchunks, ntiles)


@_pjit
def _soft_encode_kernel(nworkers, counter, nchunks, ab, k, s, inv2s2, idx, w, N, P):
    for _ in prange(nworkers):
        _soft_encode_worker(counter, nchunks, ab, k, s, inv2s2, idx, w, N, P)


# ----------------------------------------------------------------------------- fused loss


@_tjit
def _ce_tile(x, xb, P, tw, k, ti, tz, sc, gscale, need_grad, loss, g, E, mx, sm):
    """One tile of the fused loss, the target (ti, tz) already in place; sc[j] holds the
    per-pixel loss scale s * m * v and becomes the gradient factor."""
    _tile_max(x, xb, P, tw, mx)
    # -- e = exp(x - max) (kept in E when the gradient is wanted) and its sum
    for j in range(tw):
        sm[j] = _ZERO
    if need_grad:
        for q in range(Q):
            xq = x[xb + q * P: xb + q * P + tw]
            eq = E[q * TILE: q * TILE + tw]
            for j in range(tw):
                e = _fexp(_widen(xq[j]) - mx[j])
                eq[j] = e
                sm[j] += e
    else:
        for q in range(Q):
            xq = x[xb + q * P: xb + q * P + tw]
            for j in range(tw):
                sm[j] += _fexp(_widen(xq[j]) - mx[j])
    # -- per pixel: the loss from the k target logits only; the target subtracted in E
    #    (softmax - z = (e - z * sum) / sum), so the gradient pass is a plain scaling
    for j in range(tw):
        ssum = sm[j]
        lse = mx[j] + math.log(ssum)
        acc = _ZERO
        for i in range(k):
            q = ti[i * TILE + j]
            if q < 0 or q >= Q:  # a bad precomputed index: NaN loss, never a wild write
                acc = _NAN
                continue
            z = tz[i * TILE + j]
            acc += z * (_widen(x[xb + q * P + j]) - lse)
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
                gq[j] = _narrow(eq[j] * sc[j], g)


@_cjit
def _ce_worker(counter, nchunks, x, ab, idx_in, w_in, use_ab, k, s, inv2s2, cw, mask, ps, gscale,
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
    t0, t1 = _claim(counter, nchunks, ntiles)
    while t0 < t1:
        for t in range(t0, t1):
            n, p0, tw = _tile_at(t, tpi, P)
            # -- the target of every pixel of the tile: k (index, weight) pairs
            if use_ab:
                ab0 = n * 2 * P + p0
                _encode_tile(ab[ab0: ab0 + tw], ab[ab0 + P: ab0 + P + tw], tw, k, s, inv2s2, ti, tz)
            else:
                _copy_slots(idx_in, w_in, n * k * P + p0, P, ti, tz, 0, TILE, k, tw)
            # -- per-pixel scale s * m * v
            m_n = mask[n] if mask.size > 0 else _ONE
            for j in range(tw):
                v = m_n
                if ps.size > 0:
                    v *= ps[n * P + p0 + j]
                if use_cw:
                    q = ti[j]
                    v *= cw[q] if (q >= 0 and q < Q) else _ONE
                sc[j] = v
            _ce_tile(x, n * Q * P + p0, P, tw, k, ti, tz, sc, gscale, need_grad,
                     loss[n * P + p0: n * P + p0 + tw], g, E, mx, sm)
        t0, t1 = _claim(counter, nchunks, ntiles)


@_pjit
def _ce_kernel(nworkers, counter, nchunks, x, ab, idx_in, w_in, use_ab, k, s, inv2s2, cw, mask, ps,
               gscale, need_grad, loss, g, N, P):
    for _ in prange(nworkers):
        _ce_worker(counter, nchunks, x, ab, idx_in, w_in, use_ab, k, s, inv2s2, cw, mask, ps, gscale,
                  need_grad, loss, g, N, P)


# ----------------------------------------------------------------------------- annealed mean


@_tjit
def _am_accumulate(src, base, stride, tw, inv_t, mx, sm, sa, sb):
    """sm[j] = sum_q e, sa/sb[j] = sum_q e * (a_q, b_q), e = exp((y_qj - mx[j]) / T), where
    y_qj = src[base + q * stride + j] (the logits, or a tile of log-probabilities)."""
    for j in range(tw):
        sm[j] = _ZERO
        sa[j] = _ZERO
        sb[j] = _ZERO
    for q in range(Q):
        yq = src[base + q * stride: base + q * stride + tw]
        ca = _BA[q]
        cb = _BB[q]
        for j in range(tw):
            e = _fexp((_widen(yq[j]) - mx[j]) * inv_t)
            sm[j] += e
            sa[j] += e * ca
            sb[j] += e * cb


@_tjit
def _am_tile(x, xb, P, tw, inv_t, is_probs, mx, sm, sa, sb, Y, oa, ob):
    _tile_max(x, xb, P, tw, mx)
    if is_probs:
        # softmax(log(x) / T) = exp((log x - log max) / T) / sum; log x into the tile Y first
        for j in range(tw):
            mx[j] = _flog(mx[j])
        for q in range(Q):
            xq = x[xb + q * P: xb + q * P + tw]
            yq = Y[q * TILE: q * TILE + tw]
            for j in range(tw):
                yq[j] = _flog(_widen(xq[j]))
        _am_accumulate(Y, 0, TILE, tw, inv_t, mx, sm, sa, sb)
    else:
        _am_accumulate(x, xb, P, tw, inv_t, mx, sm, sa, sb)
    for j in range(tw):
        inv = _ONE / sm[j]
        oa[j] = sa[j] * inv
        ob[j] = sb[j] * inv


@_cjit
def _annealed_worker(counter, nchunks, x, inv_t, is_probs, out, N, P):
    tpi = (P + TILE - 1) // TILE
    ntiles = N * tpi
    mx = np.empty(TILE, np.float32)
    sm = np.empty(TILE, np.float32)
    sa = np.empty(TILE, np.float32)
    sb = np.empty(TILE, np.float32)
    Y = np.empty(Q * TILE if is_probs else 0, np.float32)
    t0, t1 = _claim(counter, nchunks, ntiles)
    while t0 < t1:
        for t in range(t0, t1):
            n, p0, tw = _tile_at(t, tpi, P)
            o = n * 2 * P + p0
            _am_tile(x, n * Q * P + p0, P, tw, inv_t, is_probs, mx, sm, sa, sb, Y,
                     out[o: o + tw], out[o + P: o + P + tw])
        t0, t1 = _claim(counter, nchunks, ntiles)


@_pjit
def _annealed_kernel(nworkers, counter, nchunks, x, inv_t, is_probs, out, N, P):
    for _ in prange(nworkers):
        _annealed_worker(counter, nchunks, x, inv_t, is_probs, out, N, P)


# ----------------------------------------------------------------------------- torch glue

#: logits dtype -> the dtype of the numpy view the kernels get (numba has no bfloat16)
_VIEWS = {torch.float32: torch.float32, torch.float16: torch.int16, torch.bfloat16: torch.uint16}

_EMPTY_F32 = np.empty(0, np.float32)
_EMPTY_I32 = np.empty(0, np.int32)


def _logits_view(x: torch.Tensor) -> np.ndarray:
    if x.dtype not in _VIEWS:
        raise TypeError(f"logits: the numba backend takes float32, float16 or bfloat16, got {x.dtype}")
    return x.detach().view(_VIEWS[x.dtype]).reshape(-1).numpy()


def _f32(t: torch.Tensor | None) -> np.ndarray:
    if t is None:
        return _EMPTY_F32
    return t.detach().to(torch.float32).contiguous().reshape(-1).numpy()


def soft_encode(ab: torch.Tensor, k: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, p = ab.shape
    if not 1 <= k <= K_MAX:
        raise ValueError(f"k: the numba backend takes 1 <= k <= {K_MAX}, got {k}")
    idx = torch.empty((n, k, p), dtype=torch.int32)
    w = torch.empty((n, k, p), dtype=torch.float32)
    if n * p == 0:
        return idx, w
    ntiles = n * ((p + TILE - 1) // TILE)
    _launch(_soft_encode_kernel, _soft_encode_worker, ntiles, _f32(ab), k, _window_size(k),
            _F(1.0 / (2.0 * sigma * sigma)), idx.view(-1).numpy(), w.view(-1).numpy(), n, p,
            serial_max=8 * SERIAL_MAX_TILES)
    return idx, w


def ce_forward(logits, ab, indices, weights, class_weights, image_mask, k, sigma, grad_scale, need_grad,
               pixel_scale=None):
    n, q, p = logits.shape
    loss = torch.empty((n, p), dtype=torch.float32)
    grad = empty_cpu((n, q, p), logits.dtype) if need_grad else None
    if n * p == 0:
        return loss, grad
    x = _logits_view(logits)
    g = _logits_view(grad) if need_grad else x[:0]
    use_ab = indices is None
    if use_ab:
        k_eff = int(k)
        idx_np, w_np = _EMPTY_I32, _EMPTY_F32
    else:
        k_eff = int(indices.shape[1])
        idx_np = indices.detach().to(torch.int32).contiguous().reshape(-1).numpy()
        w_np = _f32(weights)
    if not 1 <= k_eff <= K_MAX:
        raise ValueError(f"k: the numba backend takes 1 <= k <= {K_MAX}, got {k_eff}")
    ntiles = n * ((p + TILE - 1) // TILE)
    _launch(_ce_kernel, _ce_worker, ntiles, x, _f32(ab) if use_ab else _EMPTY_F32, idx_np, w_np,
            use_ab, k_eff, _window_size(k_eff), _F(1.0 / (2.0 * float(sigma) ** 2)), _f32(class_weights),
            _f32(image_mask), _f32(pixel_scale), _F(grad_scale), bool(need_grad), loss.view(-1).numpy(), g, n, p)
    return loss, grad


def annealed_mean(x: torch.Tensor, T: float, is_probs: bool) -> torch.Tensor:
    n, _, p = x.shape
    out = torch.empty((n, 2, p), dtype=torch.float32)
    if n * p == 0:
        return out
    if x.dtype not in _VIEWS:
        x = x.float()
    xv = _logits_view(x)
    ntiles = n * ((p + TILE - 1) // TILE)
    _launch(_annealed_kernel, _annealed_worker, ntiles, xv, _F(1.0 / T), bool(is_probs), out.view(-1).numpy(), n, p)
    return out
