"""Per-image transforms: the ab target's reduction to the network's resolution and the
run-time augmentation (random zoom, rotation, shear and flip; kornia, imported when used)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TARGET_REDUCTIONS", "reduce_target", "FILL_MODES", "Augmentation", "augmentation"]


#: How :func:`reduce_target` brings the ab target down to the network's output resolution.
TARGET_REDUCTIONS = ("subsample", "area")


def reduce_target(ab: torch.Tensor, stride: int, how: str = "subsample") -> torch.Tensor:
    """The ab target at ``1/stride`` of the input resolution.

    Args:
        ab: (N, 2, H, W) or (2, H, W) float ab in Lab units; H and W divisible by ``stride``.
        stride: positive int, the network's output stride (4 for ZhangNet, 1 for FusionNet).
        how: ``"subsample"`` (default) takes the top-left pixel of every ``stride`` x ``stride``
            block, ``ab[..., ::stride, ::stride]``: Zhang et al.'s (ECCV 2016) training net
            takes the ab target at 1/4 resolution this way. ``"area"`` averages each block
            (fastcolor v1's behaviour, which mixes colours across edges into a value that may
            occur in none of the pixels).

    Returns:
        ab of shape (..., 2, H/stride, W/stride), contiguous, same dtype and device;
        ``stride == 1`` returns ``ab`` itself.

    Example:
        >>> ab = torch.arange(32.0).reshape(2, 4, 4)
        >>> reduce_target(ab, 2)[0].tolist()
        [[0.0, 2.0], [8.0, 10.0]]
        >>> reduce_target(ab, 2, "area")[0].tolist()
        [[2.5, 4.5], [10.5, 12.5]]
    """
    if how not in TARGET_REDUCTIONS:
        raise ValueError(f"how must be one of {TARGET_REDUCTIONS}, got {how!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if not isinstance(ab, torch.Tensor) or ab.dim() not in (3, 4) or ab.shape[-3] != 2:
        shape = tuple(ab.shape) if isinstance(ab, torch.Tensor) else type(ab).__name__
        raise ValueError(f"ab must be a (N, 2, H, W) or (2, H, W) tensor, got {shape}")
    if ab.shape[-1] % stride or ab.shape[-2] % stride:
        raise ValueError(f"ab's height and width must be divisible by stride={stride}, got {tuple(ab.shape[-2:])}")
    if stride == 1:
        return ab
    if how == "subsample":
        return ab[..., ::stride, ::stride].contiguous()  # a copy: the view would keep the full-size ab alive
    return F.avg_pool2d(ab, stride)


#: Fill modes of :func:`augmentation` (Keras' names) -> kornia's ``padding_mode``.
FILL_MODES = {"nearest": "border", "reflect": "reflection", "constant": "zeros"}


class Augmentation(torch.nn.Module):
    """Random horizontal flip, then a random affine map (rotation, zoom, shear), on one RGB
    image (3, H, W), uint8 or float in [0, 1] -> float32 (3, H, W) in [0, 1].

    Built on ``kornia.augmentation`` (``RandomHorizontalFlip`` and ``RandomAffine``, bilinear),
    because torchvision's ``RandomAffine`` fills the uncovered corners only with a constant.
    Its random draws come from torch's global generator, so the trainer's per-epoch
    ``torch.manual_seed`` (and the DataLoader's per-worker seeds) make it deterministic.
    See :func:`augmentation` for the arguments.
    """

    def __init__(self, degrees: float, zoom: tuple[float, float], shear: float, hflip: bool, fill_mode: str):
        super().__init__()
        import kornia.augmentation as K

        if fill_mode not in FILL_MODES:
            raise ValueError(f"fill_mode must be one of {sorted(FILL_MODES)}, got {fill_mode!r}")
        self.fill_mode = fill_mode
        ops: list[torch.nn.Module] = [K.RandomHorizontalFlip(p=0.5)] if hflip else []
        ops.append(K.RandomAffine(degrees=degrees, scale=tuple(zoom), shear=shear, resample="bilinear",
                                  padding_mode=FILL_MODES[fill_mode], align_corners=False, p=1.0))
        self.ops = torch.nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be an RGB image tensor of shape (3, H, W), got {got}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return self.ops(x[None])[0].clamp(0.0, 1.0)


def augmentation(degrees: float = 15.0, zoom: tuple[float, float] = (1.0, 1.25), shear: float = 8.0,
                 hflip: bool = True, fill_mode: str = "nearest") -> Augmentation:
    """The runtime augmentation: random zoom, rotation, shear and horizontal flip.

    Args:
        degrees: rotation drawn from (-degrees, degrees).
        zoom: scale factor drawn from this range (> 1 enlarges).
        shear: x shear angle in degrees drawn from (-shear, shear).
        hflip: mirror half of the images left-right.
        fill_mode: what fills the pixels the transformed image does not cover, in Keras'
            words: ``"nearest"`` (default: the nearest edge pixel, Keras ``ImageDataGenerator``'s
            default ``fill_mode``, which the study used), ``"reflect"`` (the image mirrored at
            its edge) or ``"constant"`` (black, as fastcolor v1's torchvision
            ``RandomAffine(fill=0)``: with these default parameters it left black pixels in 57% of
            500 draws, up to 11% of an image; tests/test_augmentation.py measures this).

    Returns:
        an :class:`Augmentation`: (3, H, W) uint8 or float in [0, 1] -> float32 (3, H, W) in [0, 1].

    Example:
        >>> aug = augmentation()
        >>> aug(torch.full((3, 16, 16), 255, dtype=torch.uint8)).min().item() > 0.99  # no black corners
        True
    """
    return Augmentation(degrees, zoom, shear, hflip, fill_mode)
