"""Training loop for :class:`~fastcolor.models.ZhangNet` and :class:`~fastcolor.models.FusionNet`.

``train(TrainConfig(data_dir=..., run_dir=...))`` does, in the run directory:

* ``split.json``: the seeded stratified 80/10/10 split, with what it was made from (the image
  files listed, those skipped, seed, classes, fractions). A later run reuses it only while
  that still holds: without a checkpoint a changed data folder gets a new split (and prior);
  a resume from a checkpoint refuses, saying what changed;
* ``prior.safetensors``: class prior of the training ab (streamed through
  :class:`fastcolor.PriorAccumulator`) and the rarity weights (``lam`` 0.5), Zhang models only;
  recorded with the split, image size and parameters it was computed from (recomputed, or
  refused when resuming, like the split);
* ``last.safetensors`` after every epoch, ``best.safetensors`` when the validation loss
  improves by at least ``min_delta``: single-file, atomically written checkpoints (model,
  Adam state, training state as JSON metadata, never pickle); ``resume=True`` continues
  from ``last.safetensors``;
* ``model.safetensors`` + ``model.json``: the best weights and the model config;
* ``metrics.jsonl`` (one JSON line per epoch), ``loss_curve.png``, ``train_config.json``.

A run directory is owned by one process at a time: ``train`` holds an OS file lock on
``.fastcolor.lock`` in it (:func:`fastcolor.io.lock_directory`; released on any exit,
``kill -9`` included), and a second ``train`` on the same directory raises
:class:`fastcolor.io.DirectoryLockedError` naming the owner's pid before touching anything.
``restart=True`` removes the files of an earlier run (:data:`RUN_FILES`) first. A checkpoint
that cannot be resumed from (truncated, empty, damaged metadata) raises
:class:`CheckpointError`, which says whether ``best.safetensors`` is intact. Weights paths
stored inside checkpoints (a fusion model's ``backbone_weights``) are never followed: only
``TrainConfig.backbone_weights`` is read.

Losses: ``"rebalanced"`` (class-rebalanced soft cross-entropy), ``"ce"`` (unweighted), both
for Zhang; ``"mse"`` (the Deep Koalarization regression loss on ab / 128) for fusion.

Hyper-parameters: named recipes (:mod:`fastcolor.recipes`, :meth:`TrainConfig.from_recipe`);
the optimiser is Adam (fused: no host read per step) with L2 ``weight_decay``, its learning
rate multiplied by ``lr_gamma`` at each of ``lr_milestones`` (optimiser steps, Caffe's
"multistep"); ``max_steps`` ends a run by steps, ``epochs`` by epochs, early stopping by
``patience``. The step count is kept in every checkpoint (``meta["step"]``), so a resumed run
continues its schedule.

No host syncs per step: the losses are summed on the device and read every ``log_every`` steps
and at the end of each epoch (the progress bar moves then); a non-finite loss is flagged on the
device and raises :class:`FloatingPointError` at the next read, naming the epoch and step, with
``last.safetensors`` left at the last completed epoch.

Distributed: launch with ``torchrun --nproc_per_node=K`` (the environment variables decide);
nccl on GPU, gloo on CPU. Rank 0 writes the files (the others read the split and prior from the
run directory); all ranks end with identical weights: BatchNorm statistics are rank 0's after
each epoch, or synchronised at every step with ``sync_bn`` (:class:`torch.nn.SyncBatchNorm`,
CUDA only). Checkpoints are written once per epoch, so a resumed run repeats the interrupted epoch.
"""
from __future__ import annotations

import bisect
import contextlib
import io
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from fastcolor.colorize import activation_bytes, check_memory, memory_guard
from fastcolor.data import (
    TARGET_REDUCTIONS,
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
from fastcolor.io import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    load_tensors,
    lock_directory,
    read_checkpoint_meta,
    save_checkpoint,
    save_tensors,
)
from fastcolor.models import PRESETS, EmbeddingCache, build_model, load_model_state, model_state
from fastcolor.models.serialization import check_stored_config, save_model
from fastcolor.ops import PriorAccumulator, rarity_weights, rebalanced_cross_entropy
from fastcolor.recipes import RECIPES, recipe_values

__all__ = ["TrainConfig", "RunResult", "train", "regression_loss", "compute_class_prior", "plot_loss_curve",
           "CheckpointError", "checkpoint_meta", "check_device", "RUN_FILES"]

#: The files of a run that ``restart=True`` removes (other files in the directory are left alone,
#: the content-keyed embedding cache too).
RUN_FILES = ("last.safetensors", "best.safetensors", "model.safetensors", "model.json", "split.json",
             "prior.safetensors", "metrics.jsonl", "loss_curve.png", "result.json", "train_config.json")

