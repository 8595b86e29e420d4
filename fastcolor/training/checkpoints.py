"""Checkpoints of a training run: reading and checking them, and what a resume needs from them.

``last.safetensors`` (model, Adam state, training state as JSON metadata) is what a run resumes
from; ``best.safetensors`` the best validation so far. Every way a checkpoint can be unusable
(empty, truncated, foreign, damaged metadata, weights that do not fit) is a
:class:`CheckpointError` saying what is wrong, whether ``best.safetensors`` is intact and what to
do. Writing is :func:`fastcolor.io.save_checkpoint` (atomic).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastcolor.io import load_checkpoint, read_checkpoint_meta, save_checkpoint
from fastcolor.models.serialization import check_stored_config

__all__ = ["CheckpointError", "checkpoint_meta", "load_resume_checkpoint", "repair_best", "resume_model_config",
           "check_resume_model"]


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


def load_resume_checkpoint(path: Path) -> dict[str, Any]:
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


def repair_best(best_path: Path, ckpt: dict[str, Any]) -> None:
    """When the run was killed after writing last.safetensors of an improving epoch but before
    best.safetensors, that epoch's weights are in last: write best from them."""
    meta = ckpt["meta"]
    try:
        on_disk = read_checkpoint_meta(best_path)["meta"]["epoch"] if best_path.is_file() else None
    except (ValueError, KeyError, TypeError):
        on_disk = None  # damaged: rewrite it if we can
    if on_disk != meta["best_epoch"] and meta["best_epoch"] == meta["epoch"]:
        save_checkpoint(best_path, ckpt["model_state"], ckpt["model_config"], None, **meta)


def resume_model_config(last_path: Path, ckpt: dict[str, Any], backbone_weights: str | None) -> dict[str, Any]:
    """The checkpoint's model config, checked like a model file's before anything is built."""
    config = ckpt["model_config"]
    try:
        check_stored_config(last_path, config, {k: tuple(v.shape) for k, v in ckpt["model_state"].items()})
    except ValueError as exc:
        raise CheckpointError(last_path, str(exc).removeprefix("path: ")) from exc
    stored = config.get("backbone_weights") if config.get("arch") == "fusion" else None
    if stored and not backbone_weights:
        raise ValueError(f"backbone_weights: {last_path} was trained with the backbone weights {stored!r}, but a "
                         f"path stored in a checkpoint is never read: pass backbone_weights= (--backbone-weights) "
                         f"again to resume")
    return config


def check_resume_model(last_path: Path, stored: dict[str, Any], wanted: str | dict[str, Any],
                       image_size: int | None = None) -> None:
    """Refuse (ValueError naming ``model``) to resume ``last_path``, whose model is ``stored``,
    as a run of another model ``wanted`` (a preset name or config): its weights could only be
    continued as the stored model, while the run would record and announce the other one. The
    input size counts only where ``image_size`` is given (None: the size the model was trained at)."""
    from fastcolor.models import PRESETS

    config = PRESETS.get(wanted, {}) if isinstance(wanted, str) else wanted
    if not isinstance(config, dict):
        return
    config = {k: v for k, v in config.items() if k not in ("backbone_weights", "input_size")}
    if image_size is not None:
        config["input_size"] = image_size
    diff = [f"{k} {json.dumps(stored.get(k))} -> {json.dumps(v)}" for k, v in config.items()
            if json.dumps(stored.get(k)) != json.dumps(v)]
    if diff:
        def name(c):  # the preset it is (the most specific one that fits; its size aside)
            fits = [n for n, p in PRESETS.items()
                    if all(json.dumps(c.get(k)) == json.dumps(v) for k, v in p.items() if k != "input_size")]
            return repr(max(fits, key=lambda n: len(PRESETS[n]))) if fits else "another"

        raise ValueError(f"model: {last_path} holds a {name(stored)} model, and this run asks for a {name(config)} "
                         f"one ({'; '.join(diff)}): resume with the model and size the run was started with "
                         f"(--model, --size; its train_config.json records them), or start a new run with "
                         f"restart=True (fastcolor train --restart)")
