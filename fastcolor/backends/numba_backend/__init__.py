"""The numba backend: fused, tiled CPU kernels compiled by numba (``@njit(parallel=True)``).

The contract (:mod:`fastcolor.backends.contract`) is implemented here; the kernels live in:

* :mod:`._jit`: the numba import, JIT decorators, the on-disk cache (a per-user folder, one
  stamp for the whole package; :func:`cache_status`), the LLVM intrinsics (bit conversions,
  atomic claim).
* :mod:`._math`: float32 ``fexp`` / ``flog`` that vectorise (the CPU exp/log rule), tile max.
* :mod:`.encode`: the k-nearest-bin search of :func:`fastcolor.gamut.candidate_table`, shared
  by ``soft_encode`` and the loss's on-the-fly encoding.
* :mod:`.loss`: the fused cross-entropy + gradient.  :mod:`.decode`: the annealed mean.
* :mod:`._launch`: threads (dynamic chunks from an atomic counter, serial when tiny or forked).

Layout: ``(N, C, P)`` contiguous, class stride ``P``. Every kernel walks *tiles* of ``TILE``
contiguous pixels of one image; inside a tile the loops run over classes (outer) and pixels
(inner), so the inner loops are contiguous and LLVM vectorises them (AVX2 / AVX-512).

Memory: the gradient is the only array of size ``N x 313 x P``; it is allocated on
transparent huge pages when large (:func:`fastcolor.backends._alloc.empty_cpu`) and, float32
and aligned, written with non-temporal stores (:func:`streams_gradient`); other buffers are
per thread (``313 x TILE`` floats) or per tile.

Half precision: numba has no bfloat16. 16-bit logits are passed as their bits, float16 as
int16 and bfloat16 as uint16; ``_jit.widen`` turns them into float32 and ``_jit.narrow``
rounds float32 back. So each kernel has one specialisation per logits dtype.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from fastcolor.backends._alloc import empty_cpu
from fastcolor.backends.contract import LossCall
from fastcolor.backends.numba_backend import _jit
from fastcolor.backends.numba_backend._jit import CACHE, IMPORT_ERROR, X86_64
from fastcolor.backends.numba_backend._launch import SERIAL_MAX_TILES, TILE, launch
from fastcolor.gamut import K_MAX

if IMPORT_ERROR is None:
    from fastcolor.backends.numba_backend.decode import annealed_kernel, annealed_worker
    from fastcolor.backends.numba_backend.encode import _BA, _BB, encoder_args, soft_encode_kernel, soft_encode_worker
    from fastcolor.backends.numba_backend.loss import ce_kernel, ce_worker

__all__ = ["unavailable_reason", "soft_encode", "ce_forward", "annealed_mean", "SUPPORTS_FLOAT64", "TILE",
           "K_MAX", "CACHE", "cache_status"]

#: float64 logits are not taken (the ops layer converts them to float32).
SUPPORTS_FLOAT64 = False


def cache_status() -> dict:
    """Where numba's on-disk cache of these kernels is, and whether it is warm (every entry
    kernel, parallel and serial, compiled there for at least one input type): see
    :func:`._jit.cache_status`. ``fastcolor info`` prints it."""
    kernels = () if IMPORT_ERROR is not None else (
        soft_encode_kernel, soft_encode_worker, ce_kernel, ce_worker, annealed_kernel, annealed_worker)
    return _jit.cache_status(kernels)


def unavailable_reason(device_type: str) -> str | None:
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if device_type != "cpu":
        return f"numba kernels run on cpu tensors, not {device_type}"
    return None


#: logits dtype -> the dtype of the numpy view the kernels get (numba has no bfloat16)
_VIEWS = {torch.float32: torch.float32, torch.float16: torch.int16, torch.bfloat16: torch.uint16}

#: see :func:`streams_gradient`
_STREAM_OK = X86_64 and os.environ.get("FASTCOLOR_STREAM_STORES", "1") != "0"

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


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not 1 <= int(k) <= K_MAX:
        raise ValueError(f"k: the numba backend takes 1 <= k <= {K_MAX}, got {k}")
    return int(k)


def soft_encode(ab: torch.Tensor, *, k: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, p = ab.shape
    k = _check_k(k)
    idx = torch.empty((n, k, p), dtype=torch.int32)
    w = torch.empty((n, k, p), dtype=torch.float32)
    if n * p == 0:
        return idx, w
    ntiles = n * ((p + TILE - 1) // TILE)
    launch(soft_encode_kernel, soft_encode_worker, ntiles, _f32(ab), k, encoder_args(k, float(sigma)),
           idx.view(-1).numpy(), w.view(-1).numpy(), n, p, serial_max=8 * SERIAL_MAX_TILES)
    return idx, w


def ce_forward(call: LossCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, q, p = call.shape
    need_grad = bool(call.need_grad)
    use_ab = call.indices is None
    k = _check_k(call.k if use_ab else call.indices.shape[1])
    loss = torch.empty((n, p), dtype=torch.float32)
    grad = empty_cpu((n, q, p), call.logits.dtype, reuse=True) if need_grad else None
    if n * p == 0:
        return loss, grad
    x = _logits_view(call.logits)
    g = _logits_view(grad) if need_grad else x[:0]
    if use_ab:
        ab_np, idx_np, w_np = _f32(call.ab), _EMPTY_I32, _EMPTY_F32
    else:
        ab_np = _EMPTY_F32
        idx_np = call.indices.detach().to(torch.int32).contiguous().reshape(-1).numpy()
        w_np = _f32(call.weights)
    ntiles = n * ((p + TILE - 1) // TILE)
    gs = g if need_grad and streams_gradient(grad) else _EMPTY_F32
    # (enc is passed either way, so that both targets share one specialisation of the types)
    launch(ce_kernel, ce_worker, ntiles, x, ab_np, idx_np, w_np, use_ab, k, encoder_args(k, float(call.sigma)),
           _f32(call.class_weights), _f32(call.image_mask), _f32(call.pixel_scale), np.float32(call.grad_scale),
           need_grad, gs, loss.view(-1).numpy(), g, n, p)
    return loss, grad


def streams_gradient(grad: torch.Tensor) -> bool:
    """Whether the loss kernel writes ``grad`` (N, 313, P) with non-temporal stores: float32,
    32-byte aligned, ``P % 8 == 0`` (every tile's class rows then start 32-byte aligned),
    on x86-64 (elsewhere LLVM would lower the vector store without the hint anyway), and
    ``FASTCOLOR_STREAM_STORES`` not ``0``."""
    return (_STREAM_OK and grad.dtype == torch.float32 and grad.data_ptr() % 32 == 0
            and grad.shape[-1] % 8 == 0)


def annealed_mean(x: torch.Tensor, *, T: float, is_probs: bool) -> torch.Tensor:
    n, _, p = x.shape
    out = torch.empty((n, 2, p), dtype=torch.float32)
    if n * p == 0:
        return out
    if x.dtype not in _VIEWS:
        x = x.float()
    xv = _logits_view(x)
    ntiles = n * ((p + TILE - 1) // TILE)
    launch(annealed_kernel, annealed_worker, ntiles, xv, np.float32(1.0 / T), bool(is_probs), _BA, _BB,
           out.view(-1).numpy(), n, p)
    return out
