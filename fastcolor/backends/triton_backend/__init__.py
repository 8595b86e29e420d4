"""The triton backend: fused kernels for CUDA GPUs (and CPU tensors under the interpreter).

Implements the backend contract of :mod:`fastcolor.backends` with the kernels of
:mod:`fastcolor.backends.triton_backend.kernels`:

* ``ce_forward``: one read of the logits, one write of the per-pixel loss and of the gradient,
  the target soft-encoded on the fly (or read from precomputed ``indices``/``weights``);
  ``FASTCOLOR_TRITON_LOSS=persistent`` picks the persistent, class-streaming kernel (see
  :func:`loss_mode`);
* ``annealed_mean``: one read of the logits or probabilities (``FASTCOLOR_TRITON_DECODE=stream``
  picks the kernel that streams the classes in chunks, see :func:`decode_mode`);
* ``soft_encode``: the k nearest bins and their weights;
* ``scale_``: the fused loss's backward, ``grad *= grad_output`` read on the device (no data
  moves when it is 1).

The k-nearest search (in ``soft_encode`` and inside the fused loss: one ``@triton.jit`` routine)
is the one rule of :mod:`fastcolor.gamut`, on the candidate table of ``k`` uploaded once by
:func:`fastcolor.backends._tables.device_table` and the bin centres of
:func:`~fastcolor.backends._tables.bin_centres`, passed as kernel arguments (the box and sub-cell
geometry as constexprs): exact for every float32 ab, far outside the gamut included, with bins
0..k-1 and NaN weights for NaN/Inf ab. :mod:`~fastcolor.backends.triton_backend.kernels` says how.

CPU tensors run on Triton's interpreter (slow, for tests on machines without a GPU: each program
is a sequence of numpy calls over its whole block, so CPU launches use big blocks, see
:func:`config`). The registry lists triton for both "cuda" and "cpu"; on the CPU this backend's
:func:`unavailable_reason` accepts CPU tensors only when ``TRITON_INTERPRET=1`` is set, and
``backend="auto"`` never picks it there (it is not in the registry's CPU order), so it runs on the
CPU only when named. The kernels used for CPU tensors are always interpreted ones, built on first
use whatever the variable said when triton was imported, so the order in which test modules
import this backend does not matter.

Grids are 1-D (CUDA caps axes 1 and 2 at 65535; :data:`GRID_YZ_MAX`), and ``(M, C, 1)`` inputs
(lists of pixels) are read row-wise (:func:`_layout`). Every launch configuration is compiled for
sm_80 and sm_90 by :mod:`.compile_check`, which allows no spill.

Launch configuration: a fixed heuristic (:func:`config`), overridable for experiments through
:data:`CONFIG_OVERRIDE` (``{"ce": (BP, num_warps, maxnreg), "am": ..., "enc": ...}``) or the
environment variable ``FASTCOLOR_TRITON_CONFIG`` (e.g. ``ce=32x4x160,am=64x8``). With a
``(N, 2, P)`` ab target the loss kernel encodes it itself ("fused"); ``FASTCOLOR_TRITON_ENCODE=separate``
runs the encode kernel first and feeds its output to the loss kernel (for comparisons).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading

import torch

from fastcolor.backends._tables import DeviceTable, bin_centres, device_table
from fastcolor.backends.contract import LossCall
from fastcolor.gamut import Q

try:  # an optional dependency: the registry reports the reason when it is missing
    import triton
except ImportError as _exc:  # pragma: no cover - exercised where triton is absent
    triton = None
    _IMPORT_ERROR = f"triton is not installed ({_exc})"
else:
    _IMPORT_ERROR = None

SUPPORTS_FLOAT64 = False

#: experiment hook: {"ce" | "ce_persistent" | "am" | "am_stream" | "enc": (BP, num_warps[, maxnreg])}
CONFIG_OVERRIDE: dict[str, tuple] = {}

_lock = threading.Lock()
_kernel_modules: dict[bool, object] = {}


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def unavailable_reason(device_type: str) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available to torch"
        major, _ = torch.cuda.get_device_capability()
        if major < 7:
            return f"triton needs a GPU of compute capability >= 7.0, got {major}.x"
        return None
    if device_type == "cpu":
        if interpreter_enabled():
            return None
        return "triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 (slow; for tests)"
    return f"triton does not run on {device_type} tensors"


# ----------------------------------------------------------------------------- kernels and tables


def _kernels(device: torch.device):
    """The kernels module for this device: compiled (cuda) or interpreted (cpu)."""
    interp = device.type != "cuda"
    mod = _kernel_modules.get(interp)
    if mod is not None:
        return mod
    with _lock:
        mod = _kernel_modules.get(interp)
        if mod is None:
            if not interp:
                from fastcolor.backends.triton_backend import kernels as mod
            else:
                path = os.path.join(os.path.dirname(__file__), "kernels.py")
                name = "fastcolor.backends.triton_backend._kernels_interpreted"
                spec = importlib.util.spec_from_file_location(name, path)
                mod = importlib.util.module_from_spec(spec)
                mod._FORCE_INTERPRET = True
                sys.modules[name] = mod  # inspect.getsource needs to find it
                spec.loader.exec_module(mod)
            _kernel_modules[interp] = mod
    return mod


def _parse_env_config() -> dict[str, tuple[int, int, int | None]]:
    out = {}
    spec = os.environ.get("FASTCOLOR_TRITON_CONFIG", "").strip()
    for part in filter(None, (s.strip() for s in spec.split(","))):
        try:
            name, val = part.split("=")
            fields = [int(v) for v in val.lower().split("x")]
            bp, nw = fields[:2]
            out[name.strip()] = (bp, nw, fields[2] if len(fields) > 2 and fields[2] > 0 else None)
        except ValueError:
            raise ValueError(f"FASTCOLOR_TRITON_CONFIG: expected e.g. 'ce=32x4x160,am=64x8', got {spec!r}") from None
    return out


#: Interpreter (CPU tensors): pixels per program, at most. The interpreter runs each program's
#: operations as numpy calls over the whole block, whose cost is mostly per call: big blocks, up
#: to triton's 2^20 elements a tile ([16, BP] slots of the encoder, [256, BP] logits).
INTERP_BLOCK = {"enc": 65536, "ce": 4096, "ce_persistent": 4096, "am": 4096, "am_stream": 4096}


def config(kind: str, dtype: torch.dtype, p: int = 0, device: torch.device | None = None, *, k: int = 5,
           encode: bool = True, probs: bool = False) -> tuple[int, int, int | None]:
    """(pixels per program BP, warps, register cap or None) of kernel ``kind`` ("ce", "am", "enc",
    "am_stream", "ce_persistent": pixels per tile), for ``p`` pixels per image; for "ce" also the
    target's ``k`` and whether the kernel encodes ab (``encode``), for "am" whether it decodes ``probs``.

    The loss and decode programs hold 320 x BP logits in registers: 80 per thread for BP = 32 and
    4 warps, whatever the dtype. Capped at 168 registers, three programs fit on an SM (12 warps,
    120 KB of logits in flight): no spills for the training path (ab target, k <= 5). A SoftLabels
    target (the k entries summed per bin, issue 21.6) or k > 5 spills 8-264 bytes at 168 (ptxas
    -v, sm_80 and sm_90, triton 3.8): these take a cap of 232, with which no k <= 16 spills (two
    programs per SM). Every cap here is checked by :mod:`.compile_check`; none of this was timed.
    BP = 32 gives each class row a 128 B (float32) / 64 B (16-bit) contiguous, aligned segment when
    P % 32 == 0. When ``P % 16 != 0`` triton cannot prove the rows aligned, loads one element at a
    time with one 64-bit address each, and BP = 32 would spill: such odd images take BP = 16.
    The 16-bit decode of logits takes BP = 64: 160 logits per thread, 231 registers, two programs
    per SM, and a third fewer instructions per logit than BP = 32 (16 vs 23 by ptxas for sm_90),
    which matters at 2 bytes a logit; of probabilities (a log2 per logit) BP = 64 spills (255
    registers, ~430 bytes): BP = 32 there.
    The encode kernel's BP = 32 * warps gives every thread one pixel, whose k candidate slots
    (distance and bin) stay in that thread's registers through the whole search; without a cap
    ptxas for sm_90 chose 64-96 registers and spilled 96-208 bytes (k = 5, 10), with a cap of 168
    it takes what it needs (76-124) and spills nothing; k > 10 spilled 8 bytes at 168: 232.
    On a CPU ``device`` (the interpreter) BP is the next power of two of ``p`` up to
    :data:`INTERP_BLOCK` (warps and register caps mean nothing there).
    """
    over = CONFIG_OVERRIDE.get(kind) or _parse_env_config().get(kind)
    if over:
        return tuple(over) + (None,) * (3 - len(over))
    if device is not None and torch.device(device).type != "cuda":
        return (min(max(16, 1 << max(0, int(p) - 1).bit_length()), INTERP_BLOCK[kind]), 1, None)
    if kind == "am_stream":  # [32, 64] chunks: 16 values per thread a chunk (a first guess, untimed)
        return (64, 4, None)
    if kind == "ce_persistent":  # [32, 64] chunks, 16-byte loads along pixels (a first guess, untimed);
        return (64, 4, 232)  # uncapped, ptxas for sm_90 chose 128 registers and spilled 32 bytes (bf16, ab)
    if kind == "enc":
        return (128, 4, 168 if k <= 10 else 232)
    if p % 16:
        return (16, 4, None)
    if kind == "am" and dtype != torch.float32:
        return (32, 4, 168) if probs else (64, 4, None)
    if kind == "ce" and (k > 5 or not encode):
        return (32, 4, 232)
    return (32, 4, 168)


def encode_mode() -> str:
    """"fused" (default: the loss kernel encodes ab itself) or "separate" (the encode kernel writes
    indices and weights, the loss kernel reads them), from ``FASTCOLOR_TRITON_ENCODE``."""
    mode = os.environ.get("FASTCOLOR_TRITON_ENCODE", "fused").strip().lower() or "fused"
    if mode not in ("fused", "separate"):
        raise ValueError(f"FASTCOLOR_TRITON_ENCODE: expected 'fused' or 'separate', got {mode!r}")
    return mode


def _knn_consts(k: int, device: torch.device) -> tuple[DeviceTable, dict]:
    """The candidate table of ``k`` on the device and the search's constexprs (geometry from gamut.py)."""
    t = device_table(k, device)
    return t, dict(K=k, KP=max(2, 1 << (k - 1).bit_length()), LO=float(t.lo), HI=float(t.lo + t.n * t.cell),
                   CELL=float(t.cell), NSUB=int(t.n))


