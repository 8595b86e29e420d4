"""Backends ``cpp`` (CPU, C++/OpenMP) and ``cuda`` (CUDA kernels): the native extension ``fastcolor._C``.

One module serves both names; the tensors' device picks the implementation. ``_C`` links no
libtorch: its functions take the tensors as Python objects and read their data pointers,
shapes and dtypes (``csrc/fc_bindings.cpp``), so this module makes every tensor contiguous and
of the dtype the kernels take, allocates the outputs with torch, and passes the current CUDA
stream (or the CPU thread count). The kernels are ``csrc/fc_cpu.cpp``, ``csrc/fc_encode.cpp``
and ``kernels/fc_kernels.cu`` over the per-pixel maths of ``kernels/fc_math.cuh``; the gamut
(candidate table and bin centres) reaches them from :mod:`fastcolor.backends._tables` as
arguments. The contract is :mod:`fastcolor.backends.contract`.
"""
from __future__ import annotations

import dataclasses

import torch

from fastcolor import _ext
from fastcolor.backends._alloc import empty_cpu
from fastcolor.backends._fork import forked
from fastcolor.backends._tables import bin_centres, device_table
from fastcolor.backends.contract import LossCall
from fastcolor.gamut import Q

SUPPORTS_FLOAT64 = False

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
            return ("fastcolor._C was built without CUDA kernels (nvcc was not found at build time, "
                    "or FASTCOLOR_NO_CUDA was set)")
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None
    return f"no compiled kernels for device type {device_type!r}"


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _where(t: torch.Tensor) -> dict:
    """Where ``_C`` runs: the CPU thread count (1 in a forked process, see
    :mod:`fastcolor.backends._fork`), or the current stream of the tensor's device."""
    if t.is_cuda:
        return {"stream": torch.cuda.current_stream(t.device).cuda_stream}
    return {"nthreads": 1 if forked() else torch.get_num_threads()}


def _check_logits(x: torch.Tensor, what: str) -> None:
    if x.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{what}: backend 'cpp'/'cuda' takes float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 3 or x.shape[1] != Q:
        raise ValueError(f"{what}: expected shape (N, {Q}, P), got {tuple(x.shape)}")


def soft_encode(ab: torch.Tensor, *, k: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    ab = ab.to(torch.float32).contiguous()
    n, _, p = ab.shape
    idx = torch.empty((n, k, p), dtype=torch.int32, device=ab.device)
    w = torch.empty((n, k, p), dtype=torch.float32, device=ab.device)
    if n * p == 0:
        return idx, w
    _lib().soft_encode(ab, idx, w, device_table(k, ab.device), bin_centres(ab.device), float(sigma), **_where(ab))
    return idx, w


def ce_forward(call: LossCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_logits(call.logits, "logits")
    x = call.logits.contiguous()
    n, _, p = x.shape
    loss = torch.empty((n, p), dtype=torch.float32, device=x.device)
    grad = None
    if call.need_grad:
        grad = torch.empty_like(x) if x.is_cuda else empty_cpu(tuple(x.shape), x.dtype, reuse=True)
    if n * p == 0:
        return loss, grad
    if call.ab is not None and x.is_cuda:
        # The CUDA loss kernel takes precomputed targets: the encode kernel runs first (the
        # same per-pixel search), k * 8 bytes per pixel written and read back.
        idx, w = soft_encode(call.ab, k=call.k, sigma=call.sigma)
        call = dataclasses.replace(call, ab=None, indices=idx, weights=w)
    # Temporaries (casts) are made on the current stream, which the kernel runs on: the
    # caching allocator cannot hand their memory out before the kernel is done with it.
    call = dataclasses.replace(
        call, logits=x, ab=_f32(call.ab),
        indices=None if call.indices is None else call.indices.to(torch.int32).contiguous(),
        weights=_f32(call.weights), class_weights=_f32(call.class_weights),
        image_mask=_f32(call.image_mask), pixel_scale=_f32(call.pixel_scale),
    )
    table = centres = None
    if call.ab is not None:
        table, centres = device_table(call.k, x.device), bin_centres(x.device)
    _lib().ce_forward(call, loss, grad, table, centres, **_where(x))
    return loss, grad


def annealed_mean(x: torch.Tensor, *, T: float, is_probs: bool) -> torch.Tensor:
    _check_logits(x, "probs" if is_probs else "logits")
    x = x.contiguous()
    n, _, p = x.shape
    out = torch.empty((n, 2, p), dtype=torch.float32, device=x.device)
    if n * p == 0:
        return out
    _lib().annealed_mean(x, out, bin_centres(x.device), float(T), bool(is_probs), **_where(x))
    return out


def scale_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """The fused loss's backward, ``grad *= factor`` in place, ``factor`` a float32 ``(1,)`` tensor
    on grad's device. On CUDA the kernel reads it (no host sync) and moves no data when it is 1 (a
    plain ``loss.backward()``; before, the cuda backend multiplied the whole gradient by 1: a read
    and a write of N x 313 x P); CPU tensors (the tests' device route) take one multiply."""
    if grad.is_cuda and hasattr(_lib(), "scale_"):
        if not grad.is_contiguous():
            raise ValueError("grad: expected a contiguous tensor")
        _lib().scale_(grad, factor.to(device=grad.device, dtype=torch.float32).reshape(1),
                      stream=torch.cuda.current_stream(grad.device).cuda_stream)
        return
    grad.mul_(factor.to(grad.dtype))
