"""The data source of a run on tar shards (:mod:`fastcolor.data.shards`, written by ``fastcolor shard``).

``data_dir`` is a shard folder (its ``shards.json`` and shards) or a brace pattern of training
shards (``shards/train-{000000..000099}.tar``, whose index lies beside them). The split was made
when the shards were written: training reads the ``train`` set (or the pattern's shards),
validation the folder's ``val`` set. Each rank reads its own shards and each of its DataLoader
workers its own share of them (:class:`~fastcolor.data.shards.ShardDataset`), through a shuffle
buffer; an epoch is the same number of full batches on every rank, ``ceil(images / (ranks x
batch))``, so distributed ranks never wait for each other: a rank whose shards run out first
goes on with its shards of the next pass. The class prior is computed from the training shards
(all of them, or a few drawn at random for ``sample:N``). As for a folder, the workers return
uint8 images (or, with ``decode="gpu"``, the files' bytes) and the device does the rest
(:meth:`~fastcolor.training.source.FolderSource.to_device`). A fusion model embeds each batch's
``L`` (no embedding cache: the cache is keyed by file). Everything else is
:class:`~fastcolor.training.source.FolderSource`'s.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fastcolor.data import OnDevice, TaggedCollate, resolve_decode
from fastcolor.data.prior import parse_prior
from fastcolor.data.shards import ShardDataset, ShardError, is_shard_source, resolve_shards, sample_shards
from fastcolor.training.source import Batches, FolderSource, epoch_seed, worker_message

__all__ = ["ShardSource"]


class _Batches(Batches):
    """:class:`~fastcolor.training.source.Batches` cut to its first ``steps`` batches (all with
    None), with that length (what the trainer counts): an endless training stream cut to an
    epoch, a bounded validation. A worker's :class:`ShardError` is re-raised with its own message."""

    def __init__(self, loader: DataLoader, report, steps: int | None = None):
        super().__init__(loader, report)
        self.steps = steps

    def __len__(self) -> int:
        return len(self.loader) if self.steps is None else self.steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from itertools.islice(super().__iter__(), self.steps)
        except ShardError as exc:
            raise ShardError(worker_message(exc)) from None


