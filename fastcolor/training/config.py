"""The settings of a training run (:class:`TrainConfig`), checked before anything is written.

Everything here is pure: a config is validated field by field when it is made, so that a bad
value is refused, naming its field, before a run directory is touched.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from fastcolor.data import DECODES, TARGET_REDUCTIONS
from fastcolor.data.prior import parse_prior
from fastcolor.recipes import DEFAULT_PRIOR, RECIPES, recipe_values

__all__ = ["TrainConfig", "check_device", "RUN_FILES", "LOSSES"]


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
    epochs: int | None = 40  #: passes over the training images (None: no limit; then ``max_steps`` must be set)
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
    decode: str = "auto"  #: JPEGs decoded by the workers ("cpu", PIL) or batched on the GPU ("gpu", nvjpeg); "auto"
    prior: str = DEFAULT_PRIOR  #: "data", "sample:N" or "imagenet" (:mod:`fastcolor.data.prior`)
    prior_lam: float = 0.5  #: rarity weights: the weight of the uniform distribution in the mix, 0..1
    prior_sigma: float = 5.0  #: Gaussian smoothing (ab units) of a prior computed from data
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
    val_images: int | None = None  #: validate on this many images (a fixed, seeded subset); None: all
    val_every: int | None = None  #: validate (and checkpoint) every this many steps; None: at each epoch's end
    val_data: str | None = None  #: a folder of validation images; then all of ``data_dir`` trains
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
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {self.decode!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in 0..2**63-1 (it seeds numpy and torch generators, which take "
                             f"non-negative 64-bit seeds), got {self.seed!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else self.betas
        if not (isinstance(betas, tuple) and len(betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1) (Adam's decay rates of its gradient averages; "
                             f"1 would never forget the first gradient), got {self.betas!r}")
        if not (isinstance(self.prior_lam, (int, float)) and 0 <= self.prior_lam <= 1):
            raise ValueError(f"prior_lam must be a number in [0, 1] (the weight of the uniform distribution in the "
                             f"prior mixed for the rarity weights), got {self.prior_lam!r}")
        sigma = self.prior_sigma
        if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"prior_sigma must be a positive number, got {self.prior_sigma!r}")
        parse_prior(self.prior)
        for name in ("val_images", "val_every"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if self.val_data is not None and not isinstance(self.val_data, str):
            raise ValueError(f"val_data must be a folder's path (str) or None, got {self.val_data!r}")
        size = self.image_size or _input_size(self.model)
        if self.crop_size is not None and size is not None and self.crop_size > size:
            what = "image_size (--size)" if self.image_size else "the model's input size"
            raise ValueError(f"crop_size must be at most the image size ({what}, {size}): crops are taken from the "
                             f"resized images, got {self.crop_size}")
        check_device(self.device, available=False)
        self.betas = tuple(self.betas)
        self.split = tuple(self.split)
        self.lr_milestones = ms


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _input_size(model: str | dict) -> int | None:
    """The input size of a model preset name or config (None when it cannot be told here)."""
    from fastcolor.models import PRESETS, ZhangNet

    config = PRESETS.get(model) if isinstance(model, str) else model
    if not isinstance(config, dict):
        return None
    size = config.get("input_size")
    if size is None and config.get("arch") == "zhang":  # ZhangNet's own default
        size = inspect.signature(ZhangNet).parameters["input_size"].default
    return size if _is_int(size) else None


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
