"""numba setup shared by the kernels: the import, the JIT decorators, the on-disk cache, and the
bit-level LLVM intrinsics numba does not offer on scalars.

Caching: the kernels are cached on disk (numba's ``cache=True`` files) in a per-user folder,
never inside the package (so ``pip uninstall`` leaves nothing behind, and a read-only install
caches as well): ``$FASTCOLOR_CACHE_DIR/numba``, else ``$NUMBA_CACHE_DIR/fastcolor`` where
``NUMBA_CACHE_DIR`` is set, else the user cache folder (``$XDG_CACHE_HOME/fastcolor/numba`` or
``~/.cache/fastcolor/numba`` on Linux); inside it, one subfolder per package stamp and numba
version (:data:`CACHE_DIR`). ``FASTCOLOR_NUMBA_CACHE=0`` turns caching off.

numba stamps a cached function with the source of *its own file* only, but a kernel here
compiles in helpers from the package's other files (``_math._fexp`` into ``loss``, say): an
edit of ``_math.py`` alone would leave the kernels of ``loss.py`` stale in the cache. So the
functions of this package are cached under one stamp, a hash of every ``.py`` file of the
package and of ``fastcolor/gamut.py`` (:func:`_package_stamp`): any edit recompiles all.

Caching is an optimisation and never fails an op (:class:`_KernelCache`): the first compile of a
process without a cache hit prints one line on stderr (it takes ~15 s, once); a damaged cache
file (zero-length, truncated) is replaced by a new compile with one warning; a cache that cannot
be written (read-only, full disk, no home) leaves the kernels uncached with one warning that
says where and how to set a folder.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

numba = None
try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core.caching import CompileResultCacheImpl, FunctionCache, _CacheLocator
    from numba.extending import intrinsic
except ImportError as _exc:  # pragma: no cover - numba is an optional dependency
    IMPORT_ERROR: str | None = f"numba is not installed ({_exc})"
except Exception as _exc:  # numba refuses its configuration at import, e.g. NUMBA_NUM_THREADS=0
    _threads = os.environ.get("NUMBA_NUM_THREADS")
    if _threads is not None and "thread" in str(_exc).lower():
        IMPORT_ERROR = (f"NUMBA_NUM_THREADS={_threads!r} is refused by numba: expected a whole number from 1 to "
                        f"the CPU count ({os.cpu_count()} here) ({type(_exc).__name__}: {_exc})")
    else:
        IMPORT_ERROR = f"numba failed to import ({type(_exc).__name__}: {_exc})"
    numba = None
else:
    IMPORT_ERROR = None
    if numba.config.DISABLE_JIT:
        # numba would hand the kernels back as Python functions, which cannot run the LLVM
        # intrinsics below (bit casts, atomics, streamed stores): the backend is unavailable.
        IMPORT_ERROR = ("NUMBA_DISABLE_JIT is set: numba then runs functions as plain Python, and the numba "
                        "backend's kernels use LLVM intrinsics that cannot run so (unset it to use this backend)")

_PKG_DIR = Path(__file__).resolve().parent
#: x86-64, where the kernels' non-temporal stores and ``sfence`` apply (see ``store_fence``
#: and ``numba_backend.streams_gradient``).
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
#: What to set to move the cache (said in the messages).
CACHE_ENV = "FASTCOLOR_CACHE_DIR"
#: The compile time the notice quotes: issue 22 measured 14.5 s for the first loss call of a fresh install.
COMPILE_SECONDS = 15


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


def _user_cache_root() -> Path:
    """fastcolor's user cache folder: ``$XDG_CACHE_HOME/fastcolor`` (an absolute path; else
    ``~/.cache/fastcolor``) on Linux and other Unix, as the XDG base directory spec says;
    numba's copy of ``appdirs`` on macOS and Windows."""
    if sys.platform.startswith(("darwin", "win")):  # pragma: no cover - not Linux
        from numba.misc.appdirs import AppDirs

        return Path(AppDirs("fastcolor", appauthor=False).user_cache_dir)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "fastcolor"


