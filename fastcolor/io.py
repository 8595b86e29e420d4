"""Crash-safe file writing and pickle-free checkpoints.

Every write goes to a temporary file in the destination's directory, is flushed and
fsync'ed, moved over the destination with :func:`os.replace` (atomic on POSIX and
Windows), and the directory is fsync'ed, so a kill at any moment leaves either the old
file or the new one, never a torn one.

Checkpoints are single safetensors files: tensors under ``model.`` / ``optim.`` prefixes,
everything else (model config, optimizer hyper-parameters, training state) as JSON in the
safetensors metadata. Loading never unpickles.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "append_jsonl",
    "save_tensors", "load_tensors", "flatten_optimizer_state", "unflatten_optimizer_state",
    "save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "save_model", "load_model", "load_state_file",
]


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, os.replace, fsync dir)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Rewrite ``path`` atomically as JSON lines of ``rows`` (the whole log, so resume never duplicates lines)."""
    return atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> Path:
    """Atomically save tensors as safetensors; ``metadata`` values are stored JSON-encoded."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file: (tensors, JSON-decoded metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such safetensors file: {path}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, {k: json.loads(v) for k, v in meta.items()}


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors keyed ``state.<param>.<name>``, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state_dict["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, st in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(path: str | os.PathLike, model_state: dict[str, torch.Tensor], model_config: dict,
                    optimizer: torch.optim.Optimizer | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
                    **meta: Any) -> Path:
    """One atomic safetensors file holding the model, the optimizer and JSON training state ``meta``."""
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    metadata: dict[str, Any] = {"format": "fastcolor-checkpoint-1", "model_config": model_config, "meta": meta}
    if optimizer is not None:
        opt_tensors, opt_rest = flatten_optimizer_state(optimizer.state_dict())
        tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
        metadata["optimizer"] = opt_rest
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v
    return save_tensors(path, tensors, metadata)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Inverse of :func:`save_checkpoint`: dict with ``model_state``, ``model_config``, ``optimizer_state``
    (``None`` if absent), ``extra`` tensors and ``meta``."""
    tensors, metadata = load_tensors(path, device)
    if metadata.get("format") != "fastcolor-checkpoint-1":
        raise ValueError(f"path: expected a fastcolor checkpoint, got a safetensors file with metadata "
                         f"keys {sorted(metadata)} ({path})")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}, "extra": {}}
    for k, v in tensors.items():
        prefix, rest = k.split(".", 1)
        groups[prefix][rest] = v
    opt = metadata.get("optimizer")
    return {
        "model_state": groups["model"],
        "model_config": metadata["model_config"],
        "optimizer_state": unflatten_optimizer_state(groups["optim"], opt) if opt is not None else None,
        "extra": groups["extra"],
        "meta": metadata.get("meta", {}),
    }


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint/model file without reading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def save_model(path: str | os.PathLike, model: torch.nn.Module) -> Path:
    """Inference weights: ``<path>`` (safetensors, config in its metadata) and ``<path>.json`` beside it."""
    from fastcolor.models import model_state

    path = Path(path)
    config = dict(model.config)
    save_tensors(path, model_state(model), {"format": "fastcolor-model-1", "model_config": config})
    atomic_write_json(path.with_suffix(".json"), config)
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any) -> torch.nn.Module:
    """Rebuild a model from a model file, a checkpoint or a run directory (uses ``model.safetensors`` there).

    ``overrides`` update the stored config (e.g. ``backbone_weights=`` for a fusion model).
    """
    from fastcolor.models import build_model, load_model_state

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    meta = read_checkpoint_meta(path)
    if "model_config" not in meta:
        raise ValueError(f"path: expected a fastcolor model or checkpoint file, got {path}")
    model = build_model({**meta["model_config"], **overrides})
    tensors, _ = load_tensors(path)
    if meta.get("format") == "fastcolor-checkpoint-1":
        tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    load_model_state(model, tensors)
    return model.to(device).eval()


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.safetensors`` or a torch file loaded with ``weights_only=True`` (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such weights file: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"path: expected a state dict in {path}, got {type(obj).__name__}")
    return obj
