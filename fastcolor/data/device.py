"""The device half of the data path: what runs batched on the model's device, not in the workers.

Workers do the least (:class:`~fastcolor.data.ColorizationDataset` with ``output="rgb"``: decode
and resize, as uint8; or ``output="bytes"``: the file's bytes only, for ``decode="gpu"``). The
DataLoader pins the batch; :class:`DeviceStage` copies it to the device without blocking and
there decodes it (bytes only), applies the affine augmentation (kornia, batched, one draw per
image), crops and mirrors it, and turns it into ``L`` and the ab target (:func:`lab_batch`): the
order of the per-image path (augmentation, crop, mirror). A uint8 image is a quarter of its
float32 Lab, so the pinned copy is small too; and as every random draw happens here, from the
training process's generator, the workers are a function of the image index alone.

Flow::

    files --workers--> uint8 (N, 3, S, S) | bytes --pin, copy--> [decode_batch] -> [augment]
          -> [crop_mirror] -> lab_batch -> {"L": (N, 1, C, C), "ab": (N, 2, C/stride, C/stride), ...}
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from fastcolor.color import rgb_to_l, rgb_to_lab
from fastcolor.data.decode import collate_bytes, decode_batch
from fastcolor.data.transforms import TARGET_REDUCTIONS, reduce_target

__all__ = ["lab_batch", "CropMirror", "DeviceStage", "TaggedCollate", "OnDevice"]


def lab_batch(rgb: torch.Tensor, target_stride: int, target_reduction: str = "subsample"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``L`` and the ab target of a batch of sRGB images, computed where ``rgb`` lives.

    Args:
        rgb: (N, 3, H, W) uint8 (0..255) or float in [0, 1].
        target_stride: the ab target is ``1/target_stride`` of H and W (:func:`reduce_target`).
        target_reduction: ``"subsample"`` or ``"area"`` (:func:`reduce_target`).

    Returns:
        L (N, 1, H, W) in 0..100 and ab (N, 2, H/stride, W/stride), float32: what a
        :class:`~fastcolor.data.ColorizationDataset` with ``output="lab"`` yields per image.
    """
    if not isinstance(rgb, torch.Tensor) or rgb.dim() != 4 or rgb.shape[1] != 3:
        got = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
        raise ValueError(f"rgb must be a (N, 3, H, W) tensor, got {got}")
    if target_reduction == "subsample" and target_stride > 1:
        # per-pixel maps commute with subsampling: ab of the kept pixels only (1/stride^2 of the
        # work), L alone at full size. 2.5x faster on one CPU thread at (16, 3, 176, 176).
        return rgb_to_l(rgb), rgb_to_lab(rgb[..., ::target_stride, ::target_stride])[:, 1:].contiguous()
    lab = rgb_to_lab(rgb)
    return lab[:, :1].contiguous(), reduce_target(lab[:, 1:], target_stride, target_reduction)


