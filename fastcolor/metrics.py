"""Colorization metrics, per image and per class, and the ``evaluate`` entry point.

On the 313-bin output (Zhang): accuracy of the argmax against the truth's nearest bin;
cross-entropy against the soft target (the truth soft-encoded onto its 5 nearest bins,
sigma 5: :func:`soft_cross_entropy`, the seed study's metric) and against the nearest bin
alone (:func:`hard_cross_entropy`); an approximate accuracy on coarser bins (the 10-unit grid
merged into ``grid``-unit cells, probabilities summed per cell).
On decoded ab (both models): MSE per image on ab / 128; R^2 per image pooled over a and b
(:func:`ab_r2_pooled`, one mean over both channels: the study's) and around each channel's
own mean (:func:`ab_r2_per_channel`); Zhang et al.'s AuC: the share of pixels whose ab error
is within a threshold, swept 0..150 and integrated (normalised to 0..1), raw and
class-rebalanced (each true ab bin weighted equally).
On RGB: PSNR and SSIM (skimage.metrics) and Hasler & Suesstrunk (2003) colourfulness.
:func:`study_tables` prints the study's two tables (Fig. 13 and 17 of its report: per class,
train and test rows, then averages).
"""
from __future__ import annotations

import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastcolor.color import l_ab_to_rgb
from fastcolor.colorize import decode_ab, decode_temperature
from fastcolor.data import (
    TARGET_REDUCTIONS,
    ColorizationDataset,
    DeviceStage,
    ImageItem,
    collate_bytes,
    index_images,
    load_split,
    reduce_target,
    resolve_decode,
)
from fastcolor.gamut import A_MIN, AB_BINS, B_MIN, Q
from fastcolor.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from fastcolor.models.serialization import load_model
from fastcolor.ops import nearest_bin, rebalanced_cross_entropy

__all__ = ["bin_accuracy", "soft_cross_entropy", "hard_cross_entropy", "bin_cross_entropy", "coarse_bin_map",
           "coarse_accuracy", "ab_mse", "ab_r2_pooled", "ab_r2_per_channel", "ab_r2", "AucAccumulator", "auc", "psnr",
           "ssim", "colorfulness", "comparison_grid", "markdown_table", "STUDY_COLUMNS", "study_rows", "study_table",
           "evaluate", "Splits", "AUC_MAX_THRESHOLD"]

#: The largest ab error threshold (Lab units) of the AuC sweep: Zhang et al. 2016 (sec. 3.1, Table 1)
#: count the pixels within thresholds 0..150 of the truth and integrate that curve.
AUC_MAX_THRESHOLD = 150


