"""The authors' released ECCV16 PyTorch weights, loaded into :class:`~fastcolor.models.ZhangNet`.

Zhang, Isola & Efros published their ECCV16 network for PyTorch as
``colorization_release_v2-9b330a0b.pth`` (richzhang/colorization, ``colorizers/eccv16.py``):
a plain state dict with the keys ``model1.*`` .. ``model8.*`` and ``model_out.weight``. This
module recognises that layout from its keys and shapes (:func:`released_layout_problem`) and
loads it (:func:`load_released`) without unpickling code (``torch.load(weights_only=True)``,
through :func:`fastcolor.io.load_state_file`). Nothing is downloaded: the file must be local.

The layout (each block an ``nn.Sequential``; ReLU after every conv, so convs sit at the even
indices and each block of 1..7 ends with a BatchNorm):

========= ====================================================== ===========
block     layers                                                 indices
========= ====================================================== ===========
model1    conv 1->64, conv 64->64 stride 2, BN 64                0, 2, 4
model2    conv 64->128, conv 128->128 stride 2, BN 128           0, 2, 4
model3    conv 128->256, 256->256, 256->256 stride 2, BN 256     0, 2, 4, 6
model4    conv 256->512, 512->512, 512->512, BN 512              0, 2, 4, 6
model5/6  three conv 512->512, dilation 2, padding 2, BN 512     0, 2, 4, 6
model7    three conv 512->512, BN 512                            0, 2, 4, 6
model8    ConvTranspose 512->256 (k 4, s 2, p 1), conv 256->256, 0, 2, 4, 6
          conv 256->256, conv 1x1 256->313
model_out conv 1x1 313->2 without bias: the bin centres / 110    (weight)
========= ====================================================== ===========

Their forward: ``(L - 50) / 100`` in; softmax over model8's 313 channels with no extra scale;
``model_out``; bilinear x4 upsampling; times 110. ``ZhangNet()`` is the same network up to
model8 (see :mod:`fastcolor.models.zhang`), so ``model{i}.*`` loads into ``encoder[i-1]``,
``model8.0/2/4`` into ``decoder``, ``model8.6`` into ``classifier``. ``model_out`` is not a
layer here: it must hold the 313 bin centres / 110, and then softmax -> model_out -> x110 is
exactly the annealed mean over :data:`fastcolor.AB_BINS` at T = 1 (the expectation of the bin
centres). A loaded model therefore decodes at **T = 1 by default** (``decode_temperature`` in
its config): the authors' PyTorch code applies the plain softmax and does not anneal. (Their
Caffe deploy net multiplied the logits by 2.606, about 1/0.38, before the softmax, the paper's
T = 0.38; the PyTorch file cannot say whether that factor was folded into ``model8.6`` when it
was converted, so T = 1 is what reproduces their PyTorch output; ``T=`` / ``--temperature``
still override it.)

The bins: the columns of ``model_out.weight`` x 110 are matched to the nearest of
:data:`fastcolor.AB_BINS`. If every column is a distinct bin to within 1e-4 (in the file's
units, centre / 110), the classes are reordered into fastcolor's bin order where they differ
(fastcolor's order, lexicographic in (a, b), is the order of the authors' ``pts_in_hull.npy``
as far as published transcriptions of it show; the reordering only matters for a file that
differs). Otherwise a warning says so and the classes are taken in fastcolor's order as they
are: colours then differ from the file's own decoding.

What differs from the authors' pipeline around the network: their demo resizes the photo's
L to 256 x 256, upsamples the network's ab x4 to 256 x 256 and then to the photo's size;
:mod:`fastcolor.colorize` upsamples the 64 x 64 ab to the photo's size in one bilinear step
(identical when the photo is the network's size).
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from fastcolor.gamut import AB_BINS
from fastcolor.io import check_weight_values, load_state_file, load_tensors, tensor_shapes, weights_format
from fastcolor.models.zhang import ZhangNet

__all__ = ["RELEASED_ECCV16", "AB_SCALE", "BIN_TOLERANCE", "EXPECTED", "OVERRIDABLE", "released_config",
           "released_shapes", "released_layout_problem", "looks_like_torch_file", "convert_released_state",
           "read_released_state", "released_file_problem", "load_released", "reorder_classes"]

#: Modules of the loading path (``fastcolor.load_model`` -> serialization -> here); their warnings
#: point at the first frame outside them, the caller's line, however the loader was reached.
_LOADERS = frozenset({"fastcolor", "fastcolor.models.serialization", "fastcolor.models.released",
                      "fastcolor.models.caffe"})


def caller_stacklevel() -> int:
    """``warnings.warn`` stacklevel of the first frame outside the loading modules."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") in _LOADERS:
        frame, level = frame.f_back, level + 1
    return level