def cache_root() -> tuple[Path, str]:
    """The folder the kernels are cached under, and what chose it (see the module docstring)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser() / "numba", CACHE_ENV
    numba_dir = getattr(getattr(numba, "config", None), "CACHE_DIR", "") if numba is not None else ""
    if numba_dir:
        return Path(numba_dir).expanduser() / "fastcolor", "NUMBA_CACHE_DIR"
    try:
        return _user_cache_root() / "numba", "the user cache folder"
    except RuntimeError as exc:  # Path.home() with no home: no cache
        return Path("~/.cache/fastcolor/numba"), f"the user cache folder (unknown: {exc})"


def _probe(path: Path) -> str | None:
    """None if ``path`` (made if missing) takes a new file, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_STAMP = _package_stamp()
#: The folder of this package's cache files (one per package stamp and numba version, so that
#: two installs of different versions do not overwrite each other's files).
CACHE_DIR = cache_root()[0] / f"{_STAMP[:16]}-numba{getattr(numba, '__version__', '')}"
if IMPORT_ERROR is not None:
    CACHE_PROBLEM: str | None = "numba is unavailable"
elif os.environ.get("FASTCOLOR_NUMBA_CACHE", "1") == "0":
    CACHE_PROBLEM = "FASTCOLOR_NUMBA_CACHE=0"
else:
    CACHE_PROBLEM = _probe(CACHE_DIR)
#: Whether the kernels are cached on disk (False: compiled in every process).
CACHE = CACHE_PROBLEM is None

_said: set[str] = set()


def _say_once(key: str, message: str, *, warn: bool) -> None:
    """One message per ``key`` and process: a warning, or a line on stderr (a notice)."""
    if key in _said:
        return
    _said.add(key)
    if warn:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    else:
        print(f"fastcolor: {message}", file=sys.stderr, flush=True)


def _compiling() -> None:
    """A kernel is about to compile (no cache hit): say so, once per process."""
    if CACHE:
        _say_once("compile", f"compiling the numba CPU kernels (~{COMPILE_SECONDS} s, once: they are cached in "
                             f"{CACHE_DIR})", warn=False)
    elif CACHE_PROBLEM == "FASTCOLOR_NUMBA_CACHE=0":
        _say_once("compile", f"compiling the numba CPU kernels (~{COMPILE_SECONDS} s; not cached: "
                             f"FASTCOLOR_NUMBA_CACHE=0)", warn=False)
    else:
        _say_once("compile", f"numba's cache folder {CACHE_DIR} cannot be written ({CACHE_PROBLEM}): the numba "
                             f"CPU kernels compile again in every process (~{COMPILE_SECONDS} s); set {CACHE_ENV} "
                             f"to a writable folder to compile them once", warn=True)