class ShardSource(FolderSource):
    """The batches of a run on shards (see the module docstring); the trainer's view is
    :class:`~fastcolor.training.source.FolderSource`'s."""

    def prepare(self, resuming_from: Path | None = None) -> None:
        """The training and validation shards; a missing one is refused here, before training."""
        cfg = self.cfg
        if cfg.classes is not None:
            raise ValueError(f"classes: the classes of shards are chosen when they are written (fastcolor shard "
                             f"--class), got {cfg.classes!r} for the shards {cfg.data_dir}")
        self.train_shards, self.index = resolve_shards(cfg.data_dir, "train")
        val_data = cfg.val_data  # a given validation set: shards too
        if val_data is not None and not is_shard_source(val_data):
            raise ValueError(f"val_data: training on shards, validation takes shards too (a folder of them or a "
                             f"pattern: fastcolor shard VAL_IMAGES OUT writes them), got {val_data!r}")
        if val_data is None:  # the val set written beside the training shards
            self.val_shards, _ = resolve_shards(cfg.data_dir, "val")
        else:  # every shard of a given folder, or those of a pattern
            self.val_shards, _ = resolve_shards(val_data, "all" if Path(str(val_data)).is_dir() else "train")
        n = cfg.val_images  # a fixed seeded subset of n images: from a few whole shards
        self.val_items = sample_shards(self.val_shards, n, cfg.seed) if n else self.val_shards
        self.split = {}  # made when the shards were written: shards.json records it

    @property
    def train_fingerprint(self) -> str:
        """A hash of the training shards' names and image counts, for the prior's record."""
        names = sorted((Path(s.url).name, s.images) for s in self.train_shards)
        return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]

    def attach(self, model: torch.nn.Module, size: int, stride: int) -> None:
        self.size, self.stride = size, stride
        cfg, d = self.cfg, self.d
        if model.config["arch"] == "fusion" and d.main:
            warnings.warn("fusion on shards: each batch is embedded from its L (the embedding cache is keyed by "
                          "file, and shards have none)", stacklevel=4)
        # As for a folder: the workers decode and resize (uint8), or only read the bytes (decode
        # "gpu"); the augmentation, crops, mirroring, Lab and the target run batched on the device
        # (FolderSource.to_device). decode "auto" goes by the set's commonest image suffix.
        suffixes = self.index.get("suffixes") or {"jpg": 1}
        self.decode = resolve_decode(cfg.decode, self.device, [f"image.{max(suffixes, key=suffixes.get)}"])
        common = {"size": size, "target_stride": stride, "target_reduction": cfg.target_reduction, "seed": cfg.seed,
                  "output": "bytes" if self.decode == "gpu" else "rgb",
                  "report_skips": "sample"}  # unreadable images: warned once per run by the main process
        self.train_ds = ShardDataset(self.train_shards, rank=d.rank, world=d.world, repeat=True, **common)
        fewest = len(self.train_shards) // d.world  # shards of the rank with the fewest
        if d.main and cfg.workers > fewest:
            warnings.warn(f"shards: {len(self.train_shards)} training shard(s) for {d.world} rank(s) of {cfg.workers} "
                          f"loader workers: a rank has {fewest} or {fewest + 1}, so up to {cfg.workers - fewest} of "
                          f"its workers have none and idle; write smaller shards (fastcolor shard "
                          f"--images-per-shard) or use fewer workers", stacklevel=4)
        self.val_ds = ShardDataset(self.val_items, rank=d.rank, world=d.world, shuffle=False, **common)
        kind, n = parse_prior(cfg.prior)  # rank 0 computes the prior: from all, or a few whole shards
        shards = sample_shards(self.train_shards, n, cfg.seed) if kind == "sample" else self.train_shards
        self.prior_ds = ShardDataset(shards, shuffle=False, **common)
        self._reported: set[str] = set()
        self._make_stages()

    @property
    def train_images(self) -> int:
        """How many images an epoch trains on (all ranks together, as the index counts them)."""
        return self.train_ds.images

    def _shard_loader(self, ds: ShardDataset, stage: str, generator: torch.Generator | None = None) -> DataLoader:
        """A DataLoader of ``ds``, its batches tagged with ``stage`` for the device half. Workers are
        made anew each epoch (not persistent): the epoch's shard order is set on the dataset."""
        workers = self.cfg.workers
        return DataLoader(ds, batch_size=self.cfg.batch_size, num_workers=workers, generator=generator,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if workers else None, collate_fn=TaggedCollate(stage, self.decode == "gpu"))

    def steps_per_epoch(self) -> int:
        """Batches in one epoch, the same on every rank: ``ceil(images / (ranks x batch_size))``."""
        return max(1, math.ceil(self.train_ds.images / (self.d.world * self.cfg.batch_size)))

    def train_loader(self, epoch: int, skip: int = 0) -> _Batches:
        """This rank's training batches of ``epoch``, from its batch ``skip`` on (a run resumed in
        the middle of an epoch: the batches before are passed over undecoded)."""
        self.train_ds.set_epoch(epoch, skip_batches=skip, batch_size=self.cfg.batch_size)
        g = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch, self.d.rank))
        return _Batches(self._shard_loader(self.train_ds, "train", g), self._report,
                        max(0, self.steps_per_epoch() - skip))

    def val_loader(self, max_batches: int | None = None) -> _Batches:
        """This rank's validation batches: its share of the validation shards, in order (at most
        ``max_batches`` of them)."""
        return _Batches(self._shard_loader(self.val_ds, "val"), self._report, max_batches)

    def prior_loader(self) -> OnDevice:
        """Batches of the training images the class prior is computed from (un-augmented), their
        ab targets made on the device."""
        return OnDevice(_Batches(self._shard_loader(self.prior_ds, "prior"), self._report), self.to_device)

    def samples(self, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` validation images at the training size, with full-resolution ab, on the device."""
        ds = ShardDataset(sample_shards(self.val_shards, n), self.size, 1, shuffle=False)
        batch = torch.utils.data.default_collate(list(ds))
        return {"L": batch["L"].to(self.device), "ab": batch["ab"].to(self.device)}