def _check(name: str, x, channels: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, {channels}, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must have shape (N, {channels}, H, W), got {tuple(x.shape)}")
    return x


def _nearest(ab: torch.Tensor) -> torch.Tensor:
    return nearest_bin(ab.float())


def bin_accuracy(logits: torch.Tensor, target_ab: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Share of pixels whose argmax bin is the truth's nearest bin (per image with ``reduction="none"``).

    ``logits``: (N, 313, h, w); ``target_ab``: (N, 2, h, w) true ab in Lab units at the logits'
    resolution (see :func:`fastcolor.data.reduce_target`). Returns a scalar in [0, 1] (mean over
    images of the per-image share), or (N,) with ``reduction="none"``.

    Example:
        >>> import fastcolor, torch
        >>> ab = torch.zeros(1, 2, 2, 2)                        # grey: bin (0, 0)
        >>> logits = torch.zeros(1, 313, 2, 2)
        >>> logits[:, fastcolor.nearest_bin(ab)[0, 0, 0]] = 5.0  # argmax on the right bin everywhere
        >>> logits[0, 0, 0, 0] = 10.0                           # ... but one pixel of four
        >>> bin_accuracy(logits, ab, reduction="none")
        tensor([0.7500])
    """
    _check("logits", logits, Q)
    _check("target_ab", target_ab, 2)
    hit = (logits.argmax(1) == _nearest(target_ab)).float().flatten(1).mean(1)
    return hit.mean() if reduction == "mean" else hit


def hard_cross_entropy(logits: torch.Tensor, target_ab: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits against the truth's nearest bin alone (a one-hot, "hard" target).

    ``logits``: (N, 313, h, w); ``target_ab``: (N, 2, h, w) true ab in Lab units at the logits'
    resolution. Returns the mean over pixels and images in nats (``reduction="mean"``), or (N,)
    per-image means (``"none"``). This is *not* the study's metric, which scores against the
    soft target: see :func:`soft_cross_entropy`.

    Example:
        >>> logits = torch.zeros(1, 313, 2, 2)                 # uniform prediction
        >>> round(hard_cross_entropy(logits, torch.zeros(1, 2, 2, 2)).item(), 4)  # log(313)
        5.7462
    """
    _check("logits", logits, Q)
    _check("target_ab", target_ab, 2)
    ce = F.cross_entropy(logits.float(), _nearest(target_ab), reduction="none").flatten(1).mean(1)
    return ce.mean() if reduction == "mean" else ce


def bin_cross_entropy(logits: torch.Tensor, target_ab: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Old name of :func:`hard_cross_entropy` (against the nearest bin only), kept working.

    The study's cross-entropy is against the soft target: :func:`soft_cross_entropy`.
    ``logits``: (N, 313, h, w); ``target_ab``: (N, 2, h, w) in Lab units; nats.

    Example:
        >>> round(bin_cross_entropy(torch.zeros(1, 313, 2, 2), torch.zeros(1, 2, 2, 2)).item(), 4)  # log(313)
        5.7462
    """
    return hard_cross_entropy(logits, target_ab, reduction)


def soft_cross_entropy(logits: torch.Tensor, target_ab: torch.Tensor, k: int = 5, sigma: float = 5.0,
                       reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits against the soft target, ``-sum_q z_q log softmax(logits)_q``.

    ``z`` is the truth soft-encoded onto its ``k`` nearest bins with Gaussian weights
    (:func:`fastcolor.soft_encode`; k = 5, sigma = 5 as in Zhang et al. 2016 and the seed
    study, whose reported cross-entropy, e.g. 2.197 on the Forest road test split, is this
    quantity), without class-rebalancing weights. Computed by the fused loss
    (:func:`fastcolor.rebalanced_cross_entropy` with ``weights=None``), so no (N, 313, h, w)
    target is built. ``logits``: (N, 313, h, w); ``target_ab``: (N, 2, h, w) true ab at the
    logits' resolution (see :func:`fastcolor.data.reduce_target`). Returns the mean in nats
    (``reduction="mean"``) or (N,) per-image means (``"none"``). Its minimum, reached when the
    softmax equals the target, is the target's entropy (up to 1.41 nats for k = 5, sigma 5;
    1.15 on average over uniformly random ab), not 0 as for :func:`hard_cross_entropy`.

    Example:
        >>> logits = torch.zeros(1, 313, 2, 2)                 # uniform prediction: log(313) either way
        >>> round(soft_cross_entropy(logits, torch.zeros(1, 2, 2, 2)).item(), 4)
        5.7462
    """
    _check("logits", logits, Q)
    _check("target_ab", target_ab, 2)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    x = logits.detach()
    x = x.float() if x.dtype != torch.float32 else x
    ce = rebalanced_cross_entropy(x, target_ab.detach().float(), weights=None, k=k, sigma=sigma,
                                  reduction="none").flatten(1).mean(1)
    return ce.mean() if reduction == "mean" else ce


def coarse_bin_map(grid: float = 20.0) -> np.ndarray:
    """(313,) int64: the index of the ``grid``-unit cell holding each bin centre (cells numbered densely).

    ``grid`` is in Lab units (ab); the cells are aligned with the 10-unit bin grid, so
    ``grid=20`` merges up to 2 x 2 neighbouring bins and ``grid=10`` keeps every bin.

    Example:
        >>> cells = coarse_bin_map(20.0)
        >>> cells.shape, cells.dtype, int(cells.max()) + 1, int(coarse_bin_map(10.0).max()) + 1
        ((313,), dtype('int64'), 88, 313)
    """
    if not grid > 0:
        raise ValueError(f"grid must be positive, got {grid!r}")
    cells = np.stack([np.floor((AB_BINS[:, 0] - A_MIN + 5.0) / grid),
                      np.floor((AB_BINS[:, 1] - B_MIN + 5.0) / grid)], 1)
    _, dense = np.unique(cells, axis=0, return_inverse=True)
    return dense.reshape(-1).astype(np.int64)


def coarse_accuracy(logits: torch.Tensor, target_ab: torch.Tensor, grid: float = 20.0,
                    reduction: str = "mean") -> torch.Tensor:
    """Accuracy after merging bins into ``grid``-unit cells (probabilities summed per cell).

    ``logits``: (N, 313, h, w); ``target_ab``: (N, 2, h, w) in Lab units; ``grid`` in Lab units
    (:func:`coarse_bin_map`). A pixel is a hit when the cell with the most probability holds the
    truth's nearest bin. Returns a scalar in [0, 1], or (N,) with ``reduction="none"``.

    Example:
        >>> logits = torch.zeros(1, 313, 1, 1)
        >>> logits[0, 101] = 5.0                  # bin (a, b) = (-10, -10): next to the truth's (0, 0)
        >>> ab = torch.zeros(1, 2, 1, 1)
        >>> bin_accuracy(logits, ab).item(), coarse_accuracy(logits, ab, grid=20.0).item()
        (0.0, 1.0)
    """
    _check("logits", logits, Q)
    cmap = torch.from_numpy(coarse_bin_map(grid)).to(logits.device)
    ncells = int(cmap.max()) + 1
    p = logits.float().softmax(1)
    merged = torch.zeros(p.shape[0], ncells, *p.shape[2:], device=p.device).index_add_(1, cmap, p)
    hit = (merged.argmax(1) == cmap[_nearest(target_ab)]).float().flatten(1).mean(1)
    return hit.mean() if reduction == "mean" else hit


def ab_mse(pred_ab: torch.Tensor, true_ab: torch.Tensor) -> torch.Tensor:
    """(N,) per-image mean squared error on ab / 128 (the fusion regression loss).

    ``pred_ab``, ``true_ab``: (N, 2, H, W) in Lab units; the error is taken after dividing both
    by 128, so it is the study's MSE (Fig. 17 of its report). Returns float64.

    Example:
        >>> ab_mse(torch.full((2, 2, 4, 4), 12.8), torch.zeros(2, 2, 4, 4))   # (12.8 / 128)^2
        tensor([0.0100, 0.0100], dtype=torch.float64)
    """
    _check("pred_ab", pred_ab, 2)
    _check("true_ab", true_ab, 2)
    return ((pred_ab.double() - true_ab.double()) / 128.0).square().flatten(1).mean(1)


def _r2(ss_res: torch.Tensor, ss_tot: torch.Tensor) -> torch.Tensor:
    return torch.where(ss_tot > 1e-9, 1.0 - ss_res / ss_tot.clamp(min=1e-12), torch.full_like(ss_tot, math.nan))


def ab_r2_pooled(pred_ab: torch.Tensor, true_ab: torch.Tensor) -> torch.Tensor:
    """(N,) per-image R^2 of ab pooled over a and b: ``1 - SS_res / SS_tot`` with ONE mean.

    ``SS_res = sum (t - p)^2`` and ``SS_tot = sum (t - mean(t))^2``, both summed over the two
    channels and every pixel, ``mean(t)`` taken over a and b together: the coefficient the
    seed study reported for its fusion model (e.g. 0.494 on the Forest road test split). The
    study's report gives the formula; how its code grouped pixels (per image or per batch)
    it does not, so fastcolor computes it per image and :func:`evaluate` averages the images. The
    channel offset (a's mean minus b's) counts as explained variance here, so this is higher
    than :func:`ab_r2_per_channel` whenever a and b have different means. Scale-free (ab or
    ab / 128 give the same). ``pred_ab``, ``true_ab``: (N, 2, H, W) in Lab units. NaN for an
    image whose true ab is constant.

    Example:
        >>> t = torch.tensor([30.0, 32.0, -20.0, -22.0]).reshape(1, 2, 1, 2)
        >>> p = torch.tensor([32.0, 30.0, -22.0, -20.0]).reshape(1, 2, 1, 2)  # wrong within each channel
        >>> round(ab_r2_pooled(p, t).item(), 4), round(ab_r2_per_channel(p, t).item(), 4)
        (0.9941, -3.0)
    """
    _check("pred_ab", pred_ab, 2)
    _check("true_ab", true_ab, 2)
    t, p = true_ab.double().flatten(1), pred_ab.double().flatten(1)
    ss_res = (t - p).square().sum(1)
    ss_tot = (t - t.mean(1, keepdim=True)).square().sum(1)
    return _r2(ss_res, ss_tot)


def ab_r2_per_channel(pred_ab: torch.Tensor, true_ab: torch.Tensor) -> torch.Tensor:
    """(N,) per-image R^2 of ab around each channel's own mean (not the study's: see :func:`ab_r2_pooled`).

    ``1 - SS_res / SS_tot`` with ``SS_tot = sum_c sum (t_c - mean(t_c))^2``: a prediction that
    gets only each channel's mean right scores 0. ``pred_ab``, ``true_ab``: (N, 2, H, W) in Lab
    units. NaN for an image whose true ab is constant (e.g. grey).

    Example:
        >>> t = torch.tensor([30.0, 32.0, -20.0, -22.0]).reshape(1, 2, 1, 2)
        >>> ab_r2_per_channel(t.mean(3, keepdim=True).expand_as(t), t).item()
        0.0
    """
    _check("pred_ab", pred_ab, 2)
    _check("true_ab", true_ab, 2)
    t, p = true_ab.double().flatten(2), pred_ab.double().flatten(2)
    ss_res = (t - p).square().sum((1, 2))
    ss_tot = (t - t.mean(2, keepdim=True)).square().sum((1, 2))
    return _r2(ss_res, ss_tot)


def ab_r2(pred_ab: torch.Tensor, true_ab: torch.Tensor) -> torch.Tensor:
    """Old name of :func:`ab_r2_per_channel` (a mean per channel), kept working.

    The study's R^2 is pooled over a and b: :func:`ab_r2_pooled`. ``pred_ab``, ``true_ab``:
    (N, 2, H, W) in Lab units; returns (N,) float64.

    Example:
        >>> t = torch.tensor([30.0, 32.0, -20.0, -22.0]).reshape(1, 2, 1, 2)
        >>> ab_r2(t.flip(3), t)                   # each channel's two pixels swapped
        tensor([-3.], dtype=torch.float64)
    """
    return ab_r2_per_channel(pred_ab, true_ab)


class AucAccumulator:
    """Streams (pred_ab, true_ab) batches; :meth:`result` gives the raw and rebalanced AuC.

    Errors are binned by ``ceil(|pred - true|)`` per true nearest bin, so thresholds 0..150
    (integers) are exact.

    The error of a pixel is the Euclidean distance between predicted and true (a, b), in Lab
    units; ``update(pred_ab, true_ab)`` takes (N, 2, H, W) batches at any resolution (both the
    same) and returns the accumulator. :meth:`result` is (raw, rebalanced), each the area under
    the curve "share of pixels within threshold t" for t = 0..``max_threshold``, divided by
    ``max_threshold`` (so in [0, 1]); the rebalanced curve averages the per-bin curves of the
    true bins present, each bin counting once (Zhang et al. 2016, sec. 3.1).

    Example:
        >>> acc = AucAccumulator()
        >>> _ = acc.update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))         # 16 exact pixels
        >>> _ = acc.update(torch.full((1, 2, 4, 4), 30.0), torch.zeros(1, 2, 4, 4))  # 16 off by 42.4
        >>> [round(v, 4) for v in acc.result()], acc.curves()[0].shape
        ([0.8583, 0.8583], (151,))
    """

    def __init__(self, max_threshold: int = AUC_MAX_THRESHOLD):
        self.max_threshold = int(max_threshold)
        self.counts = np.zeros((Q, self.max_threshold + 2), dtype=np.int64)

    def update(self, pred_ab: torch.Tensor, true_ab: torch.Tensor) -> AucAccumulator:
        _check("pred_ab", pred_ab, 2)
        _check("true_ab", true_ab, 2)
        err = (pred_ab.double() - true_ab.double()).norm(dim=1)
        slot = torch.ceil(err - 1e-9).clamp(0, self.max_threshold + 1).long().reshape(-1).cpu()
        q = _nearest(true_ab).reshape(-1).cpu()
        self.counts += torch.bincount(q * (self.max_threshold + 2) + slot,
                                      minlength=Q * (self.max_threshold + 2)).reshape(Q, -1).numpy()
        return self

    def curves(self) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative share of pixels within thresholds 0..max: (raw, rebalanced), each (max + 1,)
    float64 in [0, 1]; index t is the share with an ab error <= t (Lab units)."""
        cum = np.cumsum(self.counts, axis=1)[:, : self.max_threshold + 1].astype(np.float64)
        per_bin = self.counts.sum(1)
        if per_bin.sum() == 0:
            raise ValueError("AucAccumulator: expected at least one pixel before result(), got none")
        raw = cum.sum(0) / per_bin.sum()
        present = per_bin > 0
        rebal = (cum[present] / per_bin[present, None]).mean(0)
        return raw, rebal

    def result(self) -> tuple[float, float]:
        """(raw AuC, class-rebalanced AuC), each in [0, 1]: the areas under :meth:`curves`."""
        raw, rebal = self.curves()
        x = np.arange(self.max_threshold + 1)
        return float(np.trapezoid(raw, x) / self.max_threshold), float(np.trapezoid(rebal, x) / self.max_threshold)


def auc(pred_ab: torch.Tensor, true_ab: torch.Tensor, max_threshold: int = AUC_MAX_THRESHOLD) -> tuple[float, float]:
    """(raw AuC, class-rebalanced AuC) of ab errors over thresholds 0..max_threshold, each in [0, 1].

    ``pred_ab``, ``true_ab``: (N, 2, H, W) in Lab units; one batch of :class:`AucAccumulator`
    (use that to pool many batches). 1.0 means every pixel is exact.

    Example:
        >>> auc(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))
        (1.0, 1.0)
        >>> auc(torch.full((1, 2, 4, 4), 3.0), torch.zeros(1, 2, 4, 4))   # every pixel off by 4.24
        (0.97, 0.97)
    """
    return AucAccumulator(max_threshold).update(pred_ab, true_ab).result()


def _hwc(rgb: torch.Tensor) -> np.ndarray:
    return rgb.detach().double().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def psnr(pred_rgb: torch.Tensor, true_rgb: torch.Tensor) -> np.ndarray:
    """(N,) PSNR in dB of sRGB images in [0, 1] (skimage.metrics.peak_signal_noise_ratio).

    ``pred_rgb``, ``true_rgb``: (N, 3, H, W), clamped to [0, 1] (data range 1). Returns a float64
    numpy array; ``inf`` for identical images.

    Example:
        >>> import torch
        >>> psnr(torch.full((1, 3, 8, 8), 0.5), torch.full((1, 3, 8, 8), 0.6)).round(2).tolist()  # 0.1 off
        [20.0]
    """
    from skimage.metrics import peak_signal_noise_ratio

    _check("pred_rgb", pred_rgb, 3)
    _check("true_rgb", true_rgb, 3)
    p, t = _hwc(pred_rgb), _hwc(true_rgb)
    with np.errstate(divide="ignore"):
        return np.array([peak_signal_noise_ratio(a, b, data_range=1.0) for b, a in zip(p, t, strict=True)])


def ssim(pred_rgb: torch.Tensor, true_rgb: torch.Tensor) -> np.ndarray:
    """(N,) SSIM of sRGB images in [0, 1] (skimage.metrics.structural_similarity, channel_axis).

    ``pred_rgb``, ``true_rgb``: (N, 3, H, W), clamped to [0, 1] (data range 1); the window is
    7 x 7, or the largest odd size that fits a smaller image. Returns a float64 numpy array.

    Example:
        >>> import torch
        >>> x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> ssim(x, x).tolist()
        [1.0, 1.0]
    """
    from skimage.metrics import structural_similarity

    _check("pred_rgb", pred_rgb, 3)
    _check("true_rgb", true_rgb, 3)
    p, t = _hwc(pred_rgb), _hwc(true_rgb)
    win = min(7, *p.shape[1:3])
    win -= 1 - win % 2
    return np.array([structural_similarity(a, b, data_range=1.0, channel_axis=-1, win_size=win)
                     for a, b in zip(t, p, strict=True)])


def colorfulness(rgb: torch.Tensor) -> torch.Tensor:
    """(N,) Hasler & Suesstrunk (2003) colourfulness of sRGB in [0, 1], on the 0..255 scale:
    ``sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2)``, rg = R - G, yb = (R + G) / 2 - B.

    ``rgb``: (N, 3, H, W); the statistics are over each image's pixels (population std).
    Returns (N,) float64; 0 for any grey image.

    Example:
        >>> grey = torch.full((1, 3, 4, 4), 0.5)
        >>> red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
        >>> colorfulness(grey).item(), round(colorfulness(red).item(), 2)   # red: 0.3 * sqrt(255^2 + 127.5^2)
        (0.0, 85.53)
    """
    _check("rgb", rgb, 3)
    x = rgb.double() * 255.0
    rg = (x[:, 0] - x[:, 1]).flatten(1)
    yb = (0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]).flatten(1)
    std = torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False))
    mean = torch.sqrt(rg.mean(1).square() + yb.mean(1).square())
    return std + 0.3 * mean


def comparison_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], path: str | os.PathLike,
                    row_labels: Sequence[str] | None = None) -> Path:
    """A PNG grid of images (rows of HxWx3 arrays, e.g. grayscale | Zhang | fusion | ground truth), atomic.

    ``rows``: each a sequence of (H, W, 3) uint8 sRGB arrays (or floats in [0, 1]), one per
    ``titles`` entry (the column headings); ``row_labels``: one per row, written beside it. Each
    cell is 2.2 x 2.2 inches at 100 dpi. Written atomically (:func:`fastcolor.io.atomic_write_bytes`);
    returns ``path``.

    Example:
        >>> import tempfile, numpy as np
        >>> from PIL import Image
        >>> tmp = tempfile.TemporaryDirectory()
        >>> row = [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)]
        >>> png = comparison_grid([row, row], ["grayscale", "ground truth"], f"{tmp.name}/grid.png", ["farm", "butte"])
        >>> Image.open(png).size                           # 2 columns x 2 rows of 220 x 220 pixels
        (440, 440)
        >>> tmp.cleanup()
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [list(r) for r in rows]
    if not rows or any(len(r) != len(titles) for r in rows):
        raise ValueError(f"rows must be non-empty with {len(titles)} images each (one per title), got "
                         f"{[len(r) for r in rows]}")
    fig = Figure(figsize=(2.2 * len(titles), 2.2 * len(rows)), dpi=100)
    axes = fig.subplots(len(rows), len(titles), squeeze=False)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            ax = axes[i][j]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
            if j == 0 and row_labels:
                ax.set_ylabel(row_labels[i], fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) with ``columns`` (keys; a missing key is an empty cell).

    Floats are printed with 4 significant digits, NaN as ``nan``.

    Example:
        >>> print(markdown_table([{"class": "farm", "mse": 0.012345}], ["class", "mse"]), end="")
        | class | mse |
        |---|---|
        | farm | 0.01235 |
    """
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


#: The seed study's tables: per architecture, (key of an :func:`evaluate` row, column heading).
#: Zhang model: Fig. 13 of the study's report (313-bin accuracy, cross-entropy against the
#: soft target); fusion model: Fig. 17 (MSE on ab / 128, R^2 pooled over a and b).
STUDY_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "zhang": (("acc313", "313-bin accuracy"), ("ce313_soft", "cross-entropy")),
    "fusion": (("mse", "MSE"), ("r2_pooled", "R²")),
}


def study_rows(rows: Sequence[Mapping[str, Any]], arch: str) -> list[dict[str, Any]]:
    """The rows of the seed study's table for a model of ``arch`` ("zhang" or "fusion").

    ``rows``: :func:`evaluate`'s rows of one model (one per class and split; the pooled
    ``"(all)"`` rows are left out). Per class (sorted), one row per split in the order the
    splits first appear (``train`` then ``test`` by default); then one ``"average"`` row per
    split: the unweighted mean of that split's class rows (each class counts once, however
    many images it has; NaN entries are skipped). Each row has ``class``, ``split``,
    ``images`` and the keys of :data:`STUDY_COLUMNS` for ``arch``.

    Example:
        >>> rows = [{"class": c, "split": s, "images": 2, "mse": m, "r2_pooled": 0.5}
        ...         for c, m in (("farm", 0.01), ("butte", 0.03)) for s in ("train", "test")]
        >>> [(r["class"], r["split"], r["mse"]) for r in study_rows(rows, "fusion")][-2:]
        [('average', 'train', 0.02), ('average', 'test', 0.02)]
    """
    if arch not in STUDY_COLUMNS:
        raise ValueError(f"arch must be one of {sorted(STUDY_COLUMNS)}, got {arch!r}")
    keys = [k for k, _ in STUDY_COLUMNS[arch]]
    rows = [r for r in rows if r.get("class") != "(all)"]
    splits = list(dict.fromkeys(r["split"] for r in rows))
    by = {(r["class"], r["split"]): r for r in rows}
    out = [{"class": c, "split": s, "images": by[c, s].get("images"), **{k: by[c, s].get(k, math.nan) for k in keys}}
           for c in sorted({r["class"] for r in rows}) for s in splits if (c, s) in by]
    for s in splits:
        mine = [r for r in out if r["split"] == s]
        avg: dict[str, Any] = {"class": "average", "split": s, "images": sum(r["images"] or 0 for r in mine)}
        for k in keys:
            v = np.array([r[k] for r in mine], dtype=np.float64)
            avg[k] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
        out.append(avg)
    return out


def study_table(rows: Sequence[Mapping[str, Any]], arch: str) -> str:
    """:func:`study_rows` as a markdown table with the study's headings (see :data:`STUDY_COLUMNS`).

    ``rows``: :func:`evaluate`'s rows of one model; ``arch``: ``"zhang"`` (313-bin accuracy in
    [0, 1], cross-entropy in nats) or ``"fusion"`` (MSE on ab / 128, R^2 pooled over a and b).

    Example:
        >>> rows = [{"class": c, "split": s, "images": 2, "mse": m, "r2_pooled": 0.5}
        ...         for c, m in (("farm", 0.01), ("butte", 0.03)) for s in ("train", "test")]
        >>> print(study_table(rows, "fusion"), end="")
        | class | split | images | MSE | R² |
        |---|---|---|---|---|
        | butte | train | 2 | 0.03 | 0.5 |
        | butte | test | 2 | 0.03 | 0.5 |
        | farm | train | 2 | 0.01 | 0.5 |
        | farm | test | 2 | 0.01 | 0.5 |
        | average | train | 4 | 0.02 | 0.5 |
        | average | test | 4 | 0.02 | 0.5 |
    """
    table = [{**r, **{h: r[k] for k, h in STUDY_COLUMNS[arch]}} for r in study_rows(rows, arch)]
    return markdown_table(table, ["class", "split", "images"] + [h for _, h in STUDY_COLUMNS[arch]])


# ----------------------------------------------------------------------------- evaluate

_COLUMNS = ["class", "split", "images", "acc313", "ce313_soft", "ce313_hard", "acc_coarse20", "mse", "r2_pooled",
            "r2_per_channel", "auc", "auc_rebal", "psnr", "ssim", "colorfulness_pred", "colorfulness_true"]


class _Group:
    def __init__(self):
        self.per_image: dict[str, list[float]] = defaultdict(list)
        self.auc = AucAccumulator()

    def add(self, name: str, values) -> None:
        self.per_image[name] += [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"images": len(self.per_image["mse"])}
        for k, v in self.per_image.items():
            out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
        out["auc"], out["auc_rebal"] = self.auc.result()
        return out


#: What :func:`evaluate` evaluates: split names, or split name -> images.
Splits = Sequence[str] | Mapping[str, Sequence[ImageItem]]


def _resolve_items(run_or_weights: Path, data_dir: Path, splits: Splits | None) -> dict[str, Sequence[ImageItem]]:
    """split name -> the images of it to evaluate (see :func:`evaluate`)."""
    if isinstance(splits, Mapping):
        return dict(splits)
    if isinstance(splits, str):
        raise TypeError(f"splits must be a sequence of split names, e.g. ({splits!r},), not a string")
    split_file = (run_or_weights if run_or_weights.is_dir() else run_or_weights.parent) / "split.json"
    if splits is None:
        splits = ("train", "test") if split_file.is_file() else ("all",)
    names = [s for s in splits if s != "all"]
    if names and not split_file.is_file():
        raise ValueError(f"splits {names} asked for, but there is no split.json beside {run_or_weights} (pass "
                         f"splits=('all',) to evaluate every image of data_dir)")
    split = load_split(split_file) if names else {}
    unknown = [s for s in names if s not in split]
    if unknown:
        raise ValueError(f"splits: {unknown} not in {split_file} (it has {sorted(split)})")
    items: dict[str, Sequence[ImageItem]] = {s: split[s] for s in splits if s != "all" and split[s]}
    if "all" in splits:
        items["all"] = index_images(data_dir)
    return items


_STUDY_FIGURE = {"zhang": "Fig. 13: 313-bin accuracy, cross-entropy against the k = 5 soft target",
                 "fusion": "Fig. 17: MSE on ab / 128, R² pooled over a and b"}


def _target_reduction(src: Path, given: str | None) -> str:
    """``target_reduction`` given, else the run's (train_config.json beside the model), else "subsample"."""
    if given is None:
        cfg_file = (src if src.is_dir() else src.parent) / "train_config.json"
        try:
            given = json.loads(cfg_file.read_text()).get("target_reduction") or "subsample"
        except (OSError, ValueError, AttributeError):  # no run config (a bare model file) or a damaged one
            given = "subsample"
    if given not in TARGET_REDUCTIONS:
        raise ValueError(f"target_reduction must be one of {TARGET_REDUCTIONS}, got {given!r}")
    return given


