"""Decoding a batch of image files on the model's device: nvjpeg on CUDA, the same code on CPU.

With ``decode="gpu"`` the loader's workers only read each file's bytes (:func:`read_bytes`,
batched by :func:`collate_bytes`); :func:`decode_batch` decodes the JPEGs of a batch in one
``torchvision.io.decode_jpeg(list, device=...)`` call (nvjpeg on CUDA, libjpeg-turbo on CPU,
EXIF orientation applied) and resizes each to the square the network reads, on that device.
A file that is no JPEG (by its first bytes), or that the batched decoder refuses, is decoded
from the same bytes by PIL (:func:`~fastcolor.data.images.load_square`, as ``decode="cpu"``
would); one that PIL cannot read either is dropped from the batch with one warning naming it.
A batch never holds a grey stand-in, and one unreadable file never stops a run (a batch with
no readable file at all raises :class:`~fastcolor.data.images.UnreadableImageError`, as the
dataset does after ``max_retries`` unreadable files in a row).

Decoders differ: the same JPEG through torchvision's libjpeg-turbo and through PIL's (which also
drafts large JPEGs, :func:`~fastcolor.data.images.draft_jpeg`) lands within a level or two of
255; tests/test_gpu_decode.py measures it.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from fastcolor.data.images import UnreadableImageError, _open_regular, load_square, open_image

__all__ = ["DECODES", "JPEG_SUFFIXES", "read_bytes", "is_jpeg", "nvjpeg_problem", "resolve_decode", "collate_bytes",
           "decode_full", "decode_batch"]

#: Values of ``--decode``: ``auto`` is ``gpu`` on a CUDA device when most files are JPEGs, else ``cpu``.
DECODES = ("auto", "cpu", "gpu")

#: File suffixes ``decode="auto"`` counts as JPEGs.
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")

_JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker and the first byte of the next marker


def read_bytes(path: str | os.PathLike) -> torch.Tensor:
    """The bytes of the file at ``path`` as a 1-D uint8 tensor (what ``decode_jpeg`` takes).
    Only a non-empty regular file is read, and only an image whose header PIL reads and whose
    size is within ``PIL.Image.MAX_IMAGE_PIXELS`` is returned (the header alone is parsed: what
    PIL would refuse to decode is not handed to nvjpeg either); else
    :class:`~fastcolor.data.images.UnreadableImageError` naming the file and the reason."""
    with _open_regular(path) as f:
        blob = f.read()
    with open_image(path, blob):  # the format and the pixel limit, from the header
        pass
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def is_jpeg(data: torch.Tensor | bytes) -> bool:
    """Whether ``data`` starts like a JPEG file (the SOI marker ``FF D8`` and a marker byte)."""
    head = bytes(data[:3].tolist()) if isinstance(data, torch.Tensor) else bytes(data[:3])
    return head == _JPEG_MAGIC


def nvjpeg_problem(device: torch.device | str) -> str | None:
    """Why ``torchvision.io.decode_jpeg`` cannot decode on ``device`` (a CUDA device), or None:
    one tiny JPEG is decoded there to find out (a torchvision built without nvjpeg, a driver
    that refuses it)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buf, "JPEG")
    try:
        out = _decode_jpegs([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], torch.device(device),
                            raise_=True)
    except Exception as e:  # noqa: BLE001 - RuntimeError, AssertionError (no CUDA), ...
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return None if out[0] is not None and out[0].shape == (3, 16, 16) else "it decoded a test JPEG wrongly"