if numba is not None:
    class _KernelLocator(_CacheLocator):
        """Every function of this package is cached in :data:`CACHE_DIR` under the package stamp."""

        def __init__(self, py_func, py_file):
            self._py_file = py_file  # numba reads it for warnings
            self._lineno = py_func.__code__.co_firstlineno

        def ensure_cache_path(self):
            CACHE_DIR.mkdir(parents=True, exist_ok=True)

        def get_cache_path(self):
            return str(CACHE_DIR)

        def get_source_stamp(self):
            return _STAMP

        def get_disambiguator(self):
            return str(self._lineno)

        @classmethod
        def from_function(cls, py_func, py_file):
            return cls(py_func, py_file)

    class _KernelCacheImpl(CompileResultCacheImpl):
        _locator_classes = [_KernelLocator]

    class _KernelCache(FunctionCache):
        """numba's per-function disk cache, made an optimisation that never fails an op: a file
        that cannot be read back (zero-length, truncated, not numba's) is dropped and the kernel
        compiled again (issue 23.10: ``EOFError`` / ``UnpicklingError`` from every op before); a
        write that fails (full disk, read-only folder) turns caching off for the process (23.11:
        ``ENOSPC`` failed the op, and ``colorize`` blamed the user's output disk)."""

        _impl_class = _KernelCacheImpl

        def load_overload(self, sig, target_context):
            try:
                cres = super().load_overload(sig, target_context)
            except Exception as exc:  # a damaged file: the compile below replaces it
                index = Path(self._cache_file._index_path)
                _say_once("damaged", f"numba's cache of fastcolor's CPU kernels is damaged ({index.parent}: "
                                     f"{type(exc).__name__}: {exc}); compiling the kernels again and replacing it",
                          warn=True)
                try:  # the save after the compile then starts a new index
                    index.unlink()
                except OSError:
                    pass
                cres = None
            if cres is None:
                _compiling()
            return cres

        def save_overload(self, sig, data):
            if _write_failure is not None:
                return
            try:
                super().save_overload(sig, data)
            except Exception as exc:  # OSError mostly (ENOSPC, EROFS); an index damaged meanwhile
                _stop_writing(f"{type(exc).__name__}: {exc}")

    #: Why a cache write failed in this process (no more are tried), or None.
    _write_failure: str | None = None

    def _stop_writing(reason: str) -> None:
        """A cache write failed: no more writes in this process (reads stay on), one warning."""
        global _write_failure
        _write_failure = reason
        _say_once("unwritable", f"numba's cache of fastcolor's CPU kernels cannot be written in {CACHE_DIR} "
                                f"({reason}): running uncached (the kernels compile again in every process, "
                                f"~{COMPILE_SECONDS} s); set {CACHE_ENV} to a folder with space to keep them",
                  warn=True)

    def _njit(**options):
        """``numba.njit(**options)``, cached through :class:`_KernelCache` (off when
        :data:`CACHE` is False, yet still announcing a compile)."""
        make = njit(**options)

        def decorate(fn):
            disp = make(fn)
            disp._cache = _KernelCache(fn)
            if not CACHE:
                disp._cache.disable()
            return disp

        return decorate


def cache_status(dispatchers=()) -> dict:
    """Where the kernels are cached and whether ``dispatchers`` (numba functions of this package)
    are all there already: ``{"dir", "chosen_by", "enabled", "problem", "warm", "cached",
    "kernels"}``."""
    cached = []
    for disp in dispatchers:
        cache = getattr(disp, "_cache", None)
        try:
            if CACHE and cache is not None and cache._cache_file._load_index():
                cached.append(disp.__name__)
        except Exception:  # a damaged index: not warm (the next compile replaces it)
            pass
    return {"dir": str(CACHE_DIR), "chosen_by": cache_root()[1], "enabled": CACHE, "problem": CACHE_PROBLEM,
            "warm": CACHE and len(cached) == len(dispatchers), "cached": cached, "kernels": len(dispatchers)}


if IMPORT_ERROR is None:
    _FM = {"contract"}  # FMA contraction only: NaN/Inf semantics stay IEEE
    # Helpers that take arrays are inlined at numba IR level: a real call would cost an
    # atomic incref/decref of every array argument per pixel.
    jit = _njit(fastmath=_FM, inline="always", nogil=True)
    # Scalar helpers (exp, log): real functions (LLVM inlines them), compiled once.
    ijit = _njit(fastmath=_FM, nogil=True)
    # Per-tile bodies: real calls (one per tile of TILE pixels, so the argument refcounts
    # cost nothing), compiled once and shared by the kernels: less to compile.
    tjit = _njit(fastmath=_FM, nogil=True, no_cpython_wrapper=True)
    # The same with IEEE arithmetic, no contraction: the nearest-bin search, whose distances
    # must be the plain (a - a_q)^2 + (b - b_q)^2 of the rule in fastcolor/gamut.py. numba
    # without fastmath emits no `contract` flag, and LLVM fuses nothing without it.
    # (fastmath flags are per instruction: they survive LLVM inlining either way.)
    xjit = _njit(fastmath=False, nogil=True, no_cpython_wrapper=True)
    # Workers: called by the parallel kernels, and directly (serially) from Python.
    cjit = _njit(fastmath=_FM, nogil=True)
    pjit = _njit(parallel=True, fastmath=_FM, nogil=True)
else:  # numba missing or unusable: the kernels' modules are not imported (see __init__)

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
