"""Which model file ``--weights`` names: a run directory, a model file, a checkpoint, a folder
of runs (one of them picked by ``--model``), or the authors' released ECCV16 weights
(``colorization_release_v2-9b330a0b.pth``, :mod:`fastcolor.models.released`, or their Caffe
``colorization_release_v2.caffemodel``, :mod:`fastcolor.models.caffe`), with errors that
say what to do when there is none; and whether a run was trained on a given data folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastcolor.app.choices import MODELS  # CLI model names -> fastcolor.models.PRESETS keys
from fastcolor.app.messages import CLIError, note
from fastcolor.data import load_split
from fastcolor.io import open_weights_file, read_checkpoint_meta
from fastcolor.models.caffe import looks_like_caffemodel
from fastcolor.models.released import EXPECTED, looks_like_torch_file, released_file_problem
from fastcolor.models.serialization import HUB_CONFIG, HUB_WEIGHTS, load_model
from fastcolor.models.serialization import is_safetensors_file as _is_safetensors

__all__ = ["MODELS", "no_weights_message", "resolve_weights", "load_weights", "split_matches_data"]


def _find_runs(folder: Path, depth: int = 2) -> list[Path]:
    """Run directories (with model.safetensors) at most ``depth`` levels below ``folder``."""
    found: list[Path] = []
    if depth <= 0:
        return found
    try:
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return found
    for d in subdirs:
        if (d / "model.safetensors").is_file():
            found.append(d)
        else:
            found += _find_runs(d, depth - 1)
    return found


def _arch_of(path: Path) -> str | None:
    try:
        return read_checkpoint_meta(path).get("model_config", {}).get("arch")
    except Exception:  # noqa: BLE001 - not a model file (or another writer's Hub layout: its config.json says)
        pass
    try:
        return json.loads((path.parent / HUB_CONFIG).read_text()).get("arch") if path.name == HUB_WEIGHTS else None
    except Exception:  # noqa: BLE001 - no readable config.json: no arch
        return None


def no_weights_message(model: str | None) -> str:
    """What to do when no ``--weights`` are given (none ship with fastcolor)."""
    name = model or "zhang-small"
    return (f"no trained weights given: fastcolor ships no pretrained weights and cannot download any. "
            f"Train a model first, e.g. 'fastcolor train PHOTOS/ --model {name} --out runs/{name}', then pass "
            f"'--weights runs/{name}' (or run 'fastcolor demo' and pass --weights demo_out/runs/zhang-small)")


def resolve_weights(weights: str | None, model: str | None = None, arg: str = "--weights") -> Path:
    """The model file to load for ``--weights`` (run dir, model file, checkpoint, folder of runs); errors
    name the command's argument ``arg`` (``export`` and ``eval`` take the weights as a positional)."""
    if weights is None:
        raise CLIError(no_weights_message(model))
    path = Path(weights)
    want = MODELS[model].split("_")[0] if model else None
    if path.is_dir():
        for name in ("model.safetensors", "best.safetensors"):
            if os.path.lexists(path / name):  # a FIFO or a link loop there is refused below, by name
                if name != "model.safetensors":
                    note(f"{path} has no model.safetensors yet (training not finished?): using {name}")
                path = path / name
                break
        else:
            runs = _find_runs(path)
            if want:
                runs = [r for r in runs if _arch_of(r / "model.safetensors") == want]
            if len(runs) == 1:
                note(f"using the run {runs[0]}")
                path = runs[0] / "model.safetensors"
            elif runs:
                listed = ", ".join(str(r) for r in runs[:6])
                raise CLIError(f"{arg} {weights} holds several runs ({listed}); pass one of them"
                               + ("" if want else " or choose with --model"))
            else:
                raise CLIError(f"{arg} {weights}: not a run directory (no model.safetensors in it or below); "
                               f"'fastcolor train' writes one")
    try:  # only a regular file is read: a FIFO, /dev/zero or a loop of links is named as what it is
        open_weights_file(path).close()
    except FileNotFoundError:
        raise CLIError(f"{arg}: no such file or directory: {weights}") from None
    except ValueError as exc:
        raise CLIError(f"{arg} {weights}: {str(exc).removeprefix('path: ')}") from None
    arch = _arch_of(path)
    if arch is None and path.is_file() and not _is_safetensors(path) and looks_like_caffemodel(path):
        arch = "zhang"  # the authors' Caffe ECCV16 model: its loader names what a wrong file holds
    if arch is None and path.is_file() and (looks_like_torch_file(path) or _is_safetensors(path)):
        problem = released_file_problem(path)  # the authors' released ECCV16 weights load as a zhang model
        if problem is not None and looks_like_torch_file(path):
            raise CLIError(f"{arg} {weights}: not a fastcolor model or checkpoint file (the safetensors file "
                           f"written by 'fastcolor train'), nor usable as {EXPECTED}: {problem}")
        arch = "zhang" if problem is None else None
    if arch is None:
        raise CLIError(f"{arg} {weights}: not a fastcolor model or checkpoint file (expected the safetensors "
                       f"file written by 'fastcolor train', or {EXPECTED})")
    if want and arch != want:
        raise CLIError(f"--model {model} was asked for but {arg} {weights} holds a {arch} model")
    return path


def load_weights(weights: str | None, model: str | None, device: str,
                 backbone_weights: str | None = None, arg: str = "--weights") -> torch.nn.Module:
    """The model :func:`resolve_weights` finds, loaded on ``device``; a file that does not load is a
    :class:`CLIError` naming ``arg`` (``--weights``). ``backbone_weights`` (``--backbone-weights``) is the
    only backbone file a fusion model is loaded with: a path stored in the weights file is not read."""
    path = resolve_weights(weights, model, arg)
    extra = {}
    if backbone_weights is not None:
        if _arch_of(path) == "fusion":
            extra["backbone_weights"] = backbone_weights
        else:
            note("--backbone-weights has no effect on a Zhang model (it has no backbone)")
    try:
        return load_model(path, device, **extra)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CLIError(f"{arg} {weights}: could not load the model: {exc}") from exc


def split_matches_data(run_dir: Path, data: Path) -> bool:
    """Whether ``run_dir`` has a ``split.json`` whose images are in ``data`` (its first 20 are checked)."""
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        return False
    items = [it for part in load_split(split_file).values() for it in part]
    return bool(items) and all((data / it.path).is_file() for it in items[:20])
