"""Models to and from files: :func:`save_model` writes a model's inference weights,
:func:`load_model` rebuilds one from a model file, a checkpoint, a run directory, or the
authors' released ECCV16 weights (:mod:`fastcolor.models.released`).

The files are the safetensors files of :mod:`fastcolor.io` (config in the metadata, loading
never unpickles). The config inside a file is untrusted input (:func:`check_stored_config`):
the model it describes is first built on the meta device (no memory), after bounding what
the file itself cannot vouch for (the number of blocks); its tensors must be exactly the
file's; and the memory that building it for real takes (parameters, and the backbone's probe
pass at ``embed_size``) must fit in the memory available, all before anything is allocated.
A weights path stored in a file (a fusion model's ``backbone_weights``) is never opened, not
even checked for existence: only a path passed to :func:`load_model` is read.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from fastcolor.colorize import check_memory
from fastcolor.io import (
    atomic_write_json,
    atomic_write_text,
    check_weight_values,
    load_tensors,
    read_checkpoint_meta,
    save_tensors,
    tensor_shapes,
    weights_format,
)
from fastcolor.models import build_model, load_model_state, model_state
from fastcolor.models.caffe import load_caffe, looks_like_caffemodel
from fastcolor.models.released import (
    EXPECTED,
    caller_stacklevel,
    load_released,
    released_layout_problem,
)

__all__ = ["save_model", "save_pretrained", "load_model", "check_stored_config", "is_safetensors_file", "HUB_WEIGHTS",
           "HUB_CONFIG"]

#: The Hugging Face Hub layout (``huggingface_hub``'s ``PyTorchModelHubMixin`` convention): a folder
#: holding the weights as ``model.safetensors`` and the model's config as ``config.json``.
HUB_WEIGHTS = "model.safetensors"
HUB_CONFIG = "config.json"
#: A Hub model id: ``owner/name`` (letters, digits, ``-``, ``_``, ``.``), as the Hub spells repositories.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def save_model(path: str | os.PathLike, model: torch.nn.Module) -> Path:
    """Inference weights: ``<path>`` (safetensors, config in its metadata) and ``<path>.json`` beside it.

    The tensors are :func:`~fastcolor.models.model_state` (a fusion model's frozen backbone
    is left out: :func:`load_model` rebuilds it from ``backbone_weights=``); the metadata holds
    ``format = "fastcolor-model-1"`` and ``model.config``. ``<path>.json`` is the config alone,
    for people to read (``path`` with its suffix replaced by ``.json``). Both are written
    atomically. Returns ``path``.

    Example:
        >>> import json, tempfile
        >>> from fastcolor.models import ZhangNet
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = save_model(f"{tmp.name}/zhang.safetensors", ZhangNet.tiny())
        >>> path.name, json.loads(path.with_suffix(".json").read_text())["arch"]
        ('zhang.safetensors', 'zhang')
        >>> load_model(path).config == ZhangNet.tiny().config
        True
        >>> tmp.cleanup()
    """
    path = Path(path)
    config = dict(model.config)
    save_tensors(path, model_state(model), {"format": "fastcolor-model-1", "model_config": config})
    atomic_write_json(path.with_suffix(".json"), config)
    return path


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """``model`` in the Hugging Face Hub layout: ``folder/model.safetensors`` and ``folder/config.json``.

    The layout of ``huggingface_hub``'s ``PyTorchModelHubMixin``: the weights as safetensors
    (:func:`~fastcolor.models.model_state`, with fastcolor's metadata too, so the file alone is
    also a fastcolor model file) and ``model.config`` as ``config.json``; a ``README.md`` model
    card is added when the folder has none. Every file is written atomically; the folder is made
    if missing. :func:`load_model` reads the folder back, and a Hub id of it once uploaded (e.g.
    ``huggingface_hub.upload_folder(repo_id="you/zhang-small", folder_path=folder)``). No
    ``huggingface_hub`` is needed to write or read a local folder. Returns ``folder``.

    Example:
        >>> import tempfile, torch
        >>> from fastcolor.models import ZhangNet
        >>> tmp = tempfile.TemporaryDirectory()
        >>> folder = save_pretrained(ZhangNet.tiny(), f"{tmp.name}/zhang-tiny")
        >>> sorted(p.name for p in folder.iterdir())
        ['README.md', 'config.json', 'model.safetensors']
        >>> load_model(folder).config == ZhangNet.tiny().config
        True
        >>> tmp.cleanup()
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(model.config)
    save_tensors(folder / HUB_WEIGHTS, model_state(model), {"format": "fastcolor-model-1", "model_config": config})
    atomic_write_json(folder / HUB_CONFIG, config)
    card = folder / "README.md"
    if not card.exists():
        atomic_write_text(card, _MODEL_CARD.format(arch=config.get("arch"), name=folder.name,
                                                   size=config.get("input_size")))
    return folder


