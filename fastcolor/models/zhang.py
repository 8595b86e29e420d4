"""Zhang, Isola & Efros, "Colorful Image Colorization" (ECCV 2016): the classification network.

Input: L in 0..100, shape (N, 1, H, W) (H, W divisible by 8). Output: logits over the 313
ab bins at a quarter of the input size, (N, 313, H/4, W/4). Decode with
:func:`fastcolor.annealed_mean` (see :mod:`fastcolor.colorize`).

``ZhangNet()`` (the default widths and dilations) is layer for layer the authors' PyTorch
ECCV16 network (``colorizers/eccv16.py`` of richzhang/colorization): the same input scaling
(L - 50) / 100, the same convolutions (3x3 with bias, ReLU after each, dilation 2 and padding 2
in blocks 5 and 6), BatchNorm after the last ReLU of blocks 1..7 and none in block 8, and the
same layer indices inside each block: ``encoder[i]`` is their ``model{i+1}``, ``decoder`` is
their ``model8[0:6]`` and ``classifier`` their ``model8[6]`` (the 1x1 conv 256 -> 313, with bias),
so :mod:`fastcolor.models.released` maps their state dict onto it key for key. What differs is
only where the network stops: theirs goes on with a softmax, ``model_out`` (a 1x1 conv holding
the bin centres / 110), a bilinear x4 upsampling and x 110; here that is the annealed mean over
:data:`fastcolor.AB_BINS` at temperature ``T`` (at ``T = 1`` the same expectation) and the
upsampling in :mod:`fastcolor.colorize`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: Number of ab bins (classes): the in-gamut cells of the 10-unit ab grid (Zhang et al. 2016, sec. 2.1).
Q = 313
#: The annealed-mean temperature of the paper (Zhang et al. 2016, sec. 2.3): colorize's default.
DEFAULT_T = 0.38


def _block(c_in: int, c_out: int, n: int, dilation: int = 1, last_stride: int = 1) -> nn.Sequential:
    """``n`` 3x3 conv + ReLU (the last with ``last_stride``), then BatchNorm."""
    layers: list[nn.Module] = []
    for i in range(n):
        stride = last_stride if i == n - 1 else 1
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, stride=stride, padding=dilation,
                             dilation=dilation), nn.ReLU(inplace=True)]
    layers.append(nn.BatchNorm2d(c_out))
    return nn.Sequential(*layers)


class ZhangNet(nn.Module):
    """ECCV16 colorization net, parameterised by width so that small variants share the code.

    Args:
        base: channels of block 1 (64 in the paper); blocks 2 and 3 have 2x and 4x this.
        mid_width: channels of the middle blocks (512 in the paper).
        mid_dilations: one entry per middle block (3 convs each): its dilation. The paper's
            four blocks 4..7 are ``(1, 2, 2, 1)``.
        input_size: the square input size the model is trained at (recorded, not enforced).
        num_bins: output classes (313).
        decode_temperature: the annealed-mean temperature that :mod:`fastcolor.colorize` and
            ``fastcolor colorize`` use for this model unless told otherwise: 0.38, the paper's
            (Zhang et al. 2016, sec. 2.3), for models trained with fastcolor; 1.0 for the
            authors' released PyTorch weights, whose own forward is a plain softmax
            (:mod:`fastcolor.models.released`). Recorded in ``config``, so a saved model keeps it.

    ``forward(L)``: L (N, 1, H, W) in 0..100 (H, W multiples of 8) -> logits (N, 313, H/4, W/4)
    over the ab bins of :data:`fastcolor.AB_BINS` (float, before the softmax).

    Example:
        >>> import torch
        >>> net = ZhangNet.tiny()                           # 32 x 32 L in; ZhangNet.small(): 128 x 128
        >>> net(torch.full((2, 1, 32, 32), 50.0)).shape     # L in 0..100 -> logits over 313 bins
        torch.Size([2, 313, 8, 8])
        >>> c = ZhangNet().config                           # the paper's network
        >>> c["base"], c["mid_width"], c["mid_dilations"], c["decode_temperature"]
        (64, 512, [1, 2, 2, 1], 0.38)
    """

    def __init__(self, base: int = 64, mid_width: int = 512, mid_dilations: Sequence[int] = (1, 2, 2, 1),
                 input_size: int = 256, num_bins: int = Q, decode_temperature: float = DEFAULT_T):
        super().__init__()
        for name, v in (("base", base), ("mid_width", mid_width), ("input_size", input_size), ("num_bins", num_bins)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if (isinstance(decode_temperature, bool) or not isinstance(decode_temperature, (int, float))
                or not math.isfinite(decode_temperature) or decode_temperature <= 0):
            raise ValueError(f"decode_temperature must be a finite number > 0, got {decode_temperature!r}")
        if input_size % 8:
            raise ValueError(f"input_size must be divisible by 8, got {input_size}")
        mid_dilations = [int(d) for d in mid_dilations]
        if not mid_dilations or min(mid_dilations) < 1:
            raise ValueError(f"mid_dilations must be a non-empty list of dilations >= 1, got {mid_dilations!r}")
        self.config: dict[str, Any] = {"arch": "zhang", "base": base, "mid_width": mid_width,
                                       "mid_dilations": mid_dilations, "input_size": input_size, "num_bins": num_bins,
                                       "decode_temperature": float(decode_temperature)}
        c1, c2, c3 = base, 2 * base, 4 * base
        blocks = [_block(1, c1, 2, last_stride=2), _block(c1, c2, 2, last_stride=2), _block(c2, c3, 3, last_stride=2)]
        c = c3
        for d in mid_dilations:
            blocks.append(_block(c, mid_width, 3, dilation=d))
            c = mid_width
        self.encoder = nn.Sequential(*blocks)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(c, c3, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(c3, num_bins, 1)

    @classmethod
    def small(cls) -> ZhangNet:
        """128x128 input, 32x32x313 output, half widths, the four 512 blocks reduced to two of 256."""
        return cls(base=32, mid_width=256, mid_dilations=(1, 2), input_size=128)

    @classmethod
    def tiny(cls, input_size: int = 32) -> ZhangNet:
        """A few-thousand-parameter variant for tests and demos."""
        return cls(base=8, mid_width=16, mid_dilations=(2,), input_size=input_size)

    @property
    def output_stride(self) -> int:
        """How much smaller than the input the logits are: 4 ((H, W) -> (H/4, W/4))."""
        return 4

    def forward(self, L: torch.Tensor) -> torch.Tensor:
        """Logits (N, 313, H/4, W/4) over the ab bins from L (N, 1, H, W) in 0..100, scaled to
        (L - 50) / 100 as in the authors' code; H and W must be multiples of 8."""
        if not isinstance(L, torch.Tensor) or L.dim() != 4 or L.shape[1] != 1:
            got = tuple(L.shape) if isinstance(L, torch.Tensor) else type(L).__name__
            raise ValueError(f"L must be a tensor of shape (N, 1, H, W), got {got}")
        if L.shape[-1] % 8 or L.shape[-2] % 8:
            raise ValueError(f"L height and width must be divisible by 8, got {tuple(L.shape[-2:])}")
        return self.classifier(self.decoder(self.encoder((L - 50.0) / 100.0)))
