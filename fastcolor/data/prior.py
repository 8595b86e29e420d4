"""The class prior of a data set: how often each of the 313 ab bins is the nearest one.

Where a run's prior comes from (``TrainConfig.prior``, ``fastcolor train --prior``):

* ``"data"``: every training image (:func:`compute_class_prior` streams their ab targets
  through :class:`fastcolor.PriorAccumulator`, with the DataLoader's workers and a progress bar);
* ``"sample:N"``: N training images drawn at random, seeded (:func:`sample_items`): the same
  images every time. The default (:data:`fastcolor.recipes.DEFAULT_PRIOR`, ``"sample:5000"``) is
  the whole training set up to 5000 images and a sample of 5000 beyond (bench/RESULTS.md, "class
  prior from a sample", measures how far a sample lands from the full prior);
* ``"imagenet"``: the authors' published ImageNet prior (:func:`imagenet_prior`), no pass at all.

The rarity weights of the loss come from the prior (:func:`fastcolor.rarity_weights`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from fastcolor.gamut import A_MIN, B_MIN, CELL_TO_BIN, GRID, Q
from fastcolor.ops import PriorAccumulator

__all__ = ["compute_class_prior", "prior_of_batches", "imagenet_prior", "parse_prior", "sample_items", "PRIOR_KINDS"]

#: The kinds of ``prior`` a run takes: "data", "sample:N", "imagenet".
PRIOR_KINDS = ("data", "sample", "imagenet")


def parse_prior(spec: str) -> tuple[str, int | None]:
    """``"data"`` -> ("data", None); ``"sample:N"`` -> ("sample", N); ``"imagenet"`` ->
    ("imagenet", None); anything else is a ValueError naming ``prior``."""
    what = "expected 'data', 'sample:N' (N a positive number of images) or 'imagenet'"
    if not isinstance(spec, str):
        raise ValueError(f"prior: {what}, got {spec!r}")
    if spec in ("data", "imagenet"):
        return spec, None
    kind, _, n = spec.partition(":")
    if kind == "sample" and n.isdigit() and int(n) >= 1:
        return "sample", int(n)
    raise ValueError(f"prior: {what}, got {spec!r}")


def sample_items(items: Sequence[Any], n: int, seed: int) -> list[Any]:
    """``n`` of ``items`` drawn without replacement with ``seed`` (all of them when there are no
    more than ``n``), in their order: the same images every time for the same items and seed."""
    if n >= len(items):
        return list(items)
    pick = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in pick]


#: Zhang, Isola & Efros (ECCV 2016), the ImageNet class prior their training net uses:
#: ``resources/prior_probs.npy`` of github.com/richzhang/colorization (313 float64 values, the
#: empirical ab distribution of ImageNet's training images, smoothed with sigma 5, in the order
#: of their ``pts_in_hull.npy``), given here to 6 significant figures as
#: ``a: (first b, (p(a, b), p(a, b + 10), ...))`` for each column a of the gamut. Published in that
#: repository under the BSD 2-Clause licence (copyright 2016 Richard Zhang, Phillip Isola, Alexei A.
#: Efros); fastcolor's own code is BSD 3-Clause (README, section Licence).
_IMAGENET_PRIOR: dict[int, tuple[int, tuple[float, ...]]] = {
    -90: (50, (4.88637e-08, 1.38518e-07, 5.76575e-07, 2.63934e-06, 9.50312e-07)),
    -80: (20, (
        3.56691e-08, 2.53701e-07, 7.52531e-07, 1.96177e-06, 3.01481e-06, 4.88645e-06, 5.64053e-06, 1.29429e-06
    )),
    -70: (0, (
        9.3668e-08, 6.35391e-07, 2.24641e-06, 5.25554e-06, 8.76607e-06, 1.34092e-05, 1.82779e-05, 1.60725e-05,
        7.22202e-06, 1.19143e-06
    )),
    -60: (-20, (
        4.18888e-07, 1.88787e-06, 5.56257e-06, 1.39431e-05, 2.40792e-05, 3.47404e-05, 4.82281e-05, 6.84467e-05,
        7.22764e-05, 4.29625e-05, 1.64851e-05, 3.02568e-06
    )),
    -50: (-30, (
        7.73805e-07, 1.64461e-05, 4.38741e-05, 5.87341e-05, 8.72316e-05, 0.000118771, 0.000167089, 0.000263252,
        0.000338518, 0.000260347, 0.000126975, 4.08962e-05, 7.22818e-06, 1.99694e-07
    )),
    -40: (-40, (
        8.92095e-07, 2.17681e-05, 0.000112513, 0.00021638, 0.000266031, 0.000332276, 0.000505886, 0.000930737,
        0.00137461, 0.001224, 0.000684942, 0.000266332, 7.81269e-05, 1.51248e-05, 6.91909e-07
    )),
    -30: (-50, (
        7.84442e-07, 2.60443e-05, 0.000173226, 0.000426183, 0.000694351, 0.000910107, 0.00136396, 0.00265614,
        0.00428549, 0.00412208, 0.00246152, 0.00105697, 0.00036528, 0.000116698, 3.93379e-05, 5.51557e-06
    )),
    -20: (-50, (
        2.31736e-05, 0.000218864, 0.00070025, 0.00139983, 0.0024677, 0.00412544, 0.00665953, 0.00948145,
        0.00947152, 0.00601423, 0.00273633, 0.00105932, 0.000424813, 0.000206609, 0.000112517, 1.82344e-05
    )),
    -10: (-60, (
        1.29806e-05, 0.00019846, 0.00102349, 0.00302121, 0.00683473, 0.0191548, 0.0491089, 0.0373436, 0.021541,
        0.0119576, 0.00537496, 0.00222045, 0.00100228, 0.000534522, 0.000298876, 0.000113313, 7.14431e-06
    )),
    0: (-70, (
        5.09891e-06, 0.000117017, 0.000791609, 0.0028516, 0.00663106, 0.0152824, 0.0642029, 0.201234, 0.108299,
        0.0415076, 0.0165515, 0.00617025, 0.00249038, 0.00117211, 0.000626214, 0.000319616, 7.25174e-05,
        1.56894e-06
    )),
    10: (-80, (
        1.36854e-06, 4.80932e-05, 0.000354808, 0.0011986, 0.00242656, 0.00377853, 0.00661168, 0.0195601,
        0.0531084, 0.0483595, 0.0327312, 0.0176506, 0.00757483, 0.00307662, 0.00131643, 0.00060892, 0.000251085,
        2.98835e-05
    )),
    20: (-80, (
        1.62991e-05, 0.000150674, 0.000448743, 0.000811259, 0.00102889, 0.0010709, 0.00119569, 0.00219157,
        0.0054147, 0.0105137, 0.0122408, 0.0098372, 0.00575596, 0.00278841, 0.00122907, 0.000518767, 0.000160174,
        8.73309e-06
    )),
    30: (-90, (
        3.67741e-06, 6.01862e-05, 0.000195014, 0.000329028, 0.000392109, 0.000336467, 0.000287581, 0.000355865,
        0.000600025, 0.00130303, 0.00294265, 0.0043551, 0.00423253, 0.00310585, 0.00185082, 0.000927591,
        0.000396522, 8.90297e-05, 2.16969e-06
    )),
    40: (-100, (
        5.71286e-07, 2.03626e-05, 9.38234e-05, 0.000153401, 0.00017329, 0.000139874, 0.000105414, 0.000124054,
        0.000168734, 0.000272701, 0.000494872, 0.000993267, 0.00184475, 0.00231814, 0.00180826, 0.00115884,
        0.000629567, 0.000267368, 3.9811e-05, 4.21986e-07
    )),
    50: (-100, (
        4.98443e-06, 4.41127e-05, 8.27534e-05, 7.93993e-05, 5.43451e-05, 4.12448e-05, 4.86518e-05, 6.6812e-05,
        9.23086e-05, 0.00014898, 0.000244393, 0.000432722, 0.000818054, 0.00139191, 0.00154712, 0.000945959,
        0.000447193, 0.000168977, 1.5443e-05
    )),
    60: (-110, (
        8.54773e-07, 1.67928e-05, 4.30847e-05, 3.90192e-05, 2.08583e-05, 1.52735e-05, 1.76861e-05, 2.59902e-05,
        3.63725e-05, 5.40606e-05, 8.49764e-05, 0.000125965, 0.000194377, 0.000354923, 0.000660036, 0.00102443,
        0.000973278, 0.000420818, 0.000109544, 5.62733e-06
    )),
    70: (-110, (
        5.84479e-06, 2.46368e-05, 1.78843e-05, 7.63803e-06, 5.27526e-06, 5.87004e-06, 9.44848e-06, 1.41465e-05,
        1.89742e-05, 2.83318e-05, 4.17858e-05, 5.53432e-05, 7.32897e-05, 0.000117446, 0.00021751, 0.00037346,
        0.00052329, 0.000394743, 9.10961e-05, 2.36172e-06
    )),
    80: (-110, (
        7.43685e-06, 9.7935e-06, 3.56093e-06, 2.23532e-06, 2.22702e-06, 2.89101e-06, 5.42783e-06, 6.57867e-06,
        8.08948e-06, 1.07833e-05, 1.43151e-05, 1.61774e-05, 1.76172e-05, 2.2242e-05, 3.43044e-05, 5.67338e-05,
        9.24107e-05, 0.000134054, 5.91858e-05
    )),
    90: (-110, (
        3.78755e-07, 4.58243e-07, 4.81466e-07, 6.92723e-07, 1.01985e-06, 2.3483e-06, 2.92548e-06, 2.83354e-06,
        2.48963e-06, 2.08169e-06, 2.12281e-06, 1.66436e-06, 1.28913e-06, 1.11413e-06, 1.22927e-06, 1.59697e-06,
        2.4649e-06, 5.07246e-06, 3.65974e-06
    )),
    100: (-90, (
        6.07144e-09, 3.6556e-08, 2.90158e-07, 1.4043e-06, 6.00512e-07, 2.64901e-07, 1.20902e-07, 4.78527e-08,
        2.88153e-08, 1.4504e-08
    )),
}


def imagenet_prior() -> np.ndarray:
    """The authors' ImageNet prior (see :data:`_IMAGENET_PRIOR`), float64 (313,) in
    :data:`fastcolor.AB_BINS` order, normalised to sum 1 (the 6-figure table sums to 1 within 4e-7).

    Their training layer mixes it with the uniform distribution as it is, unsmoothed further:
    so does a run with ``prior="imagenet"`` (``prior_sigma`` does not apply to it).

    Example:
        >>> import fastcolor
        >>> p = imagenet_prior()
        >>> fastcolor.AB_BINS[p.argmax()].tolist(), round(float(p.max()), 4)   # grey is the commonest
        ([0.0, 0.0], 0.2012)
    """
    prior = np.full(Q, np.nan)
    for a, (b0, values) in _IMAGENET_PRIOR.items():
        for j, p in enumerate(values):
            q = CELL_TO_BIN[round((a - A_MIN) / GRID), round((b0 + GRID * j - B_MIN) / GRID)]
            if q < 0 or not np.isnan(prior[q]):
                raise AssertionError(f"ImageNet prior table: ab ({a}, {b0 + GRID * j}) is no bin or given twice")
            prior[q] = p
    if np.isnan(prior).any():
        raise AssertionError(f"ImageNet prior table: {int(np.isnan(prior).sum())} bin(s) have no value")
    return prior / prior.sum()


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
