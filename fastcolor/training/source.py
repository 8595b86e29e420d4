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

import itertools
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from fastcolor.data import (
    ColorizationDataset,
    CropMirror,
    DeviceStage,
    OnDevice,
    TaggedCollate,
    UnreadableImageError,
    augmentation,
    files_fingerprint,
    index_images,
    load_l,
    load_split,
    resolve_decode,
    save_split,
    split_change,
    split_items,
    split_source,
)
from fastcolor.data.folder import Listing, list_folder, split_current
from fastcolor.data.prior import parse_prior, sample_items
from fastcolor.models import EmbeddingCache
from fastcolor.training.config import TrainConfig
from fastcolor.training.distributed import Dist

__all__ = ["FolderSource", "Batches", "epoch_seed", "worker_message"]


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
        """The split, recorded in ``split.json``: reused without listing the folders again while
        their modification times are those recorded (:func:`~fastcolor.data.split_current`);
        otherwise the folder is listed once and the split reused if it was made from the files as
        they are now, else made anew (without a checkpoint) or refused (resuming: the checkpoint
        was trained on the old split). No file is opened here: a file that cannot be decoded is
        skipped, with one warning, when it is loaded. With ``val_data`` every image of
        ``data_dir`` trains and the images of ``val_data`` validate."""
        split_path = self.run_dir / "split.json"
        cfg = self.cfg
        if self.d.main:
            listing = val_listing = None
            fresh = not split_path.is_file()
            if not fresh and not split_current(split_path, cfg.data_dir, cfg.seed, cfg.classes, cfg.split,
                                               cfg.val_data):
                listing = list_folder(cfg.data_dir, cfg.classes)
                val_listing = list_folder(cfg.val_data) if cfg.val_data else None
                try:
                    change = split_change(split_path, listing.items, cfg.seed, cfg.classes, cfg.split, cfg.val_data,
                                          val_listing.items if val_listing else ())
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
                fresh = change is not None
            if fresh:
                self._new_split(split_path, listing, val_listing)
        self.d.barrier()
        self.split = load_split(split_path)
        if not self.split["train"] or not self.split["val"]:
            raise ValueError(f"data_dir: need at least one training and one validation image, got "
                             f"{len(self.split['train'])} and {len(self.split['val'])} ({self.cfg.data_dir})")
        order = np.random.default_rng(cfg.seed).permutation(len(self.split["val"]))[: cfg.val_images]
        #: the images validated, in a fixed seeded order (a bounded pass validates a prefix of it)
        self.val_items = [self.split["val"][i] for i in order]

    def _new_split(self, split_path: Path, listing: Listing | None, val_listing: Listing | None) -> None:
        """List the folder (once: ``listing`` where the caller already has it), skip what is not a
        regular file (with one warning), split and write ``split.json``."""
        cfg = self.cfg
        listing = listing or list_folder(cfg.data_dir, cfg.classes)
        items = index_images(cfg.data_dir, cfg.classes, verify=False, listing=listing)
        readable = set(items)
        skipped = [it for it in listing.items if it not in readable]
        if cfg.val_data is None:
            split = split_items(items, cfg.seed, cfg.split)
            source = split_source(listing.items, skipped, cfg.classes, cfg.split, listing.folders)
        else:
            val_listing = val_listing or list_folder(cfg.val_data)
            split = {"train": items, "val": index_images(cfg.val_data, verify=False, listing=val_listing), "test": []}
            source = split_source(listing.items, skipped, cfg.classes, cfg.split, listing.folders, cfg.val_data,
                                  val_listing.items, val_listing.folders)
        save_split(split_path, split, seed=cfg.seed, source=source)

    @property
    def train_fingerprint(self) -> str:
        """What the training images are (a hash of their paths and classes), for the prior's record."""
        return files_fingerprint(self.split["train"])

    # -- datasets --------------------------------------------------------------------------
    @property
    def val_root(self) -> Path:
        """The folder the validation items' paths are relative to."""
        return Path(self.cfg.val_data or self.cfg.data_dir)

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
            if cfg.augment and self.d.main:
                warnings.warn("fusion: augmentation is on, so the embedding cache is not used for training: each "
                              "batch is embedded from its augmented L (the cache serves validation)", stacklevel=4)
            if self.d.main:
                parts = ("test",) if cfg.augment else ("train", "test")  # (the test images: for eval)
                paths = [self.val_root / it.path for it in self.val_items]
                paths += [Path(cfg.data_dir) / it.path for k in parts for it in self.split[k]]
                cache.precompute(paths, lambda p: load_l(p, size), device=self.device)
            self.d.barrier()

        # The workers decode and resize (uint8), or only read the files (decode "gpu"); the
        # augmentation, crops and mirroring, Lab and the target run batched on the device
        # (to_device), so the workers draw nothing at random and persist across epochs.
        self.decode = resolve_decode(cfg.decode, self.device, [it.path for it in self.split["train"]])

        def dataset(root, items, aug):  # aug: the device transforms these images, so no cached embedding
            return ColorizationDataset(root, items, size, stride, False, None if aug else cache,
                                       target_reduction=cfg.target_reduction, report_skips="sample",
                                       output="bytes" if self.decode == "gpu" else "rgb")

        # images that the device transforms (augments, crops) have no cached embedding
        train_aug = cfg.augment or cfg.crop_size is not None or cfg.mirror
        val_aug = cfg.crop_size is not None
        self.train_ds = dataset(cfg.data_dir, self.split["train"], train_aug)
        self.val_ds = dataset(self.val_root, self.val_items, val_aug)
        kind, n = parse_prior(cfg.prior)
        prior_items = sample_items(self.split["train"], n, cfg.seed) if kind == "sample" else self.split["train"]
        self.prior_ds = dataset(cfg.data_dir, prior_items, False)
        self._reported: set[str] = set()
        self._make_stages()

    @property
    def train_images(self) -> int:
        """How many images an epoch trains on (all ranks together)."""
        return len(self.train_ds)

    # -- batches ---------------------------------------------------------------------------
    def _loader(self, ds, epoch: int, shuffle: bool, start: int = 0, stop: int | None = None) -> Batches:
        b, stage = self.cfg.batch_size, "train" if shuffle else "val"
        kept = self.__dict__.setdefault("_loaders", {}).get(stage)
        if kept is not None and kept.dataset is ds:  # persistent workers: only the epoch and the slice change
            kept.sampler.sampler.set_epoch(epoch)
            kept.sampler.start, kept.sampler.stop = start * b, None if stop is None else stop * b
            return Batches(kept, self._report)
        sampler = DistributedSampler(ds, num_replicas=self.d.world, rank=self.d.rank, shuffle=shuffle,
                                     seed=self.cfg.seed, drop_last=False)
        sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch, self.d.rank))
        workers = self.cfg.workers
        loader = DataLoader(ds, batch_size=b, sampler=_Slice(sampler, start * b, None if stop is None else stop * b),
                            num_workers=workers, generator=g, pin_memory=self.device.type == "cuda",
                            persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                            collate_fn=TaggedCollate(stage, self.decode == "gpu"))
        self._loaders[stage] = loader
        return Batches(loader, self._report)

    def steps_per_epoch(self) -> int:
        """Batches in one epoch of this rank (every rank has as many: the sampler pads)."""
        return math.ceil(math.ceil(len(self.train_ds) / self.d.world) / self.cfg.batch_size)

    def train_loader(self, epoch: int, skip: int = 0) -> Batches:
        """This rank's training batches of ``epoch`` (shuffled with a seed of the run and epoch),
        from its batch ``skip`` on (a run resumed in the middle of an epoch)."""
        return self._loader(self.train_ds, epoch, shuffle=True, start=skip)

    def val_loader(self, max_batches: int | None = None) -> Batches:
        """This rank's validation batches: the same every time (at most ``max_batches``, the first
        ones: :attr:`val_items` is in a fixed random order, so a prefix is a random subset)."""
        return self._loader(self.val_ds, 0, shuffle=False, stop=max_batches)

    def prior_loader(self) -> OnDevice:
        """Batches of the images the class prior is computed from (un-augmented, whole): the
        training images, or a seeded sample of them (``prior="sample:N"``)."""
        loader = DataLoader(self.prior_ds, batch_size=self.cfg.batch_size, num_workers=self.cfg.workers,
                            pin_memory=self.device.type == "cuda",
                            collate_fn=TaggedCollate("prior", self.decode == "gpu"))
        return OnDevice(Batches(loader, self._report), self.to_device)  # the ab targets made on the device

    def to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``L``, ``ab`` (and ``embedding`` when the batch has one) on the model's device."""
        if "stage" in batch:  # uint8 images or file bytes from the workers: the device does the rest
            return self._stages[batch["stage"]](batch)  # "train", "val" or "prior"
        keys = ("L", "ab", "embedding")  # made by the workers (shards)
        return {k: batch[k].to(self.device, non_blocking=True) for k in keys if k in batch}

    def _make_stages(self) -> None:
        """The device halves of the batches (:class:`~fastcolor.data.DeviceStage`): decoding
        (bytes), the augmentation (training), the crop (training: random; validation: the centre)
        and mirror (training), Lab and the target. Made by :meth:`attach`, not at the first batch:
        kornia reads its parameter ranges on the host once, when its samplers are made, and that
        belongs to the setup, not to a training step (tests/test_train_syncs.py)."""
        cfg, self._stages = self.cfg, {}
        for name in ("train", "val", "prior"):
            train = name == "train"
            crop = CropMirror(cfg.crop_size if name != "prior" else None, random_crop=train,
                              mirror=train and cfg.mirror)
            augment = augmentation().ops.to(self.device) if train and cfg.augment else None
            self._stages[name] = DeviceStage(self.device, self.stride, cfg.target_reduction, size=self.size,
                                             crop_mirror=crop, augment=augment)

    def _report(self, batch: dict[str, Any]) -> None:
        """Warn once per run about each unreadable file a batch's samples skipped (the workers
        put them in the samples: each worker alone would warn once per copy of the dataset)."""
        for lines in batch.get("skipped", ()):
            for line in filter(None, lines.split("\n")):
                path, _, why = line.partition("\t")
                if path not in self._reported:
                    self._reported.add(path)
                    warnings.warn(f"skipping unreadable image {path!r} ({why}); it is skipped wherever it comes up "
                                  f"in this run, and said only this once", stacklevel=3)

    def samples(self, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` validation images at the training size, with full-resolution ab (for
        the monitor's pictures), on the device."""
        ds = ColorizationDataset(self.val_root, self.val_items[:n], self.size, 1, False)
        batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
        return {"L": batch["L"].to(self.device), "ab": batch["ab"].to(self.device)}


class _Slice(Sampler):
    """Indices ``start:stop`` of another sampler's order (a resumed epoch, a bounded validation)."""

    def __init__(self, sampler: Sampler, start: int = 0, stop: int | None = None):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, self.stop)

    def __len__(self) -> int:
        n = len(self.sampler)
        return max(0, min(n, n if self.stop is None else self.stop) - self.start)


class Batches:
    """A DataLoader as the trainer reads it: each batch's skipped files reported once per run,
    and an error raised in a worker process re-raised with the worker's own message (the
    DataLoader's puts the worker's whole traceback into the message, which a one-line error
    report then squeezes into one unreadable line)."""

    def __init__(self, loader: DataLoader, report):
        self.loader, self.report = loader, report
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UnreadableImageError as exc:
                raise UnreadableImageError(worker_message(exc)) from None
            self.report(batch)
            yield batch


def worker_message(exc: BaseException) -> str:
    """The message of an exception as raised in a DataLoader worker, without the "Caught ... in
    DataLoader worker process N. Original Traceback ..." wrapping the DataLoader adds."""
    msg = str(exc)
    if "Original Traceback" not in msg:
        return msg
    last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
    name = type(exc).__name__
    for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last