def _layout(n: int, p: int) -> tuple[int, int, bool]:
    """(images, pixels per image, ROWS) as the kernels see an ``(N, C, P)`` tensor: itself, or, for
    ``P == 1`` (a list of N pixels, e.g. ``(M, 2)`` ab or ``(M, 313)`` logits), one image of N pixels
    read row-wise (``ROWS``: a pixel's channels contiguous), so that no lane of a program is idle."""
    if p == 1 and n > 1:
        return 1, n, True
    return n, p, False


#: The most programs CUDA allows on grid axes 1 and 2 (axis 0: 2^31 - 1). Every kernel here runs
#: on a 1-D grid (program -> image and tile: ``kernels._tile``), so no launch comes near it.
GRID_YZ_MAX = 65535

_maxnreg_ok = True


def _launch(kernel, grid, args, consts, cfg, device):
    global _maxnreg_ok
    if any(g > GRID_YZ_MAX for g in grid[1:]):  # CUDA would refuse it (triton passes it through)
        raise ValueError(f"grid {grid}: axes 1 and 2 hold at most {GRID_YZ_MAX} programs on CUDA")
    if device.type != "cuda":
        kernel[grid](*args, **consts)
        return
    _, nw, maxnreg = cfg
    with torch.cuda.device(device):
        if maxnreg and _maxnreg_ok:
            try:
                kernel[grid](*args, **consts, num_warps=nw, maxnreg=maxnreg)
                return
            except KeyError as exc:  # a triton without the maxnreg option: run uncapped
                if "maxnreg" not in str(exc):
                    raise
                _maxnreg_ok = False
        kernel[grid](*args, **consts, num_warps=nw)


