"""A run's class prior and rarity weights: ``prior.safetensors`` in the run directory.

The prior comes from ``TrainConfig.prior`` (:mod:`fastcolor.data.prior`): the training images
(``"data"``), a seeded sample of them (``"sample:N"``; all of them when there are no more than
N, recorded as ``"data"``), or the authors' ImageNet prior (``"imagenet"``, no pass over the
data). The file records what it was computed from (the kind of prior, the training images'
fingerprint, image size, target stride and reduction, ``lam`` and ``smooth_sigma``; for a
sample its seed and size). A later run reuses it while that still holds; otherwise it is
computed again (a fresh run) or refused (a resumed run: the checkpoint was trained with the old
weights). Zhang models only: a fusion model has no prior.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcolor.data.prior import imagenet_prior, parse_prior, prior_of_batches
from fastcolor.io import load_tensors, save_tensors
from fastcolor.ops import rarity_weights
from fastcolor.training.config import TrainConfig
from fastcolor.training.distributed import Dist

__all__ = ["ClassPrior"]


def _weights(prior: np.ndarray, lam: float) -> np.ndarray:
    """The rarity weights, refused (naming ``prior_lam``) unless finite as the loss takes them (float32)."""
    try:
        w = np.asarray(rarity_weights(prior, lam=lam))
    except ValueError as exc:
        raise ValueError(f"prior_lam (--prior-lambda): {str(exc).removeprefix('lam: ')}") from None
    with np.errstate(over="ignore"):
        over = not np.isfinite(w.astype(np.float32)).all()
    if over:
        q = int(np.argmax(w))
        raise ValueError(f"prior_lam (--prior-lambda): {lam!r} gives bin {q} (prior {prior[q]:.3g}) the weight "
                         f"{w[q]:.3g}, beyond float32's range, in which the loss takes the weights; use prior_lam > 0 "
                         f"(then no weight exceeds {len(w)} / prior_lam times the smallest; the paper uses 0.5)")
    return w


class ClassPrior:
    """The rarity weights of a run (see the module docstring): :meth:`check` decides, before
    anything is written, whether ``prior.safetensors`` can be reused (and refuses a resumed run
    whose prior no longer fits); :meth:`weights` computes it if needed and loads it."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: Dist):
        self.cfg, self.d = cfg, d
        self.path = Path(run_dir) / "prior.safetensors"
        self.stale: str | None = None

    def record(self, source, size: int, stride: int) -> dict[str, Any]:
        """What the prior of this run is computed from, as ``prior.safetensors`` records it."""
        kind, n = parse_prior(self.cfg.prior)
        if kind == "imagenet":
            return {"prior": "imagenet", "lam": self.cfg.prior_lam}
        want = {"prior": "data", "lam": self.cfg.prior_lam, "smooth_sigma": self.cfg.prior_sigma,
                "split": source.train_fingerprint, "size": size, "stride": stride,
                "target_reduction": self.cfg.target_reduction}
        if kind == "sample" and n < source.train_images:
            want.update(prior=f"sample:{n}", seed=self.cfg.seed)
        return want

    def check(self, want: dict[str, Any], resuming_from: Path | None) -> None:
        """Decide whether the file on disk is what this run needs (rank 0 only); refuse a
        resumed run whose prior was computed for other settings."""
        self.want = want
        if not self.d.main:
            return
        path, stale = self.path, "missing"
        if path.is_file():
            try:
                tensors, meta = load_tensors(path)
                ok = tensors["prior"].shape == (313,) and tensors["weights"].shape == (313,)
                stale = None if ok else "damaged"
            except (ValueError, KeyError) as exc:
                meta, stale = {}, f"damaged ({exc})"
            if stale is None and "split" not in meta:
                stale = None if resuming_from is not None else "it does not record its split (older fastcolor)"
            elif stale is None:
                # a prior written before target_reduction (prior) was recorded was made from block
                # means (all training images); resumed, an unrecorded kind keeps the weights trained with
                legacy = {"target_reduction": "area", "prior": "data"}
                if resuming_from is not None and "prior" not in meta and want.get("prior") != "imagenet":
                    legacy["prior"] = want["prior"]
                got = {k: meta.get(k, legacy.get(k)) for k in want}
                diff = [f"{k} {got[k]!r} -> {v!r}" for k, v in want.items() if got[k] != v]
                stale = "; ".join(diff) or None
                if stale and resuming_from is not None:
                    raise ValueError(f"{path} was computed for another setting ({stale}) than this resumed run, "
                                     f"and {resuming_from} was trained with it: resume with the same settings "
                                     f"(e.g. --size), or start a new run with restart=True (fastcolor train "
                                     f"--restart)")
            if stale:
                warnings.warn(f"{path} is out of date ({stale}): computing the class prior again", stacklevel=4)
        self.stale = stale

    def weights(self, source) -> torch.Tensor:
        """The rarity weights (313,) float32 on the source's device, computed first (rank 0: the
        ImageNet table, or a pass over ``source.prior_loader()``) where :meth:`check` found no
        usable file."""
        if self.d.main and self.stale:
            if self.want["prior"] == "imagenet":
                prior, images = imagenet_prior(), "ImageNet's training set (Zhang et al.'s prior_probs.npy)"
            else:
                loader = source.prior_loader()
                prior = prior_of_batches(loader, self.cfg.prior_sigma, self.cfg.progress, total=len(loader))
                images = len(loader.dataset)
            w = _weights(prior, self.cfg.prior_lam)
            save_tensors(self.path, {"prior": torch.from_numpy(prior), "weights": torch.from_numpy(w)},
                         {**self.want, "images": images})
        self.d.barrier()
        tensors, _ = load_tensors(self.path)
        return tensors["weights"].to(source.device, torch.float32)