class CropMirror:
    """A square crop (random, or the centre) and a random horizontal mirror, of one image
    (3, H, W) or a batch (N, 3, H, W) with its own draw per image; any dtype and device.

    The authors' data layer (Caffe's ``crop_size`` and ``mirror``): random crops and mirroring
    in training, the centre crop in validation. Offsets and flips are drawn from torch's global
    generator on the CPU (a DataLoader seeds it per worker), and the crop is one gather.
    """

    def __init__(self, crop: int | None = None, random_crop: bool = True, mirror: bool = False):
        if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < 1):
            raise ValueError(f"crop must be a positive int or None, got {crop!r}")
        self.crop, self.random_crop, self.mirror = crop, random_crop, mirror

    def __repr__(self) -> str:
        return f"CropMirror(crop={self.crop}, random_crop={self.random_crop}, mirror={self.mirror})"

    def _offsets(self, n: int, h: int, w: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-left corners of ``n`` crops of ``c`` x ``c`` from ``h`` x ``w`` (y, x)."""
        if self.random_crop and self.crop is not None:
            return torch.randint(0, h - c + 1, (n,)), torch.randint(0, w - c + 1, (n,))
        return torch.full((n,), (h - c) // 2), torch.full((n,), (w - c) // 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a (3, H, W) or (N, 3, H, W) image tensor, got {got}")
        if self.crop is None and not self.mirror:
            return x
        n, h, w = (1, *x.shape[-2:]) if x.dim() == 3 else (x.shape[0], *x.shape[-2:])
        c = self.crop or min(h, w)
        if c > min(h, w):
            raise ValueError(f"crop must be at most the image's size {h}x{w}, got {c}")
        if x.dim() == 3:  # one image (a worker's): slices, a tenth of the gather's time
            oy, ox = self._offsets(1, h, w, c)
            x = x[:, int(oy[0]):int(oy[0]) + c, int(ox[0]):int(ox[0]) + c]
            return x.flip(-1) if self.mirror and bool(torch.rand(1) < 0.5) else x
        oy, ox = self._offsets(n, h, w, c)
        flip = torch.rand(n) < 0.5 if self.mirror else torch.zeros(n, dtype=torch.bool)
        if x.device.type == "cpu":  # slices: a tenth of the gather's time on a CPU
            return torch.stack([(lambda v, f: v.flip(-1) if f else v)(x[i, :, y:y + c, o:o + c], bool(flip[i]))
                                for i, (y, o) in enumerate(zip(oy.tolist(), ox.tolist(), strict=True))])
        dev = x.device  # one gather (a kernel per image would cost a launch each)
        ar = torch.arange(c)
        rows = oy[:, None] + ar
        cols = torch.where(flip[:, None], ox[:, None] + c - 1 - ar, ox[:, None] + ar)
        return x[torch.arange(n, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None],
                 rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]


class DeviceStage:
    """Turn a DataLoader batch of uint8 crops (``"rgb"``) or file bytes (``"data"``) into the
    ``L``/``ab`` batch the loss reads, on ``device``.

    Args:
        device: the model's device; the batch is copied there with ``non_blocking=True`` (from
            pinned memory when the DataLoader pins it).
        target_stride, target_reduction: the ab target (:func:`lab_batch`).
        size: the square the images are resized to (bytes batches only: workers resized the rest).
        crop_mirror: a :class:`CropMirror` applied here, after ``augment``, or None.
        augment: a batched transform of float (N, 3, H, W) in [0, 1] (the ``ops`` of an
            :class:`~fastcolor.data.Augmentation`), or None.

    Calling it returns ``{"L", "ab", "index"}`` (plus ``"embedding"`` when the batch has one),
    with files that could not be decoded dropped (:func:`decode_batch`).
    """

    def __init__(self, device: torch.device | str, target_stride: int, target_reduction: str = "subsample",
                 size: int | None = None, crop_mirror: CropMirror | None = None, augment: Any = None):
        if target_reduction not in TARGET_REDUCTIONS:
            raise ValueError(f"target_reduction must be one of {TARGET_REDUCTIONS}, got {target_reduction!r}")
        self.device = torch.device(device)
        self.target_stride, self.target_reduction = target_stride, target_reduction
        self.size, self.crop_mirror, self.augment = size, crop_mirror, augment
        self.reported: set[str] = set()

    def rgb(self, batch: dict[str, Any]) -> tuple[torch.Tensor, list[int] | None]:
        """The batch's uint8 (N, 3, S, S) images on the device (decoded, not yet augmented or
        cropped), and which samples they are (None: all of them)."""
        if "rgb" in batch:
            return batch["rgb"].to(self.device, non_blocking=True), None
        if "data" not in batch:
            raise ValueError(f"batch must hold 'rgb' (uint8 crops) or 'data' (file bytes), got keys {sorted(batch)}")
        if self.size is None:
            raise ValueError("size: a DeviceStage that decodes file bytes needs the square size to resize to")
        x, kept = decode_batch(batch["data"], batch["path"], self.size, self.device, self.reported)
        return x, (None if len(kept) == len(batch["data"]) else kept)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        x, kept = self.rgb(batch)
        if self.augment is not None:
            x = self.augment(x.float() / 255.0).clamp(0.0, 1.0)
        if self.crop_mirror is not None:
            x = self.crop_mirror(x)
        L, ab = lab_batch(x, self.target_stride, self.target_reduction)
        out = {"L": L, "ab": ab}
        for k in ("index", "embedding"):
            if k in batch:
                v = batch[k] if kept is None else batch[k][torch.tensor(kept, dtype=torch.long)]
                out[k] = v.to(self.device, non_blocking=True)
        return out


class TaggedCollate:
    """A DataLoader's ``collate_fn`` that names the batch's stage (``batch["stage"]``), so that one
    ``to_device`` serves a source's training, validation and prior batches; ``raw``: the samples
    hold file bytes (:func:`~fastcolor.data.collate_bytes`)."""

    def __init__(self, stage: str, raw: bool = False):
        self.stage, self.raw = stage, raw

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_bytes(samples) if self.raw else default_collate(samples)
        batch["stage"] = self.stage
        return batch


class OnDevice:
    """The batches of ``loader`` passed through ``fn`` (e.g. a source's ``to_device``), with the
    loader's length and dataset."""

    def __init__(self, loader: Any, fn: Any):
        self.loader, self.fn, self.dataset = loader, fn, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return (self.fn(b) for b in self.loader)
