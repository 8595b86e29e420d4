"""From a trained model to a colour image: run, decode ab, upsample, join with the full-size L.

* :class:`~fastcolor.models.ZhangNet` logits are decoded with the annealed mean
  (:func:`fastcolor.annealed_mean`, temperature ``T``) at a quarter of the input size;
* :class:`~fastcolor.models.FusionNet` predicts ab / 128 directly.

The ab prediction is upsampled (bilinear) to the original resolution and joined with the
original L, so the output keeps every detail of the grayscale input.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastcolor.color import l_ab_to_rgb, rgb_to_l
from fastcolor.data import load_rgb
from fastcolor.data.images import pil_to_rgb
from fastcolor.models import build_model
from fastcolor.ops import annealed_mean

__all__ = ["decode_temperature", "decode_ab", "predict_ab", "colorize_tensor", "colorize_image", "to_l_tensor",
           "MemoryLimitError", "available_memory", "activation_bytes", "check_memory", "memory_guard"]

#: Full-resolution work (L -> RGB, Lab -> RGB) is done in strips of about this many pixels,
#: so only L, the upsampled ab and the output are ever full size.
STRIP_PIXELS = 1 << 20
_GiB = float(1 << 30)


# ----------------------------------------------------------------------------- memory limits


class MemoryLimitError(MemoryError):
    """A job too big for the memory of its device: refused before it starts, or caught when
    the allocator gave up. The message names the size that was asked for and the limit."""


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().split()[0]
        return None if text == "max" else int(text)
    except (OSError, ValueError, IndexError):
        return None


def _cpu_available() -> int | None:
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    # a container's own limit (cgroup v2, then v1) may be tighter than the machine's
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, used = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and used is not None and limit < (1 << 60):
            avail = min(avail, max(limit - used, 0))
            break
    return avail


def available_memory(device: str | torch.device) -> int | None:
    """Bytes that a new job may still allocate on ``device`` (None where unknown).

    CPU: ``MemAvailable`` of /proc/meminfo (``os.sysconf`` elsewhere), capped by the cgroup's
    limit; CUDA: :func:`torch.cuda.mem_get_info`'s free memory plus what PyTorch's caching
    allocator holds unused. Other devices (and CUDA without a GPU): None, and nothing is refused
    there.

    Example:
        >>> n = available_memory("cpu")                     # bytes, e.g. 23921561600
        >>> n is None or n > 0
        True
        >>> available_memory("meta") is None
        True
    """
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_available()
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return None


@lru_cache(maxsize=64)
def _activation_profile(config_json: str, batch: int, size: int) -> tuple[int, int, int]:
    """(largest single output, sum of the trainable part's outputs, logits) in bytes for one
    forward pass of the model ``config_json`` on (batch, 1, size, size), traced on the meta
    device (no memory, no compute)."""
    config = json.loads(config_json)
    if config.get("arch") == "fusion":
        config["backbone_weights"] = None
    largest, total = 0, 0
    with torch.device("meta"):
        skeleton = build_model(config)
        hooks = []
        for name, mod in skeleton.named_modules():
            if list(mod.children()):
                continue
            frozen = name.startswith("embedder.")

            def hook(_m, _i, out, frozen=frozen):
                nonlocal largest, total
                if isinstance(out, torch.Tensor):
                    b = out.numel() * out.element_size()
                    largest = max(largest, b)
                    total += 0 if frozen else b
            hooks.append(mod.register_forward_hook(hook))
        out = skeleton(torch.zeros(batch, 1, size, size))
    return largest, total, out.numel() * 4


def activation_bytes(model: torch.nn.Module, batch: int, size: int, training: bool = False) -> int | None:
    """Estimated memory (bytes) of the activations of ``model`` on ``batch`` inputs of
    ``size`` x ``size``: for inference, the largest output twice (input and output of a layer)
    plus the logits; for training, every output of the trainable layers (autograd keeps them)
    plus the logits and their gradient. None if the model cannot be traced.

    The inputs are L (``batch``, 1, ``size``, ``size``); the estimate is traced on the meta
    device (no memory, no compute) from ``model.config``, so a model without a fastcolor
    ``config`` dict gives None. A fusion model's frozen backbone counts towards the largest
    output but not towards the training sum (no gradient flows into it).

    Example:
        >>> import torch
        >>> from fastcolor.models import ZhangNet
        >>> net = ZhangNet.tiny()                            # 32 x 32 L -> (N, 313, 8, 8) logits
        >>> activation_bytes(net, batch=4, size=32), activation_bytes(net, 4, 32, training=True)
        (961536, 1883136)
        >>> activation_bytes(torch.nn.Linear(2, 2), 1, 32) is None
        True
    """
    model = getattr(model, "module", model)
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        return None
    try:
        largest, total, logits = _activation_profile(json.dumps(config, sort_keys=True), int(batch), int(size))
    except Exception as exc:  # noqa: BLE001 - an op without a meta kernel: no estimate, no pre-check
        if "overflow" in str(exc).lower():  # sizes past int64 bytes: more than any machine has
            return 1 << 62
        return None
    return total + 2 * logits if training else 2 * largest + logits


def _fmt(n: float) -> str:
    return f"{n / _GiB:.2f} GiB" if n >= (1 << 28) else f"{n / (1 << 20):.0f} MiB"


def check_memory(need: int, device: str | torch.device, what: str, advice: str) -> None:
    """Raise :class:`MemoryLimitError` if ``need`` bytes exceed what ``device`` has available.

    ``what`` (the job, e.g. ``"colorizing 1 image(s) of 4000x3000 ..."``) and ``advice`` (what to
    do instead) go into the one-line message, with both sizes in MiB or GiB. Where
    :func:`available_memory` is None (unknown), nothing is refused.

    Example:
        >>> check_memory(1 << 20, "cpu", "a 1 MiB buffer", "free some memory")     # fits: None
        >>> check_memory(1 << 62, "cpu", "a 4 EiB buffer", "use a smaller one")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fastcolor.colorize.MemoryLimitError: a 4 EiB buffer needs about 4294967296.00 GiB of cpu memory, but only ...
    """
    avail = available_memory(device)
    if avail is not None and need > avail:
        raise MemoryLimitError(f"{what} needs about {_fmt(need)} of {torch.device(device).type} memory, but only "
                               f"{_fmt(avail)} is available; {advice}")


_OOM_TEXT = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|not enough memory", re.I)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator failure (CUDA OOM, CPU allocation failure, MemoryError).

    A :class:`MemoryLimitError` (a refusal that already says what to do) is not.

    Example:
        >>> is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        True
        >>> is_out_of_memory(RuntimeError("shape mismatch")), is_out_of_memory(MemoryLimitError("refused"))
        (False, False)
    """
    if isinstance(exc, MemoryLimitError):
        return False
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and bool(_OOM_TEXT.search(str(exc)))


@contextlib.contextmanager
def memory_guard(device: str | torch.device, what: str, advice: str) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into :class:`MemoryLimitError` saying what
    was being done (and free PyTorch's CUDA cache so the process can go on).

    ``what`` completes "ran out of <device> memory ..."; ``advice`` ends the message. Other
    exceptions pass through unchanged; the original error is the new one's ``__cause__``.

    Example:
        >>> with memory_guard("cpu", "while adding", "use smaller tensors"):  # doctest: +ELLIPSIS
        ...     raise MemoryError("cannot allocate memory")
        Traceback (most recent call last):
        ...
        fastcolor.colorize.MemoryLimitError: ran out of cpu memory while adding (...): cannot allocate memory; use ...
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an allocation failure
        if not is_out_of_memory(exc):
            raise
        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        avail = available_memory(device)
        limit = f" ({_fmt(avail)} available now)" if avail is not None else ""
        first = " ".join(str(exc).split())[:200]
        raise MemoryLimitError(f"ran out of {torch.device(device).type} memory {what}{limit}: {first}; "
                               f"{advice}") from exc


def _arch(model: torch.nn.Module) -> str:
    model = getattr(model, "module", model)
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or config.get("arch") not in ("zhang", "fusion"):
        raise TypeError(f"model must be a fastcolor ZhangNet or FusionNet (with a .config), got {type(model).__name__}")
    return config["arch"]


def decode_temperature(model: torch.nn.Module) -> float:
    """The annealed-mean temperature a Zhang model decodes at by default: its config's
    ``decode_temperature`` (1.0 for the authors' released weights, see
    :mod:`fastcolor.models.released`), else 0.38, the paper's (Zhang et al. 2016, sec. 2.3).

    A float > 0 (dimensionless: the logits are divided by it before the softmax). A model
    wrapped in ``DistributedDataParallel`` (``.module``) is looked through.

    Example:
        >>> from fastcolor.models import ZhangNet
        >>> decode_temperature(ZhangNet.tiny()), decode_temperature(ZhangNet(8, 16, (2,), 32, decode_temperature=1.0))
        (0.38, 1.0)
    """
    config = getattr(getattr(model, "module", model), "config", None) or {}
    return float(config.get("decode_temperature", 0.38))


def decode_ab(model: torch.nn.Module, output: torch.Tensor, T: float | None = None) -> torch.Tensor:
    """A model's raw output -> ab in Lab units (float32, at the output's resolution).

    ZhangNet: ``output`` is logits (N, 313, h, w) over the ab bins, decoded by the annealed mean
    (:func:`fastcolor.annealed_mean`) at temperature ``T`` (``T=None``: the model's
    :func:`decode_temperature`). FusionNet: ``output`` is ab / 128 (N, 2, h, w) and is scaled
    back (``T`` is ignored). Returns (N, 2, h, w) float32, a and b in Lab units (roughly -110..110).

    Example:
        >>> import torch
        >>> from fastcolor.models import FusionNet, ZhangNet
        >>> ab = decode_ab(ZhangNet.tiny(), torch.zeros(1, 313, 8, 8))  # uniform: the mean bin centre
        >>> ab.shape, ab.dtype, [round(v, 2) for v in ab[0, :, 0, 0].tolist()]
        (torch.Size([1, 2, 8, 8]), torch.float32, [15.69, 6.68])
        >>> decode_ab(FusionNet.tiny(backbone=None), torch.full((1, 2, 4, 4), 0.5))[0, :, 0, 0]
        tensor([64., 64.])
    """
    if _arch(model) == "zhang":
        return annealed_mean(output, T=decode_temperature(model) if T is None else T)
    return output.float() * 128.0


def predict_ab(model: torch.nn.Module, L: torch.Tensor, T: float | None = None,
               embedding: torch.Tensor | None = None) -> torch.Tensor:
    """ab (N, 2, h, w) in Lab units predicted from L (N, 1, H, W) in 0..100 (no resizing).

    The network's forward then :func:`decode_ab`: (h, w) = (H/4, W/4) for a ZhangNet (annealed
    mean at ``T``; ``T=None``: the model's :func:`decode_temperature`), (H, W) for a FusionNet
    (``embedding`` (N, D) if given, e.g. from an :class:`~fastcolor.models.EmbeddingCache`,
    else computed from L by its backbone). H and W must be multiples of 8. Gradients flow
    (no ``no_grad`` here); the model's train/eval mode is left as it is.

    Example:
        >>> import torch
        >>> from fastcolor.models import FusionNet, ZhangNet
        >>> predict_ab(ZhangNet.tiny(), torch.full((2, 1, 32, 32), 50.0)).shape
        torch.Size([2, 2, 8, 8])
        >>> predict_ab(FusionNet.tiny(backbone=None), torch.full((2, 1, 32, 32), 50.0),
        ...            embedding=torch.zeros(2, 1000)).shape
        torch.Size([2, 2, 32, 32])
    """
    args = (L,) if _arch(model) == "zhang" else (L, embedding)
    return decode_ab(model, model(*args), T)


@torch.no_grad()
def colorize_tensor(model: torch.nn.Module, L_full: torch.Tensor, size: int | None = None, T: float | None = None,
                    embedding: torch.Tensor | None = None) -> torch.Tensor:
    """Colourise L (N, 1, H, W) or (1, H, W) in 0..100 -> sRGB (same layout, 3 channels) in [0, 1].

    The model sees L resized to ``size`` x ``size`` (default: its configured input size);
    the decoded ab is upsampled back to (H, W) and joined with the full-resolution L.
    The model is put in eval mode. ``T``: the annealed-mean temperature (Zhang models; None:
    the model's :func:`decode_temperature`); ``embedding``: a fusion model's (N, D) embedding
    (None: computed from L). Runs without gradients; a job too big for the device's memory is
    refused with :class:`MemoryLimitError` before any work; a NaN/Inf prediction (NaN/Inf in L,
    or broken weights) raises ``ValueError`` rather than returning black pixels.

    Example:
        >>> import torch
        >>> from fastcolor.models import ZhangNet
        >>> rgb = colorize_tensor(ZhangNet.tiny(), torch.full((1, 100, 60), 50.0))  # any H, W
        >>> rgb.shape, rgb.dtype, bool(rgb.min() >= 0 and rgb.max() <= 1)
        (torch.Size([3, 100, 60]), torch.float32, True)
    """
    if not isinstance(L_full, torch.Tensor) or L_full.dim() not in (3, 4) or L_full.shape[-3] != 1:
        got = tuple(L_full.shape) if isinstance(L_full, torch.Tensor) else type(L_full).__name__
        raise ValueError(f"L_full must be a tensor of shape (N, 1, H, W) or (1, H, W), got {got}")
    _arch(model)
    single = L_full.dim() == 3
    L_full = L_full[None] if single else L_full
    size = int(size or getattr(model, "config", {}).get("input_size") or 0)
    if size < 8 or size % 8:
        raise ValueError(f"size must be a positive multiple of 8, got {size}")
    model.eval()
    device = next(model.parameters()).device
    n, _, H, W = L_full.shape
    _precheck(model, n, H, W, size, device, bytes_per_pixel=4 + 8 + 12)  # L, ab, RGB: float32
    with _colorize_guard(n, H, W, size, device):
        L_full = L_full.float().to(device)
        rgb = torch.empty((n, 3, H, W), dtype=torch.float32, device=device)
        for rows, out in _colorized_strips(model, L_full, size, T, embedding):
            rgb[:, :, rows] = out
    return rgb[0] if single else rgb


def _precheck(model, n: int, H: int, W: int, size: int, device, bytes_per_pixel: int) -> None:
    """Refuse (MemoryLimitError) a colourisation whose full-size buffers and network
    activations would not fit in the device's available memory."""
    acts = activation_bytes(model, n, size) or 0
    strip = min(H * W, STRIP_PIXELS) * n * 64  # Lab -> RGB temporaries of one strip
    need = n * H * W * bytes_per_pixel + acts + strip
    check_memory(need, device, f"colorizing {n} image(s) of {W}x{H} = {n * H * W} pixels (network input "
                 f"{size}x{size})", "use fewer images at once, a smaller size, or another device")


def _colorize_guard(n: int, H: int, W: int, size: int, device):
    return memory_guard(device, f"colorizing {n} image(s) of {W}x{H} pixels (network input {size}x{size})",
                        "use fewer images at once, a smaller size, or another device")


def _colorized_strips(model, L_full: torch.Tensor, size: int, T: float, embedding):
    """Run the network on L_full (N, 1, H, W) resized to size x size, upsample its ab to (H, W),
    and yield (row slice, RGB (N, 3, rows, W) in [0, 1]) strip by strip."""
    L_in = F.interpolate(L_full, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    ab = predict_ab(model, L_in, T, embedding)
    finite = torch.isfinite(ab)
    if not bool(finite.all()):  # one check of the small ab: a black image would otherwise come back
        what = "its input L holds NaN/Inf" if not bool(torch.isfinite(L_in).all()) else "its weights are broken"
        raise ValueError(f"model: {int((~finite).sum())} of {ab.numel()} predicted ab values are NaN/Inf ({what}); "
                         f"nothing was colorized")
    ab = F.interpolate(ab.float(), size=L_full.shape[-2:], mode="bilinear", align_corners=False)
    H, W = L_full.shape[-2:]
    step = max(1, STRIP_PIXELS // max(W, 1))
    for r0 in range(0, H, step):
        rows = slice(r0, min(r0 + step, H))
        yield rows, l_ab_to_rgb(L_full[:, :, rows], ab[:, :, rows])


#: How far past [0, 1] a float image's values may go and still be read as [0, 1] (clipped):
#: one 8-bit step. Anything further is refused as data on another scale (0..255, 0..65535).
FLOAT_SLACK = 1.0 / 255.0


def _unit_range(image: np.ndarray) -> np.ndarray:
    """An image array as uint8, or as float32/float64 in [0, 1], by the rule of its dtype (see
    :func:`to_l_tensor`); ``ValueError`` naming what came where the range cannot be told."""
    dtype = image.dtype
    if dtype == np.uint8:
        return image
    if dtype == np.bool_:
        return image.astype(np.uint8) * np.uint8(255)
    if dtype == np.uint16:
        return image.astype(np.float32) / np.float32(65535)
    if np.issubdtype(dtype, np.integer):
        lo, hi = (int(image.min()), int(image.max())) if image.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(f"image: {dtype} values are read as 8-bit values 0..255, got values in {lo}..{hi}; pass "
                             f"uint16 for 16-bit data, or floats in [0, 1]")
        return image.astype(np.uint8)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"image: expected uint8, uint16, another integer or a floating dtype, got {dtype}")
    image = image.astype(np.float64 if dtype == np.float64 else np.float32)
    finite = np.isfinite(image)
    if not finite.all():
        bad = int(image.size - np.count_nonzero(finite))
        raise ValueError(f"image: {bad} of {image.size} values are NaN or Inf; colorize_image needs finite values "
                         f"(replace them first, e.g. with np.nan_to_num)")
    lo, hi = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    if lo < -FLOAT_SLACK or hi > 1 + FLOAT_SLACK:
        raise ValueError(f"image: {dtype} values are read in [0, 1], got values in {lo:g}..{hi:g}; divide 8-bit values "
                         f"by 255 (or pass uint8), 16-bit ones by 65535 (or pass uint16)")
    return np.clip(image, 0.0, 1.0)


def to_l_tensor(image: Any) -> torch.Tensor:
    """L (1, H, W) of a path, PIL image, or numpy array (H, W), (H, W, 3) or (H, W, 4).

    The image is taken as sRGB and converted to CIE Lab lightness, float32 in 0..100 (float64
    stays float64), strip by strip so that only L is full size. A path and a PIL image are read
    alike (:func:`fastcolor.data.images.pil_to_rgb`): upright by their EXIF orientation, 16-bit
    (``I;16``) and float modes scaled to 8 bits, transparency composited over white. An array's
    values follow its dtype: uint8 0..255, uint16 0..65535, bool False/True as black/white, other
    integers 0..255 (others refused), floats [0, 1] (up to :data:`FLOAT_SLACK` beyond is clipped;
    further, and NaN or Inf, refused). A 2-D array is grey; an (H, W, 4) array's alpha is dropped.
    ``ValueError`` names the dtype and the values that came where the range cannot be told, and
    refuses an image without pixels.

    Example:
        >>> import numpy as np
        >>> L = to_l_tensor(np.full((4, 6, 3), 255, dtype=np.uint8))   # white
        >>> L.shape, L.dtype, round(L.max().item(), 2)
        (torch.Size([1, 4, 6]), torch.float32, 100.0)
        >>> round(to_l_tensor(np.full((2, 2), 32768, dtype=np.uint16)).max().item(), 1)   # as uint8 128
        53.4
        >>> to_l_tensor(np.full((2, 2), 200.0))   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: image: float64 values are read in [0, 1], got values in 200..200; divide 8-bit values by 255 ...
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_rgb(image)
    if isinstance(image, Image.Image):
        image = np.array(pil_to_rgb(image))  # a writable copy: torch.from_numpy warns on read-only arrays
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a path, PIL image or numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must have shape (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image: expected at least one pixel, got shape {image.shape}")
    image = _unit_range(image[..., :3])
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    H, W = x.shape[-2:]
    L = torch.empty((1, H, W), dtype=torch.float32 if x.dtype == torch.uint8 else x.dtype)
    step = max(1, STRIP_PIXELS // max(W, 1))
    for r0 in range(0, H, step):  # strip by strip: only L is full size
        L[:, r0:r0 + step] = rgb_to_l(x[:, r0:r0 + step])
    return L


def colorize_image(model: torch.nn.Module, image: Any, size: int | None = None, T: float | None = None) -> np.ndarray:
    """Colourise an image (path, PIL, or array; colour input is reduced to its L) -> (H, W, 3) uint8.

    Any pixel count works: only L, the upsampled ab and the output are full size (about
    15 bytes a pixel besides the input); a photo too big for the available memory is refused
    with :class:`MemoryLimitError` before any work. ``T=None``: the model's
    :func:`decode_temperature` (0.38, or 1.0 for the authors' released weights).

    The network sees L resized to ``size`` x ``size`` (default: its configured input size,
    a multiple of 8); the decoded ab (in Lab units) is upsampled to the image's (H, W) and
    joined with its full-resolution L (0..100), then converted to sRGB, rounded to uint8.

    Input values follow the array's dtype (:func:`to_l_tensor`): uint8 0..255, uint16 0..65535,
    other integers 0..255, floats [0, 1]; a float array with values far outside [0, 1] (e.g.
    0..255 floats), an integer array outside 0..255 (e.g. 16-bit data in int64), NaN or Inf
    values, and an image without pixels raise ``ValueError`` saying what came. A PIL image is
    read as a file is (EXIF orientation, ``I;16``, alpha over white). A model whose output is not
    finite (broken weights) raises ``ValueError`` instead of returning a black image.

    Example:
        >>> import numpy as np
        >>> from fastcolor.models import ZhangNet
        >>> out = colorize_image(ZhangNet.tiny(), np.zeros((50, 70), dtype=np.uint8))  # or a path, a PIL image
        >>> out.shape, out.dtype
        ((50, 70, 3), dtype('uint8'))

    With trained weights::

        net = fastcolor.load_model("runs/zhang")
        PIL.Image.fromarray(colorize_image(net, "photo.jpg")).save("photo_color.png")
    """
    _arch(model)
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        H, W = image.shape[:2]
    elif isinstance(image, Image.Image):
        W, H = image.size
    else:
        H = W = None
    size = int(size or getattr(model, "config", {}).get("input_size") or 0)
    if size < 8 or size % 8:
        raise ValueError(f"size must be a positive multiple of 8, got {size}")
    device = next(model.parameters()).device
    if H is not None:
        _precheck(model, 1, H, W, size, device, bytes_per_pixel=4 + 4 + 8 + 3)  # uint8 -> L, ab, output
    L = to_l_tensor(image)
    H, W = L.shape[-2:]
    _precheck(model, 1, H, W, size, device, bytes_per_pixel=4 + 8 + 3)
    model.eval()
    out = np.empty((H, W, 3), dtype=np.uint8)
    with torch.no_grad(), _colorize_guard(1, H, W, size, device):
        for rows, rgb in _colorized_strips(model, L[None].float().to(device), size, T, None):
            out[rows] = (rgb[0].permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return out