#: The model card :func:`save_pretrained` writes: the Hub's YAML header, then how to load the model.
_MODEL_CARD = """---
library_name: fastcolor
tags:
- image-colorization
---

# {name}

A fastcolor `{arch}` colorization model (input size {size}), saved by `fastcolor.models.serialization.save_pretrained`.

```python
import fastcolor
net = fastcolor.load_model("path/or/hub-id")   # this folder, or its Hub id once uploaded
```
"""


def _hub_folder(path: Path) -> Path:
    """A Hub id that is no local path -> the local folder ``huggingface_hub`` downloads it into.

    ``ValueError`` (one line) without ``huggingface_hub`` or when the download fails (offline, no
    such repository): the message says both that nothing local is there and what the Hub said."""
    local = f"path: no file or folder {str(path)!r} here"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{local}; as a Hugging Face Hub id it needs the huggingface_hub package, which is not "
                         f"installed (pip install 'fastcolor[hub]', or download the folder and pass its path)") \
            from None
    try:
        return Path(snapshot_download(repo_id=str(path), allow_patterns=[HUB_WEIGHTS, HUB_CONFIG]))
    except Exception as exc:  # noqa: BLE001 - offline, no such repository, HTTP errors: all one message
        why = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(f"{local}, and the Hugging Face Hub id {str(path)!r} could not be fetched "
                         f"({type(exc).__name__}: {why}); offline, pass a local folder") from exc