# ----------------------------------------------------------------------------- the contract


def soft_encode(ab: torch.Tensor, *, k: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest bins (int32 ``(N, k, P)``) and their weights (float32) of ``(N, 2, P)`` ab."""
    n, _, p = ab.shape
    k = int(k)
    idx = torch.empty((n, k, p), dtype=torch.int32, device=ab.device)
    w = torch.empty((n, k, p), dtype=torch.float32, device=ab.device)
    if n == 0 or p == 0:
        return idx, w
    ab = ab.float().contiguous()
    km = _kernels(ab.device)
    t, consts = _knn_consts(k, ab.device)
    n, p, rows = _layout(n, p)
    cfg = config("enc", torch.float32, p, device=ab.device, k=k)
    tpi = triton.cdiv(p, cfg[0])
    _launch(km.encode_kernel, (n * tpi,),
            (ab, idx, w, t.offsets, t.bins, bin_centres(ab.device), p, -1.0 / (2.0 * float(sigma) ** 2)),
            dict(**consts, BP=cfg[0], TPI=tpi, ROWS=rows), cfg, ab.device)
    return idx, w


def ce_forward(call: LossCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused loss of :class:`~fastcolor.backends.contract.LossCall`: (loss (N, P), grad or None)."""
    logits = call.logits
    n, q, p = logits.shape
    if q != Q:
        raise ValueError(f"logits: expected {Q} classes on axis 1, got {q}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits: the triton backend takes float32, float16 or bfloat16, got {logits.dtype}")
    dev = logits.device
    loss = torch.empty((n, p), dtype=torch.float32, device=dev)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if call.need_grad else None
    if n == 0 or p == 0:
        return loss, grad
    logits = logits.contiguous()
    ab, indices, weights = call.ab, call.indices, call.weights
    encode = indices is None
    if encode and encode_mode() == "separate":
        indices, weights = soft_encode(ab, k=call.k, sigma=call.sigma)
        encode = False
    if encode:
        ab = ab.float().contiguous()
        kk = int(call.k)
        dummy_i, dummy_w = loss, loss
    else:
        indices = indices.to(torch.int32).contiguous()
        weights = weights.float().contiguous()
        kk = indices.shape[1]
        dummy_i, dummy_w = indices, weights
    cw, im, ps = (None if t is None else t.float().contiguous()
                  for t in (call.class_weights, call.image_mask, call.pixel_scale))
    km = _kernels(dev)
    t, consts = _knn_consts(kk, dev)
    n, p, rows = _layout(n, p)
    args = (logits, ab if encode else loss, dummy_i, dummy_w,
            cw if cw is not None else loss, im if im is not None else loss, ps if ps is not None else loss,
            t.offsets, t.bins, bin_centres(dev), loss, grad if grad is not None else loss,
            p, -1.0 / (2.0 * float(call.sigma) ** 2), float(call.grad_scale))
    consts.update(ENCODE=encode, HAS_CW=cw is not None, HAS_MASK=im is not None, HAS_PS=ps is not None,
                  WRITE_GRAD=bool(call.need_grad))
    if loss_mode() == "persistent" and not rows and kk <= PERSISTENT_K_MAX:
        cfg = config("ce_persistent", logits.dtype, p, device=dev)
        tpi = triton.cdiv(p, cfg[0])
        tiles = n * tpi
        args = args[:12] + (p, tiles, tpi) + args[13:]
        pconsts = dict(consts, BP=cfg[0], QC=PERSISTENT_CLASSES)
        grid = (min(tiles, persistent_programs(dev, km.ce_persistent_kernel, args, pconsts, cfg)),)
        _launch(km.ce_persistent_kernel, grid, args, pconsts, cfg, dev)
        return loss, grad
    cfg = config("ce", logits.dtype, p, device=dev, k=kk, encode=encode)
    tpi = triton.cdiv(p, cfg[0])
    _launch(km.ce_kernel, (n * tpi,), args, dict(consts, BP=cfg[0], TPI=tpi, ROWS=rows), cfg, dev)
    return loss, grad


#: Classes per chunk of the persistent loss kernel.
PERSISTENT_CLASSES = 32
#: The largest k the persistent loss kernel takes (a larger one takes ``ce_kernel``): with a
#: SoftLabels target its k bins and weights per pixel (kept as 2k rows for the gradient sweep, with
#: the next tile's target) spilled 16-480 bytes for k = 16 and 400 bytes for k = 10 (float32, sm_80)
#: at every configuration tried (BP 32/64, 4/8 warps, caps 232/255; ptxas -v, triton 3.8).
PERSISTENT_K_MAX = 5
#: Programs per SM of the persistent loss kernel at most (and where its registers cannot be read).
PERSISTENT_PROGRAMS_PER_SM = 4
#: Programs of the persistent loss kernel in the interpreter (CPU tensors): a few, so that each
#: loops over several tiles when the tiles are small.
INTERP_PROGRAMS = 2
#: 32-bit registers per SM (sm_70 .. sm_90) and their allocation unit per warp.
REGISTERS_PER_SM = 65536
_WARP_REGISTER_UNIT = 256

_sm_count: dict[int, int] = {}
_per_sm: dict[tuple, int] = {}


def programs_per_sm(n_regs: int, num_warps: int, shared_bytes: int = 0, shared_per_sm: int = 0,
                    most: int = PERSISTENT_PROGRAMS_PER_SM) -> int:
    """How many programs of a kernel using ``n_regs`` registers per thread (and ``shared_bytes`` of
    shared memory, of ``shared_per_sm``) fit on one SM at once, at most ``most``, at least 1.
    Registers are allocated per warp in units of 256: 166 registers and 4 warps take 21504 of
    65536, so 3 programs fit (the persistent loss, f32, k = 5, sm_90: 4 were launched per SM)."""
    per_warp = -(-n_regs * 32 // _WARP_REGISTER_UNIT) * _WARP_REGISTER_UNIT
    fit = REGISTERS_PER_SM // max(1, per_warp * num_warps)
    if shared_bytes and shared_per_sm:
        fit = min(fit, shared_per_sm // shared_bytes)
    return max(1, min(most, fit))


def persistent_programs(device: torch.device, kernel=None, args=(), consts=None, cfg=None) -> int:
    """The most programs the persistent loss kernel launches on ``device``: SMs x the programs
    that fit on one SM by the registers of the compiled kernel (``kernel.warmup`` compiles it, as
    the launch would, without running it; cached per device and compile-time flags), at most
    :data:`PERSISTENT_PROGRAMS_PER_SM`; :data:`INTERP_PROGRAMS` in the interpreter. The SM count
    and the registers are host attributes: no sync."""
    if device.type != "cuda":
        return INTERP_PROGRAMS
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _sm_count:
        _sm_count[i] = torch.cuda.get_device_properties(i).multi_processor_count
    per_sm = PERSISTENT_PROGRAMS_PER_SM
    if kernel is not None:
        key = (i, tuple(sorted((consts or {}).items())), tuple(cfg or ()), tuple(str(a.dtype) for a in args
                                                                                if isinstance(a, torch.Tensor)))
        if key not in _per_sm:
            _per_sm[key] = _registers_per_sm(kernel, args, consts, cfg, i)
        per_sm = _per_sm[key]
    return _sm_count[i] * per_sm


def _registers_per_sm(kernel, args, consts, cfg, index: int) -> int:
    """:func:`programs_per_sm` of the compiled kernel (of its register cap, all of it used, when
    this triton cannot say)."""
    _, nw, maxnreg = cfg
    opts = dict(num_warps=nw) | (dict(maxnreg=maxnreg) if maxnreg and _maxnreg_ok else {})
    try:
        with torch.cuda.device(index):
            compiled = kernel.warmup(*args, grid=(1,), **consts, **opts)
            compiled._init_handles()
            props = torch.cuda.get_device_properties(index)
            smem = getattr(props, "shared_memory_per_multiprocessor", 0)
            return programs_per_sm(int(compiled.n_regs), nw, int(compiled.metadata.shared or 0), int(smem))
    except Exception:  # noqa: BLE001 - an API this triton lacks: as if every register of the cap were used
        return programs_per_sm(maxnreg or 255, nw)


def loss_mode() -> str:
    """"registers" (default: ``ce_kernel``, one program per ``BP`` pixels holding all 313 classes,
    the kernel bench/RESULTS.md measured) or "persistent" (``ce_persistent_kernel``: persistent
    programs over pixel tiles, the next tile's target encoded while this tile's logits load, the
    classes streamed in chunks of :data:`PERSISTENT_CLASSES` with a running max and sum, the k
    target entries folded into the one gradient store; checked against the reference in the
    interpreter, not yet timed on a GPU), from ``FASTCOLOR_TRITON_LOSS``."""
    mode = os.environ.get("FASTCOLOR_TRITON_LOSS", "registers").strip().lower() or "registers"
    if mode not in ("registers", "persistent"):
        raise ValueError(f"FASTCOLOR_TRITON_LOSS: expected 'registers' or 'persistent', got {mode!r}")
    return mode


def annealed_mean(x: torch.Tensor, *, T: float, is_probs: bool) -> torch.Tensor:
    """The annealed mean (float32 ``(N, 2, P)``) of ``(N, 313, P)`` logits or probabilities."""
    n, q, p = x.shape
    if q != Q:
        raise ValueError(f"x: expected {Q} classes on axis 1, got {q}")
    out = torch.empty((n, 2, p), dtype=torch.float32, device=x.device)
    if n == 0 or p == 0:
        return out
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    x = x.contiguous()
    km = _kernels(x.device)
    n, p, rows = _layout(n, p)
    args = (x, out, bin_centres(x.device), p, 1.0 / float(T))
    if decode_mode() == "stream":
        cfg = config("am_stream", x.dtype, p, device=x.device)
        tpi = triton.cdiv(p, cfg[0])
        _launch(km.annealed_mean_stream_kernel, (n * tpi,), args,
                dict(IS_PROBS=bool(is_probs), BP=cfg[0], QC=STREAM_CLASSES, TPI=tpi, ROWS=rows), cfg, x.device)
        return out
    cfg = config("am", x.dtype, p, device=x.device, probs=bool(is_probs))
    tpi = triton.cdiv(p, cfg[0])
    _launch(km.annealed_mean_kernel, (n * tpi,), args, dict(IS_PROBS=bool(is_probs), BP=cfg[0], TPI=tpi, ROWS=rows),
            cfg, x.device)
    return out


#: Classes per chunk of the streaming decode kernel.
STREAM_CLASSES = 32


def decode_mode() -> str:
    """"registers" (default: ``annealed_mean_kernel`` holds a pixel's 313 classes at once, the
    kernel bench/RESULTS.md measured) or "stream" (``annealed_mean_stream_kernel``: chunks of
    :data:`STREAM_CLASSES` classes, a running max and three running sums; checked against the
    reference in the interpreter, not yet timed on a GPU), from ``FASTCOLOR_TRITON_DECODE``."""
    mode = os.environ.get("FASTCOLOR_TRITON_DECODE", "registers").strip().lower() or "registers"
    if mode not in ("registers", "stream"):
        raise ValueError(f"FASTCOLOR_TRITON_DECODE: expected 'registers' or 'stream', got {mode!r}")
    return mode


#: Elements per program of :func:`scale_` (16 KB of float32 per program on a GPU).
SCALE_BLOCK = 4096


def scale_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad *= factor`` in place, ``factor`` a float32 ``(1,)`` tensor on grad's device, read by
    the kernel: no data moves when it is 1, and the host never reads it (no sync)."""
    if not grad.is_contiguous():
        raise ValueError("grad: expected a contiguous tensor")
    n = grad.numel()
    if n == 0:
        return
    block = SCALE_BLOCK if grad.is_cuda else max(16, min(1 << 20, 1 << (n - 1).bit_length()))
    _launch(_kernels(grad.device).scale_kernel, (triton.cdiv(n, block),), (grad, factor, n),
            dict(BLOCK=block), (block, 4, None), grad.device)
