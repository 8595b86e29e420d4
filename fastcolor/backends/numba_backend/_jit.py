"""numba setup shared by the kernels: the import, the JIT decorators, the on-disk cache, and the
bit-level LLVM intrinsics numba does not offer on scalars.

Caching: kernels use numba's on-disk cache (``cache=True``) when numba finds a writable cache
folder (``NUMBA_CACHE_DIR``, the package's ``__pycache__`` or the user-wide cache); when none
is writable they are compiled without a cache instead of failing at import.

numba stamps a cached function with the source of *its own file* only, but a kernel here
compiles in helpers from the package's other files (``_math._fexp`` into ``loss``, say): an
edit of ``_math.py`` alone would leave the kernels of ``loss.py`` stale in the cache. So the
functions of this package are cached under one stamp, a hash of every ``.py`` file of the
package and of ``fastcolor/gamut.py`` (see :class:`_PackageLocator`): any edit recompiles all.
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError as _exc:  # pragma: no cover - numba is an optional dependency
    numba = None
    IMPORT_ERROR: str | None = f"numba is not installed ({_exc})"
else:
    IMPORT_ERROR = None

_PKG_DIR = Path(__file__).resolve().parent
#: x86-64, where the kernels' non-temporal stores and ``sfence`` apply (see ``store_fence``
#: and ``numba_backend.streams_gradient``).
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _package_stamp() -> str:
    """sha256 over the sources the compiled kernels depend on (this package, gamut.py)."""
    h = hashlib.sha256()
    for path in sorted(_PKG_DIR.glob("*.py")) + [_PKG_DIR.parent.parent / "gamut.py"]:
        h.update(path.name.encode())
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"?")
    return h.hexdigest()


def _install_package_locator() -> bool:
    """Put :class:`_PackageLocator` first in numba's locator list; False if this numba has
    no such list (then each file keeps numba's own per-file stamp)."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover
        return False
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    base = getattr(caching, "_CacheLocator", None)
    classes = getattr(impl, "_locator_classes", None)
    if base is None or not isinstance(classes, list):  # pragma: no cover
        return False
    if any(getattr(c, "_fastcolor_locator", False) for c in classes):
        return True  # (the module re-imported)
    stamp = _package_stamp()
    others = list(classes)

    class _PackageLocator(base):
        """numba's own locator for the file (the same cache folder), but the package's stamp."""

        _fastcolor_locator = True

        def __init__(self, inner):
            self._inner = inner
            self._py_file = inner._py_file  # numba reads it for warnings

        def ensure_cache_path(self):
            self._inner.ensure_cache_path()

        def get_cache_path(self):
            return self._inner.get_cache_path()

        def get_source_stamp(self):
            return stamp

        def get_disambiguator(self):
            return self._inner.get_disambiguator()

        @classmethod
        def from_function(cls, py_func, py_file):
            try:
                if Path(py_file).resolve().parent != _PKG_DIR:
                    return None
            except (OSError, ValueError):
                return None
            for other in others:
                inner = other.from_function(py_func, py_file)
                if inner is not None:
                    return cls(inner) if hasattr(inner, "_py_file") else inner
            return None

    classes.insert(0, _PackageLocator)
    return True


def _cache_works() -> bool:
    """Whether numba can cache functions of this package (some writable cache folder exists).

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
    PACKAGE_STAMPED = _install_package_locator()
    CACHE = _cache_works()
    _FM = {"contract"}  # FMA contraction only: NaN/Inf semantics stay IEEE
    # Helpers that take arrays are inlined at numba IR level: a real call would cost an
    # atomic incref/decref of every array argument per pixel.
    jit = njit(fastmath=_FM, cache=CACHE, inline="always", nogil=True)
    # Scalar helpers (exp, log): real functions (LLVM inlines them), compiled once.
    ijit = njit(fastmath=_FM, cache=CACHE, nogil=True)
    # Per-tile bodies: real calls (one per tile of TILE pixels, so the argument refcounts
    # cost nothing), compiled once and shared by the kernels: less to compile.
    tjit = njit(fastmath=_FM, cache=CACHE, nogil=True, no_cpython_wrapper=True)
    # The same with IEEE arithmetic, no contraction: the nearest-bin search, whose distances
    # must be the plain (a - a_q)^2 + (b - b_q)^2 of the rule in fastcolor/gamut.py. numba
    # without fastmath emits no `contract` flag, and LLVM fuses nothing without it.
    # (fastmath flags are per instruction: they survive LLVM inlining either way.)
    xjit = njit(fastmath=False, cache=CACHE, nogil=True, no_cpython_wrapper=True)
    # Workers: called by the parallel kernels, and directly (serially) from Python.
    cjit = njit(fastmath=_FM, cache=CACHE, nogil=True)
    pjit = njit(parallel=True, fastmath=_FM, cache=CACHE, nogil=True)
else:  # pragma: no cover
    PACKAGE_STAMPED = False
    CACHE = False

    def _identity(f):
        return f

    jit = ijit = tjit = xjit = cjit = pjit = _identity

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
    def pow2_of_magic(typingctx, t):
        """``t = n + 1.5 * 2^23`` (n an integer in [-126, 127]) -> the float32 ``2^n``."""
        sig = types.float32(types.float32)

        def codegen(context, builder, signature, args):
            b = builder.bitcast(args[0], _I32)
            b = builder.add(b, _c32(127 - 0x4B400000))
            return builder.bitcast(builder.shl(b, _c32(23)), _F32)

        return sig, codegen

    @intrinsic
    def claim_index(typingctx, counter):
        """Atomically counter[0] += 1; returns the old value (an int64 array of one)."""
        if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
            return None
        sig = types.int64(counter)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            return builder.atomic_rmw("add", ary.data, ir.Constant(ir.IntType(64), 1), "monotonic")

        return sig, codegen

    @intrinsic
    def mant_expo(typingctx, x):
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
    def max_skip_nan(typingctx, m, v):
        """float32 max of m and v where a NaN v leaves m (``llvm.maxnum``; m is never NaN
        here): the running max of a tile.

        Not ``mx[j] = v if v > mx[j] else mx[j]``: LLVM turns that (a branch, or even an
        explicit ``select``, of a value loaded from the address it stores to) into a store only
        when v > m, vectorised as a masked store (``vmaskmovps``), microcoded on AMD Zen. It
        made the tile max 1.64 cycles per logit against 0.88 with ``maxnum`` and 0.70 for a
        plain sum over the same tile (Zen 3, AVX2, 2026-12-01; the signs of zeros aside, which
        no shifted exp sees, the result is the same)."""
        if m != types.float32 or v != types.float32:
            return None
        sig = types.float32(types.float32, types.float32)

        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(_F32, [_F32, _F32])
            fn = builder.module.declare_intrinsic("llvm.maxnum", [_F32], fnty)
            return builder.call(fn, list(args))

        return sig, codegen

    def _prefetch_codegen(rw):
        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            i8p = ir.IntType(8).as_pointer()
            ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
            fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
            fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
            builder.call(fn, [ptr, _c32(rw), _c32(3), _c32(1)])
            return context.get_dummy_value()

        return codegen

    @intrinsic
    def prefetch(typingctx, arr, idx):
        """Hint the CPU to bring the cache line of ``arr[idx]`` into all cache levels
        (``llvm.prefetch``, read, locality 3: x86 ``prefetcht0``); never faults, even for an
        index past the end, and changes no result.

        The kernels prefetch the next tile's logits while they compute the exp of this one:
        313 rows of 512 bytes 16 KB apart are more streams than the hardware prefetcher follows.
        The decode's tile (max + exp pass) went from 2.61 to 1.99 cycles per logit (one thread,
        logits in DRAM, Zen 3, 2026-12-01); ``prefetcht2`` (locality 1) gained nothing."""
        if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
            return None
        return types.void(arr, idx), _prefetch_codegen(0)

    @intrinsic
    def prefetch_write(typingctx, arr, idx):
        """:func:`prefetch` with the intent to write (x86 ``prefetchw``): the gradient rows of a
        tile, fetched during the exp pass so that the gradient pass's stores do not wait."""
        if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
            return None
        return types.void(arr, idx), _prefetch_codegen(1)

    _V8 = ir.VectorType(_F32, 8)

    @intrinsic
    def stream_product8(typingctx, dst, di, a, ai, b, bi):
        """``dst[di: di + 8] = a[ai: ai + 8] * b[bi: bi + 8]`` (float32 arrays) as one 8-wide
        multiply and a non-temporal store (x86 ``vmovntps``): the line goes to memory without
        being read first. The caller guarantees ``dst[di]`` is 32-byte aligned and the 8 in
        bounds (no check here), and calls :func:`store_fence` before its results are read.

        The fused loss writes its gradient with it: with plain stores every gradient line is
        first read from memory (a write-allocate), so writing 205 MB moved 410 MB: 16.2 ms
        against 8.9 ms streamed (a numba loop over the same tiles, 2 threads, Zen 3,
        2026-12-01). LLVM's vectoriser will not form such stores from a scalar loop (a
        scalar non-temporal store has 4-byte alignment), hence the explicit vector."""
        if not all(isinstance(t, types.Array) and t.dtype == types.float32 for t in (dst, a, b)):
            return None
        if not all(isinstance(t, types.Integer) for t in (di, ai, bi)):
            return None

        def codegen(context, builder, signature, args):
            def vec_ptr(k):
                ary = context.make_array(signature.args[k])(context, builder, args[k])
                return builder.bitcast(builder.gep(ary.data, [args[k + 1]]), _V8.as_pointer())

            prod = builder.fmul(builder.load(vec_ptr(2), align=4), builder.load(vec_ptr(4), align=4))
            store = builder.store(prod, vec_ptr(0), align=32)
            store.set_metadata("nontemporal", builder.module.add_metadata([_c32(1)]))
            return context.get_dummy_value()

        return types.void(dst, di, a, ai, b, bi), codegen

    @intrinsic
    def store_fence(typingctx):
        """Order the non-temporal stores of :func:`stream_product8` made so far before any
        later store (a worker calls it once, when its tiles are done, so the thread that reads
        the gradient after the kernel sees all of it): x86 ``sfence``. Not a C++-style
        seq_cst fence: on x86 LLVM emits that as a locked ``or`` on the stack, which orders
        ordinary stores but is not documented to drain the write-combining buffers that
        non-temporal stores go through. Elsewhere (where the stores are ordinary or the
        platform's own non-temporal pairs) a seq_cst fence."""

        def codegen(context, builder, signature, args):
            if X86_64:
                fn = builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), []))
                builder.call(fn, [])
            else:  # pragma: no cover - not x86
                builder.fence("seq_cst")
            return context.get_dummy_value()

        return types.void(), codegen

    @intrinsic
    def widen(typingctx, v):
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
    def narrow(typingctx, f, like):
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
