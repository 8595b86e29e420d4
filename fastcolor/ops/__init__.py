"""The public ops: one module per hot path (autograd and backend dispatch live there)."""
from fastcolor.ops.decode import AnnealedMeanDecoder, annealed_mean
from fastcolor.ops.encode import SoftLabels, soft_encode
from fastcolor.ops.loss import RebalancedCrossEntropyLoss, image_mask_nongray, rebalanced_cross_entropy
from fastcolor.ops.prior import PriorAccumulator, nearest_bin, rarity_weights

__all__ = [
    "AnnealedMeanDecoder", "annealed_mean", "SoftLabels", "soft_encode",
    "RebalancedCrossEntropyLoss", "image_mask_nongray", "rebalanced_cross_entropy",
    "PriorAccumulator", "nearest_bin", "rarity_weights",
]
