"""fastcolor: fast probabilistic image colorization (Zhang, Isola & Efros, ECCV 2016).

Grayscale L in, a distribution over the 313 quantised ab bins out, an annealed mean back to
colour. The hot paths (soft-encoding, the fused class-rebalanced cross-entropy, annealed-mean
decoding) run on custom kernels chosen per device; :mod:`fastcolor.reference` is their spec.
"""
from fastcolor._ext import build_info
from fastcolor._version import __version__
from fastcolor.backends import BackendUnavailable
from fastcolor.gamut import AB_BINS, Q
from fastcolor.ops import (
    AnnealedMeanDecoder,
    PriorAccumulator,
    RebalancedCrossEntropyLoss,
    SoftLabels,
    annealed_mean,
    image_mask_nongray,
    nearest_bin,
    rarity_weights,
    rebalanced_cross_entropy,
    soft_encode,
)

__all__ = [
    "__version__", "build_info", "BackendUnavailable", "AB_BINS", "Q",
    "AnnealedMeanDecoder", "PriorAccumulator", "RebalancedCrossEntropyLoss", "SoftLabels",
    "annealed_mean", "image_mask_nongray", "nearest_bin", "rarity_weights",
    "rebalanced_cross_entropy", "soft_encode",
]
