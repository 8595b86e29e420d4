"""Colorization metrics, per image and per class, and the ``evaluate`` entry point.

On the 313-bin output (Zhang): accuracy of the argmax against the truth's nearest bin,
cross-entropy against it, and an approximate accuracy on coarser bins (the 10-unit grid
merged into ``grid``-unit cells, probabilities summed per cell).
On decoded ab (both models): MSE and R^2 per image on ab / 128, and Zhang et al.'s AuC: the
share of pixels whose ab error is within a threshold, swept 0..150 and integrated
(normalised to 0..1), raw and class-rebalanced (each true ab bin weighted equally).
On RGB: PSNR and SSIM (skimage.metrics) and Hasler & Suesstrunk (2003) colourfulness.
"""
from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from fastcolor.color import l_ab_to_rgb
from fastcolor.colorize import decode_ab
from fastcolor.data import ColorizationDataset, ImageItem, index_images, load_split
from fastcolor.gamut import A_MIN, AB_BINS, B_MIN, Q
from fastcolor.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from fastcolor.models.serialization import load_model
from fastcolor.ops import nearest_bin

__all__ = ["bin_accuracy", "bin_cross_entropy", "coarse_bin_map", "coarse_accuracy", "ab_mse", "ab_r2",
           "AucAccumulator", "auc", "psnr", "ssim", "colorfulness", "comparison_grid", "markdown_table",
           "evaluate", "Splits", "AUC_MAX_THRESHOLD"]

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
    """Share of pixels whose argmax bin is the truth's nearest bin (per image with ``reduction="none"``)."""
    _check("logits", logits, Q)
    _check("target_ab", target_ab, 2)
    hit = (logits.argmax(1) == _nearest(target_ab)).float().flatten(1).mean(1)
    return hit.mean() if reduction == "mean" else hit