LOSSES = ("rebalanced", "ce", "mse")


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``train_config.json`` in the run directory.

    The hyper-parameters (:data:`fastcolor.recipes.HYPERPARAMETERS`) can come from a named recipe:
    ``TrainConfig.from_recipe("zhang2016", data_dir=..., run_dir=..., lr=1e-5)`` (any field given
    beats the recipe's value; ``recipe`` records the name). The field defaults here are fastcolor
    v1's (the ``default`` recipe but for ``batch_size``), so configs written before recipes
    existed mean what they meant.

    Example::

        cfg = TrainConfig.from_recipe("study", data_dir="photos", run_dir="runs/study", epochs=10)
        train(cfg)
    """

    data_dir: str
    run_dir: str
    model: str | dict = "zhang_small"  #: a :data:`fastcolor.models.PRESETS` name or a model config dict
    loss: str = "rebalanced"  #: "rebalanced" | "ce" (Zhang) | "mse" (fusion)
    classes: list[str] | None = None  #: train on these class subfolders only (None: all)
    image_size: int | None = None  #: images are resized to this square side; default: the model's ``input_size``
    crop_size: int | None = None  #: train on random crop_size x crop_size crops of them (validation: centre crop)
    mirror: bool = False  #: random horizontal mirroring (besides ``augment``)
    batch_size: int = 100
    epochs: int | None = 40  #: None: no epoch limit (then ``max_steps`` must be set)
    max_steps: int | None = None  #: stop after this many optimiser steps in all (resumed ones included)
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0  #: Adam's L2 term added to the gradient (as Caffe's Adam does; not AdamW)
    lr_milestones: tuple[int, ...] = ()  #: the learning rate is multiplied by ``lr_gamma`` at each of these steps
    lr_gamma: float = 0.1
    patience: int | None = 7  #: early stopping: epochs without a validation improvement >= min_delta (None: never)
    min_delta: float = 1e-3
    keep_best: bool = True  #: model.safetensors = the best epoch by validation loss (False: the final weights)
    seed: int = 0
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    augment: bool = True  #: random zoom, rotation, shear and flip (:func:`fastcolor.data.augmentation`)
    workers: int = 2
    prior_lam: float = 0.5
    prior_sigma: float = 5.0
    nongray: bool = False  #: Zhang losses: no loss for grey images (|a|, |b| <= 5 everywhere), as the authors trained
    target_reduction: str = "area"  #: ab target at the logits' resolution: "area" (block means) or "subsample"
    recipe: str | None = None  #: the :mod:`fastcolor.recipes` name the values came from (recorded only)
    resume: bool = True  #: continue from ``last.safetensors`` when there is one
    restart: bool = False  #: start afresh: remove the files of an earlier run (:data:`RUN_FILES`) first
    device: str = "auto"  #: "auto", "cpu", "cuda", "cuda:1", ...
    precision: str = "fp32"  #: "fp32" or "bf16" (autocast of forward and loss; weights stay fp32)
    sync_bn: bool = False  #: distributed: SyncBatchNorm (CUDA only); else BatchNorm statistics come from rank 0
    backbone_weights: str | None = None  #: fusion: local weights file for the backbone
    embedding_cache: str | None = None  #: fusion: cache directory (default ``<run_dir>/embeddings``)
    max_steps_per_epoch: int | None = None  #: cut epochs short (smoke tests, demos)
    log_every: int = 50  #: read the loss (and check it is finite) every this many steps, and at epoch end
    tensorboard: str | None = None  #: write TensorBoard events to this folder (rank 0)
    progress: bool = True  #: tqdm bar on rank 0
    plot: bool = True  #: loss_curve.png at the end (and after each epoch that took >= 5 s)

    @classmethod
    def from_recipe(cls, recipe: str, **fields: Any) -> TrainConfig:
        """The config of recipe ``recipe`` (:data:`fastcolor.recipes.RECIPES`) with ``fields``
        (``data_dir``, ``run_dir`` and any overrides) on top; a fusion ``model`` gets the
        recipe's fusion values (the MSE loss) unless ``loss`` is given."""
        values = recipe_values(recipe, fields.get("model"))
        values.update(fields)
        values["recipe"] = recipe
        return cls(**values)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("batch_size", "log_every"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("epochs", "patience", "max_steps", "crop_size", "image_size", "max_steps_per_epoch"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("epochs: None (no epoch limit) needs max_steps, got max_steps=None too")
        if self.crop_size is not None and self.crop_size % 8:
            raise ValueError(f"crop_size must be a multiple of 8 (the networks downsample by 8), got {self.crop_size}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.lr_gamma, (int, float)) and self.lr_gamma > 0):
            raise ValueError(f"lr_gamma must be a positive number, got {self.lr_gamma!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.min_delta, (int, float)) and math.isfinite(self.min_delta)):
            raise ValueError(f"min_delta must be a finite number, got {self.min_delta!r}")
        ms = tuple(self.lr_milestones)
        if not all(_is_int(m) and m >= 1 for m in ms) or list(ms) != sorted(set(ms)):
            raise ValueError(f"lr_milestones must be increasing positive step counts, got {self.lr_milestones!r}")
        for name in ("nongray", "mirror", "keep_best", "sync_bn", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.target_reduction not in TARGET_REDUCTIONS:
            raise ValueError(f"target_reduction must be one of {TARGET_REDUCTIONS}, got {self.target_reduction!r}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {tuple(RECIPES)} or None, got {self.recipe!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {self.workers!r}")
        check_device(self.device, available=False)
        self.betas = tuple(self.betas)
        self.split = tuple(self.split)
        self.lr_milestones = ms


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class RunResult:
    run_dir: Path
    best_val_loss: float
    best_epoch: int
    epochs_completed: int  #: epochs finished in total, resumed ones included
    stopped_early: bool
    history: list[dict[str, Any]]
    resumed_from_epoch: int | None  #: the last epoch of the checkpoint resumed from, None for a fresh run
    model: torch.nn.Module = field(repr=False)  #: the model as it ended training (best weights: model.safetensors)

    @property
    def best_model_path(self) -> Path:
        return self.run_dir / "model.safetensors"


def check_device(device: str, available: bool = True) -> None:
    """Refuse (ValueError) a ``device`` that training cannot use: not ``"auto"``, a ``cpu`` or a
    ``cuda[:N]`` device (``meta`` holds no data; ``mps`` and the rest have no fastcolor kernels);
    with ``available``, also a CUDA device that this machine does not have."""
    what = "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
    if not isinstance(device, str):
        raise ValueError(f"device: {what}, got {device!r}")
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device: {what}, got {device!r} (not a device name)") from None
    if dev.type == "meta":
        raise ValueError(f"device: {what}, got {device!r}: meta tensors hold no data, nothing can be trained on them")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {what}, got {device!r}: fastcolor's kernels run on cpu and cuda only")
    if available and dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device: {device!r} asked for, but no CUDA device is available here (torch "
                             f"{torch.__version__}, built with CUDA {torch.version.cuda}); use 'cpu'")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device: {device!r} asked for, but this machine has {n} CUDA device(s) "
                             f"(cuda:0..cuda:{n - 1})")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from. ``path``: the file; ``reason``: what is wrong
    with it; ``best``/``best_epoch``: an intact ``best.safetensors`` beside it (else None)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        self.best, self.best_epoch = None, None
        best = self.path.parent / "best.safetensors"
        if self.path.name != best.name and best.is_file():
            try:
                self.best_epoch = _valid_meta(best, read_checkpoint_meta(best).get("meta"))["epoch"]
                self.best = best
            except ValueError:
                pass
        hint = (f"{self.best} (epoch {self.best_epoch}) is intact and usable as weights; " if self.best else "")
        super().__init__(f"cannot resume from {self.path}: {reason}; {hint}start a new run in {self.path.parent} "
                         f"with restart=True (fastcolor train --restart), or move the file away")


_META_TYPES: dict[str, tuple[type, ...]] = {"epoch": (int,), "history": (list,), "best_val_loss": (int, float),
                                            "best_epoch": (int,), "bad_epochs": (int,), "stopped_early": (bool,)}


def _valid_meta(path: Path, meta: Any) -> dict[str, Any]:
    """The training state of a checkpoint, checked field by field (CheckpointError if damaged)."""
    if not isinstance(meta, dict):
        raise CheckpointError(path, f"its training state ('meta') is {type(meta).__name__}, expected a JSON object")
    bad = []
    for key, types in _META_TYPES.items():
        v = meta.get(key)
        if key not in meta:
            bad.append(f"{key!r} is missing")
        elif not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            bad.append(f"{key!r} is {json.dumps(v)[:40]}, expected {' or '.join(t.__name__ for t in types)}")
    if not bad:
        if meta["epoch"] < 0 or not -1 <= meta["best_epoch"] <= meta["epoch"] or meta["bad_epochs"] < 0:
            bad.append(f"epoch {meta['epoch']}, best_epoch {meta['best_epoch']}, bad_epochs {meta['bad_epochs']} "
                       f"do not fit together")
        for h in meta["history"]:
            if not (isinstance(h, dict) and isinstance(h.get("epoch"), int) and not isinstance(h.get("epoch"), bool)
                    and all(isinstance(h.get(k), (int, float)) for k in ("train_loss", "val_loss"))):
                bad.append(f"a 'history' entry is {json.dumps(h)[:60]}, expected {{'epoch': int, 'train_loss': "
                           f"number, 'val_loss': number, ...}}")
                break
    if bad:
        raise CheckpointError(path, "damaged training state in its metadata: " + "; ".join(bad))
    return meta


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The training state (``meta``: epoch, history, ...) of a checkpoint, read from its header
    only (no tensor is loaded) and checked: an empty, truncated or foreign file or damaged
    metadata raises :class:`CheckpointError` saying what is wrong and what to do."""
    path = Path(path)
    try:
        metadata = read_checkpoint_meta(path)
    except ValueError as exc:
        raise CheckpointError(path, str(exc).removeprefix(f"path: cannot read {path}: ")) from exc
    if metadata.get("format") != "fastcolor-checkpoint-1":
        raise CheckpointError(path, f"not a fastcolor checkpoint (format {metadata.get('format')!r})")
    if not isinstance(metadata.get("model_config"), dict):
        raise CheckpointError(path, "damaged metadata: its model_config is not a JSON object")
    return _valid_meta(path, metadata.get("meta"))


def _load_resume_checkpoint(path: Path) -> dict[str, Any]:
    """load_checkpoint, every failure a CheckpointError naming the file and what is wrong."""
    checkpoint_meta(path)
    try:
        ckpt = load_checkpoint(path)
    except ValueError as exc:
        raise CheckpointError(path, str(exc).removeprefix("path: ").removeprefix(f"cannot read {path}: ")) from exc
    if ckpt["optimizer_state"] is None:
        raise CheckpointError(path, "it holds no optimizer state (a best.safetensors or model file, not a last "
                                    "checkpoint)")
    return ckpt


def regression_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Deep Koalarization loss: per image ``1/(2HW) sum (pred - target)^2``, averaged over the batch
    (``"mean"``) or per image (``"none"``). Spec: :func:`fastcolor.reference.regression_loss`."""
    if pred.shape != target.shape or pred.dim() < 2 or pred.shape[1] != 2:
        raise ValueError(f"pred, target: expected equal shapes (N, 2, ...), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    per_image = (pred.float() - target.float()).square().flatten(1).mean(1)
    if reduction == "none":
        return per_image
    if reduction == "mean":
        return per_image.mean()
    raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _setup_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def _device(pref: str, d: _Dist) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{d.local_rank}")
    return dev


# ----------------------------------------------------------------------------- helpers


def compute_class_prior(dataset: ColorizationDataset, batch_size: int = 100, workers: int = 0,
                        smooth_sigma: float = 5.0) -> np.ndarray:
    """Smoothed empirical prior (313,) of the dataset's ab targets, streamed batch by batch."""
    acc = PriorAccumulator()
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        acc.update(batch["ab"])
    return acc.prior(smooth_sigma=smooth_sigma)


def plot_loss_curve(history: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Train/validation loss per epoch as a PNG (matplotlib Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    if history:
        best = min(history, key=lambda h: h["val_loss"])
        ax.axvline(best["epoch"], color="gray", ls=":", label=f"best (epoch {best['epoch']})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**63)


@dataclass
class _Reading:
    mean: float  #: mean loss per image since the meter was made (NaN if none or not finite)
    images: int
    bad_steps: int  #: steps whose loss was not finite (summed over ranks)
    bad_step: int  #: the first such step on this rank (-1: none here)
    bad_value: float


class _LossMeter:
    """A loss summed over steps on its device, read on the host only by :meth:`read`.

    :meth:`add` queues a few device ops (sum of loss x images, count of non-finite steps, the
    first non-finite step and its value, via ``torch.where``) and reads nothing, so a training step
    never waits for the device; :meth:`read` all-reduces over ranks and makes the one host read.
    """

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.bad = torch.zeros((), dtype=torch.float64, device=device)
        self.bad_step = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float64, device=device)
        self.images = 0

    def add(self, loss: torch.Tensor, n: int, step: int) -> None:
        value = loss.detach().reshape(()).double()
        bad = ~torch.isfinite(value)
        self.total += value * n
        self.bad += bad
        first = bad & (self.bad_step < 0)
        self.bad_step = torch.where(first, float(step), self.bad_step)
        self.bad_value = torch.where(first, value, self.bad_value)
        self.images += n

    def read(self, d: _Dist) -> _Reading:
        packed = torch.stack([self.total, self.total.new_full((), self.images), self.bad, self.bad_step,
                              self.bad_value])
        if d.world > 1:
            dist.all_reduce(packed[:3])  # sums over ranks; the first bad step and value stay this rank's
        total, images, bad, step, value = packed.tolist()
        return _Reading(total / images if images else math.nan, int(images), int(bad), int(step), value)


class _Trainer:
    def __init__(self, cfg: TrainConfig, d: _Dist):
        self.cfg, self.d = cfg, d
        self.run_dir = Path(cfg.run_dir)
        self.device = _device(cfg.device, d)
        self.step = 0  #: optimiser steps done in the run (resumed ones included)

    # -- setup -----------------------------------------------------------------------------
    def prepare_split(self, resuming_from: Path | None = None):
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
                                  f"of {cfg.data_dir}", stacklevel=3)
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

    def build(self, model_config):
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank
        if isinstance(model_config, str):
            model_config = PRESETS.get(model_config, model_config)
        if isinstance(model_config, dict) and model_config.get("arch") == "fusion":
            # only the path given in this run's config is read, never one stored in a checkpoint
            model_config = {**model_config, "backbone_weights": self.cfg.backbone_weights}
        self.model = build_model(model_config).to(self.device)
        arch = self.model.config["arch"]
        if (arch == "fusion") != (self.cfg.loss == "mse"):
            raise ValueError(f"loss must be 'mse' for a fusion model and 'rebalanced' or 'ce' for a Zhang model, "
                             f"got loss={self.cfg.loss!r} for arch={arch!r}")
        self.size = self.cfg.image_size or self.model.config["input_size"]
        self.stride = self.model.output_stride
        if self.cfg.crop_size is not None and self.cfg.crop_size > self.size:
            raise ValueError(f"crop_size must be at most image_size ({self.size}), got {self.cfg.crop_size}")
        if self.cfg.sync_bn and self.d.world > 1:
            if self.device.type != "cuda":
                raise ValueError(f"sync_bn: torch's SyncBatchNorm runs on CUDA devices only (torch "
                                 f"{torch.__version__} refuses CPU tensors), got device {self.device}; without "
                                 f"sync_bn every rank takes rank 0's BatchNorm statistics after each epoch")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

    def datasets(self):
        # Fusion: the embedding comes from exactly the L the network sees (FusionNet.embed). The
        # cache holds un-augmented embeddings, computed from the dataset's own L (load_l at
        # self.size): it serves the splits without augmentation; augmented training batches are
        # embedded per batch in loss().
        cache = None
        if self.model.config["arch"] == "fusion":
            cache_dir = self.cfg.embedding_cache or self.run_dir / "embeddings"
            cache = EmbeddingCache(cache_dir, self.model.embedder, image_size=self.size)
            cached = ("val", "test") if self.cfg.augment else ("train", "val", "test")
            if self.cfg.augment and self.d.main:
                warnings.warn("fusion: augmentation is on, so the embedding cache is not used for training: each "
                              "batch is embedded from its augmented L (the cache serves validation)", stacklevel=3)
            if self.d.main:
                root = Path(self.cfg.data_dir)
                paths = [root / it.path for k in cached for it in self.split[k]]
                cache.precompute(paths, lambda p: load_l(p, self.size), device=self.device)
            self.d.barrier()
        mk = lambda items, aug: ColorizationDataset(self.cfg.data_dir, items, self.size, self.stride, aug,  # noqa: E731
                                                    None if aug else cache, target_reduction=self.cfg.target_reduction)
        train_aug, val_aug = self.transforms()
        self.train_ds = mk(self.split["train"], train_aug)
        self.val_ds = mk(self.split["val"], val_aug)
        self.prior_ds = mk(self.split["train"], False)

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

    def class_weights(self, resuming_from: Path | None = None) -> torch.Tensor | None:
        """The rarity weights of ``prior.safetensors``: reused if computed from this split, image
        size and parameters, else computed anew (without a checkpoint) or refused (resuming)."""
        if self.model.config["arch"] != "zhang":
            return None
        path = self.run_dir / "prior.safetensors"
        want = {"lam": self.cfg.prior_lam, "smooth_sigma": self.cfg.prior_sigma,
                "split": files_fingerprint(self.split["train"]), "size": self.size, "stride": self.stride,
                "target_reduction": self.cfg.target_reduction}
        if self.d.main:
            stale = "missing"
            if path.is_file():
                try:
                    tensors, meta = load_tensors(path)
                    ok = tensors["prior"].shape == (313,) and tensors["weights"].shape == (313,)
                    stale = None if ok else "damaged"
                except (ValueError, KeyError) as exc:
                    meta, stale = {}, f"damaged ({exc})"
                if stale is None and "split" not in meta:
                    stale = None if resuming_from is not None else "it does not record its split (older fastcolor)"
                elif stale is None:
                    # a prior written before target_reduction was recorded was made from block means
                    got = {k: meta.get(k, "area" if k == "target_reduction" else None) for k in want}
                    diff = [f"{k} {got[k]!r} -> {v!r}" for k, v in want.items() if got[k] != v]
                    stale = "; ".join(diff) or None
                    if stale and resuming_from is not None:
                        raise ValueError(f"{path} was computed for another setting ({stale}) than this resumed run, "
                                         f"and {resuming_from} was trained with it: resume with the same settings "
                                         f"(e.g. --size), or start a new run with restart=True (fastcolor train "
                                         f"--restart)")
                if stale:
                    warnings.warn(f"{path} is out of date ({stale}): computing the class prior again", stacklevel=3)
            if stale:
                prior = compute_class_prior(self.prior_ds, self.cfg.batch_size, self.cfg.workers, self.cfg.prior_sigma)
                w = rarity_weights(prior, lam=self.cfg.prior_lam)
                save_tensors(path, {"prior": torch.from_numpy(prior), "weights": torch.from_numpy(np.asarray(w))}, want)
        self.d.barrier()
        tensors, _ = load_tensors(path)
        return tensors["weights"].to(self.device, torch.float32) if self.cfg.loss == "rebalanced" else None

    def loss(self, model, batch, weights):
        L = batch["L"].to(self.device, non_blocking=True)
        ab = batch["ab"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            if self.model.config["arch"] == "fusion":  # cached, or from this (augmented) L: FusionNet.embed
                emb = batch.get("embedding")
                emb = self.model.embed(L) if emb is None else emb.to(self.device, non_blocking=True)
                return regression_loss(model(L, emb), ab / 128.0)
            return rebalanced_cross_entropy(model(L), ab, weights=weights, nongray=self.cfg.nongray)

    def loader(self, ds, epoch: int, shuffle: bool) -> DataLoader:
        sampler = DistributedSampler(ds, num_replicas=self.d.world, rank=self.d.rank, shuffle=shuffle,
                                     seed=self.cfg.seed, drop_last=False)
        sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(_epoch_seed(self.cfg.seed, epoch, self.d.rank))
        return DataLoader(ds, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=self.cfg.workers,
                          generator=g, pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    # -- one epoch -------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based): ``lr`` times ``lr_gamma`` for
        every milestone <= step (Caffe's "multistep" policy, which the authors' solver uses)."""
        return self.cfg.lr * self.cfg.lr_gamma ** bisect.bisect_right(self.cfg.lr_milestones, step)

    def train_step(self, model, opt, batch, weights, meter: _LossMeter, index: int) -> None:
        """One optimiser step on ``batch``; its loss goes to ``meter`` on the device (no host read
        here: the loss is read, and checked to be finite, by :meth:`_LossMeter.read`)."""
        lr = self.lr_at(self.step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = self.loss(model, batch, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        meter.add(loss, batch["L"].shape[0], index)
        self.step += 1

    def steps_left(self) -> int | None:
        return None if self.cfg.max_steps is None else max(0, self.cfg.max_steps - self.step)

    def run_epoch(self, model, opt, weights, epoch: int) -> float:
        """Train one epoch (cut at ``max_steps_per_epoch`` and at ``max_steps`` in all); the mean
        training loss. The loss is read every ``log_every`` steps and at the end (the progress bar
        moves then); a non-finite loss raises FloatingPointError at that read."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, self.d.rank))
        model.train()
        loader = self.loader(self.train_ds, epoch, shuffle=True)
        steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        if self.steps_left() is not None:
            steps = min(steps, self.steps_left())
        bar = tqdm(total=steps, desc=f"epoch {epoch}", leave=False, disable=not (cfg.progress and self.d.main))
        meter = _LossMeter(self.device)
        mean, shown = math.nan, 0
        for i, batch in enumerate(loader):
            if i >= steps:
                break
            self.train_step(model, opt, batch, weights, meter, i)
            if (i + 1) % cfg.log_every == 0 or i + 1 == steps:
                got = meter.read(self.d)
                if got.bad_steps:
                    bar.close()
                    raise FloatingPointError(self._nan_message(got, epoch, i))
                mean = got.mean
                bar.update(i + 1 - shown)
                bar.set_postfix(loss=f"{mean:.4f}")
                shown = i + 1
        bar.close()
        return mean

    def _nan_message(self, got: _Reading, epoch: int, index: int) -> str:
        last = self.run_dir / "last.safetensors"
        where = (f"at epoch {epoch}, step {got.bad_step}" if got.bad_step >= 0 else
                 f"on another rank in epoch {epoch}, by step {index}")
        try:
            kept = (f"{last} holds the last good checkpoint (epoch {checkpoint_meta(last)['epoch']}), from which "
                    f"resume=True continues" if last.is_file() else "no epoch was completed, so no checkpoint was "
                    "written")
        except CheckpointError:
            kept = f"{last} could not be read"
        return (f"training loss became {got.bad_value} {where} (checked every {self.cfg.log_every} steps: seen at "
                f"step {index}); training stops and nothing of this epoch is saved: {kept}; lower lr (now "
                f"{self.cfg.lr}){' or use precision fp32' if self.cfg.precision != 'fp32' else ''}")

    @torch.no_grad()
    def validate(self, model, weights) -> float:
        """The mean validation loss (NaN when it is not finite): one host read, at the end."""
        model.eval()
        meter = _LossMeter(self.device)
        for i, batch in enumerate(self.loader(self.val_ds, 0, shuffle=False)):
            meter.add(self.loss(model, batch, weights), batch["L"].shape[0], i)
        return meter.read(self.d).mean

    def _sync_buffers(self):
        """BatchNorm running stats: every rank takes rank 0's, so weights end identical."""
        if self.d.world > 1:
            for b in self.model.buffers():
                dist.broadcast(b, 0)


def train(config: TrainConfig | dict) -> RunResult:
    """Train a model as described by ``config``; see the module docstring for the run directory."""
    if isinstance(config, dict):
        config = TrainConfig(**config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")
    cfg = config
    check_device(cfg.device)  # before anything is written
    d = _setup_distributed(cfg.device)
    try:
        return _train(cfg, d)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _repair_best(best_path: Path, ckpt: dict[str, Any]) -> None:
    """When the run was killed after writing last.safetensors of an improving epoch but before
    best.safetensors, that epoch's weights are in last: write best from them."""
    meta = ckpt["meta"]
    try:
        on_disk = read_checkpoint_meta(best_path)["meta"]["epoch"] if best_path.is_file() else None
    except (ValueError, KeyError, TypeError):
        on_disk = None  # damaged: rewrite it if we can
    if on_disk != meta["best_epoch"] and meta["best_epoch"] == meta["epoch"]:
        save_checkpoint(best_path, ckpt["model_state"], ckpt["model_config"], None, **meta)


def _check_training_memory(t: _Trainer, model: torch.nn.Module) -> int:
    """Refuse (MemoryLimitError) a batch whose activations, gradients and Adam state would not
    fit in the device's available memory; returns the largest batch a rank will see."""
    batch = min(t.cfg.batch_size, max(1, math.ceil(len(t.train_ds) / t.d.world)))
    acts = activation_bytes(model, batch, t.size, training=True)
    if acts is not None:
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        check_memory(acts + 3 * trainable, t.device,
                     f"training with batches of {batch} image(s) at image_size={t.size} (activations about "
                     f"{acts / batch / 2**20:.0f} MiB per image, plus gradients and Adam state)",
                     f"lower batch_size (now {t.cfg.batch_size}) or image_size (now {t.size})")
    return batch


class _Monitor:
    """TensorBoard on rank 0 (:class:`fastcolor.monitor.TensorBoardMonitor`): each epoch's losses,
    learning rate, step and time, and a few fixed validation images colorized by the model."""

    SAMPLES = 4

    def __init__(self, log_dir: str):
        from fastcolor.monitor import TensorBoardMonitor  # MissingExtraError names the extra to install

        self.tb = TensorBoardMonitor(log_dir)
        self.samples: dict[str, torch.Tensor] | None = None

    def pick_samples(self, t: _Trainer) -> None:
        """The first few validation images, at the training size with full-resolution ab."""
        ds = ColorizationDataset(t.cfg.data_dir, t.split["val"][: self.SAMPLES], t.size, 1, False)
        batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
        self.samples = {"L": batch["L"].to(t.device), "ab": batch["ab"].to(t.device)}

    def log(self, epoch: int, h: dict[str, Any], model: torch.nn.Module) -> None:
        scalars = {"loss/train": h["train_loss"], "loss/val": h["val_loss"], "lr": h["lr"], "step": h["step"],
                   "time/epoch_seconds": h["seconds"]}
        self.tb.log_epoch(epoch, scalars, model=model, samples=self.samples)

    def close(self) -> None:
        self.tb.close()


def _train(cfg: TrainConfig, d: _Dist) -> RunResult:
    t = _Trainer(cfg, d)
    # rank 0 owns the run directory (the lock is taken before anything in it is touched)
    with lock_directory(t.run_dir, "training run") if d.main else contextlib.nullcontext():
        return _train_locked(t, cfg, d)


def _resume_model_config(last_path: Path, ckpt: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """The checkpoint's model config, checked like a model file's before anything is built."""
    config = ckpt["model_config"]
    try:
        check_stored_config(last_path, config, {k: tuple(v.shape) for k, v in ckpt["model_state"].items()})
    except ValueError as exc:
        raise CheckpointError(last_path, str(exc).removeprefix("path: ")) from exc
    stored = config.get("backbone_weights") if config.get("arch") == "fusion" else None
    if stored and not cfg.backbone_weights:
        raise ValueError(f"backbone_weights: {last_path} was trained with the backbone weights {stored!r}, but a "
                         f"path stored in a checkpoint is never read: pass backbone_weights= (--backbone-weights) "
                         f"again to resume")
    return config


def _train_locked(t: _Trainer, cfg: TrainConfig, d: _Dist) -> RunResult:
    # first, so that a missing tensorboard package is said before anything is done
    monitor = _Monitor(cfg.tensorboard) if d.main and cfg.tensorboard else None
    try:
        return _train_monitored(t, cfg, d, monitor)
    finally:
        if monitor is not None:
            monitor.close()


def _train_monitored(t: _Trainer, cfg: TrainConfig, d: _Dist, monitor: _Monitor | None) -> RunResult:
    run_dir = t.run_dir
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.restart:
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
        for stale in run_dir.glob(".*.tmp"):  # temp files of writes killed half-way
            stale.unlink(missing_ok=True)
    d.barrier()

    last_path, best_path = run_dir / "last.safetensors", run_dir / "best.safetensors"
    ckpt = _load_resume_checkpoint(last_path) if cfg.resume and last_path.is_file() else None
    resuming_from = last_path if ckpt is not None else None
    t.prepare_split(resuming_from)
    t.build(_resume_model_config(last_path, ckpt, cfg) if ckpt else cfg.model)
    if d.main:
        atomic_write_json(run_dir / "train_config.json", {**asdict(cfg), "restart": False})  # replayable
    t.datasets()
    batch = _check_training_memory(t, t.model)  # before the prior pass reads every image at this size
    weights = t.class_weights(resuming_from)
    model = t.model
    # fused: one kernel per step, and no host read of the step count (the for-loop and foreach
    # versions read it with .item() every step)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
                           weight_decay=cfg.weight_decay, fused=True)

    history: list[dict[str, Any]] = []
    start_epoch, best_val, best_epoch, bad_epochs, stopped_early = 0, math.inf, -1, 0, False
    resumed_from = None
    if ckpt is not None:
        try:
            load_model_state(model, {k: v.to(t.device) for k, v in ckpt["model_state"].items()})
            opt.load_state_dict(ckpt["optimizer_state"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(last_path, f"its weights or optimizer state do not fit the model it describes "
                                             f"({' '.join(str(exc).split())[:300]})") from exc
        meta = ckpt["meta"]
        history, best_val, best_epoch = meta["history"], meta["best_val_loss"], meta["best_epoch"]
        bad_epochs, stopped_early = meta["bad_epochs"], meta["stopped_early"]
        resumed_from = meta["epoch"]
        start_epoch = meta["epoch"] + 1
        # optimiser steps done: recorded since recipes have step-based schedules; before, Adam's count
        counts = [st["step"] for st in opt.state.values() if "step" in st]
        t.step = meta["step"] if _is_int(meta.get("step")) else (int(counts[0]) if counts else 0)
        if d.main:
            _repair_best(best_path, ckpt)
        del ckpt

    ddp_model = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[t.device.index] if t.device.type == "cuda" else None)

    title = f"{model.config['arch']} / {cfg.loss}"
    epoch = start_epoch
    advice = (f"lower batch_size (now {cfg.batch_size}) or image_size (now {t.size}); {last_path} holds the last "
              f"completed epoch and resume=True continues from it")
    if monitor is not None:
        monitor.pick_samples(t)
    while ((cfg.epochs is None or epoch < cfg.epochs) and not stopped_early
           and (t.steps_left() is None or t.steps_left() > 0)):
        t0 = time.time()
        with memory_guard(t.device, f"in epoch {epoch} (batches of {batch} at {t.size}x{t.size})", advice):
            train_loss = t.run_epoch(ddp_model, opt, weights, epoch)
            t._sync_buffers()
            val_loss = t.validate(model, weights)
        improved = val_loss < best_val - cfg.min_delta
        if improved:
            best_val, best_epoch, bad_epochs = val_loss, epoch, 0
        else:
            bad_epochs += 1
        stopped_early = cfg.patience is not None and bad_epochs >= cfg.patience
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best": improved,
                        "seconds": round(time.time() - t0, 3), "lr": opt.param_groups[0]["lr"], "step": t.step})
        if d.main:
            meta = {"epoch": epoch, "history": history, "best_val_loss": best_val, "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs, "stopped_early": stopped_early, "world_size": d.world, "step": t.step}
            state = model_state(model)
            # last first: a kill between the two writes leaves a best.safetensors one improvement
            # behind, which the resume repairs from last (the other order could leave a best
            # file from an epoch that the resumed run then repeats and records differently)
            save_checkpoint(last_path, state, model.config, opt, **meta)
            if improved:
                save_checkpoint(best_path, state, model.config, None, **meta)
            append_jsonl(run_dir / "metrics.jsonl", history)
            if cfg.plot and history[-1]["seconds"] >= 5.0:  # short epochs: plot at the end only
                plot_loss_curve(history, run_dir / "loss_curve.png", title)
            if monitor is not None:
                monitor.log(epoch, history[-1], model)
        epoch += 1

    if d.main:
        if not cfg.keep_best and history:  # the final weights (the authors' solver keeps its last iterate)
            final = build_model(model.config)
            load_model_state(final, model_state(model))
            save_model(run_dir / "model.safetensors", final)
        elif best_path.is_file():
            best = build_model(model.config)
            load_model_state(best, load_checkpoint(best_path)["model_state"])
            save_model(run_dir / "model.safetensors", best)
        if cfg.plot and history:
            plot_loss_curve(history, run_dir / "loss_curve.png", title)
        atomic_write_json(run_dir / "result.json", {"best_val_loss": best_val, "best_epoch": best_epoch,
                                                    "epochs_completed": len(history), "stopped_early": stopped_early})
    d.barrier()
    return RunResult(run_dir=run_dir, best_val_loss=best_val, best_epoch=best_epoch, epochs_completed=len(history),
                     stopped_early=stopped_early, history=history, resumed_from_epoch=resumed_from, model=model)


def _main(argv: list[str] | None = None) -> None:
    """``python -m fastcolor.train config.json`` (or under torchrun): train from a JSON TrainConfig."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m fastcolor.train CONFIG.json")
    res = train(TrainConfig(**json.loads(Path(args[0]).read_text())))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run_dir": str(res.run_dir), "best_val_loss": res.best_val_loss,
                          "best_epoch": res.best_epoch, "epochs": res.epochs_completed}))


if __name__ == "__main__":
    _main()
