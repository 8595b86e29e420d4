"""How far a class prior from a sample of N images lands from the prior of all of them.

The question behind ``fastcolor train --prior sample:N``: how many images does the class prior
need? The population is a photo set made from the photos bundled with scikit-image and
scikit-learn, first scaled to a short side of 375 pixels (as ImageNet's), then random square
crops of 30-100 % of the short side with random flips, resized to the training size (``--size``)
and reduced to the ab target as the trainer does (block means, stride 4). Per image the 313-bin
histogram is kept, so a sample's prior is a sum of rows. Each sample size is drawn ``--draws``
times (seeded); the table gives the mean and the worst draw of:

* TV: total variation distance between the smoothed priors (sigma 5), 0.5 * sum |p - q|;
* KL: KL(full || sample) of the smoothed priors, in nats;
* w max rel: the largest relative error of a rarity weight (lambda 0.5) over the 313 bins;
* w mean rel: the relative error of the weights averaged under the full prior (what a pixel sees).

A caveat the numbers carry: crops of a dozen photos are far less varied than a real photo
collection, so these errors are a lower bound for one; real archives need more images for the
same error. Usage: ``python bench/prior_sample.py --images 50000 --draws 10`` (a few minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from PIL import Image

from fastcolor.app.demo import demo_photos, make_crops
from fastcolor.color import rgb_to_lab
from fastcolor.data import reduce_target
from fastcolor.gamut import Q
from fastcolor.ops import nearest_bin, rarity_weights
from fastcolor.reference import smooth_prior


def photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    out = [p for p in list(demo_photos().values()) + list(load_sample_images().images) if p.ndim == 3]
    small = []  # ImageNet-like: the short side 375 pixels (and crops of it are quick to resize)
    for p in out:
        h, w = p.shape[:2]
        k = 375 / min(h, w)
        small.append(np.asarray(Image.fromarray(p).resize((round(w * k), round(h * k)), Image.BILINEAR)))
    return small


def histograms(n: int, size: int, seed: int, batch: int = 250) -> np.ndarray:
    """(n, 313) int32: the nearest-bin counts of each image's ab target."""
    rng = np.random.default_rng(seed)
    pics = photos()
    out = np.zeros((n, Q), dtype=np.int32)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        which = rng.integers(0, len(pics), m)
        crops = [make_crops(pics[k], 1, size, rng)[0] for k in which]
        rgb = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
        ab = reduce_target(rgb_to_lab(rgb)[:, 1:], 4, "area")
        q = nearest_bin(ab).reshape(m, -1)
        rows = torch.arange(m)[:, None].expand_as(q)
        counts = torch.bincount((rows * Q + q).reshape(-1), minlength=m * Q).reshape(m, Q)
        out[start:start + m] = counts.numpy()
        if start % 5000 == 0:
            print(f"{start} images", file=sys.stderr, flush=True)
    return out


def compare(full: np.ndarray, sample: np.ndarray) -> dict[str, float]:
    p, q = smooth_prior(full / full.sum(), 5.0), smooth_prior(sample / sample.sum(), 5.0)
    wp, wq = rarity_weights(p, 0.5), rarity_weights(q, 0.5)
    rel = np.abs(wq / wp - 1)
    return {"tv": 0.5 * float(np.abs(p - q).sum()), "kl": float(np.sum(p * np.log(p / q))),
            "w_max": float(rel.max()), "w_mean": float((p * rel).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20_000])
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128, help="training image side (the target is size / 4)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    h = histograms(args.images, args.size, args.seed)
    print(f"population: {args.images} images of {len(photos())} photos at {args.size} px, {h.sum() // args.images} "
          f"target pixels "
          f"each ({time.perf_counter() - t0:.0f} s)")
    full = h.sum(0)
    rng = np.random.default_rng(args.seed + 1)
    print("| sample | TV mean | TV worst | KL mean | KL worst | w max rel mean | w max rel worst | w mean rel mean |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in args.sizes:
        rs = [compare(full, h[rng.choice(len(h), n, replace=False)].sum(0)) for _ in range(args.draws)]
        col = {k: [r[k] for r in rs] for k in rs[0]}
        print(f"| {n} | {np.mean(col['tv']):.4f} | {max(col['tv']):.4f} | {np.mean(col['kl']):.5f} | "
              f"{max(col['kl']):.5f} | {np.mean(col['w_max']):.3f} | {max(col['w_max']):.3f} | "
              f"{np.mean(col['w_mean']):.4f} |")


if __name__ == "__main__":
    Image.MAX_IMAGE_PIXELS = None
    main()
