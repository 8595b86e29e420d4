"""Where a run's batches come from: a data source, the one seam between the trainer and the data.

The trainer asks a source for four things, and knows nothing else of files, splits or decoding:

* :meth:`FolderSource.prepare` (once, before the model is built): settle which images train and
  validate (for a folder: the split, recorded in ``split.json``);
* :meth:`FolderSource.train_loader` ``(epoch)``, :meth:`FolderSource.val_loader` ``()`` and
  :meth:`FolderSource.prior_loader` ``()``: iterables of batches (training: this rank's share,
  shuffled per epoch; validation: fixed; prior: the images the class prior is estimated from);
* :meth:`FolderSource.to_device` ``(batch)``: the batch as the loss takes it, on the model's
  device: ``L`` (N, 1, S, S) in 0..100, ``ab`` (N, 2, S/stride, S/stride) in Lab units and, for a
  fusion model with a cache, ``embedding``.

:class:`FolderSource` serves a folder of images (flat, or one subfolder per class) through
:class:`fastcolor.data.ColorizationDataset` and torch DataLoaders. Another source (sharded
archives, a GPU decoder) provides the same methods and attributes.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from fastcolor.data import (
    ColorizationDataset,
    augmentation,
    files_fingerprint,
    index_images,
    list_images,
    load_l,
    load_split,
    save_split,
    split_change,
    split_items,
    split_source,
)
from fastcolor.models import EmbeddingCache
from fastcolor.training.config import TrainConfig
from fastcolor.training.distributed import Dist

__all__ = ["FolderSource", "epoch_seed"]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch (shuffling and augmentation draws), from the run's seed."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**63)


class FolderSource:
    """The batches of a run on a folder of images (``cfg.data_dir``).

    ``split`` ({"train", "val", "test"} -> items) is known after :meth:`prepare`; the datasets
    after :meth:`attach` (which needs the model: its input size, output stride and, for a fusion
    model, its embedder).
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: Dist, device: torch.device):
        self.cfg, self.run_dir, self.d, self.device = cfg, Path(run_dir), d, device
        self.split: dict[str, list] = {}

    # -- which images ----------------------------------------------------------------------
    def prepare(self, resuming_from: Path | None = None) -> None:
        """The split: reused if it was made from the data as it is now, else made anew (without a
        checkpoint) or refused (resuming: the checkpoint was trained on the old split)."""
        split_path = self.run_dir / "split.json"
        cfg = self.cfg
        if self.d.main:
            change = None
            if split_path.is_file():
                try:
                    change = split_change(split_path, list_images(cfg.data_dir, cfg.classes), cfg.seed, cfg.classes,
                                          cfg.split)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:  # json/structure damage
                    change = f"it does not parse ({type(exc).__name__}: {exc})"
                legacy = change is not None and "older fastcolor" in change
                if change is not None and resuming_from is not None and not legacy:
                    raise ValueError(f"data_dir: {split_path} was made from other data than {cfg.data_dir} holds now "
                                     f"({change}), and {resuming_from} was trained on that split: resume with the "
                                     f"data as it was, or start a new run with restart=True (fastcolor train "
                                     f"--restart)")
                if legacy and resuming_from is not None:
                    change = None  # cannot tell: keep the split the checkpoint was trained on
                if change is not None:
                    warnings.warn(f"{split_path} is out of date ({change}): making a new split (and class prior) "
                                  f"of {cfg.data_dir}", stacklevel=4)
            if change is not None or not split_path.is_file():
                listed = list_images(cfg.data_dir, cfg.classes)
                items = index_images(cfg.data_dir, cfg.classes)  # warns about (and skips) unreadable files
                readable = set(items)
                source = split_source(listed, [it for it in listed if it not in readable], cfg.classes, cfg.split)
                save_split(split_path, split_items(items, cfg.seed, cfg.split), seed=cfg.seed, source=source)
        self.d.barrier()
        self.split = load_split(split_path)
        if not self.split["train"] or not self.split["val"]:
            raise ValueError(f"data_dir: need at least one training and one validation image, got "
                             f"{len(self.split['train'])} and {len(self.split['val'])} ({self.cfg.data_dir})")

    @property
    def train_fingerprint(self) -> str:
        """What the training images are (a hash of their paths and classes), for the prior's record."""
        return files_fingerprint(self.split["train"])

    # -- datasets --------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, size: int, stride: int) -> None:
        """Make the datasets for ``model`` at ``size`` with targets at ``1/stride``.

        Fusion: the embedding comes from exactly the L the network sees (FusionNet.embed). The
        cache holds un-augmented embeddings, computed from the dataset's own L (load_l at size):
        it serves the splits without augmentation; augmented training batches are embedded per
        batch by the trainer's loss."""
        self.size, self.stride = size, stride
        cfg = self.cfg
        cache = None
        if model.config["arch"] == "fusion":
            cache_dir = cfg.embedding_cache or self.run_dir / "embeddings"
            cache = EmbeddingCache(cache_dir, model.embedder, image_size=size)
            cached = ("val", "test") if cfg.augment else ("train", "val", "test")
            if cfg.augment and self.d.main:
                warnings.warn("fusion: augmentation is on, so the embedding cache is not used for training: each "
                              "batch is embedded from its augmented L (the cache serves validation)", stacklevel=4)
            if self.d.main:
                root = Path(cfg.data_dir)
                paths = [root / it.path for k in cached for it in self.split[k]]
                cache.precompute(paths, lambda p: load_l(p, size), device=self.device)
            self.d.barrier()

        def dataset(items, aug):
            return ColorizationDataset(cfg.data_dir, items, size, stride, aug, None if aug else cache,
                                       target_reduction=cfg.target_reduction)

        train_aug, val_aug = self.transforms()
        self.train_ds = dataset(self.split["train"], train_aug)
        self.val_ds = dataset(self.split["val"], val_aug)
        self.prior_ds = dataset(self.split["train"], False)

    def transforms(self) -> tuple[bool | v2.Transform, bool | v2.Transform]:
        """The ``augment=`` of the training and validation datasets: ``augment`` (zoom, rotation,
        shear, flip), then a random ``crop_size`` crop and a random horizontal mirror (the authors'
        data layer); validation sees the centre crop (what Caffe's data layer does in its TEST phase)."""
        cfg = self.cfg
        if cfg.crop_size is None and not cfg.mirror:
            return cfg.augment, False
        ts: list[v2.Transform] = [augmentation()] if cfg.augment else []
        if cfg.crop_size is not None:
            ts.append(v2.RandomCrop(cfg.crop_size))
        if cfg.mirror:
            ts.append(v2.RandomHorizontalFlip())
        return v2.Compose(ts), (v2.CenterCrop(cfg.crop_size) if cfg.crop_size is not None else False)

    @property
    def train_images(self) -> int:
        """How many images an epoch trains on (all ranks together)."""
        return len(self.train_ds)

    # -- batches ---------------------------------------------------------------------------
    def _loader(self, ds, epoch: int, shuffle: bool) -> DataLoader:
        sampler = DistributedSampler(ds, num_replicas=self.d.world, rank=self.d.rank, shuffle=shuffle,
                                     seed=self.cfg.seed, drop_last=False)
        sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch, self.d.rank))
        return DataLoader(ds, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=self.cfg.workers,
                          generator=g, pin_memory=self.device.type == "cuda", persistent_workers=False)

    def train_loader(self, epoch: int) -> DataLoader:
        """This rank's training batches of ``epoch`` (shuffled with a seed of the run and epoch)."""
        return self._loader(self.train_ds, epoch, shuffle=True)

    def val_loader(self) -> DataLoader:
        """This rank's validation batches (the same every time)."""
        return self._loader(self.val_ds, 0, shuffle=False)

    def prior_loader(self) -> DataLoader:
        """Batches of the images the class prior is computed from (un-augmented, whole)."""
        return DataLoader(self.prior_ds, batch_size=self.cfg.batch_size, num_workers=self.cfg.workers)

    def to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``L``, ``ab`` (and ``embedding`` when the batch has one) on the model's device."""
        keys = ("L", "ab", "embedding")
        return {k: batch[k].to(self.device, non_blocking=True) for k in keys if k in batch}

    def samples(self, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` validation images at the training size, with full-resolution ab (for
        the monitor's pictures), on the device."""
        ds = ColorizationDataset(self.cfg.data_dir, self.split["val"][:n], self.size, 1, False)
        batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
        return {"L": batch["L"].to(self.device), "ab": batch["ab"].to(self.device)}
