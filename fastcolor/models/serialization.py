"""Models to and from files: :func:`save_model` writes a model's inference weights,
:func:`load_model` rebuilds one from a model file, a checkpoint or a run directory.

The files are the safetensors files of :mod:`fastcolor.io` (config in the metadata, loading
never unpickles); a file's tensors are checked against the architecture its config describes
before anything that config asks for is allocated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fastcolor.io import atomic_write_json, load_tensors, read_checkpoint_meta, save_tensors, tensor_shapes
from fastcolor.models import build_model, load_model_state, model_state

__all__ = ["save_model", "load_model"]


def save_model(path: str | os.PathLike, model: torch.nn.Module) -> Path:
    """Inference weights: ``<path>`` (safetensors, config in its metadata) and ``<path>.json`` beside it."""
    path = Path(path)
    config = dict(model.config)
    save_tensors(path, model_state(model), {"format": "fastcolor-model-1", "model_config": config})
    atomic_write_json(path.with_suffix(".json"), config)
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any) -> torch.nn.Module:
    """Rebuild a model from a model file, a checkpoint or a run directory (uses ``model.safetensors`` there).

    ``overrides`` update the stored config (e.g. ``backbone_weights=`` for a fusion model).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    meta = read_checkpoint_meta(path)
    config = meta.get("model_config")
    if not isinstance(config, dict) or meta.get("format") not in ("fastcolor-model-1", "fastcolor-checkpoint-1"):
        raise ValueError(f"path: expected a fastcolor model or checkpoint file, got {path}")
    prefix = "model." if meta["format"] == "fastcolor-checkpoint-1" else ""
    shapes = {k[len(prefix):]: shape for k, shape in tensor_shapes(path).items() if k.startswith(prefix)}
    config = {**config, **overrides}
    _check_architecture(path, config, shapes)  # before allocating anything the file's config asks for
    model = build_model(config)
    tensors, _ = load_tensors(path)
    load_model_state(model, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return model.to(device).eval()


def _check_architecture(path: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """The file's tensors must be exactly those of the model its config describes.

    The model is first built on the meta device (no memory), so a config that asks for an
    absurdly large network is refused from the shapes alone, as is a file whose tensors come
    from another architecture.
    """
    skeleton_config = {**config, "backbone_weights": None} if config.get("arch") == "fusion" else config
    try:
        with torch.device("meta"):
            skeleton = build_model(skeleton_config)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"path: {path} has an invalid model_config {json.dumps(config)[:300]}: {exc}") from exc
    want = {k: tuple(v.shape) for k, v in model_state(skeleton).items()}
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    wrong = [f"{k}: file {shapes[k]}, model {want[k]}" for k in sorted(set(want) & set(shapes)) if shapes[k] != want[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"path: the weights in {path} do not fit the {config.get('arch')} architecture its config "
                         f"describes (wrong architecture or damaged file): "
                         + "; ".join(x for x in (f"missing {missing[:3]}" if missing else "",
                                                  f"unexpected {unexpected[:3]}" if unexpected else "",
                                                  f"shape mismatch {wrong[:3]}" if wrong else "") if x))