#: File name of the authors' released ECCV16 PyTorch weights.
RELEASED_ECCV16 = "colorization_release_v2-9b330a0b.pth"
#: The authors' ab normalisation: ``model_out`` holds the bin centres divided by this (eccv16.py).
AB_SCALE = 110.0
#: How far (in the file's units, centre / 110) a ``model_out`` column may be from a bin centre / 110.
BIN_TOLERANCE = 1e-4
#: What a file in that layout holds, for error messages.
EXPECTED = (f"the authors' released ECCV16 weights ({RELEASED_ECCV16}: a PyTorch state dict with "
            f"model1.* .. model8.* and model_out.weight)")

_ZHANG_KEY = re.compile(r"^(?:encoder\.(\d+)|decoder|classifier)\.(.*)$")


def released_config() -> dict:
    """The :class:`ZhangNet` config a released ECCV16 file loads into: the paper's network at
    256 x 256 (the size the authors' demo feeds it), decoded at T = 1."""
    return {"arch": "zhang", "base": 64, "mid_width": 512, "mid_dilations": [1, 2, 2, 1], "input_size": 256,
            "num_bins": len(AB_BINS), "decode_temperature": 1.0}


def _released_name(zhang_key: str) -> str:
    """``encoder.3.4.weight`` -> ``model4.4.weight``; ``decoder.2.bias`` -> ``model8.2.bias``;
    ``classifier.weight`` -> ``model8.6.weight``."""
    m = _ZHANG_KEY.match(zhang_key)
    if m is None:
        raise AssertionError(f"unexpected ZhangNet key {zhang_key}")
    if zhang_key.startswith("encoder."):
        return f"model{int(m.group(1)) + 1}.{m.group(2)}"
    if zhang_key.startswith("decoder."):
        return f"model8.{m.group(2)}"
    return f"model8.6.{m.group(2)}"


def _zhang_shapes() -> dict[str, tuple[int, ...]]:
    config = released_config()
    config.pop("arch")
    with torch.device("meta"):
        net = ZhangNet(**config)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def released_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of the released layout (``num_batches_tracked`` included:
    it may be absent from a file)."""
    shapes = {_released_name(k): s for k, s in _zhang_shapes().items()}
    shapes["model_out.weight"] = (2, len(AB_BINS), 1, 1)
    return shapes


def _optional(key: str) -> bool:
    return key.endswith(".num_batches_tracked")


def released_layout_problem(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """None if ``shapes`` (key -> shape) is the released ECCV16 layout, else what differs (one line)."""
    want = released_shapes()
    missing = sorted(k for k in set(want) - set(shapes) if not _optional(k))
    unexpected = sorted(set(shapes) - set(want))
    wrong = [f"{k}: file {tuple(shapes[k])}, expected {want[k]}" for k in sorted(set(want) & set(shapes))
             if tuple(shapes[k]) != want[k]]
    if not (missing or unexpected or wrong):
        return None
    parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
             f"shape mismatch {wrong[:2]}" if wrong else ""]
    return "keys " + "; ".join(p for p in parts if p)


def looks_like_torch_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``torch.save`` file (a zip archive, or a legacy pickle stream), judged
    by :func:`fastcolor.io.weights_format`: a safetensors file whose header parses is not one, whatever
    its first byte. False where no regular file is there."""
    try:
        return weights_format(path) in ("zip", "pickle")
    except (OSError, ValueError):
        return False


def _bin_permutation(model_out: torch.Tensor) -> tuple[np.ndarray | None, str]:
    """(perm, why not): ``perm[j]`` is the fastcolor bin that column ``j`` of ``model_out``
    (2, 313, 1, 1) holds, or None (and the reason) if the columns are not the 313 bins / 110,
    each bin once, to within :data:`BIN_TOLERANCE` in the file's units."""
    cols = model_out.detach().double().reshape(2, -1).T.numpy()  # (313, 2): column j's (a, b) / 110
    bins = AB_BINS / AB_SCALE
    dist = np.abs(cols[:, None, :] - bins[None, :, :]).max(-1)  # (313, 313) Chebyshev distances
    nearest = dist.argmin(1)
    worst = float(dist[np.arange(len(cols)), nearest].max())
    if not np.isfinite(worst) or worst > BIN_TOLERANCE:
        return None, f"a column is {worst:.3g} from the nearest bin / {AB_SCALE:g}, tolerance {BIN_TOLERANCE:g}"
    distinct = len(set(nearest.tolist()))
    if distinct != len(bins):
        return None, f"its columns hold only {distinct} distinct bins"
    return nearest, ""


