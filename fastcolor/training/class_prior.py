"""A run's class prior and rarity weights: ``prior.safetensors`` in the run directory.

The file records what it was computed from (the training images' fingerprint, image size,
target stride and reduction, ``lam`` and ``smooth_sigma``). A later run reuses it while that
still holds; otherwise it is computed again (a fresh run) or refused (a resumed run: the
checkpoint was trained with the old weights). Zhang models only: a fusion model has no prior.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcolor.data.prior import prior_of_batches
from fastcolor.io import load_tensors, save_tensors
from fastcolor.ops import rarity_weights
from fastcolor.training.config import TrainConfig
from fastcolor.training.distributed import Dist

__all__ = ["ClassPrior"]


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
        return {"lam": self.cfg.prior_lam, "smooth_sigma": self.cfg.prior_sigma, "split": source.train_fingerprint,
                "size": size, "stride": stride, "target_reduction": self.cfg.target_reduction}

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
                # a prior written before target_reduction was recorded was made from block means
                got = {k: meta.get(k, "area" if k == "target_reduction" else None) for k in want}
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
        """The rarity weights (313,) float32 on the source's device, computed first (rank 0, from
        ``source.prior_loader()``) where :meth:`check` found no usable file."""
        if self.d.main and self.stale:
            loader = source.prior_loader()
            prior = prior_of_batches(loader, self.cfg.prior_sigma, self.cfg.progress, total=len(loader))
            w = rarity_weights(prior, lam=self.cfg.prior_lam)
            save_tensors(self.path, {"prior": torch.from_numpy(prior), "weights": torch.from_numpy(np.asarray(w))},
                         self.want)
        self.d.barrier()
        tensors, _ = load_tensors(self.path)
        return tensors["weights"].to(source.device, torch.float32)