def _hub_config(weights: Path) -> dict | None:
    """The config of a Hub-layout folder, ``config.json`` beside its ``model.safetensors`` ``weights``,
    as a dict; None where ``weights`` has another name or there is no ``config.json``."""
    folder = weights.parent
    if weights.name != HUB_WEIGHTS:
        return None
    try:
        config = json.loads((folder / HUB_CONFIG).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"path: cannot read {folder / HUB_CONFIG}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(config, dict) or config.get("arch") not in ("zhang", "fusion"):
        raise ValueError(f"path: {folder / HUB_CONFIG} is not a fastcolor model config (expected a JSON object "
                         f"with \"arch\": \"zhang\" or \"fusion\", got {json.dumps(config)[:80]})")
    return config


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any) -> torch.nn.Module:
    """Rebuild a model (in eval mode, on ``device``) from a fastcolor model file, a checkpoint, a
    run directory (uses ``model.safetensors`` there), or the authors' released ECCV16 weights
    (``colorization_release_v2-9b330a0b.pth``, recognised by its keys and shapes; see
    :mod:`fastcolor.models.released`; or their Caffe model ``colorization_release_v2.caffemodel``
    and its ``_norebal`` twin, recognised by the ``.caffemodel`` suffix or the content; see
    :mod:`fastcolor.models.caffe`), or a folder in the Hugging Face Hub layout (``model.safetensors``
    and ``config.json``, as :func:`save_pretrained` writes it; another writer's folder loads from its
    ``config.json``), or a Hub id ``owner/name`` that is no local path (downloaded with
    ``huggingface_hub`` where it is installed and the network allows; otherwise a ``ValueError``
    saying which). Also exported as ``fastcolor.load_model``.

    ``overrides`` update the stored config (e.g. ``backbone_weights=`` for a fusion model; it
    is ignored for a Zhang model, which has no backbone; ``input_size=`` or
    ``decode_temperature=`` for the released weights). A ``backbone_weights`` path stored in
    the file is never read (the backbone is then random, with a warning saying so): pass
    ``backbone_weights=`` to load the backbone from a file. No file is ever unpickled: a torch
    file is read with ``torch.load(weights_only=True)``. A file of neither kind raises
    ``ValueError`` naming both; so do weights that cannot give finite colours (NaN/Inf, past
    :data:`fastcolor.io.MAX_WEIGHT_MAGNITUDE`, a negative BatchNorm variance: the message names
    the tensor) and anything but a regular file (a FIFO, a device), refused before it is read.

    Returns a :class:`~fastcolor.models.ZhangNet` (L (N, 1, H, W) in 0..100 -> logits
    (N, 313, H/4, W/4) over the ab bins) or a :class:`~fastcolor.models.FusionNet` (-> ab / 128,
    (N, 2, H, W)); :func:`save_model` shows a runnable round trip.

    Example::

        net = load_model("runs/zhang")                              # trained with fastcolor: T 0.38
        net = load_model("colorization_release_v2-9b330a0b.pth")    # the authors' weights: T 1
        net = load_model("colorization_release_v2.caffemodel")      # their Caffe model: T 1/2.606
        rgb = fastcolor.colorize.colorize_image(net, "photo.jpg")   # decodes at net's temperature
    """
    path = Path(path)
    if not path.exists() and _HUB_ID.match(str(path)):
        path = _hub_folder(path)
    if path.is_dir():
        path = path / HUB_WEIGHTS
    if path.suffix.lower() == ".caffemodel":
        return _load_caffe(path, device, overrides)
    kind = weights_format(path)  # refuses a FIFO, a device, ... before reading it
    if kind in ("zip", "pickle"):
        return _load_released(path, device, overrides)
    if kind == "unknown" and looks_like_caffemodel(path):
        return _load_caffe(path, device, overrides)
    try:
        meta = read_checkpoint_meta(path)
    except ValueError as exc:  # not a (fastcolor) safetensors file: perhaps the released layout in one
        if is_safetensors_file(path) and _hub_config(path) is not None:
            meta = {}  # another writer's Hub layout (plain-string metadata): the config is config.json
        elif path.is_file() and _has_released_layout(path):
            return _load_released(path, device, overrides)
        else:
            raise ValueError(f"{' '.join(str(exc).split())}; expected a fastcolor model or checkpoint, or "
                             f"{EXPECTED}") from exc
    if "model_config" not in meta and _hub_config(path) is not None:  # the Hub layout: config.json holds it
        meta = {"format": "fastcolor-model-1", "model_config": _hub_config(path)}
    config = meta.get("model_config")
    if not isinstance(config, dict) or meta.get("format") not in ("fastcolor-model-1", "fastcolor-checkpoint-1"):
        if _has_released_layout(path):
            return _load_released(path, device, overrides)
        raise ValueError(f"path: expected a fastcolor model or checkpoint file, or {EXPECTED}, got {path}")
    prefix = "model." if meta["format"] == "fastcolor-checkpoint-1" else ""
    shapes = {k[len(prefix):]: shape for k, shape in tensor_shapes(path).items() if k.startswith(prefix)}
    stored = config.get("backbone_weights")
    if config.get("arch") != "fusion":
        overrides.pop("backbone_weights", None)  # a Zhang model has no backbone
    elif "backbone_weights" not in overrides:
        config = {**config, "backbone_weights": None}  # a path from the file: never followed
        if stored is not None:
            warnings.warn(f"{path} was trained with backbone weights from {str(stored)[:200]!r}; a path stored in a "
                          f"weights file is never read, so the backbone is random: pass backbone_weights= "
                          f"(--backbone-weights) to load them", stacklevel=caller_stacklevel())
    config = {**config, **overrides}
    check_stored_config(path, config, shapes)  # before allocating anything the file's config asks for
    model = build_model(config)
    tensors = _read_tensors(path)
    tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    check_weight_values(tensors, path)  # NaN/Inf, absurd or negative-variance weights would colorize black
    load_model_state(model, tensors)
    return model.to(device).eval()


def _load_caffe(path: Path, device, overrides: dict[str, Any]) -> torch.nn.Module:
    """:func:`fastcolor.models.caffe.load_caffe` (the authors' Caffe ECCV16 model; protobuf is imported
    only then); no backbone."""
    return load_caffe(path, device, **{k: v for k, v in overrides.items() if k != "backbone_weights"})


def is_safetensors_file(path: Path) -> bool:
    """Whether ``path`` is a safetensors file, whatever its metadata (another tool's plain strings too)."""
    try:
        tensor_shapes(path)
    except (ValueError, OSError):
        return False
    return True


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file without decoding its metadata (another writer's may be plain
    strings); a damaged file gets :func:`fastcolor.io.load_tensors`' error, naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - any failure: let fastcolor.io say what is wrong with the file
        tensors, _ = load_tensors(path)
        return tensors


def _has_released_layout(path: Path) -> bool:
    try:
        return released_layout_problem(tensor_shapes(path)) is None
    except (ValueError, OSError):
        return False


