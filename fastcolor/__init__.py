"""fastcolor: fast probabilistic image colorization (Zhang, Isola & Efros, ECCV 2016).

Grayscale L in, a distribution over the 313 quantised ab bins out, an annealed mean back to
colour. The hot paths (soft-encoding, the fused class-rebalanced cross-entropy, annealed-mean
decoding) run on custom kernels chosen per device; `fastcolor.reference` is their spec.
BSD 3-Clause licence; the command line is ``fastcolor --help``.

## Quickstart

The loss and the decoder in your own training loop (L in 0..100, ab in Lab units, at the
logits' resolution):

>>> import torch, fastcolor
>>> from fastcolor.models import ZhangNet
>>> model = ZhangNet.tiny()                        # L (N, 1, 32, 32) -> logits (N, 313, 8, 8)
>>> L, ab = torch.rand(2, 1, 32, 32) * 100, torch.rand(2, 2, 8, 8) * 160 - 80
>>> criterion = fastcolor.RebalancedCrossEntropyLoss()   # weights= the rarity weights, if any
>>> loss = criterion(model(L), ab)                 # soft-encodes ab on the fly (k = 5, sigma = 5)
>>> loss.backward()
>>> with torch.no_grad():
...     ab_pred = fastcolor.AnnealedMeanDecoder(T=0.38)(model(L))
>>> ab_pred.shape
torch.Size([2, 2, 8, 8])

The class-rebalancing weights come from the training set's prior
(`fastcolor.PriorAccumulator`, then `fastcolor.rarity_weights`). A trained model colorizes a
photo with `fastcolor.colorize.colorize_image`; `fastcolor.load_model` reads fastcolor's files,
a run directory, the authors' released PyTorch weights and their Caffe model.

## Module map

| module | what it holds |
|---|---|
| `fastcolor` | the ops (`soft_encode`, `rebalanced_cross_entropy`, `annealed_mean`, their modules), `load_model` |
| `fastcolor.ops` | the ops, one module each (below): autograd and backend dispatch |
| `fastcolor.reference` | the float64 numpy specification every backend is tested against |
| `fastcolor.gamut` | the 313 ab bins and the nearest-bin search table |
| `fastcolor.color` | sRGB <-> CIE Lab on torch tensors |
| `fastcolor.models` | `fastcolor.models.zhang`, `fastcolor.models.fusion`; loading and saving weights |
| `fastcolor.colorize` | a trained model to a colour image, at the photo's own resolution |
| `fastcolor.data` | image folders, splits, tar shards, the dataset and the device half of the data path |
| `fastcolor.train` | the training loop; `fastcolor.training` its parts; `fastcolor.recipes` named settings |
| `fastcolor.metrics` | accuracy, AuC, PSNR, SSIM, ..., and `evaluate` (the tables of `fastcolor eval`) |
| `fastcolor.export` | a model and its decoding as one ONNX graph |
| `fastcolor.io` | atomic writes, pickle-free checkpoints |
| `fastcolor.monitor` | TensorBoard logging |
| `fastcolor.backends` | the backend registry: `resolve`, `available`, `BackendUnavailable` |

The ops' modules: `fastcolor.ops.encode` (soft-encoding, `SoftLabels`), `fastcolor.ops.loss`
(the fused loss), `fastcolor.ops.decode` (annealed mean), `fastcolor.ops.prior` (class prior,
rarity weights).

## Backends

Every op takes ``backend="auto"`` (the default) or a name; ``FASTCOLOR_BACKEND=name`` overrides
``auto`` everywhere, and a backend that cannot run raises `BackendUnavailable` saying why.

| backend | device | what |
|---|---|---|
| ``numba`` | CPU | JIT-compiled kernels; ``auto``'s first choice on the CPU |
| ``cpp`` | CPU | C++/OpenMP kernels in the native extension ``fastcolor._C`` |
| ``triton`` | CUDA | Triton kernels; ``auto``'s first choice on a GPU |
| ``cuda`` | CUDA | CUDA kernels in ``fastcolor._C`` (built where ``nvcc`` was found) |
| ``torch`` | CPU, CUDA | plain PyTorch: the baseline, and the fallback |

``import fastcolor`` imports neither torch nor the kernels: each name is imported on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastcolor._ext import warn_if_missing as _warn_if_missing
from fastcolor._version import __version__
from fastcolor.backends import _fork  # noqa: F401  (marks forked children: their CPU kernels run on one thread)

# The public names, each imported from its module on first use (PEP 562): `import fastcolor` imports
# neither torch nor the kernels, so `fastcolor --help` answers at once, and `fastcolor.soft_encode`
# imports what it needs then. tests/test_import.py checks what each step imports.
_LAZY: dict[str, str] = {
    "build_info": "fastcolor._ext", "BackendUnavailable": "fastcolor.backends", "AB_BINS": "fastcolor.gamut",
    "Q": "fastcolor.gamut", "warmup": "fastcolor.backends._tables",
    **{name: "fastcolor.ops" for name in (
        "AnnealedMeanDecoder", "PriorAccumulator", "RebalancedCrossEntropyLoss", "SoftLabels", "annealed_mean",
        "image_mask_nongray", "nearest_bin", "rarity_weights", "rebalanced_cross_entropy", "soft_encode")},
}

#: The public submodules, also reachable as attributes after a bare ``import fastcolor``.
_SUBMODULES = ("backends", "color", "colorize", "data", "export", "gamut", "io", "metrics", "models", "monitor",
               "ops", "recipes", "reference", "train", "training")

__all__ = [
    "__version__", "build_info", "BackendUnavailable", "AB_BINS", "Q",
    "AnnealedMeanDecoder", "PriorAccumulator", "RebalancedCrossEntropyLoss", "SoftLabels",
    "annealed_mean", "image_mask_nongray", "nearest_bin", "rarity_weights",
    "rebalanced_cross_entropy", "soft_encode", "load_model", "warmup",
]

if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from fastcolor._ext import build_info
    from fastcolor.backends import BackendUnavailable
    from fastcolor.backends._tables import warmup
    from fastcolor.gamut import AB_BINS, Q
    from fastcolor.ops import (
        AnnealedMeanDecoder,
        PriorAccumulator,
        RebalancedCrossEntropyLoss,
        SoftLabels,
        annealed_mean,
        image_mask_nongray,
        nearest_bin,
        rarity_weights,
        rebalanced_cross_entropy,
        soft_encode,
    )


_warn_if_missing()  # once per process: a failed native build should not go unnoticed


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"fastcolor.{name}")
    else:
        raise AttributeError(f"module 'fastcolor' has no attribute {name!r}")
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})


def load_model(path, device="cpu", **overrides):
    """A colorization network rebuilt from a weights file, in eval mode on ``device``.

    ``path`` may be any of:

    * a fastcolor model file (safetensors, written by ``fastcolor train`` or
      :func:`fastcolor.models.serialization.save_model`; the config is in its metadata);
    * a fastcolor training checkpoint (safetensors, ``fastcolor-checkpoint-1``);
    * a run directory (its ``model.safetensors`` is loaded);
    * the authors' released ECCV16 PyTorch weights, ``colorization_release_v2-9b330a0b.pth``
      (richzhang/colorization), recognised by its keys and shapes and loaded into a
      :class:`~fastcolor.models.ZhangNet` that decodes at T = 1 by default (see
      :mod:`fastcolor.models.released` for why);
    * the authors' Caffe model, ``colorization_release_v2.caffemodel`` (or ``_norebal``), decoded
      at T = 1 / 2.606 as their Caffe pipeline (:mod:`fastcolor.models.caffe`; needs protobuf);
    * a folder in the Hugging Face Hub layout (``model.safetensors`` + ``config.json``, as
      :func:`fastcolor.models.serialization.save_pretrained` writes it), or a Hub id
      ``owner/name`` that is no local path (needs the optional ``huggingface_hub`` and the network).

    No file is ever unpickled (a torch file is read with ``torch.load(weights_only=True)``) and
    the config stored in a file is checked before anything it asks for is allocated; a file of
    neither kind raises ``ValueError`` naming both. ``overrides`` update the stored config
    (e.g. ``backbone_weights=`` for a fusion model, ``input_size=`` or ``decode_temperature=``
    for the released weights).

    This is :func:`fastcolor.models.serialization.load_model`, imported on the first call so
    that ``import fastcolor`` does not import the models and :mod:`fastcolor.colorize`.

    Args:
        path: a file or run directory (``str`` or ``os.PathLike``), as listed above.
        device: where the model is put (``"cpu"``, ``"cuda"``, a ``torch.device``).
        **overrides: config entries that replace the stored ones.

    Returns:
        ``torch.nn.Module``: a :class:`~fastcolor.models.ZhangNet` (L (N, 1, H, W) in 0..100 ->
        logits (N, 313, H/4, W/4) over the ab bins) or a :class:`~fastcolor.models.FusionNet`
        (L (N, 1, H, W) -> ab / 128 in [-1, 1], (N, 2, H, W)), with its ``config`` dict; decode
        either with :func:`fastcolor.colorize.colorize_image` / ``colorize_tensor``.

    Example:
        >>> import tempfile, torch, fastcolor
        >>> from fastcolor.models import ZhangNet
        >>> from fastcolor.models.serialization import save_model
        >>> with tempfile.TemporaryDirectory() as run:
        ...     _ = save_model(f"{run}/model.safetensors", ZhangNet.tiny())
        ...     net = fastcolor.load_model(run)              # a run directory: its model.safetensors
        >>> net.config["arch"], net.training
        ('zhang', False)
        >>> net(torch.full((1, 1, 32, 32), 50.0)).shape     # L in 0..100 -> logits over 313 bins
        torch.Size([1, 313, 8, 8])

        With the authors' released weights (a local file; nothing is downloaded)::

            net = fastcolor.load_model("colorization_release_v2-9b330a0b.pth")   # decodes at T = 1
    """
    from fastcolor.models.serialization import load_model as _load_model

    return _load_model(path, device, **overrides)
