"""The triton backend: fused kernels for CUDA GPUs (and CPU tensors under the interpreter).

Implements the backend contract of :mod:`fastcolor.backends` with the kernels of
:mod:`fastcolor.backends.triton_backend.kernels`:

* ``ce_forward``: one read of the logits, one write of the per-pixel loss and of the gradient,
  the target soft-encoded on the fly (or read from precomputed ``indices``/``weights``);
* ``annealed_mean``: one read of the logits or probabilities;
* ``soft_encode``: the k nearest bins and their weights.

CPU tensors run on Triton's interpreter (slow, sequential, for tests on machines without a
GPU). It is allowed only when ``TRITON_INTERPRET=1`` is set; the kernels used for CPU tensors are
always interpreted ones, built on first use whatever the variable said when triton was imported,
so the order in which test modules import this backend does not matter.

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

from fastcolor.gamut import AB_BINS, CELL_TO_BIN, Q

try:  # an optional dependency: the registry reports the reason when it is missing
    import triton
except ImportError as _exc:  # pragma: no cover - exercised where triton is absent
    triton = None
    _IMPORT_ERROR = f"triton is not installed ({_exc})"
else:
    _IMPORT_ERROR = None

SUPPORTS_FLOAT64 = False

#: experiment hook: {"ce" | "am" | "enc": (BP, num_warps[, maxnreg])}
CONFIG_OVERRIDE: dict[str, tuple] = {}

_lock = threading.Lock()
_kernel_modules: dict[bool, object] = {}
_tables: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


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


def _device_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell table int32 (20*22,), bins table float32 (2, 512): a row, b row, zero beyond 313)."""
    key = (device.type, device.index)
    t = _tables.get(key)
    if t is None:
        cells = torch.tensor(CELL_TO_BIN.reshape(-1), dtype=torch.int32).to(device)
        bins = torch.zeros(2, 512, dtype=torch.float32)
        bins[:, :Q] = torch.tensor(AB_BINS.T, dtype=torch.float32)
        t = (cells, bins.to(device))
        _tables[key] = t
    return t


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


def config(kind: str, dtype: torch.dtype, p: int = 0) -> tuple[int, int, int | None]:
    """(pixels per program BP, warps, register cap or None) of kernel ``kind`` ("ce", "am", "enc").

    The loss and decode programs hold 320 x BP logits in registers: 80 per thread for BP = 32 and
    4 warps, whatever the dtype. Capped at 168 registers (no spills for k <= 10, ptxas for sm_90),
    three programs fit on an SM (12 warps, 120 KB of logits in flight). BP = 32 gives each class row
    a 128 B (float32) / 64 B (16-bit) contiguous, aligned segment when P % 32 == 0.
    When ``P % 16 != 0`` triton cannot prove the rows aligned, loads one element at a time with one
    64-bit address each, and BP = 32 would spill: such odd images take BP = 16.
    The 16-bit decode (read only, no gradient to keep) takes BP = 64: 160 logits per thread, 231
    registers, two programs per SM, and a third fewer instructions per logit than BP = 32 (16 vs 23
    by ptxas for sm_90), which matters at 2 bytes a logit.
    The encode kernel's BP = 32 * warps gives every thread one pixel's whole candidate window, so
    its k rounds of argmin never leave the thread.
    """
    over = CONFIG_OVERRIDE.get(kind) or _parse_env_config().get(kind)
    if over:
        return tuple(over) + (None,) * (3 - len(over))
    if kind == "enc":
        return (128, 4, None)
    if p % 16:
        return (16, 4, None)
    if kind == "am" and dtype != torch.float32:
        return (64, 4, None)
    return (32, 4, 168)


def encode_mode() -> str:
    """"fused" (default: the loss kernel encodes ab itself) or "separate" (the encode kernel writes
    indices and weights, the loss kernel reads them), from ``FASTCOLOR_TRITON_ENCODE``."""
    mode = os.environ.get("FASTCOLOR_TRITON_ENCODE", "fused").strip().lower() or "fused"
    if mode not in ("fused", "separate"):
        raise ValueError(f"FASTCOLOR_TRITON_ENCODE: expected 'fused' or 'separate', got {mode!r}")
    return mode


