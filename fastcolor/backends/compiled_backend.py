"""Backends ``cpp`` (CPU, C++/OpenMP) and ``cuda`` (CUDA kernels): the native extension ``fastcolor._C``.

One module serves both names; the tensors' device picks the implementation. ``_C`` takes raw
data pointers, sizes and a dtype code (no libtorch), so this module makes every tensor
contiguous, allocates the outputs with torch, and passes the current CUDA stream. The
kernels are ``csrc/fc_cpu.cpp`` and ``kernels/fc_kernels.cu`` over the per-pixel maths of
``kernels/fc_math.cuh``; the contract is in :mod:`fastcolor.backends`.
"""
from __future__ import annotations

import torch

from fastcolor import _ext
from fastcolor.backends._alloc import empty_cpu
from fastcolor.gamut import Q

SUPPORTS_FLOAT64 = False

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}




def _lib():
    return _ext.load_extension()


def unavailable_reason(device_type: str) -> str | None:
    lib = _lib()
    if lib is None:
        return f"the native extension fastcolor._C is not available: {_ext.build_info()['reason']}"
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not getattr(lib, "has_cuda_kernels", False):
            return "fastcolor._C was built without CUDA kernels (nvcc was not found at build time, or FASTCOLOR_NO_CUDA was set)"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None
    return f"no compiled kernels for device type {device_type!r}"


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _threads() -> int:
    return torch.get_num_threads()


def _cuda(t: torch.Tensor) -> tuple[int, int]:
    """(device index, current stream handle) for a CUDA tensor."""
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


def _dtype_code(x: torch.Tensor) -> int:
    try:
        return _DTYPE_CODE[x.dtype]
    except KeyError:
        raise TypeError(f"logits: backend 'cpp'/'cuda' takes float32, float16 or bfloat16, got {x.dtype}") from None


def soft_encode(ab: torch.Tensor, k: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _lib()
    ab = ab.to(torch.float32).contiguous()
    n, _, p = ab.shape
    idx = torch.empty((n, k, p), dtype=torch.int32, device=ab.device)
    w = torch.empty((n, k, p), dtype=torch.float32, device=ab.device)
    if n * p == 0:
        return idx, w
    if ab.is_cuda:
        lib.cuda_soft_encode(_ptr(ab), _ptr(idx), _ptr(w), n, p, int(k), float(sigma), *_cuda(ab))
    else:
        lib.cpu_soft_encode(_ptr(ab), _ptr(idx), _ptr(w), n, p, int(k), float(sigma), _threads())
    return idx, w


def ce_forward(logits, ab, indices, weights, class_weights, image_mask, k, sigma, grad_scale, need_grad, pixel_scale=None):
    lib = _lib()
    code = _dtype_code(logits)
    x = logits.contiguous()
    n, q, p = x.shape
    if q != Q:
        raise ValueError(f"logits: expected {Q} classes on axis 1, got shape {tuple(x.shape)}")
    loss = torch.empty((n, p), dtype=torch.float32, device=x.device)
    grad = (torch.empty_like(x) if x.is_cuda else empty_cpu(tuple(x.shape), x.dtype)) if need_grad else None
    if n * p == 0:
        return loss, grad
    if indices is None and x.is_cuda:  # the CUDA loss kernel takes precomputed targets
        indices, weights = soft_encode(ab, k, sigma)
    if indices is not None:
        indices = indices.to(torch.int32).contiguous()
        weights = _f32(weights)
        k = indices.shape[1]
        ab = None
    else:
        ab = _f32(ab)
    # Temporaries (casts) are made on the current stream, which the kernel runs on: the
    # caching allocator cannot hand their memory out before the kernel is done with it.
    cw, m, ps = _f32(class_weights), _f32(image_mask), _f32(pixel_scale)
    args = (_ptr(x), code, _ptr(ab), _ptr(indices), _ptr(weights), _ptr(cw), _ptr(m), _ptr(ps), _ptr(loss),
            _ptr(grad), n, p, int(k), float(sigma), float(grad_scale))
    if x.is_cuda:
        lib.cuda_ce_forward(*args, *_cuda(x))
    else:
        lib.cpu_ce_forward(*args, _threads())
    return loss, grad


def annealed_mean(x: torch.Tensor, T: float, is_probs: bool) -> torch.Tensor:
    lib = _lib()
    code = _dtype_code(x)
    x = x.contiguous()
    n, _, p = x.shape
    out = torch.empty((n, 2, p), dtype=torch.float32, device=x.device)
    if n * p == 0:
        return out
    if x.is_cuda:
        lib.cuda_annealed_mean(_ptr(x), code, _ptr(out), n, p, float(T), bool(is_probs), *_cuda(x))
    else:
        lib.cpu_annealed_mean(_ptr(x), code, _ptr(out), n, p, float(T), bool(is_probs), _threads())
    return out