def bin_cross_entropy(logits: torch.Tensor, target_ab: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits against the truth's nearest bin (hard labels)."""
    _check("logits", logits, Q)
    _check("target_ab", target_ab, 2)
    ce = F.cross_entropy(logits.float(), _nearest(target_ab), reduction="none").flatten(1).mean(1)
    return ce.mean() if reduction == "mean" else ce


def coarse_bin_map(grid: float = 20.0) -> np.ndarray:
    """(313,) int64: the index of the ``grid``-unit cell holding each bin centre (cells numbered densely)."""
    if not grid > 0:
        raise ValueError(f"grid must be positive, got {grid!r}")
    cells = np.stack([np.floor((AB_BINS[:, 0] - A_MIN + 5.0) / grid), np.floor((AB_BINS[:, 1] - B_MIN + 5.0) / grid)], 1)
    _, dense = np.unique(cells, axis=0, return_inverse=True)
    return dense.reshape(-1).astype(np.int64)


def coarse_accuracy(logits: torch.Tensor, target_ab: torch.Tensor, grid: float = 20.0,
                    reduction: str = "mean") -> torch.Tensor:
    """Accuracy after merging bins into ``grid``-unit cells (probabilities summed per cell)."""
    _check("logits", logits, Q)
    cmap = torch.from_numpy(coarse_bin_map(grid)).to(logits.device)
    ncells = int(cmap.max()) + 1
    p = logits.float().softmax(1)
    merged = torch.zeros(p.shape[0], ncells, *p.shape[2:], device=p.device).index_add_(1, cmap, p)
    hit = (merged.argmax(1) == cmap[_nearest(target_ab)]).float().flatten(1).mean(1)
    return hit.mean() if reduction == "mean" else hit


def ab_mse(pred_ab: torch.Tensor, true_ab: torch.Tensor) -> torch.Tensor:
    """(N,) per-image mean squared error on ab / 128 (the fusion regression loss)."""
    _check("pred_ab", pred_ab, 2)
    _check("true_ab", true_ab, 2)
    return ((pred_ab.double() - true_ab.double()) / 128.0).square().flatten(1).mean(1)


def ab_r2(pred_ab: torch.Tensor, true_ab: torch.Tensor) -> torch.Tensor:
    """(N,) per-image coefficient of determination of ab (both channels, around each channel's mean).
    NaN for an image whose true ab is constant (e.g. grey)."""
    _check("pred_ab", pred_ab, 2)
    _check("true_ab", true_ab, 2)
    t, p = true_ab.double().flatten(2), pred_ab.double().flatten(2)
    ss_res = (t - p).square().sum((1, 2))
    ss_tot = (t - t.mean(2, keepdim=True)).square().sum((1, 2))
    return torch.where(ss_tot > 1e-9, 1.0 - ss_res / ss_tot.clamp(min=1e-12), torch.full_like(ss_tot, math.nan))


class AucAccumulator:
    """Streams (pred_ab, true_ab) batches; :meth:`result` gives the raw and rebalanced AuC.

    Errors are binned by ``ceil(|pred - true|)`` per true nearest bin, so thresholds 0..150
    (integers) are exact.
    """

    def __init__(self, max_threshold: int = AUC_MAX_THRESHOLD):
        self.max_threshold = int(max_threshold)
        self.counts = np.zeros((Q, self.max_threshold + 2), dtype=np.int64)

    def update(self, pred_ab: torch.Tensor, true_ab: torch.Tensor) -> "AucAccumulator":
        _check("pred_ab", pred_ab, 2)
        _check("true_ab", true_ab, 2)
        err = (pred_ab.double() - true_ab.double()).norm(dim=1)
        slot = torch.ceil(err - 1e-9).clamp(0, self.max_threshold + 1).long().reshape(-1).cpu()
        q = _nearest(true_ab).reshape(-1).cpu()
        self.counts += torch.bincount(q * (self.max_threshold + 2) + slot,
                                      minlength=Q * (self.max_threshold + 2)).reshape(Q, -1).numpy()
        return self

    def curves(self) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative share of pixels within thresholds 0..max: (raw, rebalanced)."""
        cum = np.cumsum(self.counts, axis=1)[:, : self.max_threshold + 1].astype(np.float64)
        per_bin = self.counts.sum(1)
        if per_bin.sum() == 0:
            raise ValueError("AucAccumulator: expected at least one pixel before result(), got none")
        raw = cum.sum(0) / per_bin.sum()
        present = per_bin > 0
        rebal = (cum[present] / per_bin[present, None]).mean(0)
        return raw, rebal

    def result(self) -> tuple[float, float]:
        raw, rebal = self.curves()
        x = np.arange(self.max_threshold + 1)
        return float(np.trapezoid(raw, x) / self.max_threshold), float(np.trapezoid(rebal, x) / self.max_threshold)


def auc(pred_ab: torch.Tensor, true_ab: torch.Tensor, max_threshold: int = AUC_MAX_THRESHOLD) -> tuple[float, float]:
    """(raw AuC, class-rebalanced AuC) of ab errors over thresholds 0..max_threshold, each in [0, 1]."""
    return AucAccumulator(max_threshold).update(pred_ab, true_ab).result()


def _hwc(rgb: torch.Tensor) -> np.ndarray:
    return rgb.detach().double().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def psnr(pred_rgb: torch.Tensor, true_rgb: torch.Tensor) -> np.ndarray:
    """(N,) PSNR in dB of sRGB images in [0, 1] (skimage.metrics.peak_signal_noise_ratio)."""
    from skimage.metrics import peak_signal_noise_ratio

    _check("pred_rgb", pred_rgb, 3)
    _check("true_rgb", true_rgb, 3)
    p, t = _hwc(pred_rgb), _hwc(true_rgb)
    with np.errstate(divide="ignore"):
        return np.array([peak_signal_noise_ratio(a, b, data_range=1.0) for b, a in zip(p, t)])


def ssim(pred_rgb: torch.Tensor, true_rgb: torch.Tensor) -> np.ndarray:
    """(N,) SSIM of sRGB images in [0, 1] (skimage.metrics.structural_similarity, channel_axis)."""
    from skimage.metrics import structural_similarity

    _check("pred_rgb", pred_rgb, 3)
    _check("true_rgb", true_rgb, 3)
    p, t = _hwc(pred_rgb), _hwc(true_rgb)
    win = min(7, *p.shape[1:3])
    win -= 1 - win % 2
    return np.array([structural_similarity(a, b, data_range=1.0, channel_axis=-1, win_size=win)
                     for a, b in zip(t, p)])


def colorfulness(rgb: torch.Tensor) -> torch.Tensor:
    """(N,) Hasler & Suesstrunk (2003) colourfulness of sRGB in [0, 1], on the 0..255 scale:
    ``sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2)``, rg = R - G, yb = (R + G) / 2 - B."""
    _check("rgb", rgb, 3)
    x = rgb.double() * 255.0
    rg = (x[:, 0] - x[:, 1]).flatten(1)
    yb = (0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]).flatten(1)
    std = torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False))
    mean = torch.sqrt(rg.mean(1).square() + yb.mean(1).square())
    return std + 0.3 * mean


def comparison_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], path: str | os.PathLike,
                    row_labels: Sequence[str] | None = None) -> Path:
    """A PNG grid of images (rows of HxWx3 arrays, e.g. grayscale | Zhang | fusion | ground truth), atomic."""
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
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- evaluate

_COLUMNS = ["class", "split", "images", "acc313", "ce313", "acc_coarse20", "mse", "r2", "auc", "auc_rebal",
            "psnr", "ssim", "colorfulness_pred", "colorfulness_true"]


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
Splits = Union[Sequence[str], Mapping[str, Sequence[ImageItem]]]


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


@torch.no_grad()
def _predict(model, L: torch.Tensor, T: float):
    """(decoded ab at L's size, logits or None)."""
    out = model(L) if model.config["arch"] == "zhang" else model(L, model.embed(L))
    ab = decode_ab(model, out, T)
    if ab.shape[-2:] != L.shape[-2:]:
        ab = F.interpolate(ab, size=L.shape[-2:], mode="bilinear", align_corners=False)
    return ab, (out if model.config["arch"] == "zhang" else None)


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def evaluate(run_dir_or_weights: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
             splits: Splits | None = None, compare: str | os.PathLike | None = None, T: float = 0.38,
             batch_size: int = 32, device: str = "auto", max_images: int | None = None,
             grid_images: int = 6, backbone_weights: str | os.PathLike | None = None) -> dict[str, Any]:
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
    Returns ``{"rows": [...], "models": {...}, "files": {...}}``.
    """
    src = Path(run_dir_or_weights)
    data_dir = Path(data_dir)
    if not src.exists():
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
    out_dir = Path(out_dir) if out_dir is not None else (src if src.is_dir() else src.parent) / "eval"
    items = _resolve_items(src, data_dir, splits)

    results: dict[str, list[dict[str, Any]]] = {k: [] for k in models}
    grid_rows: list[list[np.ndarray]] = []
    grid_labels: list[str] = []
    for split_name, split_items_ in items.items():
        split_items_ = split_items_[:max_images] if max_images else split_items_
        groups: dict[str, dict[str, _Group]] = {k: defaultdict(_Group) for k in models}
        size = models["model"].config["input_size"]
        ds = ColorizationDataset(data_dir, split_items_, size=size, target_stride=1, augment=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size)
        for batch in loader:
            L, ab = batch["L"].to(dev), batch["ab"].to(dev)
            labels = [ds.items[int(i)].label for i in batch["index"]]
            true_rgb = l_ab_to_rgb(L, ab)
            preds = {}
            for key, model in models.items():
                Lm = L if model.config["input_size"] == size else F.interpolate(
                    L, size=model.config["input_size"], mode="bilinear", antialias=True)
                pab, logits = _predict(model, Lm, T)
                if pab.shape[-2:] != L.shape[-2:]:
                    pab = F.interpolate(pab, size=L.shape[-2:], mode="bilinear", align_corners=False)
                pred_rgb = l_ab_to_rgb(L, pab)
                preds[key] = pred_rgb
                per = {"mse": ab_mse(pab, ab), "r2": ab_r2(pab, ab), "psnr": psnr(pred_rgb, true_rgb),
                       "ssim": ssim(pred_rgb, true_rgb), "colorfulness_pred": colorfulness(pred_rgb),
                       "colorfulness_true": colorfulness(true_rgb)}
                if logits is not None:
                    ab_small = F.avg_pool2d(ab, L.shape[-1] // logits.shape[-1])
                    per.update(acc313=bin_accuracy(logits, ab_small, "none"),
                               ce313=bin_cross_entropy(logits, ab_small, "none"),
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
    for key, rows in results.items():
        md.append(f"## {key}: {names[key]} ({src if key == 'model' else compare})\n\n")
        md.append(markdown_table(rows, [c for c in _COLUMNS if any(c in r for r in rows)]))
        md.append("\n")
    report = {"rows": results["model"], "models": {k: {"arch": names[k], "rows": v} for k, v in results.items()},
              "T": T, "source": str(src), "compare": None if compare is None else str(compare)}
    files = {"json": atomic_write_json(out_dir / "metrics.json", report),
             "markdown": atomic_write_text(out_dir / "metrics.md", "".join(md))}
    if grid_rows:
        ordered = sorted(models, key=lambda k: names[k] != "zhang")
        titles = ["grayscale"] + [{"zhang": "Zhang", "fusion": "fusion"}[names[k]] for k in ordered] + ["ground truth"]
        files["grid"] = comparison_grid(grid_rows, titles, out_dir / "comparison.png", grid_labels)
    report["files"] = {k: str(v) for k, v in files.items()}
    return report
