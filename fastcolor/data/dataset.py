"""The map-style dataset the trainer reads: L and the ab target of each image of a split (or,
for the device-side path, its uint8 crop or its file's bytes)."""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fastcolor.color import rgb_to_lab
from fastcolor.data.decode import read_bytes
from fastcolor.data.folder import ImageItem
from fastcolor.data.images import UnreadableImageError, load_square
from fastcolor.data.transforms import TARGET_REDUCTIONS, augmentation, reduce_target

__all__ = ["OUTPUTS", "ColorizationDataset"]

#: What a :class:`ColorizationDataset` yields per image (its ``output`` argument).
OUTPUTS = ("lab", "rgb", "bytes")


def _square_sample(ds: Any, x: torch.Tensor, index: int) -> dict[str, Any]:
    """The sample of one decoded square ``x`` (uint8 (3, S, S)) of a dataset ``ds`` (a
    :class:`ColorizationDataset` or a :class:`~fastcolor.data.shards.ShardDataset`: its
    ``transform``, ``output``, ``target_stride`` and ``target_reduction``): ``{"rgb", "index"}``
    for ``output="rgb"``, else ``{"L", "ab", "index"}``."""
    if ds.transform is not None:
        x = ds.transform(x)
    if ds.output == "rgb":
        if x.dtype != torch.uint8:
            raise ValueError(f"augment must keep uint8 images with output='rgb' (crops, flips; the affine "
                             f"augmentation runs on the device), got {x.dtype} from {ds.transform!r}")
        return {"rgb": x, "index": index}
    lab = rgb_to_lab(x)
    return {"L": lab[:1], "ab": reduce_target(lab[1:], ds.target_stride, ds.target_reduction), "index": index}


class ColorizationDataset(Dataset):
    """L and ab target tensors from a list of :class:`ImageItem` under ``root``.

    Args:
        root: the data directory the items' paths are relative to.
        items: the images (e.g. one split of :func:`split_items`).
        size: square size the images are resized to (the model's input size).
        target_stride: ab targets are ``size / target_stride``; 4 for Zhang, 1 for fusion.
        target_reduction: how the target is reduced to that size (:func:`reduce_target`):
            ``"subsample"`` (default, the authors' choice: Zhang et al.'s training net subsamples
            the ab target at 1/4 resolution) or ``"area"`` (block means, fastcolor v1's).
        augment: ``True`` for :func:`augmentation` defaults (nearest-edge fill), a transform
            ((3, S, S) uint8 -> (3, S, S) uint8 or float in [0, 1]: an :class:`Augmentation`, a
            torchvision v2 transform), or ``False``.
        embeddings: an :class:`~fastcolor.models.EmbeddingCache`; adds ``embedding`` to samples.
            Only without augmentation (refused with it): a cached embedding is that of the
            un-augmented image, computed from this dataset's ``L`` (:func:`load_l` at ``size``);
            with augmentation a fusion model embeds the augmented ``L`` per batch instead.
        output: what a sample holds besides ``index`` (and ``embedding``): ``"lab"`` (default)
            ``L`` and ``ab`` as above; ``"rgb"`` the uint8 (3, S, S) image after ``augment``
            (which must keep uint8: crops and flips; the affine augmentation and the Lab
            conversion then run batched on the device, :class:`~fastcolor.data.DeviceStage`);
            ``"bytes"`` the file's bytes (``data``, 1-D uint8) and ``path``, for
            ``decode="gpu"`` (``augment`` must be off: the device stage crops and mirrors;
            batch them with :func:`~fastcolor.data.collate_bytes`).
        report_skips: how an unreadable file is reported (:meth:`__getitem__`): ``"warn"``
            (default) or ``"sample"`` (in the sample's ``skipped``, for the reader to report).
    """

    def __init__(self, root: str | os.PathLike, items: Sequence[ImageItem], size: int = 128, target_stride: int = 4,
                 augment: bool | Any = False, embeddings: Any = None, max_retries: int = 20,
                 target_reduction: str = "subsample", output: str = "lab", report_skips: str = "warn"):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if output == "bytes" and augment is not False and augment is not None:
            raise ValueError(f"augment must be off with output='bytes' (the device stage crops, mirrors and augments "
                             f"the decoded batch), got {augment!r}")
        if target_reduction not in TARGET_REDUCTIONS:
            raise ValueError(f"target_reduction must be one of {TARGET_REDUCTIONS}, got {target_reduction!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(target_stride, int) or target_stride < 1 or size % target_stride:
            raise ValueError(f"target_stride must be a positive int dividing size={size}, got {target_stride!r}")
        if len(items) == 0:
            raise ValueError("items must contain at least one image, got none")
        if embeddings is not None and augment is not False and augment is not None:
            raise ValueError("embeddings: a cache holds embeddings of the un-augmented images, so it cannot be used "
                             "with augment on; embed the augmented L per batch (FusionNet.embed) instead")
        self.root = Path(root)
        self.items = list(items)
        self.size = size
        self.target_stride = target_stride
        self.target_reduction = target_reduction
        self.transform = augmentation() if augment is True else (augment or None)
        self.embeddings = embeddings
        self.max_retries = max_retries
        self.output = output
        if report_skips not in ("warn", "sample"):
            raise ValueError(f"report_skips must be 'warn' or 'sample', got {report_skips!r}")
        self.report_skips = report_skips
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> dict[str, Any]:
        """The sample at ``index``; raises if the file cannot be read (see ``__getitem__``)."""
        item = self.items[index]
        path = self.root / item.path
        if self.output == "bytes":
            sample = {"data": read_bytes(path), "path": str(path), "index": index}
        else:
            sample = _square_sample(self, load_square(path, self.size), index)
        if self.embeddings is not None:
            emb = self.embeddings.get(path)
            if emb is None:
                raise OSError(f"no cached embedding for {path}")
            sample["embedding"] = emb
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Like :meth:`load`, but an unreadable file is reported once and the next readable one is
        returned; :class:`UnreadableImageError` when none of ``max_retries`` in a row can be read.

        Reported: a warning from this process; or, with ``report_skips="sample"``, in the sample
        (``skipped``: one ``"path\treason"`` line per file skipped for it, ``""`` for none), so
        that the process that reads the batches reports each file once however many DataLoader
        workers (each with its own copy of this dataset) met it."""
        tries = min(self.max_retries, len(self.items))
        last, skipped = "", []
        for attempt in range(tries):
            i = (index + attempt) % len(self.items)
            try:
                sample = self.load(i)
                if self.report_skips == "sample":
                    sample["skipped"] = "\n".join(skipped)
                return sample
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                path = self.items[i].path
                last = f"{type(e).__name__}: {e}"
                if self.report_skips == "sample":
                    skipped.append(f"{path}\t{' '.join(last.split())}")
                elif path not in self._reported:
                    self._reported.add(path)
                    warnings.warn(f"skipping unreadable image {path!r} ({last})", stacklevel=2)
        raise UnreadableImageError(
            f"{self.root}: none of {tries} image(s) in a row from {self.items[index].path!r} on could be read "
            f"(the last: {' '.join(last.split())[:300]}); expected readable image files there")
