"""The executable specification of every fastcolor op: numpy, float64, written to be read.

Every backend (torch, numba, triton, C++, CUDA) is tested against these functions.
Nothing here is fast; everything here is meant to be obviously right.

Layout conventions, shared with the public API:

* ``ab`` images are ``(N, 2, *spatial)``: channel 0 is a, channel 1 is b (CIE Lab units).
  A plain list of pixels ``(P, 2)`` is the special case with no spatial axes.
* ``logits`` / ``probs`` are ``(N, Q, *spatial)`` with ``Q = 313`` bins on axis 1.
* Bins are :data:`fastcolor.gamut.AB_BINS`, ordered by (a, b).

References:
    [Z16] R. Zhang, P. Isola, A. A. Efros. "Colorful Image Colorization". ECCV 2016.
    [B17] F. Baldassarre, D. G. Morin, L. Rodes-Guirao. "Deep Koalarization: Image
          Colorization using CNNs and Inception-ResNet-v2". arXiv:1712.03400, 2017.
"""
from __future__ import annotations

import numpy as np

from fastcolor.gamut import AB_BINS, Q

__all__ = [
    "nearest_bin",
    "soft_encode",
    "densify",
    "image_mask_nongray",
    "class_prior",
    "smooth_prior",
    "rarity_weights",
    "rebalanced_cross_entropy",
    "annealed_mean",
    "regression_loss",
]

#: Images whose ab never leaves ``|a|, |b| <= GRAY_THRESHOLD`` count as grey (``nongray=True``).
GRAY_THRESHOLD = 5.0
#: Below this temperature the annealed mean is the mode.
T_MODE = 1e-6
_REDUCTIONS = ("mean", "sum", "none")