@torch.no_grad()
def _predict(model, L: torch.Tensor, T: float):
    """(decoded ab at L's size, logits or None)."""
    out = model(L)  # a fusion model computes its embedding from L itself
    ab = decode_ab(model, out, T)
    if ab.shape[-2:] != L.shape[-2:]:
        ab = F.interpolate(ab, size=L.shape[-2:], mode="bilinear", align_corners=False)
    return ab, (out if model.config["arch"] == "zhang" else None)


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def evaluate(run_dir_or_weights: str | os.PathLike, data_dir: str | os.PathLike,
             out_dir: str | os.PathLike | None = None,
             splits: Splits | None = None, compare: str | os.PathLike | None = None, T: float | None = None,
             batch_size: int = 32, device: str = "auto", max_images: int | None = None,
             grid_images: int = 6, backbone_weights: str | os.PathLike | None = None,
             target_reduction: str | None = None, decode: str = "auto") -> dict[str, Any]:
    """Evaluate a trained model on ``data_dir``; write ``metrics.json``, ``metrics.md``, ``comparison.png``.

    ``run_dir_or_weights``: a run directory (its ``model.safetensors``) or a model or checkpoint
    file. The report has one row per class and split; ``splits`` says which:

    * split names of the run's ``split.json`` (in the run directory, or beside the model file),
      e.g. ``("test",)``; the name ``"all"`` stands for every image in ``data_dir``, whatever the
      split file says (e.g. a folder the model was never trained on);
    * a mapping split name -> list of :class:`~fastcolor.data.ImageItem` (paths relative to
      ``data_dir``), evaluated as given;
    * None (default): ``("train", "test")`` when there is a ``split.json``, else ``("all",)``.

    Asking for a named split where there is no ``split.json`` is a ValueError.
    ``compare``: a second run/model shown in the comparison grid (e.g. the fusion model next
    to Zhang's); its metrics are computed too. ``max_images`` caps each split (quick looks).
    ``backbone_weights``: a local weights file for the backbone of the fusion model(s) (a path
    stored in a weights file is never read; see :func:`~fastcolor.models.serialization.load_model`).
    ``T``: the annealed-mean temperature of Zhang models; None (default) takes each model's own
    (:func:`fastcolor.colorize.decode_temperature`: 0.38, Zhang et al.'s, for fastcolor's
    models; 1 for the authors' released weights).
    ``target_reduction``: how the true ab is brought down to the logits' resolution for the
    313-bin metrics (:func:`fastcolor.data.reduce_target`: ``"subsample"`` or ``"area"``);
    None (default) takes each model's run's (``target_reduction`` in the ``train_config.json``
    beside the model), else ``"subsample"`` (Zhang et al.'s choice). The ab metrics (MSE,
    R^2, AuC) are always at full resolution.
    ``decode``: where the images are decoded, as in training (:func:`fastcolor.data.resolve_decode`):
    ``"cpu"`` (PIL), ``"gpu"`` (nvjpeg on a CUDA device, batched), ``"auto"`` (default: ``"gpu"``
    on CUDA for mostly-JPEG folders); Lab is computed batched on ``device`` either way.

    Rows hold, per class and split, the mean over images of: ``acc313``, ``ce313_soft``
    (:func:`soft_cross_entropy`, the study's), ``ce313_hard`` (:func:`hard_cross_entropy`),
    ``acc_coarse20`` (Zhang models only); ``mse``, ``r2_pooled`` (:func:`ab_r2_pooled`, the
    study's), ``r2_per_channel``, ``psnr``, ``ssim``, ``colorfulness_pred``/``_true``; and
    ``auc``/``auc_rebal`` over the group's pixels. ``metrics.md`` starts each model with the
    study's table (:func:`study_table`), then all metrics.
    Returns ``{"rows": [...], "study": [...], "models": {key: {"arch", "rows", "study"}}, "files": {...}}``.

    Example:
        >>> report = evaluate("runs/zhang", "photos/")              # doctest: +SKIP
        >>> [(r["class"], r["split"], round(r["acc313"], 3)) for r in report["study"]][:2]  # doctest: +SKIP
        [('butte', 'train', 0.231), ('butte', 'test', 0.204)]
    """
    src = Path(run_dir_or_weights)
    data_dir = Path(data_dir)
    if not src.exists() and not src.is_symlink():  # a loop of links or a dangling one: load_model names it
        raise FileNotFoundError(f"run_dir_or_weights: no such run directory or model file: {src}")
    if not data_dir.is_dir():
        raise ValueError(f"data_dir must be a directory of images, got {str(data_dir)!r}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    extra = {} if backbone_weights is None else {"backbone_weights": str(backbone_weights)}
    models = {"model": load_model(src, dev, **extra)}
    if compare is not None:
        models["compare"] = load_model(compare, dev, **extra)
    names = {k: m.config["arch"] for k, m in models.items()}
    temps = {k: (None if names[k] == "fusion" else decode_temperature(m) if T is None else float(T))
             for k, m in models.items()}
    out_dir = Path(out_dir) if out_dir is not None else (src if src.is_dir() else src.parent) / "eval"
    reductions = {"model": _target_reduction(src, target_reduction)}
    if compare is not None:
        reductions["compare"] = _target_reduction(Path(compare), target_reduction)
    items = _resolve_items(src, data_dir, splits)

    results: dict[str, list[dict[str, Any]]] = {k: [] for k in models}
    grid_rows: list[list[np.ndarray]] = []
    grid_labels: list[str] = []
    for split_name, split_items_ in items.items():
        split_items_ = split_items_[:max_images] if max_images else split_items_
        groups: dict[str, dict[str, _Group]] = {k: defaultdict(_Group) for k in models}
        size = models["model"].config["input_size"]
        how = resolve_decode(decode, dev, [it.path for it in split_items_])
        ds = ColorizationDataset(data_dir, split_items_, size=size, target_stride=1, augment=False,
                                 output="bytes" if how == "gpu" else "rgb")
        stage = DeviceStage(dev, 1, size=size)  # decoding (bytes), L and ab: batched on the device
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, pin_memory=dev.type == "cuda",
                                             collate_fn=collate_bytes if how == "gpu" else None)
        for raw in loader:
            batch = stage(raw)
            L, ab = batch["L"], batch["ab"]
            labels = [ds.items[i].label for i in batch["index"].tolist()]
            true_rgb = l_ab_to_rgb(L, ab)
            preds = {}
            for key, model in models.items():
                Lm = L if model.config["input_size"] == size else F.interpolate(
                    L, size=model.config["input_size"], mode="bilinear", antialias=True)
                pab, logits = _predict(model, Lm, T)
                if not bool(torch.isfinite(pab).all()):  # finite L from the loader: the model is broken
                    raise ValueError(f"{src if key == 'model' else compare}: the model predicts NaN/Inf colours for "
                                     f"finite inputs ({int((~torch.isfinite(pab)).sum())} of {pab.numel()} ab values "
                                     f"in this batch): its weights are broken; nothing was evaluated")
                if pab.shape[-2:] != L.shape[-2:]:
                    pab = F.interpolate(pab, size=L.shape[-2:], mode="bilinear", align_corners=False)
                pred_rgb = l_ab_to_rgb(L, pab)
                preds[key] = pred_rgb
                per = {"mse": ab_mse(pab, ab), "r2_pooled": ab_r2_pooled(pab, ab),
                       "r2_per_channel": ab_r2_per_channel(pab, ab), "psnr": psnr(pred_rgb, true_rgb),
                       "ssim": ssim(pred_rgb, true_rgb), "colorfulness_pred": colorfulness(pred_rgb),
                       "colorfulness_true": colorfulness(true_rgb)}
                if logits is not None:
                    ab_m = ab if Lm.shape == L.shape else F.interpolate(ab, size=Lm.shape[-2:], mode="bilinear",
                                                                          antialias=True)
                    ab_small = reduce_target(ab_m, Lm.shape[-1] // logits.shape[-1], reductions[key])
                    per.update(acc313=bin_accuracy(logits, ab_small, "none"),
                               ce313_soft=soft_cross_entropy(logits, ab_small, reduction="none"),
                               ce313_hard=hard_cross_entropy(logits, ab_small, "none"),
                               acc_coarse20=coarse_accuracy(logits, ab_small, 20.0, "none"))
                for i, label in enumerate(labels):
                    for g in (groups[key][label], groups[key]["(all)"]):
                        for name, vals in per.items():
                            v = vals[i]
                            g.add(name, v.item() if isinstance(v, torch.Tensor) else v)
                        g.auc.update(pab[i:i + 1], ab[i:i + 1])
            if split_name in ("test", "all") and len(grid_rows) < grid_images:
                gray = l_ab_to_rgb(L, torch.zeros_like(ab))
                for i in range(min(len(labels), grid_images - len(grid_rows))):
                    ordered = sorted(models, key=lambda k: names[k] != "zhang")  # Zhang before fusion
                    grid_rows.append([_to_uint8(gray[i])] + [_to_uint8(preds[k][i]) for k in ordered]
                                     + [_to_uint8(true_rgb[i])])
                    grid_labels.append(labels[i])
        for key in models:
            for label in sorted(groups[key]):
                results[key].append({"class": label, "split": split_name, **groups[key][label].row()})

    out_dir.mkdir(parents=True, exist_ok=True)
    md = []
    study = {key: study_rows(rows, names[key]) for key, rows in results.items()}
    for key, rows in results.items():
        md.append(f"## {key}: {names[key]} ({src if key == 'model' else compare})\n\n")
        md.append(f"The seed study's table (its report's {_STUDY_FIGURE[names[key]]}); per class, then the mean of "
                  f"the classes:\n\n")
        md.append(study_table(rows, names[key]))
        md.append("\nAll metrics (per class; (all) pools every image):\n\n")
        md.append(markdown_table(rows, [c for c in _COLUMNS if any(c in r for r in rows)]))
        md.append("\n")
    report = {"rows": results["model"], "study": study["model"],
              "models": {k: {"arch": names[k], "rows": v, "study": study[k], "target_reduction": reductions[k],
                             "T": temps[k]} for k, v in results.items()},
              "T": temps["model"], "target_reduction": reductions["model"], "source": str(src),
              "compare": None if compare is None else str(compare)}
    files = {"json": atomic_write_json(out_dir / "metrics.json", report),
             "markdown": atomic_write_text(out_dir / "metrics.md", "".join(md))}
    if grid_rows:
        ordered = sorted(models, key=lambda k: names[k] != "zhang")
        titles = ["grayscale"] + [{"zhang": "Zhang", "fusion": "fusion"}[names[k]] for k in ordered] + ["ground truth"]
        files["grid"] = comparison_grid(grid_rows, titles, out_dir / "comparison.png", grid_labels)
    report["files"] = {k: str(v) for k, v in files.items()}
    return report
