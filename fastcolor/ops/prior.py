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

    Args:
        ab: ``(N, 2, *spatial)`` floating ab in Lab units (channel 0 = a, 1 = b).
        backend: ``"auto"`` (the fastest available for the tensor's device) or a backend name.

    Returns:
        int64 ``(N, *spatial)`` bin indices in 0..312, rows of :data:`fastcolor.AB_BINS`.

    Example:
        >>> import torch, fastcolor
        >>> ab = torch.tensor([[[[0.0, 40.0], [-20.0, 3.0]],     # a
        ...                     [[0.0, 20.0], [60.0, -2.0]]]])   # b: (N, 2, H, W) = (1, 2, 2, 2)
        >>> q = fastcolor.nearest_bin(ab)
        >>> q
        tensor([[[120, 198],
                 [ 91, 120]]])
        >>> fastcolor.AB_BINS[q[0, 1, 1]].tolist()        # (3, -2) rounds to the grey bin (0, 0)
        [0.0, 0.0]
    """
    check_tensor("ab", ab, channels=2)
    return soft_encode(ab.detach(), k=1, backend=backend).indices[:, 0].long()


class PriorAccumulator:
    """Streams batches of ab and counts how often each bin is the nearest one.

    Pixels with NaN/Inf ab are not counted; :attr:`skipped` says how many there were.
    :meth:`update` takes ab ``(N, 2, *spatial)`` in Lab units, any batch size and resolution, on
    any device (the counts live on the host, an int64 numpy ``(313,)`` array, :attr:`counts`);
    :meth:`prior` gives the normalised histogram, float64 ``(313,)``, Gaussian-smoothed with
    ``smooth_sigma`` in ab units (5, as in the paper; None for the raw frequencies), ready for
    :func:`rarity_weights`.

    Example:
        >>> import torch, fastcolor
        >>> acc = fastcolor.PriorAccumulator()
        >>> ab = torch.zeros(2, 2, 4, 4)                  # ab (N, 2, H, W) in Lab units
        >>> ab[1, 0], ab[1, 1] = 40.0, 20.0               # image 1: bin 198; image 0: grey, bin 120
        >>> ab[0, :, 0, 0] = float("nan")                 # a pixel without a nearest bin
        >>> _ = acc.update(ab).update(torch.zeros(1, 2, 3, 5))   # any number of batches, any sizes
        >>> acc.pixels, acc.skipped, int(acc.counts[120]), int(acc.counts[198])
        (46, 1, 30, 16)
        >>> prior = acc.prior(smooth_sigma=5.0)           # (313,) float64, sums to 1
        >>> prior.shape, prior.dtype, round(float(prior.sum()), 6), int(prior.argmax())
        ((313,), dtype('float64'), 1.0, 120)
        >>> weights = fastcolor.rarity_weights(prior, lam=0.5)
        >>> int(weights.argmin())                         # the commonest bin weighs least
        120
    """

    def __init__(self):
        self.counts = np.zeros(Q, dtype=np.int64)
        #: Pixels left out because their ab was NaN or infinite (they have no nearest bin).
        self.skipped = 0

    def update(self, ab: torch.Tensor) -> PriorAccumulator:
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

    Zhang et al. (2016, eq. 3-4) mix the smoothed prior with a uniform one, ``lam = 0.5``, so
    that the expected weight of a pixel under the prior is 1.

    Args:
        prior: ``(313,)`` bin frequencies (finite, non-negative, positive sum; e.g.
            :meth:`PriorAccumulator.prior`), over the bins of :data:`fastcolor.AB_BINS`.
        lam: weight of the uniform distribution in the mix, in 0..1 (0 needs every bin non-empty).

    Returns:
        float64 ``(313,)`` numpy weights.

    Example:
        >>> import numpy as np, fastcolor
        >>> fastcolor.rarity_weights(np.full(313, 1 / 313))[:3]   # a uniform prior: all 1
        array([1., 1., 1.])
        >>> prior = np.ones(313)
        >>> prior[120] = 1000.0                           # grey is common
        >>> prior /= prior.sum()
        >>> w = fastcolor.rarity_weights(prior, lam=0.5)
        >>> w.shape, w.dtype, round(float((prior * w).sum()), 6)
        ((313,), dtype('float64'), 1.0)
        >>> round(float(w[120]), 4), round(float(w[0]), 4)        # the common bin weighs less
        (0.0214, 4.1366)
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
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        w = reference.rarity_weights(prior, lam)
    if not np.isfinite(w).all():  # lam near 0: w = 1 / p overflows where p is tiny (a subnormal, after smoothing)
        q = int(np.argmin(np.where(prior > 0, prior, np.inf)))
        raise ValueError(f"lam: {lam!r} weighs bin {q} (prior {prior[q]:.3g}) by about 1 / ((1 - lam) p + lam / "
                         f"{Q}), which overflows, so the weights are not finite; use lam > 0 (then no weight exceeds "
                         f"{Q} / lam times the smallest; the paper uses 0.5)")
    return w
