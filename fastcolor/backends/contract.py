"""The typed contract between the public ops (:mod:`fastcolor.ops`) and every backend.

A backend is a module (or package) with four functions; the ops validate and flatten the
user's tensors (``P`` = pixels per image, spatial axes flattened) and call them as:

``unavailable_reason(device_type: str) -> str | None``
    None when the backend can run on that device type ("cpu" or "cuda"), else a sentence
    naming what is missing.

``soft_encode(ab, *, k, sigma) -> (indices, weights)``
    ``ab``: float32 contiguous ``(N, 2, P)``. Returns int32 ``(N, k, P)`` bin indices,
    nearest first (ties: lower bin index), and float32 ``(N, k, P)`` Gaussian weights summing
    to 1. Fast backends search :func:`fastcolor.gamut.candidate_table` (see
    :mod:`fastcolor.gamut` for the one rule for pixels outside it and for NaN/Inf).

``ce_forward(call: LossCall) -> (loss, grad)``
    The fused class-rebalanced cross-entropy; see :class:`LossCall`. Returns float32 ``(N, P)``
    per-pixel loss ``s_np m_n v_np * -sum_{q in target} Z_nqp log softmax_nqp`` and, when
    ``call.need_grad``, the gradient ``grad_scale * s_np m_n v_np (softmax_nqp - Z_nqp)`` in the
    logits' dtype and shape (None otherwise). Arithmetic is float32 whatever the logits' dtype.

``annealed_mean(x, *, T, is_probs) -> ab``
    ``x``: contiguous ``(N, 313, P)`` logits (or probabilities when ``is_probs``),
    ``T >= 1e-6``. Returns float32 ``(N, 2, P)``.

Optional: ``scale_(grad, factor) -> None``
    ``grad *= factor`` in place (contiguous ``(N, 313, P)``), ``factor`` a float32 ``(1,)``
    tensor on grad's device that the kernel reads, moving no data when it is 1 (the fused
    loss's backward: no host read of ``grad_output``). Without it the ops multiply with torch.

A backend that takes float64 logits sets ``SUPPORTS_FLOAT64 = True``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossCall:
    """One call of the fused loss, every tensor already flat, contiguous and on one device.

    Exactly one of ``ab`` and (``indices``, ``weights``) is given.
    """

    #: ``(N, 313, P)`` float32 / float16 / bfloat16 logits (float64 where the backend says so).
    logits: torch.Tensor
    #: ``(N, 2, P)`` float32 target ab, soft-encoded inside the kernel with ``k`` and ``sigma``.
    ab: torch.Tensor | None = None
    #: ``(N, k, P)`` int32 precomputed target bins (with ``weights``), instead of ``ab``.
    indices: torch.Tensor | None = None
    #: ``(N, k, P)`` float32 precomputed target weights.
    weights: torch.Tensor | None = None
    #: ``(313,)`` float32 rarity weights v; None means v = 1.
    class_weights: torch.Tensor | None = None
    #: ``(N,)`` float32 per-image factor m (the nongray mask); None means m = 1.
    image_mask: torch.Tensor | None = None
    #: ``(N, P)`` float32 per-pixel factor s (an upstream gradient); None means s = 1.
    pixel_scale: torch.Tensor | None = None
    #: Bins per pixel of the target (the precomputed target's axis 1 when ``indices`` is given).
    k: int = 5
    #: Gaussian width of the soft-encoding, in ab units.
    sigma: float = 5.0
    #: Factor applied to the gradient only (1 / pixels for a mean reduction).
    grad_scale: float = 1.0
    #: Whether to compute and return the gradient.
    need_grad: bool = True

    def __post_init__(self):
        if (self.ab is None) == (self.indices is None):
            raise ValueError("LossCall: expected exactly one of ab and indices")
        if (self.indices is None) != (self.weights is None):
            raise ValueError("LossCall: indices and weights come together")
        if self.indices is not None and self.indices.shape[1] != self.k:
            raise ValueError(f"LossCall: k={self.k} but indices have {self.indices.shape[1]} bins per pixel")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N, Q, P)`` of the logits."""
        n, q, p = self.logits.shape
        return n, q, p
