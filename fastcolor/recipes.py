"""Named training recipes: complete, frozen sets of :class:`fastcolor.train.TrainConfig` values.

``fastcolor train --recipe NAME`` (or ``TrainConfig.from_recipe(NAME, data_dir=..., run_dir=...)``)
starts from one of these and lets every value be overridden by its own flag or keyword. The
recipe's name is recorded in the run's ``train_config.json`` beside the resolved values.

* ``zhang2016``: the authors' solver and training net (Zhang, Isola & Efros, ECCV 2016).
* ``study``: the student study's protocol (the seed report of this project).
* ``default``: what ``fastcolor train`` did before recipes existed (fastcolor v1), unchanged, so
  that existing runs resume with the settings they were started with.

Each recipe sets every hyper-parameter in :data:`HYPERPARAMETERS` and says in ``sources`` where
each number comes from. The authors' test-time temperature (T = 0.38) is not a training value:
it is the default ``--temperature`` of ``fastcolor colorize`` and ``fastcolor eval``. The
settings of a run that are not hyper-parameters (data, run directory, device, seed, workers,
precision, logging) are never part of a recipe.

Example::

    >>> from fastcolor.recipes import RECIPES, recipe_values
    >>> RECIPES["zhang2016"].values["lr"]
    3e-05
    >>> recipe_values("study", model="fusion_small")["loss"]   # the study's fusion model: MSE
    'mse'
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["Recipe", "RECIPES", "HYPERPARAMETERS", "get_recipe", "recipe_values", "DEFAULT_RECIPE", "DEFAULT_PRIOR"]

#: The TrainConfig fields every recipe sets (and only those).
HYPERPARAMETERS = (
    "model", "loss", "image_size", "crop_size", "mirror", "augment", "batch_size", "epochs", "max_steps", "lr",
    "betas", "weight_decay", "lr_milestones", "lr_gamma", "patience", "min_delta", "keep_best", "split",
    "prior", "prior_lam", "prior_sigma", "nongray", "target_reduction",
)

#: Where a run's class prior comes from unless a recipe or flag says otherwise: every training
#: image up to 5000, a seeded sample of 5000 beyond (:mod:`fastcolor.data.prior`; bench/RESULTS.md,
#: "class prior from a sample", measures how far such a sample lands from the full prior).
DEFAULT_PRIOR = "sample:5000"

#: The recipe ``fastcolor train`` uses without ``--recipe``.
DEFAULT_RECIPE = "default"


@dataclass(frozen=True)
class Recipe:
    """A named set of training hyper-parameters.

    ``values``: every field of :data:`HYPERPARAMETERS` -> its value (read-only). ``fusion``: the
    values that differ when the model is a fusion network (Deep Koalarization). ``sources``: per
    field, where the value comes from (or why fastcolor chose it). ``summary``: one line for
    ``--help``.
    """

    name: str
    summary: str
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    fusion: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({"loss": "mse"}))

    def __post_init__(self):
        missing = [k for k in HYPERPARAMETERS if k not in self.values]
        extra = [k for k in self.values if k not in HYPERPARAMETERS]
        if missing or extra:
            raise ValueError(f"recipe {self.name!r}: values must set exactly {HYPERPARAMETERS}; missing {missing}, "
                             f"unexpected {extra}")
        unsourced = [k for k in HYPERPARAMETERS if k not in self.sources]
        if unsourced:
            raise ValueError(f"recipe {self.name!r}: sources must name where every value comes from; missing "
                             f"{unsourced}")
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))
        object.__setattr__(self, "fusion", MappingProxyType(dict(self.fusion)))


_ISSUE = "the authors' released Caffe solver and training net (richzhang/colorization)"
_REPORT = "the seed study's report"

ZHANG2016 = Recipe(
    name="zhang2016",
    summary="the authors' ECCV16 solver: Adam 3e-5, wd 1e-3, batch 40, 500k steps, 176px crops, non-grey mask",
    values={
        "model": "zhang", "loss": "rebalanced", "image_size": 256, "crop_size": 176, "mirror": True,
        "augment": False, "batch_size": 40, "epochs": None, "max_steps": 500_000, "lr": 3e-5, "betas": (0.9, 0.99),
        "weight_decay": 1e-3, "lr_milestones": (225_000,), "lr_gamma": 0.1, "patience": None, "min_delta": 0.0,
        "keep_best": False, "split": (0.8, 0.1, 0.1), "prior": "imagenet", "prior_lam": 0.5, "prior_sigma": 5.0,
        "nongray": True, "target_reduction": "subsample",
    },
    sources={
        "model": "the ECCV16 network (fastcolor's 'zhang' preset, the authors' architecture)",
        "loss": f"class-rebalanced soft-target cross-entropy ({_ISSUE}; paper eq. 2)",
        "image_size": "fastcolor's choice: the ECCV16 network's input size (256); the 176x176 crops are taken from "
                      "images resized to it (the issue's facts give the crop size only)",
        "crop_size": f"176x176 random crops ({_ISSUE}); validation takes the centre crop, as Caffe's data layer does "
                     f"in its TEST phase",
        "mirror": f"random horizontal mirroring ({_ISSUE})",
        "augment": "no zoom/rotation/shear: the authors' data layer only crops and mirrors",
        "batch_size": f"batch 40 ({_ISSUE})",
        "epochs": "no epoch limit: the solver counts iterations (max_steps ends the run)",
        "max_steps": f"500k iterations in all ({_ISSUE}); scale it with lr_milestones for a smaller data set",
        "lr": f"Adam base_lr 3e-5 ({_ISSUE})",
        "betas": f"beta1 0.9 (momentum), beta2 0.99 (momentum2) ({_ISSUE})",
        "weight_decay": f"weight decay 1e-3 ({_ISSUE}); L2 added to the gradient, as Caffe does (torch Adam's "
                        f"weight_decay, not AdamW)",
        "lr_milestones": f"the learning rate times 0.1 after 225k iterations ({_ISSUE})",
        "lr_gamma": f"x 0.1 ({_ISSUE})",
        "patience": "no early stopping: the solver runs its iterations out",
        "min_delta": "unused without early stopping (any improvement marks best.safetensors)",
        "keep_best": "the model is the weights after the last iteration (the solver does no validation-based "
                     "selection); best.safetensors is still written",
        "split": "the authors trained on ImageNet's training set and validated on its own validation images: "
                 "pass ImageNet's val/ as val_data (--val-data) to do the same; without it fastcolor makes its "
                 "seeded 80/10/10 split of the folder",
        "prior": f"the authors' ImageNet prior, resources/prior_probs.npy, which their class-rebalancing layer "
                 f"loads ({_ISSUE}): a fact table in fastcolor.data.prior, no pass over the data",
        "prior_lam": f"lambda 0.5 ({_ISSUE}; paper sec. 2.2)",
        "prior_sigma": f"prior smoothed with a Gaussian, sigma 5 ({_ISSUE}); the ImageNet prior is already "
                       f"smoothed, so only a prior computed from data (--prior data or sample:N) is",
        "nongray": f"the non-grey mask on: images whose ab never leaves |a|,|b| <= 5 get no loss ({_ISSUE})",
        "target_reduction": f"the ab target at 1/4 resolution by subsampling, the top-left pixel of every 4x4 block "
                            f"({_ISSUE})",
    },
)

STUDY = Recipe(
    name="study",
    summary="the student study: zhang-small at 128px, Adam 1e-3, batch 100, 40 epochs, early stopping",
    values={
        "model": "zhang_small", "loss": "rebalanced", "image_size": None, "crop_size": None, "mirror": False,
        "augment": True, "batch_size": 100, "epochs": 40, "max_steps": None, "lr": 1e-3, "betas": (0.9, 0.999),
        "weight_decay": 0.0, "lr_milestones": (), "lr_gamma": 0.1, "patience": 7, "min_delta": 1e-3,
        "keep_best": True, "split": (0.8, 0.1, 0.1), "prior": DEFAULT_PRIOR, "prior_lam": 0.5, "prior_sigma": 5.0,
        "nongray": False, "target_reduction": "area",
    },
    sources={
        "model": f"128x128 input, 32x32x313 output ({_REPORT}): fastcolor's 'zhang_small'",
        "loss": f"the rebalanced loss ({_REPORT}); the fusion model: MSE on ab/128 with a tanh output",
        "image_size": f"the model's input size, 128x128 for zhang_small ({_REPORT})",
        "crop_size": "no crops: the study resized whole images",
        "mirror": "the horizontal flip is part of 'augment'",
        "augment": f"run-time augmentation by zoom, rotation, shear and horizontal flip ({_REPORT}): "
                   f"fastcolor.data.augmentation()",
        "batch_size": f"batch 100 ({_REPORT})",
        "epochs": f"40 epochs ({_REPORT})",
        "max_steps": "no step limit: the study counts epochs",
        "lr": f"Adam with Keras' default learning rate 1e-3 ({_REPORT})",
        "betas": f"Keras' default betas (0.9, 0.999) ({_REPORT}); Keras' epsilon is not reproduced (torch's 1e-8)",
        "weight_decay": "none: Keras' Adam has no weight decay by default",
        "lr_milestones": "a constant learning rate (Keras' Adam default)",
        "lr_gamma": "unused (no milestones)",
        "patience": f"early stopping after 7 epochs without an improvement ({_REPORT})",
        "min_delta": f"an improvement is a validation loss lower by at least 0.001 ({_REPORT})",
        "keep_best": f"keep the best model by validation loss ({_REPORT})",
        "split": f"split 80/10/10 ({_REPORT})",
        "prior": "the prior of the training images (the report facts do not say; a study-sized folder is under the "
                 "default sample's 5000 images, so all of them are used)",
        "prior_lam": "the paper's lambda 0.5 (the study used the paper's rebalanced loss; the report facts give "
                     "no other value)",
        "prior_sigma": "the paper's sigma 5 (as for prior_lam)",
        "nongray": "off: the report facts do not mention the authors' non-grey mask",
        "target_reduction": "block means (fastcolor v1's): the report facts do not say how the 32x32 target was "
                            "made",
    },
)

DEFAULT = Recipe(
    name="default",
    summary="fastcolor v1's settings, unchanged: zhang-small, Adam 3e-4, batch 32, 40 epochs, area targets",
    values={
        "model": "zhang_small", "loss": "rebalanced", "image_size": None, "crop_size": None, "mirror": False,
        "augment": True, "batch_size": 32, "epochs": 40, "max_steps": None, "lr": 3e-4, "betas": (0.9, 0.99),
        "weight_decay": 0.0, "lr_milestones": (), "lr_gamma": 0.1, "patience": 7, "min_delta": 1e-3,
        "keep_best": True, "split": (0.8, 0.1, 0.1), "prior": DEFAULT_PRIOR, "prior_lam": 0.5, "prior_sigma": 5.0,
        "nongray": False, "target_reduction": "area",
    },
    sources={**{k: "fastcolor v1's 'fastcolor train' default (kept so that earlier commands and runs behave as before; "
                   "TrainConfig's own field defaults differ only in batch_size 100)" for k in HYPERPARAMETERS},
             "prior": "v1's prior of every training image up to 5000 of them; beyond, a seeded sample of 5000 (v1 "
                      "decoded every training image before step 1: 143 s for 16k images, hours for ImageNet)"},
)

#: The recipes by name.
RECIPES: Mapping[str, Recipe] = MappingProxyType({r.name: r for r in (ZHANG2016, STUDY, DEFAULT)})


def get_recipe(name: str) -> Recipe:
    """The :class:`Recipe` called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in RECIPES:
        raise ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {name!r}")
    return RECIPES[name]


def _arch(model: str | Mapping[str, Any] | None) -> str | None:
    if isinstance(model, Mapping):
        return model.get("arch")
    if isinstance(model, str):
        return model.replace("-", "_").split("_")[0]
    return None


def recipe_values(name: str, model: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The hyper-parameters of recipe ``name`` as a plain dict (a fresh copy), for ``model`` (a
    preset name or model config; default: the recipe's own): a fusion model gets the recipe's
    ``fusion`` values (the MSE loss), since the class-rebalanced loss does not apply to it."""
    recipe = get_recipe(name)
    values = dict(recipe.values)
    if model is not None:
        values["model"] = model
    if _arch(values["model"]) == "fusion":
        values.update(recipe.fusion)
    return values
