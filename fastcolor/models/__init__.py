"""Colorization networks: :class:`ZhangNet` (313-bin classification) and :class:`FusionNet`
(Deep Koalarization regression), rebuildable from their ``config`` dicts; :func:`load_released`
reads the authors' released ECCV16 weights into a :class:`ZhangNet`. Loading any weights file
(fastcolor's or the authors') is ``fastcolor.load_model`` (:mod:`fastcolor.models.serialization`:
it needs :mod:`fastcolor.colorize`, which imports this package, so it is not exported here)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastcolor.models.fusion import BACKBONES, EMBEDDINGS, Embedder, EmbeddingCache, FusionNet
from fastcolor.models.released import load_released
from fastcolor.models.zhang import ZhangNet

__all__ = ["ZhangNet", "FusionNet", "Embedder", "EmbeddingCache", "BACKBONES", "EMBEDDINGS", "build_model",
           "model_state", "load_model_state", "load_released", "PRESETS"]

#: Named configurations accepted by :func:`build_model`.
PRESETS: dict[str, dict[str, Any]] = {
    "zhang": {"arch": "zhang"},
    "zhang_small": {"arch": "zhang", "base": 32, "mid_width": 256, "mid_dilations": [1, 2], "input_size": 128},
    "zhang_tiny": {"arch": "zhang", "base": 8, "mid_width": 16, "mid_dilations": [2], "input_size": 32},
    "fusion": {"arch": "fusion"},
    "fusion_small": {"arch": "fusion", "input_size": 128, "width": 0.5, "backbone": "mobilenet_v3_small"},
    "fusion_tiny": {"arch": "fusion", "input_size": 32, "width": 0.125, "backbone": "mobilenet_v3_small",
                    "embed_size": 64},
}


def build_model(config: dict[str, Any] | str) -> nn.Module:
    """A fresh model from a ``config`` dict (as found in ``model.config``) or a :data:`PRESETS` name.

    ``config["arch"]`` picks the class: ``"zhang"`` -> :class:`ZhangNet` (L (N, 1, H, W) in
    0..100 -> logits (N, 313, H/4, W/4) over the ab bins), ``"fusion"`` -> :class:`FusionNet`
    (L (N, 1, H, W) -> ab / 128 in [-1, 1], (N, 2, H, W)); the other keys are that class's
    arguments. The weights are freshly initialised (a fusion model's backbone is random
    unless ``backbone_weights`` names a local file); the model is in training mode.

    Example:
        >>> net = build_model("zhang_tiny")
        >>> type(net).__name__, net.config["input_size"], net.config["num_bins"]
        ('ZhangNet', 32, 313)
        >>> build_model(net.config).config == net.config        # the config rebuilds the model
        True
    """
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"config must be a dict or one of {sorted(PRESETS)}, got {config!r}")
        config = PRESETS[config]
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a preset name, got {type(config).__name__}")
    kwargs = dict(config)
    arch = kwargs.pop("arch", None)
    if arch == "zhang":
        return ZhangNet(**kwargs)
    if arch == "fusion":
        return FusionNet(**kwargs)
    raise ValueError(f"config['arch'] must be 'zhang' or 'fusion', got {arch!r}")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable state to checkpoint: the state dict without a fusion model's frozen backbone.

    name -> tensor (the tensors themselves, not copies), as in ``model.state_dict()`` minus
    the ``embedder.*`` keys; a ``DistributedDataParallel`` wrapper (``.module``) is looked
    through, so the keys never start with ``module.``.

    Example:
        >>> net = FusionNet.tiny()                              # a mobilenet_v3_small backbone
        >>> state = model_state(net)
        >>> len(state) < len(net.state_dict()), any(k.startswith("embedder.") for k in state)
        (True, False)
    """
    model = _unwrap(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("embedder.")}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`model_state` output strictly (the frozen backbone keys are allowed to be absent).

    ``state``: name -> tensor, each of the model's shape. A missing or unexpected key or a shape
    mismatch (another architecture's or size's weights) raises ``ValueError`` saying which.

    Example:
        >>> import torch
        >>> a, b = ZhangNet.tiny(), ZhangNet.tiny()
        >>> load_model_state(b, model_state(a))
        >>> torch.equal(a.classifier.weight, b.classifier.weight)
        True
        >>> load_model_state(b, {})                              # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: state does not fit the model: missing ['encoder.0.0.weight', ...
    """
    model = _unwrap(model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches: another architecture's weights
        raise ValueError(f"state does not fit the model: {' '.join(str(exc).split())[:500]}") from exc
    missing = [k for k in missing if not k.startswith("embedder.")]
    if missing or unexpected:
        raise ValueError(f"state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
