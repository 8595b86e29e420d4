"""The class prior of a dataset and the rarity weights that rebalance the loss."""
from __future__ import annotations

import numpy as np
import torch

from fastcolor import reference
from fastcolor.gamut import Q
from fastcolor.ops._common import check_tensor
from fastcolor.ops.encode import soft_encode


def nearest_bin(ab: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Index of the nearest bin for every pixel: ``(N, 2, *S) -> (N, *S)`` int64.

    The k = 1 soft-encoding (same kernels, same tie rule and out-of-gamut handling).
    """
    check_tensor("ab", ab, channels=2)
    return soft_encode(ab.detach(), k=1, backend=backend).indices[:, 0].long()


class PriorAccumulator:
    """Streams batches of ab and counts how often each bin is the nearest one.

    Pixels with NaN/Inf ab are not counted; :attr:`skipped` says how many there were.

    >>> acc = PriorAccumulator()
    >>> for batch in loader: acc.update(batch_ab)      # any number of batches, any sizes
    >>> prior = acc.prior(smooth_sigma=5.0)            # (313,) float64, sums to 1
    >>> weights = rarity_weights(prior, lam=0.5)
    """

    def __init__(self):
        self.counts = np.zeros(Q, dtype=np.int64)
        #: Pixels left out because their ab was NaN or infinite (they have no nearest bin).
        self.skipped = 0

    def update(self, ab: torch.Tensor) -> "PriorAccumulator":
        idx = nearest_bin(ab)
        finite = torch.isfinite(ab.detach()).all(1)
        self.counts += torch.bincount(idx[finite].cpu(), minlength=Q).numpy()
        self.skipped += int(finite.numel() - finite.sum())
        return self

    @property
    def pixels(self) -> int:
        return int(self.counts.sum())

    def prior(self, smooth_sigma: float | None = 5.0) -> np.ndarray:
        """The normalised histogram, optionally smoothed over the ab plane (as the paper does)."""
        if self.pixels == 0:
            why = f" ({self.skipped} NaN/Inf pixels were skipped)" if self.skipped else ""
            raise ValueError(f"PriorAccumulator: expected at least one pixel before prior(), got none{why}")
        p = self.counts / self.pixels
        return reference.smooth_prior(p, smooth_sigma) if smooth_sigma else p


def rarity_weights(prior, lam: float = 0.5) -> np.ndarray:
    """Class-rebalancing weights ``w ~ ((1 - lam) p + lam / Q)^-1`` with ``sum p w = 1``.

    Accepts a numpy array or tensor ``(313,)``; returns float64 numpy (pass it to the loss,
    which moves it to the logits' device). Spec: :func:`fastcolor.reference.rarity_weights`.
    """
    if isinstance(prior, torch.Tensor):
        prior = prior.detach().cpu().numpy()
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape == (Q,):  # (the reference reports a wrong shape)
        bad = int((~np.isfinite(prior)).sum())
        neg = int((prior < 0).sum())
        if bad or neg or not prior.sum() > 0:
            got = f"{bad} NaN/Inf" if bad else f"{neg} negative" if neg else f"a sum of {prior.sum():g}"
            raise ValueError(f"prior: expected finite, non-negative values with a positive sum, got {got}")
        if isinstance(lam, (int, float)) and lam == 0 and (prior == 0).any():
            raise ValueError(f"lam: 0 needs every prior entry > 0 (the weight of an empty bin is infinite), "
                             f"got {int((prior == 0).sum())} empty bin(s); use lam > 0")
    return reference.rarity_weights(prior, lam)
