"""From a trained model to a colour image: run, decode ab, upsample, join with the full-size L.

* :class:`~fastcolor.models.ZhangNet` logits are decoded with the annealed mean
  (:func:`fastcolor.annealed_mean`, temperature ``T``) at a quarter of the input size;
* :class:`~fastcolor.models.FusionNet` predicts ab / 128 directly.

The ab prediction is upsampled (bilinear) to the original resolution and joined with the
original L, so the output keeps every detail of the grayscale input.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastcolor.color import l_ab_to_rgb, rgb_to_l

__all__ = ["decode_ab", "predict_ab", "colorize_tensor", "colorize_image", "to_l_tensor"]


def _arch(model: torch.nn.Module) -> str:
    model = getattr(model, "module", model)
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or config.get("arch") not in ("zhang", "fusion"):
        raise TypeError(f"model must be a fastcolor ZhangNet or FusionNet (with a .config), got {type(model).__name__}")
    return config["arch"]


def decode_ab(model: torch.nn.Module, output: torch.Tensor, T: float = 0.38) -> torch.Tensor:
    """A model's raw output -> ab in Lab units (float32, at the output's resolution)."""
    if _arch(model) == "zhang":
        import fastcolor

        return fastcolor.annealed_mean(output, T=T)
    return output.float() * 128.0


def predict_ab(model: torch.nn.Module, L: torch.Tensor, T: float = 0.38,
               embedding: torch.Tensor | None = None) -> torch.Tensor:
    """ab (N, 2, h, w) predicted from L (N, 1, H, W) at the model's input size (no resizing)."""
    args = (L,) if _arch(model) == "zhang" else (L, embedding)
    return decode_ab(model, model(*args), T)


@torch.no_grad()
def colorize_tensor(model: torch.nn.Module, L_full: torch.Tensor, size: int | None = None, T: float = 0.38,
                    embedding: torch.Tensor | None = None) -> torch.Tensor:
    """Colourise L (N, 1, H, W) or (1, H, W) in 0..100 -> sRGB (same layout, 3 channels) in [0, 1].

    The model sees L resized to ``size`` x ``size`` (default: its configured input size);
    the decoded ab is upsampled back to (H, W) and joined with the full-resolution L.
    The model is put in eval mode.
    """
    if not isinstance(L_full, torch.Tensor) or L_full.dim() not in (3, 4) or L_full.shape[-3] != 1:
        got = tuple(L_full.shape) if isinstance(L_full, torch.Tensor) else type(L_full).__name__
        raise ValueError(f"L_full must be a tensor of shape (N, 1, H, W) or (1, H, W), got {got}")
    _arch(model)
    single = L_full.dim() == 3
    L_full = L_full[None] if single else L_full
    size = int(size or getattr(model, "config", {}).get("input_size") or 0)
    if size < 8 or size % 8:
        raise ValueError(f"size must be a positive multiple of 8, got {size}")
    model.eval()
    device = next(model.parameters()).device
    L_full = L_full.float().to(device)
    L_in = F.interpolate(L_full, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    ab = predict_ab(model, L_in, T, embedding)
    ab = F.interpolate(ab, size=L_full.shape[-2:], mode="bilinear", align_corners=False)
    rgb = l_ab_to_rgb(L_full, ab)
    return rgb[0] if single else rgb


def to_l_tensor(image: Any) -> torch.Tensor:
    """L (1, H, W) of a path, PIL image, or numpy array (H, W) / (H, W, 3), uint8 or float in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        from fastcolor.data import load_rgb

        image = load_rgb(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a path, PIL image or numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must have shape (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)
    if x.dtype != torch.uint8:
        x = x.float()
    return rgb_to_l(x)


def colorize_image(model: torch.nn.Module, image: Any, size: int | None = None, T: float = 0.38) -> np.ndarray:
    """Colourise an image (path, PIL, or array; colour input is reduced to its L) -> (H, W, 3) uint8."""
    rgb = colorize_tensor(model, to_l_tensor(image), size=size, T=T)
    return (rgb.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