def _knn_params(k: int) -> dict:
    kp = max(2, 1 << (k - 1).bit_length())
    r = 2 if k <= 12 else 3  # 5 x 5 cells hold the 12 nearest of any point inside the gamut
    side = 2 * r + 1
    win = 1 << (side * side - 1).bit_length()
    return dict(K=k, KP=kp, R=r, SIDE=side, WIN=win)


_maxnreg_ok = True


def _launch(kernel, grid, args, consts, cfg, device):
    global _maxnreg_ok
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


def soft_encode(ab: torch.Tensor, k: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, p = ab.shape
    idx = torch.empty((n, k, p), dtype=torch.int32, device=ab.device)
    w = torch.empty((n, k, p), dtype=torch.float32, device=ab.device)
    if n == 0 or p == 0:
        return idx, w
    ab = ab.float().contiguous()
    km = _kernels(ab.device)
    cells, bins = _device_tables(ab.device)
    cfg = config("enc", torch.float32)
    grid = (triton.cdiv(p, cfg[0]), n)
    _launch(km.encode_kernel, grid, (ab, idx, w, cells, bins, p, 1.0 / (2.0 * float(sigma) ** 2)),
            dict(**_knn_params(k), BP=cfg[0]), cfg, ab.device)
    return idx, w


def ce_forward(logits, ab, indices, weights, class_weights, image_mask, k, sigma, grad_scale, need_grad,
               pixel_scale=None):
    n, q, p = logits.shape
    if q != Q:
        raise ValueError(f"logits: expected {Q} classes on axis 1, got {q}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits: the triton backend takes float32, float16 or bfloat16, got {logits.dtype}")
    dev = logits.device
    loss = torch.empty((n, p), dtype=torch.float32, device=dev)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else None
    if n == 0 or p == 0:
        return loss, grad
    logits = logits.contiguous()
    encode = indices is None
    if encode and encode_mode() == "separate":
        indices, weights = soft_encode(ab, int(k), sigma)
        encode = False
    if encode:
        if ab is None:
            raise ValueError("ce_forward: expected ab or (indices, weights)")
        ab = ab.float().contiguous()
        kk = int(k)
        dummy_i, dummy_w = loss, loss
    else:
        indices = indices.to(torch.int32).contiguous()
        weights = weights.float().contiguous()
        kk = indices.shape[1]
        dummy_i, dummy_w = indices, weights
    cw = class_weights.float().contiguous() if class_weights is not None else None
    im = image_mask.float().contiguous() if image_mask is not None else None
    ps = pixel_scale.float().contiguous() if pixel_scale is not None else None
    km = _kernels(dev)
    cells, bins = _device_tables(dev)
    cfg = config("ce", logits.dtype, p)
    grid = (triton.cdiv(p, cfg[0]), n)
    args = (logits, ab if encode else loss, dummy_i, dummy_w,
            cw if cw is not None else loss, im if im is not None else loss, ps if ps is not None else loss,
            cells, bins, loss, grad if grad is not None else loss,
            p, 1.0 / (2.0 * float(sigma) * float(sigma)), float(grad_scale))
    consts = dict(**_knn_params(kk), ENCODE=encode, HAS_CW=cw is not None, HAS_MASK=im is not None,
                  HAS_PS=ps is not None, WRITE_GRAD=bool(need_grad), BP=cfg[0])
    _launch(km.ce_kernel, grid, args, consts, cfg, dev)
    return loss, grad


def annealed_mean(x: torch.Tensor, T: float, is_probs: bool) -> torch.Tensor:
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
    _, bins = _device_tables(x.device)
    cfg = config("am", x.dtype, p)
    grid = (triton.cdiv(p, cfg[0]), n)
    _launch(km.annealed_mean_kernel, grid, (x, out, bins, p, 1.0 / float(T)),
            dict(IS_PROBS=bool(is_probs), BP=cfg[0]), cfg, x.device)
    return out