def convert_released_state(state: dict[str, torch.Tensor], source: str = "the file") -> dict[str, torch.Tensor]:
    """The state dict of a released ECCV16 file -> a :class:`ZhangNet` state dict (float32),
    with the classes in :data:`fastcolor.AB_BINS` order. ``state`` must have the released
    layout (:func:`released_layout_problem`). Warns if ``model_out`` does not hold the bins."""
    problem = released_layout_problem({k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise ValueError(f"path: {source} is not {EXPECTED}: {problem}")
    out: dict[str, torch.Tensor] = {}
    for key in _zhang_shapes():
        name = _released_name(key)
        if name in state:
            t = state[name]
            out[key] = t.to(torch.long) if _optional(key) else t.to(torch.float32)
        else:  # num_batches_tracked, absent from older files: unused in eval mode
            out[key] = torch.zeros((), dtype=torch.long)
    reorder_classes(out, state["model_out.weight"], source, "model_out")
    return out


def reorder_classes(out: dict[str, torch.Tensor], model_out: torch.Tensor, source: str, layer: str) -> None:
    """Put the classifier of the ZhangNet state dict ``out`` into :data:`fastcolor.AB_BINS` order, in
    place, given the file's decoding layer ``model_out`` ((2, 313, 1, 1): the bin centres / 110 in
    the file's class order). Warns (naming ``layer``) and leaves the order if it does not hold them."""
    perm, why = _bin_permutation(model_out)
    if perm is None:
        warnings.warn(f"{source}: {layer} does not hold the 313 ab bin centres / {AB_SCALE:g} ({why}): decoding "
                      f"uses fastcolor's bins in their order, so the colours differ from the file's own {layer}",
                      stacklevel=caller_stacklevel())
    elif not np.array_equal(perm, np.arange(len(perm))):
        # class j of the file is fastcolor's bin perm[j]: move its row of the classifier there
        index = torch.as_tensor(np.argsort(perm))
        out["classifier.weight"] = out["classifier.weight"][index]
        out["classifier.bias"] = out["classifier.bias"][index]


def read_released_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``path``: a ``torch.save`` state dict read with ``weights_only=True``
    (:func:`fastcolor.io.load_state_file`), or a safetensors file (the same keys converted).
    ``ValueError`` (one line, naming the file) if it cannot be read or asks to run code."""
    path = Path(path)
    if looks_like_torch_file(path):
        return load_state_file(path)
    tensors, _meta = load_tensors(path)
    return tensors


def released_file_problem(path: str | os.PathLike) -> str | None:
    """None if ``path`` holds the released ECCV16 layout, else why not (one line, naming the file
    and what was expected). A safetensors file is judged from its header, a torch file by reading it."""
    path = Path(path)
    try:
        if looks_like_torch_file(path):
            shapes = {k: tuple(v.shape) for k, v in load_state_file(path).items()}
        else:
            shapes = tensor_shapes(path)
    except (ValueError, OSError) as exc:
        return " ".join(str(exc).split())
    problem = released_layout_problem(shapes)
    return None if problem is None else f"path: {path} is not {EXPECTED}: {problem}"


#: Config entries that a caller may change on a released model (they change no tensor).
OVERRIDABLE = ("input_size", "decode_temperature")


def load_released(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides) -> ZhangNet:
    """The released ECCV16 weights file ``path`` -> :class:`ZhangNet` in eval mode on ``device``.

    The file is read with ``torch.load(weights_only=True)`` (a file that asks to run code is
    refused and nothing of it is executed); a safetensors file with the same keys also loads.
    A file in another layout raises ``ValueError`` naming what was expected, as do broken weights
    (:func:`fastcolor.io.check_weight_values`: NaN/Inf, absurd magnitudes, negative variances). The model's config
    is :func:`released_config` (input 256, decoded at T = 1), updated with ``overrides`` of
    :data:`OVERRIDABLE` entries.

    Example::

        net = load_released("colorization_release_v2-9b330a0b.pth")
        rgb = fastcolor.colorize.colorize_image(net, "photo.jpg")   # (H, W, 3) uint8, at T = 1
    """
    path = Path(path)
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise ValueError(f"overrides: only {list(OVERRIDABLE)} can change on the released ECCV16 network, got {bad}")
    state = read_released_state(path)
    check_weight_values(state, path)  # NaN/Inf, absurd or negative-variance weights would colorize black
    converted = convert_released_state(state, str(path))
    config = {**released_config(), **overrides}
    config.pop("arch")
    with torch.device("meta"):
        model = ZhangNet(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.to(device).eval()
