"""Training loop for :class:`~fastcolor.models.ZhangNet` and :class:`~fastcolor.models.FusionNet`.

``train(TrainConfig(data_dir=..., run_dir=...))`` does, in the run directory:

* ``split.json``: the seeded stratified 80/10/10 split (with ``val_data``: all of ``data_dir``
  trains, ``val_data``'s images validate), with what it was made from (the image files listed,
  those skipped, seed, classes, fractions, the folders' modification times). It is the run's
  file index: a later run whose folders kept their times reuses it without listing them again;
  otherwise the folder is listed once and, without a checkpoint, a changed folder gets a new
  split (and prior), while a resume from a checkpoint refuses, saying what changed. No image is
  opened before step 1: one that cannot be decoded is skipped, with one warning, when loaded;
* ``prior.safetensors``: the class prior (``prior``: of the training images, of a seeded
  sample of them, or the authors' ImageNet prior; :mod:`fastcolor.data.prior`) and the rarity
  weights (``lam`` 0.5), Zhang models only; recorded with what it was computed from
  (recomputed, or refused when resuming, like the split);
* ``last.safetensors`` after every validation (each epoch's end, or every ``val_every`` steps),
  ``best.safetensors`` when the validation loss improves by at least ``min_delta``:
  single-file, atomically written checkpoints (model, Adam state, training state as JSON
  metadata, never pickle); ``resume=True`` continues from ``last.safetensors``, at the step it
  was written (the run is one stream of batches: step s is batch ``s % steps_per_epoch`` of
  data epoch ``s // steps_per_epoch``, so a resume continues in the middle of an epoch too);
* ``model.safetensors`` + ``model.json``: the best weights and the model config;
* ``metrics.jsonl`` (one JSON line per validation), ``loss_curve.png``, ``train_config.json``
  (written once every check that can refuse the run has passed).

Validation: over ``val_images`` images (a fixed seeded subset; all by default), at the end of
each epoch or every ``val_every`` steps (then an "epoch" of the history, of ``patience`` and of
the checkpoints is those steps); a validation reads at most as many batches as the steps it
judges, so a 3-step run validates 3 batches.

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
"multistep"); ``max_steps`` ends a run by steps, ``epochs`` after that many passes over the
training images (``epochs`` x steps per epoch steps), early stopping by
``patience``. The step count is kept in every checkpoint (``meta["step"]``), so a resumed run
continues its schedule.

No host syncs per step: the losses are summed on the device and read every ``log_every`` steps
and at the end of each epoch (the progress bar moves then); a non-finite loss is flagged on the
device and raises :class:`FloatingPointError` at the next read, naming the epoch and step, with
``last.safetensors`` left at the last completed epoch.

Layout: this module is the loop (:class:`_Trainer`: steps, validation, the epoch loop, early
stopping); the rest of a run lives in :mod:`fastcolor.training`: the settings
(:mod:`~fastcolor.training.config`), the data source that gives the loop its batches
(:mod:`~fastcolor.training.source`; :mod:`~fastcolor.training.shard_source` when ``data_dir`` names tar
shards, :func:`fastcolor.data.is_shard_source`), the class prior file (:mod:`~fastcolor.training.class_prior`),
checkpoints (:mod:`~fastcolor.training.checkpoints`) and the process group
(:mod:`~fastcolor.training.distributed`). Their public names are re-exported here.

Distributed: launch with ``torchrun --nproc_per_node=K`` (the environment variables decide);
nccl on GPU, gloo on CPU. Rank 0 writes the files (the others read the split and prior from the
run directory); all ranks end with identical weights: BatchNorm statistics are rank 0's after
each epoch, or synchronised at every step with ``sync_bn`` (:class:`torch.nn.SyncBatchNorm`,
CUDA only).
"""
from __future__ import annotations

