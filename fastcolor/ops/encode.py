"""Soft-encoding of ab onto the k nearest bins, and the sparse target type it returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastcolor import backends
from fastcolor.gamut import Q, ab_bins
from fastcolor.ops._common import check_k_sigma, check_tensor, flat


@dataclass(frozen=True)
class SoftLabels:
    """A sparse soft target: for every pixel the ``k`` nearest bins (nearest first) and weights.

    ``indices``: int32 ``(N, k, *spatial)``; ``weights``: float32 ``(N, k, *spatial)``, summing to
    1 over axis 1. This is what a data loader should hand to the GPU: k values per pixel
    instead of 313. :meth:`dense` gives the ``(N, 313, *spatial)`` distribution.
    """

    indices: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.indices, torch.Tensor) or not isinstance(self.weights, torch.Tensor):
            raise TypeError("SoftLabels: expected tensors for indices and weights")
        if self.indices.shape != self.weights.shape or self.indices.dim() < 2:
            raise ValueError(
                f"SoftLabels: expected indices and weights of one shape (N, k, ...), "
                f"got {tuple(self.indices.shape)} and {tuple(self.weights.shape)}"
            )
        if self.indices.dtype not in (torch.int16, torch.int32, torch.int64):
            raise TypeError(f"SoftLabels.indices: expected an integer tensor, got {self.indices.dtype}")

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def dense(self) -> torch.Tensor:
        """The ``(N, 313, *spatial)`` float32 distribution."""
        shape = (self.indices.shape[0], Q) + tuple(self.indices.shape[2:])
        z = torch.zeros(shape, dtype=torch.float32, device=self.indices.device)
        return z.scatter_(1, self.indices.long(), self.weights.float())

    def to(self, *args, **kwargs) -> "SoftLabels":
        """Move both tensors (e.g. ``labels.to("cuda", non_blocking=True)``); indices stay integers."""
        kwargs.pop("dtype", None)
        return SoftLabels(self.indices.to(*args, **kwargs), self.weights.to(*args, **kwargs))


@torch.library.custom_op("fastcolor::soft_encode", mutates_args=())
def _soft_encode_op(ab: torch.Tensor, k: int, sigma: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.get(backend).soft_encode(ab, k, sigma)


@_soft_encode_op.register_fake
def _(ab, k, sigma, backend):
    n, _, p = ab.shape
    return ab.new_empty((n, k, p), dtype=torch.int32), ab.new_empty((n, k, p), dtype=torch.float32)


#: Pixels with |a| or |b| beyond this lie outside the gamut of any RGB photo (sRGB spans about
#: -87..99 in a and -108..95 in b). There the float32 kernels lose the order of the bins:
#: d^2 ~ |ab|^2 swamps the few hundred that separates neighbouring bins (at |a| = 1e6 every
#: bin of the top row ties). Such pixels are re-encoded exactly, in float64.
FAR_AB = 128.0
_FAR_CHUNK = 8192


def has_far_ab(ab: torch.Tensor) -> bool:
    """Whether any finite pixel of CPU ``ab`` (N, 2, ...) lies beyond :data:`FAR_AB`.

    Always False on other devices (the answer would cost a host sync per call: there the
    kernels' float32 search stands, and puts far-off pixels on a bin of the gamut's edge
    facing them, not always the nearest one) and while torch.compile traces.
    """
    if ab.numel() == 0 or ab.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(((ab.abs() > FAR_AB) & torch.isfinite(ab)).any())


def _far_pixels(ab: torch.Tensor) -> torch.Tensor:
    """(N, 2, P) -> (N, P) mask of the finite pixels with |a| or |b| > FAR_AB."""
    return ((ab.abs() > FAR_AB).any(1)) & torch.isfinite(ab).all(1)


def encode_far_exactly(ab: torch.Tensor, idx: torch.Tensor, w: torch.Tensor | None, k: int, sigma: float) -> None:
    """Overwrite, in place, the (N, k, P) encoding of the far-off pixels of ``ab`` (N, 2, P) with
    the reference's: exact float64 distances, ties to the lower bin index, nearest first."""
    far = _far_pixels(ab)
    if not bool(far.any()):
        return
    pix = ab.movedim(1, -1)[far].double()  # (M, 2)
    bins = ab_bins(ab.device, torch.float64)
    out_i, out_w = [], []
    for start in range(0, pix.shape[0], _FAR_CHUNK):
        d2 = (pix[start:start + _FAR_CHUNK, None, :] - bins[None]).square().sum(-1)  # (m, Q)
        near, order = torch.sort(d2, dim=1, stable=True)
        near, order = near[:, :k], order[:, :k]
        out_i.append(order)
        out_w.append(torch.softmax(-(near - near[:, :1]) / (2.0 * sigma * sigma), dim=1))
    idx_v = idx.movedim(1, -1)
    idx_v[far] = torch.cat(out_i).to(idx.dtype)
    if w is not None:
        w.movedim(1, -1)[far] = torch.cat(out_w).to(w.dtype)


def soft_encode(ab: torch.Tensor, k: int = 5, sigma: float = 5.0, backend: str = "auto") -> SoftLabels:
    """Soft-encode ab ``(N, 2, *spatial)`` onto its ``k`` nearest of the 313 bins.

    Gaussian weights ``exp(-d^2 / (2 sigma^2))`` normalised per pixel (Zhang et al. 2016: k = 5,
    sigma = 5). Spec: :func:`fastcolor.reference.soft_encode`. Not differentiable. On the CPU,
    out-of-gamut pixels (|a| or |b| > :data:`FAR_AB`, up to float32's range) go onto their
    exact nearest bins; NaN/Inf ab give NaN weights.
    """
    check_tensor("ab", ab, channels=2)
    check_k_sigma(k, sigma)
    name = backends.resolve(backend, ab.device.type)
    ab_f = flat(ab, torch.float32)
    idx, w = _soft_encode_op(ab_f, k, float(sigma), name)
    if has_far_ab(ab_f):
        idx, w = idx.clone(), w.clone()
        encode_far_exactly(ab_f, idx, w, k, float(sigma))
    shape = (ab.shape[0], k) + tuple(ab.shape[2:])
    return SoftLabels(idx.reshape(shape), w.reshape(shape))