def _pixels(ab: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """(N, 2, *S) -> ((P, 2) float64 pixels, the shape (N, *S) to restore)."""
    ab = np.asarray(ab, dtype=np.float64)
    if ab.ndim < 2 or ab.shape[1] != 2:
        raise ValueError(f"ab: expected shape (N, 2, ...), got {ab.shape}")
    moved = np.moveaxis(ab, 1, -1)
    return moved.reshape(-1, 2), moved.shape[:-1]


def _squared_distances(pixels: np.ndarray) -> np.ndarray:
    """(P, 2) -> (P, Q): squared Euclidean distance from each pixel to each bin centre."""
    diff = pixels[:, None, :] - AB_BINS[None, :, :]
    return (diff**2).sum(-1)


def nearest_bin(ab: np.ndarray) -> np.ndarray:
    """Index of the nearest bin centre for every pixel: ``(N, 2, *S) -> (N, *S)`` int64.

    ``argmin_q |ab - c_q|``, ties broken towards the lower bin index (np.argmin's rule).
    """
    pixels, shape = _pixels(ab)
    return np.argmin(_squared_distances(pixels), axis=1).reshape(shape)


def soft_encode(ab: np.ndarray, k: int = 5, sigma: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Soft-encode ab onto its ``k`` nearest bins [Z16, Sec. 2.1].

    For each pixel, take the k bins with the smallest Euclidean distance ``d_j`` (ties:
    lower bin index first), ordered nearest first, and weight them with a Gaussian kernel:

        Z_j = exp(-d_j^2 / (2 sigma^2)) / sum_i exp(-d_i^2 / (2 sigma^2)).

    The paper uses k = 5, sigma = 5; the authors' released code used k = 10.

    Returns ``(indices, weights)``, each ``(N, k, *S)``: int64 bin indices and float64 weights
    summing to 1 over axis 1. :func:`densify` turns them into ``(N, Q, *S)``.
    """
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= 16:
        raise ValueError(f"k: expected an integer in 1..16, got {k!r}")
    if not sigma > 0:
        raise ValueError(f"sigma: expected a positive number, got {sigma!r}")
    pixels, shape = _pixels(ab)
    d2 = _squared_distances(pixels)
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    near = np.take_along_axis(d2, order, axis=1)
    # Subtracting the nearest distance leaves the normalised weights unchanged and keeps
    # far-off ab from underflowing every weight to zero.
    g = np.exp(-(near - near[:, :1]) / (2.0 * sigma**2))
    w = g / g.sum(axis=1, keepdims=True)
    def back(x):
        return np.moveaxis(x.reshape(*shape, k), -1, 1)

    return back(order.astype(np.int64)), back(w)


def densify(indices: np.ndarray, weights: np.ndarray, num_bins: int = Q) -> np.ndarray:
    """Sparse ``(N, k, *S)`` (indices, weights) -> dense ``(N, num_bins, *S)`` distribution.

    A bin listed twice for a pixel (possible in a hand-made target, never from :func:`soft_encode`)
    gets the SUM of its weights: ``Z_q = sum_{j: idx_j = q} w_j``. That is the target the loss's
    sum over the k entries implies (``-sum_j w_j log p_{idx_j} = -sum_q Z_q log p_q``), so the
    gradient ``softmax - Z`` is the true one; every backend does the same.
    """
    indices = np.asarray(indices).astype(np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    k = indices.shape[1]
    idx = np.moveaxis(indices, 1, -1).reshape(-1, k)
    dense = np.zeros((idx.shape[0], num_bins), dtype=np.float64)
    np.add.at(dense, (np.arange(idx.shape[0])[:, None], idx), np.moveaxis(weights, 1, -1).reshape(-1, k))
    return np.moveaxis(dense.reshape((indices.shape[0],) + indices.shape[2:] + (num_bins,)), -1, 1)


def image_mask_nongray(ab: np.ndarray) -> np.ndarray:
    """The authors' per-image mask: 0 for images whose ab never leaves ``|a|, |b| <= 5``, else 1.

    ``(N, 2, *S) -> (N,)`` float64. An empty image (no pixels) counts as grey. NaN/Inf values
    are ignored: a bad pixel gets a NaN loss of its own and leaves its image's mask alone.
    """
    ab = np.asarray(ab, dtype=np.float64)
    flat = np.abs(ab.reshape(ab.shape[0], -1))
    flat = np.where(np.isfinite(flat), flat, 0.0)
    if flat.shape[1] == 0:
        return np.zeros(ab.shape[0])
    return (flat.max(axis=1) > GRAY_THRESHOLD).astype(np.float64)


def class_prior(ab: np.ndarray, smooth_sigma: float | None = None) -> np.ndarray:
    """Empirical distribution of the nearest bin over a set of pixels [Z16, Sec. 2.2].

    ``p_q = #{pixels whose nearest bin is q} / #pixels``. With ``smooth_sigma`` the prior is
    smoothed over the ab plane with a Gaussian kernel between bin centres and renormalised:

        p'_q = sum_r p_r exp(-|c_q - c_r|^2 / (2 smooth_sigma^2)) / (normaliser),

    (the paper smooths with sigma = 5). ``ab`` is ``(N, 2, *S)``. Pixels with NaN/Inf ab have no
    nearest bin and are not counted.
    """
    finite = np.isfinite(np.asarray(ab, dtype=np.float64)).all(axis=1)
    counts = np.bincount(nearest_bin(ab)[finite].ravel(), minlength=Q).astype(np.float64)
    if counts.sum() == 0:
        raise ValueError("ab: expected at least one pixel, got none")
    p = counts / counts.sum()
    return smooth_prior(p, smooth_sigma) if smooth_sigma else p


def smooth_prior(prior: np.ndarray, sigma: float = 5.0) -> np.ndarray:
    """Gaussian smoothing of a prior over the ab plane, between bin centres, renormalised:

        p'_q = sum_r p_r exp(-|c_q - c_r|^2 / (2 sigma^2)) / sum_q' (same).
    """
    d2 = ((AB_BINS[:, None, :] - AB_BINS[None, :, :]) ** 2).sum(-1)
    p = np.exp(-d2 / (2.0 * sigma**2)) @ np.asarray(prior, dtype=np.float64)
    return p / p.sum()


def rarity_weights(prior: np.ndarray, lam: float = 0.5) -> np.ndarray:
    """Class-rebalancing weights [Z16, eq. 3-4].

        w_q  proportional to  ((1 - lam) p_q + lam / Q)^(-1),   scaled so  sum_q p_q w_q = 1,

    so that the expected weight of a pixel under the prior is 1. The paper uses lam = 0.5.
    """
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != (Q,):
        raise ValueError(f"prior: expected shape ({Q},), got {prior.shape}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected a number in [0, 1], got {lam!r}")
    w = 1.0 / ((1.0 - lam) * prior + lam / Q)
    return w / (prior * w).sum()


def _log_softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def rebalanced_cross_entropy(
    logits: np.ndarray,
    ab: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    k: int = 5,
    sigma: float = 5.0,
    reduction: str = "mean",
    nongray: bool = False,
    target: tuple[np.ndarray, np.ndarray] | None = None,
    grad_output: float | np.ndarray = 1.0,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Class-rebalanced multinomial cross-entropy [Z16, eq. 2] and its exact gradient.

    With ``Z = soft_encode(ab, k, sigma)`` and ``v_hw = weights[nearest bin of ab_hw]``
    (``v = 1`` when ``weights`` is None: plain soft-target cross-entropy), per pixel

        l_hw = -m_n v_hw sum_q Z_hwq log softmax(logits)_hwq,

(the sum runs over the k bins with Z > 0, so a -inf logit elsewhere gives a finite loss),

    where ``m_n = image_mask_nongray(ab)[n]`` when ``nongray`` else 1. Reductions:
    ``"mean"`` = sum of l over all N*H*W pixels / (N*H*W) (the paper's 1/HW, averaged over
    the batch), ``"sum"``, ``"none"`` (the ``(N, *S)`` map).

    ``mask`` (``(N, *S)`` bool or 0/1, True = leave the pixel out) removes pixels entirely: their
    ab are read as 0 (so NaN ground truth there is harmless, and they cannot make an image
    non-grey), their ``l_hw`` and gradient are exactly 0, and ``"mean"`` divides by the number of
    pixels left, ``U = #{hw: not mask_hw}`` (NaN when ``U = 0``, as PyTorch's mean over no
    pixels). Unlike ``torch.nn.CrossEntropyLoss(weight=w)``, whose mean divides by
    ``sum_hw w[target_hw]``, the mean divides by the pixel count and not by the sum of ``v_hw``.

    ``target=(indices, weights)`` replaces ``ab`` with a precomputed encoding (nearest bin
    first, as :func:`soft_encode` orders it); ``nongray`` then needs ``ab`` too.

    Returns ``(loss, grad)``: ``grad`` is d(sum(grad_output * loss)) / d logits,

        grad = grad_output * m_n v_hw (softmax(logits)_hwq - Z_hwq) * (1 / (N*H*W) for "mean"),

    with ``U`` in place of ``N*H*W`` and 0 at masked pixels when ``mask`` is given.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim < 2 or logits.shape[1] != Q:
        raise ValueError(f"logits: expected shape (N, {Q}, ...), got {logits.shape}")
    keep = None
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (logits.shape[0],) + logits.shape[2:]:
            raise ValueError(f"mask: expected shape {(logits.shape[0],) + logits.shape[2:]}, got {mask.shape}")
        keep = ~mask.astype(bool)
        if ab is not None:
            ab = np.where(keep[:, None], np.asarray(ab, dtype=np.float64), 0.0)
    if target is None:
        if ab is None:
            raise ValueError("ab: expected the target ab (or target=(indices, weights)), got None")
        idx, z = soft_encode(ab, k, sigma)
    else:
        idx, z = (np.asarray(t) for t in target)
    if idx.shape[0] != logits.shape[0] or idx.shape[2:] != logits.shape[2:]:
        raise ValueError(f"target: expected (N, k, ...) matching logits {logits.shape}, got {idx.shape}")
    z_dense = densify(idx, z)
    v = np.ones(idx[:, 0].shape) if weights is None else np.asarray(weights, np.float64)[idx[:, 0]]
    if nongray:
        if ab is None:
            raise ValueError("nongray: needs the target ab to find grey images, got only an encoding")
        mask = image_mask_nongray(ab)
        v = v * mask.reshape((-1,) + (1,) * (v.ndim - 1))
    logp = _log_softmax(logits, axis=1)
    # Only the k target bins enter the sum: a bin with Z = 0 contributes nothing, even where its
    # logit is -inf (log p = -inf), as for a class masked out of the model's output.
    per_pixel = -v * (z * np.take_along_axis(logp, idx.astype(np.int64), axis=1)).sum(axis=1)
    n_pix = per_pixel.size
    if keep is not None:
        v = v * keep
        per_pixel = np.where(keep, per_pixel, 0.0)  # exactly 0, even where the logits would give inf
        n_pix = int(keep.sum())
    if reduction == "mean":
        loss = per_pixel.sum() / n_pix if n_pix else np.float64("nan")
        scale = np.float64(grad_output) / max(n_pix, 1)
    elif reduction == "sum":
        loss = per_pixel.sum()
        scale = np.float64(grad_output)
    else:
        loss = per_pixel
        scale = np.broadcast_to(np.asarray(grad_output, np.float64), per_pixel.shape)
    scale = np.expand_dims(scale * v, 1)
    grad = scale * (np.exp(logp) - z_dense)
    return loss, grad


def annealed_mean(
    logits: np.ndarray | None = None, T: float = 0.38, probs: np.ndarray | None = None
) -> np.ndarray:
    """Annealed-mean decoding of a distribution over the bins [Z16, eq. 5].

        H(Z) = E[f_T(Z)],  f_T(z) = exp(log z / T) / sum_q exp(log z_q / T),

    i.e. the expectation of the bin centres under the re-tempered distribution. Since
    ``softmax(log softmax(x) / T) = softmax(x / T)``, logits are simply divided by T.
    T = 1 gives the mean, T -> 0 the mode: for ``T < 1e-6`` the result is exactly the centre
    of the most likely bin (ties: lower index). Give ``probs=`` (a distribution over axis 1,
    e.g. the output of a softmax layer) instead of ``logits`` for such models.

    Returns ``(N, 2, *S)`` ab.
    """
    if (logits is None) == (probs is None):
        raise ValueError("annealed_mean: expected exactly one of logits= and probs=")
    if not T > 0:
        raise ValueError(f"T: expected a positive temperature, got {T!r}")
    if probs is not None:
        with np.errstate(divide="ignore"):
            x = np.log(np.asarray(probs, dtype=np.float64))
    else:
        x = np.asarray(logits, dtype=np.float64)
    if x.ndim < 2 or x.shape[1] != Q:
        raise ValueError(f"logits: expected shape (N, {Q}, ...), got {x.shape}")
    if T < T_MODE:
        mode = np.argmax(x, axis=1)
        return np.moveaxis(AB_BINS[mode], -1, 1)
    f = np.exp(_log_softmax(x / T, axis=1))
    return np.einsum("nq...,qc->nc...", f, AB_BINS)


def regression_loss(pred_ab: np.ndarray, true_ab: np.ndarray, reduction: str = "mean") -> np.ndarray:
    """The fusion model's loss [B17, eq. 1], per image

        C = 1 / (2 H W) sum_{c in (a, b)} sum_{i, j} (pred_c,ij - true_c,ij)^2,

    averaged over the batch for ``"mean"``, per image ``(N,)`` for ``"none"``.
    (Deep Koalarization computes it on ab / 128; the scale is the caller's choice.)
    """
    pred = np.asarray(pred_ab, dtype=np.float64)
    true = np.asarray(true_ab, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim < 2 or pred.shape[1] != 2:
        raise ValueError(f"pred_ab, true_ab: expected equal shapes (N, 2, ...), got {pred.shape} and {true.shape}")
    per_image = ((pred - true) ** 2).reshape(pred.shape[0], -1).sum(1) / pred[0].size
    if reduction == "none":
        return per_image
    if reduction == "mean":
        return per_image.mean()
    raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
