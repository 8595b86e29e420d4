"""sRGB <-> CIE Lab (D65, 2 degree observer) on torch tensors.

Thin wrappers over :func:`kornia.color.rgb_to_lab` / :func:`kornia.color.lab_to_rgb`.
What kornia does (kornia 0.9, checked against ``skimage.color`` in float64 to 1e-13):

* sRGB is linearised with the piecewise sRGB curve (threshold 0.04045); the input is
  *not* clamped, so values outside [0, 1] extrapolate like skimage does;
* XYZ uses the same matrix and D65 white as skimage; the f(t) knee is 0.008856 / 7.787;
* Lab -> RGB clamps ``fz`` at 0 (skimage does the same for negative Z) and, with
  ``clip=True``, clamps the sRGB result to [0, 1];
* float16 / bfloat16 are computed in float32.

What this module adds: uint8 input (scaled by 1/255), argument checking that names the
argument, a cheap luminance-only :func:`rgb_to_l`, and ``L``/``ab`` split/join helpers.
L is in 0..100, a and b roughly in -128..127. Shapes are ``(3, H, W)`` or ``(N, 3, H, W)``
(any leading dimensions work); the device and float dtype of the input are kept.
"""
from __future__ import annotations

import torch

__all__ = ["rgb_to_lab", "lab_to_rgb", "rgb_to_l", "split_l_ab", "join_l_ab", "l_ab_to_rgb", "gray_rgb"]



def _kornia():
    """``kornia.color``, imported on first use: importing fastcolor (and its ops, models and
    benchmark) must not need kornia, which some machines lack (issue 21: the lent GPUs' image)."""
    try:
        import kornia.color
    except ImportError as exc:
        raise ImportError(f"fastcolor.color needs kornia for sRGB <-> Lab (pip install kornia): {exc}") from exc
    return kornia.color


# Second row of kornia's / skimage's sRGB -> XYZ matrix (D65): Y from linear RGB.
_Y_FROM_RGB = (0.212671, 0.715160, 0.072169)


def _check_image(x, name: str, channels: int, allow_uint8: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., {channels}, H, W), got {type(x).__name__}")
    if x.dim() < 3 or x.shape[-3] != channels:
        raise ValueError(f"{name} must have shape (..., {channels}, H, W) with {channels} channels at dim -3, "
                         f"got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8 and allow_uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        allowed = "a float dtype or uint8" if allow_uint8 else "a float dtype"
        raise TypeError(f"{name} must have {allowed}, got {x.dtype}")
    return x


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (float) or 0..255 (uint8), shape (..., 3, H, W) -> Lab with L in 0..100."""
    return _kornia().rgb_to_lab(_check_image(rgb, "rgb", 3, allow_uint8=True))


def lab_to_rgb(lab: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Lab (..., 3, H, W) -> sRGB, clamped to [0, 1] unless ``clip=False``."""
    return _kornia().lab_to_rgb(_check_image(lab, "lab", 3), clip=clip)


def rgb_to_l(rgb: torch.Tensor) -> torch.Tensor:
    """Lightness only: (..., 3, H, W) sRGB -> (..., 1, H, W) L in 0..100 (same as ``rgb_to_lab(rgb)[..., :1]``)."""
    rgb = _check_image(rgb, "rgb", 3, allow_uint8=True)
    if rgb.dtype in (torch.float16, torch.bfloat16):
        return rgb_to_l(rgb.float()).to(rgb.dtype)
    lin = _kornia().rgb_to_linear_rgb(rgb)
    r, g, b = _Y_FROM_RGB
    y = r * lin[..., 0:1, :, :] + g * lin[..., 1:2, :, :] + b * lin[..., 2:3, :, :]
    f = torch.where(y > 0.008856, y.clamp(min=0.008856).pow(1.0 / 3.0), 7.787 * y + 4.0 / 29.0)
    return 116.0 * f - 16.0


def split_l_ab(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 3, H, W) Lab -> ((..., 1, H, W) L, (..., 2, H, W) ab) (views, no copy)."""
    lab = _check_image(lab, "lab", 3)
    return lab[..., 0:1, :, :], lab[..., 1:3, :, :]


def join_l_ab(L: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """Concatenate L (..., 1, H, W) and ab (..., 2, H, W) into Lab (..., 3, H, W)."""
    L = _check_image(L, "L", 1)
    ab = _check_image(ab, "ab", 2)
    if L.shape[-2:] != ab.shape[-2:] or L.shape[:-3] != ab.shape[:-3]:
        raise ValueError(f"L and ab must share batch and spatial shape, got L {tuple(L.shape)} "
                         f"and ab {tuple(ab.shape)}")
    return torch.cat([L, ab.to(L.dtype)], dim=-3)


def l_ab_to_rgb(L: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """L (..., 1, H, W) and ab (..., 2, H, W) -> sRGB in [0, 1]."""
    return lab_to_rgb(join_l_ab(L, ab))


def gray_rgb(L: torch.Tensor) -> torch.Tensor:
    """The neutral (a = b = 0) sRGB image of lightness L (..., 1, H, W), as 3 equal channels in [0, 1]."""
    L = _check_image(L, "L", 1)
    fy = (L + 16.0) / 116.0
    y = torch.where(fy > 0.2068966, fy.pow(3.0), (fy - 4.0 / 29.0) / 7.787)  # relative luminance Y
    g = _kornia().linear_rgb_to_rgb(y.clamp(0.0, 1.0).expand(*L.shape[:-3], 3, *L.shape[-2:]))
    return g.clamp(0.0, 1.0)