def resolve_decode(decode: str, device: torch.device | str, paths: Sequence[str] = ()) -> str:
    """What ``decode`` means on ``device``: ``"cpu"`` (PIL in the workers) or ``"gpu"`` (bytes in
    the workers, :func:`decode_batch` on the device). ``"auto"`` is ``"gpu"`` on a CUDA device
    when at least half of ``paths`` have a JPEG suffix (the rest would be decoded by PIL in the
    training process) and nvjpeg decodes there (:func:`nvjpeg_problem`; else ``"cpu"`` with a
    warning saying why), else ``"cpu"``; ``"gpu"`` needs a CUDA device where nvjpeg decodes."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    device = torch.device(device)
    if decode == "gpu" and device.type != "cuda":
        raise ValueError(f"decode: 'gpu' decodes JPEGs with nvjpeg on a CUDA device, got device {str(device)!r}; "
                         f"use decode 'cpu' or 'auto'")
    if decode == "cpu":
        return decode
    jpegs = sum(str(p).lower().endswith(JPEG_SUFFIXES) for p in paths)
    if decode == "auto" and not (device.type == "cuda" and paths and 2 * jpegs >= len(paths)):
        return "cpu"
    problem = nvjpeg_problem(device)
    if problem is None:
        return "gpu"
    if decode == "gpu":
        raise ValueError(f"decode: 'gpu' needs torchvision's nvjpeg decoder on {device}, which failed there "
                         f"({problem}); use decode 'cpu'")
    warnings.warn(f"decode 'auto': JPEGs are decoded by PIL in the workers, as torchvision's nvjpeg decoder failed "
                  f"on {device} ({problem})", stacklevel=2)
    return "cpu"


def collate_bytes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The DataLoader's ``collate_fn`` for samples holding file bytes: ``data`` (tensors of
    different lengths) and ``path`` stay lists, everything else is collated as usual."""
    lists = ("data", "path")
    batch = default_collate([{k: v for k, v in s.items() if k not in lists} for s in samples])
    batch.update({k: [s[k] for s in samples] for k in lists})
    return batch


def _decode_jpegs(data: list[torch.Tensor], device: torch.device, raise_: bool = False) -> list[torch.Tensor | None]:
    """``decode_jpeg`` on the list, upright RGB on ``device``; None for each one it refuses. The
    batched call gives no partial result when one image fails, so then each is tried alone
    (``raise_``: the batched call's error is raised instead)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def run(x):
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec's
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(x, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)

    try:
        return list(run(data))
    except RuntimeError:
        if raise_:
            raise
        out: list[torch.Tensor | None] = []
        for x in data:
            try:
                out.append(run(x))
            except RuntimeError:
                out.append(None)
        return out


def decode_full(data: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
    """One JPEG's bytes decoded on ``device`` (nvjpeg on CUDA) at full size: upright uint8 RGB
    (3, H, W), or None when it is no JPEG or the decoder refuses it (then PIL reads the file)."""
    if not is_jpeg(data):
        return None
    return _decode_jpegs([data], torch.device(device))[0]


def decode_batch(data: Sequence[torch.Tensor], paths: Sequence[str], size: int, device: torch.device | str,
                 reported: set[str] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Decode a batch of files' bytes to uint8 RGB squares on ``device``.

    Args:
        data: each file's bytes, 1-D uint8 CPU tensors (:func:`read_bytes`).
        paths: the files' names, for the fallback's messages and the one warning per dropped file.
        size: each image is resized (antialiased) to ``size`` x ``size``, as
            :func:`~fastcolor.data.images.load_square` does.
        device: where the JPEGs are decoded (nvjpeg on CUDA) and the result lives.
        reported: names already warned about (a file is warned about once); updated.

    Returns:
        (images, kept): uint8 (K, 3, size, size) on ``device`` and the K positions in ``data``
        that were decoded (a file neither decoder reads is dropped and warned about).
    """
    if len(data) != len(paths):
        raise ValueError(f"data and paths must have the same length, got {len(data)} and {len(paths)}")
    from torchvision.transforms.v2.functional import resize  # here: torchvision imports torch._dynamo (~1 s)

    device = torch.device(device)
    reported = set() if reported is None else reported
    jpeg = [i for i, x in enumerate(data) if is_jpeg(x)]
    decoded: dict[int, torch.Tensor | None] = dict(zip(jpeg, _decode_jpegs([data[i] for i in jpeg], device),
                                                      strict=True)) if jpeg else {}
    images: list[torch.Tensor] = []
    kept: list[int] = []
    last = ""
    for i, x in enumerate(data):
        img = decoded.get(i)
        if img is not None:
            img = resize(img, [size, size], antialias=True)
        else:  # not a JPEG, or one the batched decoder refused (CMYK, corrupt, ...): PIL, from the same bytes
            try:
                img = load_square(paths[i], size, data=x.numpy().tobytes()).to(device, non_blocking=True)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                last = f"{type(e).__name__}: {e}"
                if paths[i] not in reported:
                    reported.add(paths[i])
                    warnings.warn(f"skipping unreadable image {paths[i]!r} ({last})", stacklevel=2)
                continue
        images.append(img)
        kept.append(i)
    if not images:
        raise UnreadableImageError(f"none of the {len(data)} image(s) of a batch could be read (the last: "
                                   f"{' '.join(last.split())[:300]}); expected readable image files")
    return torch.stack(images), kept