import bisect
import contextlib
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fastcolor.colorize import activation_bytes, check_memory, memory_guard
from fastcolor.data.prior import compute_class_prior
from fastcolor.data.shards import is_shard_source
from fastcolor.io import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    lock_directory,
    save_checkpoint,
)
from fastcolor.models import PRESETS, build_model, load_model_state, model_state
from fastcolor.models.serialization import save_model
from fastcolor.ops import rebalanced_cross_entropy
from fastcolor.training.checkpoints import (
    CheckpointError,
    check_resume_model,
    checkpoint_meta,
    load_resume_checkpoint,
    repair_best,
    resume_model_config,
)
from fastcolor.training.class_prior import ClassPrior
from fastcolor.training.config import LOSSES, RUN_FILES, TrainConfig, _is_int, check_device
from fastcolor.training.distributed import Dist, resolve_device, setup_distributed
from fastcolor.training.shard_source import ShardSource
from fastcolor.training.source import FolderSource, epoch_seed

__all__ = ["TrainConfig", "RunResult", "train", "regression_loss", "compute_class_prior", "plot_loss_curve",
           "CheckpointError", "checkpoint_meta", "check_device", "RUN_FILES", "LOSSES"]

_Dist = Dist  # the name tests and older callers use


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

    def read(self, d: Dist) -> _Reading:
        packed = torch.stack([self.total, self.total.new_full((), self.images), self.bad, self.bad_step,
                              self.bad_value])
        if d.world > 1:
            dist.all_reduce(packed[:3])  # sums over ranks; the first bad step and value stay this rank's
        total, images, bad, step, value = packed.tolist()
        return _Reading(total / images if images else math.nan, int(images), int(bad), int(step), value)


