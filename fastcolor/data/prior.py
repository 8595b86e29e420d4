"""The class prior of a data set: how often each of the 313 ab bins is the nearest one.

:func:`compute_class_prior` streams the ab targets of a dataset (or any iterable of batches)
through :class:`fastcolor.PriorAccumulator`, with the DataLoader's worker processes and a
progress bar; the rarity weights of the loss come from it (:func:`fastcolor.rarity_weights`).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from fastcolor.ops import PriorAccumulator

__all__ = ["compute_class_prior", "prior_of_batches"]


def prior_of_batches(batches: Iterable[dict[str, Any]], smooth_sigma: float | None = 5.0, progress: bool = False,
                     total: int | None = None, desc: str = "class prior") -> np.ndarray:
    """The prior (313,) float64 of the ``ab`` of every batch (dicts with ``ab`` (N, 2, H, W) in Lab
    units), smoothed with ``smooth_sigma`` (None: the raw frequencies); ``progress`` shows a tqdm
    bar of ``total`` batches."""
    from tqdm.auto import tqdm

    acc = PriorAccumulator()
    for batch in tqdm(batches, total=total, desc=desc, leave=False, disable=not progress):
        acc.update(batch["ab"])
    return acc.prior(smooth_sigma=smooth_sigma)


def compute_class_prior(dataset: Dataset, batch_size: int = 100, workers: int = 0, smooth_sigma: float = 5.0,
                        progress: bool = False) -> np.ndarray:
    """Smoothed empirical prior (313,) of the dataset's ab targets, streamed batch by batch
    (``workers`` DataLoader processes; ``progress``: a tqdm bar)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return prior_of_batches(loader, smooth_sigma, progress, total=len(loader))
