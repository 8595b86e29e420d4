"""Soft-encoding of ab onto the k nearest bins, and the sparse target type it returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastcolor import backends
from fastcolor.gamut import Q
from fastcolor.ops._common import check_finite_non_negative, check_k_sigma, check_tensor, flat


@dataclass(frozen=True)
class SoftLabels:
    """A sparse soft target: for every pixel the ``k`` nearest bins (nearest first) and weights.

    ``indices``: int32 ``(N, k, *spatial)``; ``weights``: float32 ``(N, k, *spatial)``, summing to
    1 over axis 1. This is what a data loader should hand to the GPU: k values per pixel
    instead of 313. :meth:`dense` gives the ``(N, 313, *spatial)`` distribution.

    :func:`soft_encode` returns one; built by hand, the indices must be integers (int16, int32 or
    int64) in 0..312 (the loss checks that) and the weights finite and non-negative (checked here
    for CPU tensors; a check of a GPU tensor's values would cost a host sync).

    Example:
        >>> import torch, fastcolor
        >>> ab = torch.zeros(2, 2, 4, 4)                 # ab (N, 2, H, W) in Lab units: all grey
        >>> labels = fastcolor.soft_encode(ab, k=5)
        >>> labels.k, labels.indices.shape, labels.weights.dtype
        (5, torch.Size([2, 5, 4, 4]), torch.float32)
        >>> dense = labels.dense()                       # (N, 313, H, W), sums to 1 over the bins
        >>> dense.shape, dense.sum(1).allclose(torch.ones(2, 4, 4))
        (torch.Size([2, 313, 4, 4]), True)
        >>> one_hot = fastcolor.SoftLabels(indices=torch.full((1, 1, 2, 2), 120, dtype=torch.int32),
        ...                                weights=torch.ones(1, 1, 2, 2))   # k = 1: bin 120 = (0, 0)
        >>> one_hot.dense()[0, 120].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
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
            small = " (too narrow for bin 312)" if self.indices.dtype in (torch.uint8, torch.int8) else ""
            raise TypeError(f"SoftLabels.indices: expected bin indices 0..{Q - 1} as int16, int32 or int64, got "
                            f"{self.indices.dtype}{small}")
        if not self.weights.is_floating_point():
            raise TypeError(f"SoftLabels.weights: expected a floating tensor, got {self.weights.dtype}")
        if self.weights.device.type == "cpu" and self.weights.numel():  # (no host sync on a GPU)
            check_finite_non_negative("SoftLabels.weights", self.weights)

    @classmethod
    def _of_kernel(cls, indices: torch.Tensor, weights: torch.Tensor) -> SoftLabels:
        """Wrap an encoder's output without the value checks (its NaN weights for NaN ab are
        the documented answer, not bad input)."""
        labels = object.__new__(cls)
        object.__setattr__(labels, "indices", indices)
        object.__setattr__(labels, "weights", weights)
        return labels

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def dense(self) -> torch.Tensor:
        """The ``(N, 313, *spatial)`` float32 distribution; a bin listed twice for a pixel gets the
        sum of its weights (as :func:`fastcolor.reference.densify`, and every loss backend)."""
        shape = (self.indices.shape[0], Q) + tuple(self.indices.shape[2:])
        z = torch.zeros(shape, dtype=torch.float32, device=self.indices.device)
        return z.scatter_add_(1, self.indices.long(), self.weights.float())

    def to(self, *args, **kwargs) -> SoftLabels:
        """Move both tensors (e.g. ``labels.to("cuda", non_blocking=True)``); indices stay integers."""
        kwargs.pop("dtype", None)
        return SoftLabels._of_kernel(self.indices.to(*args, **kwargs), self.weights.to(*args, **kwargs))


@torch.library.custom_op("fastcolor::soft_encode", mutates_args=())
def _soft_encode_op(ab: torch.Tensor, k: int, sigma: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.get(backend).soft_encode(ab, k=k, sigma=sigma)


@_soft_encode_op.register_fake
def _(ab, k, sigma, backend):
    n, _, p = ab.shape
    return ab.new_empty((n, k, p), dtype=torch.int32), ab.new_empty((n, k, p), dtype=torch.float32)


def soft_encode(ab: torch.Tensor, k: int = 5, sigma: float = 5.0, backend: str = "auto") -> SoftLabels:
    """Soft-encode ab ``(N, 2, *spatial)`` onto its ``k`` nearest of the 313 bins.

    Gaussian weights ``exp(-d^2 / (2 sigma^2))`` normalised per pixel (Zhang et al. 2016: k = 5,
    sigma = 5). Spec: :func:`fastcolor.reference.soft_encode`. Not differentiable. The fast
    backends give the reference's bins for any float32 ab, far outside the gamut included, and
    NaN weights on bins 0..k-1 for NaN/Inf ab (the rule: :mod:`fastcolor.gamut`); the torch
    baseline is plain float32 ``topk``, whose order among near-equal distances (and so for ab
    far outside the gamut) may differ.

    Args:
        ab: ``(N, 2, *spatial)`` floating ab in Lab units (channel 0 = a, 1 = b; the gamut spans
            about -110..100), e.g. ``(N, 2, H/4, W/4)`` at the network's output resolution.
        k: bins per pixel, an integer in 1..16.
        sigma: Gaussian width in ab units (positive).
        backend: ``"auto"`` (the fastest available for the tensor's device) or a backend name.

    Returns:
        :class:`SoftLabels` with int32 indices and float32 weights, both ``(N, k, *spatial)``.

    Example:
        >>> import torch, fastcolor
        >>> ab = torch.tensor([[[[0.0, 40.0], [-20.0, 3.0]],     # a
        ...                     [[0.0, 20.0], [60.0, -2.0]]]])   # b: (N, 2, H, W) = (1, 2, 2, 2)
        >>> labels = fastcolor.soft_encode(ab, k=5, sigma=5.0)
        >>> labels.indices.shape, labels.indices.dtype
        (torch.Size([1, 5, 2, 2]), torch.int32)
        >>> labels.indices[0, 0]                          # the nearest bin of each pixel
        tensor([[120, 198],
                [ 91, 120]], dtype=torch.int32)
        >>> fastcolor.AB_BINS[198].tolist()               # its centre (a, b)
        [40.0, 20.0]
        >>> # ab (0, 0) is bin 120's centre; its 4 neighbours, 10 away, weigh exp(-100 / 50) as much
        >>> [round(w, 4) for w in labels.weights[0, :, 0, 0].tolist()]
        [0.6488, 0.0878, 0.0878, 0.0878, 0.0878]
    """
    check_tensor("ab", ab, channels=2)
    k, sigma = check_k_sigma(k, sigma)
    name = backends.resolve(backend, ab.device.type)
    ab_f = flat(ab.detach(), torch.float32)
    if torch.compiler.is_compiling():  # the graph holds the custom op, with its fake implementation
        idx, w = _soft_encode_op(ab_f, k, sigma, name)
    else:  # eager: the backend directly, without the custom-op dispatch (tests/test_syncs.py times it)
        idx, w = backends.get(name).soft_encode(ab_f, k=k, sigma=sigma)
    shape = (ab.shape[0], k) + tuple(ab.shape[2:])
    return SoftLabels._of_kernel(idx.reshape(shape), w.reshape(shape))