def _load_released(path: Path, device, overrides: dict[str, Any]) -> torch.nn.Module:
    """:func:`fastcolor.models.released.load_released`, with an error that names both formats."""
    overrides = {k: v for k, v in overrides.items() if k != "backbone_weights"}  # no backbone
    try:
        return load_released(path, device, **overrides)
    except ValueError as exc:
        problem = " ".join(str(exc).split())
        head = f"path: {path} is not "
        if problem.startswith(head):  # the layout differs: say what both formats are
            problem = (f"path: {path} is neither a fastcolor model or checkpoint (safetensors, written by "
                       f"'fastcolor train') nor {problem[len(head):]}")
        raise ValueError(problem) from exc


def _bound_structure(path: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """What even the meta-device skeleton would spend time and memory on: one block per entry
    of ``mid_dilations``, each with tensors in the file, so no more blocks than the file has
    tensors (a 20 MB list of a million dilations would otherwise build a million modules)."""
    dil = config.get("mid_dilations")
    if config.get("arch") == "zhang" and isinstance(dil, (list, tuple)) and len(dil) > max(len(shapes), 1):
        raise ValueError(f"path: {path} has an invalid model_config: mid_dilations lists {len(dil)} blocks, but the "
                         f"file holds only {len(shapes)} tensors (each block has several)")


def _build_bytes(skeleton: torch.nn.Module) -> tuple[int, str]:
    """(bytes that building ``skeleton`` for real allocates, what they are): its parameters and
    buffers, plus a fusion model's backbone probe pass (one image at ``embed_size``, run when
    the backbone is built), traced on the meta device."""
    params = sum(t.numel() * t.element_size() for t in list(skeleton.parameters()) + list(skeleton.buffers()))
    embedder = getattr(skeleton, "embedder", None)
    if embedder is None:
        return params, f"{params / 2**20:.0f} MiB of weights"
    size = int(embedder.input_size)
    largest = 0

    def hook(_m, _i, out):
        nonlocal largest
        if isinstance(out, torch.Tensor):
            largest = max(largest, out.numel() * out.element_size())

    hooks = [m.register_forward_hook(hook) for m in embedder.net.modules() if not list(m.children())]
    try:
        with torch.device("meta"), torch.no_grad():
            x = torch.zeros(1, 3, size, size)
            embedder.net(x)
    finally:
        for h in hooks:
            h.remove()
    probe = x.numel() * x.element_size() + 2 * largest
    return params + probe, (f"{params / 2**20:.0f} MiB of weights and {probe / 2**20:.0f} MiB for the backbone's "
                            f"probe pass at embed_size={size}")


def check_stored_config(path: str | os.PathLike, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse (``ValueError``, or :class:`fastcolor.colorize.MemoryLimitError` for memory) a model
    config read from the file ``path`` before anything it asks for is allocated: its block count
    must be one the file can hold, the model it describes (built on the meta device) must have
    exactly the file's tensor ``shapes``, and building it for real must fit in the available
    CPU memory. A ``backbone_weights`` path in ``config`` is not opened here.

    ``shapes``: tensor name -> shape of the file's model tensors (without a checkpoint's
    ``model.`` prefix), e.g. from :func:`fastcolor.io.tensor_shapes`. Returns None when the
    config is acceptable.

    Example:
        >>> import tempfile
        >>> from fastcolor.io import tensor_shapes
        >>> from fastcolor.models import ZhangNet
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = save_model(f"{tmp.name}/zhang.safetensors", ZhangNet.tiny())
        >>> config = ZhangNet.tiny().config
        >>> check_stored_config(path, config, tensor_shapes(path))                   # fits: None
        >>> check_stored_config(path, {**config, "mid_width": 32}, tensor_shapes(path))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: path: the weights in ... do not fit the zhang architecture its config describes ...
        >>> tmp.cleanup()
    """
    path = Path(path)
    _bound_structure(path, config, shapes)
    skeleton = _check_architecture(path, config, shapes)
    need, what = _build_bytes(skeleton)
    check_memory(need, "cpu", f"building the model that {path} describes ({what})",
                 "its model_config asks for more than this machine has (a damaged or crafted file?)")


def _check_architecture(path: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """The file's tensors must be exactly those of the model its config describes; returns the
    meta-device skeleton.

    The model is first built on the meta device (no memory), so a config that asks for an
    absurdly large network is refused from the shapes alone, as is a file whose tensors come
    from another architecture.
    """
    skeleton_config = {**config, "backbone_weights": None} if config.get("arch") == "fusion" else config
    try:
        with torch.device("meta"):
            skeleton = build_model(skeleton_config)
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError) as exc:
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
    return skeleton
