"""TensorBoard logging of a training run: scalars and colorized validation images per epoch.

:class:`TensorBoardMonitor` writes event files that ``tensorboard --logdir DIR`` shows:
every scalar the trainer passes (losses, learning rate, metrics) under its own name, and one
image per epoch, ``validation/gray|predicted|truth``: a row per validation sample, each row
the grayscale input, the model's colorization (:func:`fastcolor.colorize.colorize_tensor`,
annealed mean at ``T`` for Zhang models) and the ground truth side by side.

TensorBoard is an optional extra (``pip install 'fastcolor[tensorboard]'``); without it
:class:`TensorBoardMonitor` raises :class:`MissingExtraError` naming the extra. The writer is
:class:`torch.utils.tensorboard.SummaryWriter`.

Example:
    >>> mon = TensorBoardMonitor("runs/zhang/tensorboard")            # doctest: +SKIP
    >>> mon.log_epoch(0, {"loss/train": 3.1, "loss/val": 3.3, "lr": 3e-4},
    ...               model=model, samples={"L": L[:4], "ab": ab[:4]})  # doctest: +SKIP
    >>> mon.close()                                                   # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fastcolor._extras import MissingExtraError
from fastcolor.color import gray_rgb, l_ab_to_rgb
from fastcolor.colorize import colorize_tensor

__all__ = ["TensorBoardMonitor", "MissingExtraError", "IMAGE_TAG"]

#: The tag of the per-epoch image grid (rows: samples; columns: gray | predicted | truth).
IMAGE_TAG = "validation/gray|predicted|truth"




def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch.utils.tensorboard imports the tensorboard package
        why = " ".join(str(exc).split())
        raise MissingExtraError(f"TensorBoard logging needs the tensorboard package ({why}); install it with "
                                f"pip install 'fastcolor[tensorboard]'") from None
    return SummaryWriter


def _check_samples(samples: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not isinstance(samples, Mapping) or "L" not in samples or "ab" not in samples:
        got = sorted(samples) if isinstance(samples, Mapping) else type(samples).__name__
        raise ValueError(f"samples must be a dict with 'L' (n, 1, H, W) and 'ab' (n, 2, h, w) tensors, got {got}")
    L, ab, emb = samples["L"], samples["ab"], samples.get("embedding")
    if not isinstance(L, torch.Tensor) or L.dim() != 4 or L.shape[1] != 1 or L.shape[0] < 1:
        raise ValueError(f"samples['L'] must be a tensor of shape (n, 1, H, W), n >= 1, got "
                         f"{tuple(L.shape) if isinstance(L, torch.Tensor) else type(L).__name__}")
    if not isinstance(ab, torch.Tensor) or ab.dim() != 4 or ab.shape[:2] != (L.shape[0], 2):
        raise ValueError(f"samples['ab'] must be a tensor of shape ({L.shape[0]}, 2, h, w) (as many as L), got "
                         f"{tuple(ab.shape) if isinstance(ab, torch.Tensor) else type(ab).__name__}")
    return L, ab, emb


class TensorBoardMonitor:
    """Writes scalars and colorized validation images to TensorBoard event files in ``log_dir``.

    Args:
        log_dir: folder for the event files (created if missing); point ``tensorboard --logdir``
            at it or at a folder above it.
        T: annealed-mean temperature for the Zhang models' images (0.38, Zhang et al. 2016's
            test-time value); fusion models regress ab and ignore it.

    Raises:
        MissingExtraError: tensorboard is not installed (``pip install 'fastcolor[tensorboard]'``).

    Use :meth:`log_epoch` once per epoch and :meth:`close` at the end (or ``with``).

    Example:
        >>> with TensorBoardMonitor(run_dir / "tensorboard") as mon:     # doctest: +SKIP
        ...     mon.log_epoch(epoch, {"loss/train": 3.1}, model, {"L": L, "ab": ab})
    """

    def __init__(self, log_dir: str | os.PathLike, *, T: float = 0.38):
        writer_class = _summary_writer_class()
        if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            raise ValueError(f"T must be a positive finite number, got {T!r}")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.T = float(T)
        self._writer = writer_class(log_dir=str(self.log_dir))

    def log_epoch(self, epoch: int, scalars: Mapping[str, float], model: torch.nn.Module | None = None,
                  samples: Mapping[str, torch.Tensor] | None = None) -> None:
        """Log epoch ``epoch``'s ``scalars`` and, with ``model`` and ``samples``, its colorizations.

        Args:
            epoch: the step every value is logged at (int >= 0).
            scalars: name -> number, e.g. ``{"loss/train": 3.1, "loss/val": 3.3, "lr": 3e-4}``;
                a ``/`` in a name groups the charts in TensorBoard.
            model: the model being trained (a ZhangNet or FusionNet, or a DistributedDataParallel /
                ``torch.compile`` wrapper of one, which is unwrapped so no collective runs). It is
                run in eval mode without gradients and put back in the mode it was in.
            samples: a few validation images, ``{"L": (n, 1, H, W) float L in 0..100, "ab":
                (n, 2, h, w) float ab in Lab units}``; ab at a lower resolution (e.g. the logits')
                is upsampled bilinearly to (H, W) for the truth column. An ``"embedding"`` (n, D)
                entry is passed on to a fusion model that has no backbone of its own.
                The image ``validation/gray|predicted|truth`` has one row per sample.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if not isinstance(scalars, Mapping):
            raise TypeError(f"scalars must be a dict of name -> number, got {type(scalars).__name__}")
        for name, value in scalars.items():
            number = isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)
            if not isinstance(name, str) or not number:
                raise TypeError(f"scalars must map names (str) to numbers, got {name!r}: {value!r}")
            self._writer.add_scalar(name, float(value), epoch)
        if samples is not None:
            if model is None:
                raise ValueError("model: needed to colorize the samples, got None")
            self._writer.add_image(IMAGE_TAG, self._grid(model, samples), epoch, dataformats="CHW")
        self._writer.flush()

    @torch.no_grad()
    def _grid(self, model: torch.nn.Module, samples: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(3, n * H, 3 * W) float in [0, 1]: per sample, gray | predicted | truth."""
        L, ab, emb = _check_samples(samples)
        net = getattr(model, "_orig_mod", model)  # torch.compile
        net = getattr(net, "module", net)  # DistributedDataParallel: its forward would broadcast buffers
        was_training = net.training
        try:
            L = L.detach().float()
            predicted = colorize_tensor(net, L, T=self.T, embedding=emb).cpu()
        finally:
            net.train(was_training)
        L = L.cpu()
        ab = ab.detach().float().cpu()
        if ab.shape[-2:] != L.shape[-2:]:
            ab = F.interpolate(ab, size=L.shape[-2:], mode="bilinear", align_corners=False)
        rows = torch.cat([gray_rgb(L), predicted, l_ab_to_rgb(L, ab)], dim=3)  # (n, 3, H, 3W)
        return torch.cat(list(rows.clamp(0, 1)), dim=1)  # (3, nH, 3W)

    def close(self) -> None:
        """Flush and close the event file (safe to call twice)."""
        self._writer.close()

    def __enter__(self) -> TensorBoardMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