class _Trainer:
    """The training loop of one run: the model, its loss, one step, one epoch, validation. Its
    batches come from ``source`` (:class:`fastcolor.training.source.FolderSource`)."""

    def __init__(self, cfg: TrainConfig, d: Dist):
        self.cfg, self.d = cfg, d
        self.run_dir = Path(cfg.run_dir)
        self.device = resolve_device(cfg.device, d)
        source = ShardSource if is_shard_source(cfg.data_dir) else FolderSource  # tar shards or a folder
        self.source = source(cfg, self.run_dir, d, self.device)
        self.step = 0  #: optimiser steps done in the run (resumed ones included)

    # -- setup -----------------------------------------------------------------------------
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

    def loss(self, model, batch, weights):
        """The loss of a batch on the device (``L``, ``ab``, maybe ``embedding``: :meth:`FolderSource.to_device`)."""
        L, ab = batch["L"], batch["ab"]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            if self.model.config["arch"] == "fusion":  # cached, or from this (augmented) L: FusionNet.embed
                emb = batch.get("embedding")
                emb = self.model.embed(L) if emb is None else emb
                return regression_loss(model(L, emb), ab / 128.0)
            return rebalanced_cross_entropy(model(L), ab, weights=weights, nongray=self.cfg.nongray)

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
        batch = self.source.to_device(batch)  # L and ab on the device (made there from uint8 images or bytes)
        loss = self.loss(model, batch, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        meter.add(loss, batch["L"].shape[0], index)
        self.step += 1

    # -- where the run is --------------------------------------------------------------------
    def plan(self) -> None:
        """The run's length in optimiser steps (:attr:`limit`, None: no limit) from ``epochs`` of
        :attr:`steps_per_epoch` steps and ``max_steps``. The run is one stream of batches: step s
        is batch ``s % steps_per_epoch`` of data epoch ``s // steps_per_epoch``, so a resumed run
        continues exactly where its checkpoint was written, in the middle of an epoch too."""
        cfg = self.cfg
        self.steps_per_epoch = len(self.source.train_loader(0))
        if cfg.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        limits = [n for n in (cfg.max_steps, cfg.epochs and cfg.epochs * self.steps_per_epoch) if n is not None]
        self.limit = min(limits) if limits else None

    def steps_left(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.step)

    def period_end(self) -> int:
        """The step at which the period starting now ends with a validation and a checkpoint:
        the end of this data epoch, or the next multiple of ``val_every``; at most :attr:`limit`."""
        every = self.cfg.val_every or self.steps_per_epoch
        end = (self.step // every + 1) * every
        return end if self.limit is None else min(end, self.limit)

    def run_period(self, model, opt, weights, period: int) -> float:
        """Train from the current step to :meth:`period_end` (over data epochs' ends where
        ``val_every`` says so); the mean training loss. The loss is read every ``log_every`` steps
        and at the end (the progress bar moves then); a non-finite loss raises
        FloatingPointError at that read."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        model.train()
        end = self.period_end()
        steps = end - self.step
        bar = tqdm(total=steps, desc=f"epoch {period}", leave=False, disable=not (cfg.progress and self.d.main))
        meter = _LossMeter(self.device)
        mean, shown, i = math.nan, 0, 0
        while self.step < end:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            if not skip:
                torch.manual_seed(epoch_seed(cfg.seed, epoch, self.d.rank))
            stop = min(end, (epoch + 1) * self.steps_per_epoch)
            taken = 0
            for batch in self.source.train_loader(epoch, skip=skip):
                self.train_step(model, opt, batch, weights, meter, i)
                i, taken = i + 1, taken + 1
                if i % cfg.log_every == 0 or i == steps:
                    got = meter.read(self.d)
                    if got.bad_steps:
                        bar.close()
                        raise FloatingPointError(self._nan_message(got, period, i - 1))
                    mean = got.mean
                    bar.update(i - shown)
                    bar.set_postfix(loss=f"{mean:.4f}")
                    shown = i
                if self.step >= stop:
                    break
            if not taken:
                raise RuntimeError(f"the data source gave no training batch for epoch {epoch} from batch {skip} on")
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
    def validate(self, model, weights, max_batches: int | None = None) -> tuple[float, int]:
        """(the mean validation loss, NaN when it is not finite; the images it was taken over):
        one host read, at the end. At most ``max_batches`` batches per rank (the first ones of
        the fixed validation order)."""
        model.eval()
        meter = _LossMeter(self.device)
        for i, batch in enumerate(self.source.val_loader(max_batches)):
            if max_batches is not None and i >= max_batches:
                break
            batch = self.source.to_device(batch)
            meter.add(self.loss(model, batch, weights), batch["L"].shape[0], i)
        got = meter.read(self.d)
        return got.mean, got.images

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
    d = setup_distributed(cfg.device)
    try:
        return _train(cfg, d)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _check_training_memory(t: _Trainer, model: torch.nn.Module) -> int:
    """Refuse (MemoryLimitError) a batch whose activations, gradients and Adam state would not
    fit in the device's available memory; returns the largest batch a rank will see."""
    batch = min(t.cfg.batch_size, max(1, math.ceil(t.source.train_images / t.d.world)))
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
        self.samples = t.source.samples(self.SAMPLES)

    def log(self, epoch: int, h: dict[str, Any], model: torch.nn.Module) -> None:
        scalars = {"loss/train": h["train_loss"], "loss/val": h["val_loss"], "lr": h["lr"], "step": h["step"],
                   "time/epoch_seconds": h["seconds"]}
        self.tb.log_epoch(epoch, scalars, model=model, samples=self.samples)

    def close(self) -> None:
        self.tb.close()


def _train(cfg: TrainConfig, d: Dist) -> RunResult:
    t = _Trainer(cfg, d)
    # rank 0 owns the run directory (the lock is taken before anything in it is touched)
    with lock_directory(t.run_dir, "training run") if d.main else contextlib.nullcontext():
        return _train_locked(t, cfg, d)


def _train_locked(t: _Trainer, cfg: TrainConfig, d: Dist) -> RunResult:
    # first, so that a missing tensorboard package is said before anything is done
    monitor = _Monitor(cfg.tensorboard) if d.main and cfg.tensorboard else None
    try:
        return _train_monitored(t, cfg, d, monitor)
    finally:
        if monitor is not None:
            monitor.close()


def _train_monitored(t: _Trainer, cfg: TrainConfig, d: Dist, monitor: _Monitor | None) -> RunResult:
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
    # every check that can refuse the run comes before train_config.json is written, so that a
    # refused run (a resume with other settings, above all) leaves the one of the run as it was
    ckpt = load_resume_checkpoint(last_path) if cfg.resume and last_path.is_file() else None
    resuming_from = last_path if ckpt is not None else None
    if ckpt is not None:
        check_resume_model(last_path, ckpt["model_config"], cfg.model, cfg.image_size)
    if cfg.val_data is not None and isinstance(t.source, ShardSource):
        raise ValueError(f"val_data (--val-data): tar shards carry their own validation set (the val shards "
                         f"'fastcolor shard' writes beside the training ones), got val_data={cfg.val_data!r} for the "
                         f"shards {cfg.data_dir}")
    if cfg.val_data is not None and not Path(cfg.val_data).is_dir():
        raise ValueError(f"val_data (--val-data): expected a folder of validation images, got {cfg.val_data!r} "
                         f"({'not a folder' if Path(cfg.val_data).exists() else 'no such folder'})")
    t.source.prepare(resuming_from)
    t.build(resume_model_config(last_path, ckpt, cfg.backbone_weights) if ckpt else cfg.model)
    t.source.attach(t.model, t.size, t.stride)
    batch = _check_training_memory(t, t.model)  # before the prior pass reads images at this size
    prior = ClassPrior(cfg, run_dir, d) if t.model.config["arch"] == "zhang" else None
    if prior is not None:
        prior.check(prior.record(t.source, t.size, t.stride), resuming_from)
    weights = prior.weights(t.source) if prior is not None else None  # written for "ce" too, as before
    weights = weights if cfg.loss == "rebalanced" else None
    if d.main:
        atomic_write_json(run_dir / "train_config.json", {**asdict(cfg), "restart": False})  # replayable
    t.plan()
    model = t.model
    # fused: one kernel per step, and no host read of the step count (the for-loop and foreach
    # versions read it with .item() every step)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
                           weight_decay=cfg.weight_decay, fused=True)

    history: list[dict[str, Any]] = []
    start_period, best_val, best_epoch, bad_epochs, stopped_early = 0, math.inf, -1, 0, False
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
        start_period = meta["epoch"] + 1
        # optimiser steps done: recorded since recipes have step-based schedules; before, Adam's count
        counts = [st["step"] for st in opt.state.values() if "step" in st]
        t.step = meta["step"] if _is_int(meta.get("step")) else (int(counts[0]) if counts else 0)
        if d.main:
            repair_best(best_path, ckpt)
        del ckpt

    ddp_model = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[t.device.index] if t.device.type == "cuda" else None)

    title = f"{model.config['arch']} / {cfg.loss}"
    epoch = start_period  # a period: the steps between two validations (a data epoch without val_every)
    advice = (f"lower batch_size (now {cfg.batch_size}) or image_size (now {t.size}); {last_path} holds the last "
              f"completed epoch and resume=True continues from it")
    if monitor is not None:
        monitor.pick_samples(t)
    while not stopped_early and (t.steps_left() is None or t.steps_left() > 0):
        t0, first = time.time(), t.step
        with memory_guard(t.device, f"in epoch {epoch} (batches of {batch} at {t.size}x{t.size})", advice):
            train_loss = t.run_period(ddp_model, opt, weights, epoch)
            t._sync_buffers()
            # a validation never reads more batches than the steps it judges: a 3-step run
            # validates 3 batches, not the whole validation set
            val_loss, val_images = t.validate(model, weights, max_batches=t.step - first)
        improved = val_loss < best_val - cfg.min_delta
        if improved:
            best_val, best_epoch, bad_epochs = val_loss, epoch, 0
        else:
            bad_epochs += 1
        stopped_early = cfg.patience is not None and bad_epochs >= cfg.patience
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best": improved,
                        "seconds": round(time.time() - t0, 3), "lr": opt.param_groups[0]["lr"], "step": t.step,
                        "val_images": val_images})
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
