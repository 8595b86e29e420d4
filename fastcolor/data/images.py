"""Reading one image file: any format PIL opens, as upright 8-bit sRGB.

Grayscale, palette, RGBA/LA over white, CMYK, 16-bit and EXIF orientation are handled; a file
that cannot be used raises :class:`UnreadableImageError` naming it and the reason. Only regular
files are read (a FIFO or a device with an image's name is refused before any read).
"""
from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from fastcolor.color import rgb_to_lab
from fastcolor.io import file_kind, open_regular

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImageError", "check_pixel_limit", "file_kind", "open_image", "draft_jpeg",
           "load_rgb", "pil_to_rgb", "load_square", "load_l"]

IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())

def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth single-channel arrays (PIL modes I;16*, I, F) -> uint8."""
    arr = arr.astype(np.float64)
    if mode == "F":
        scale = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
    elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
        scale = 65535.0
    else:
        scale = 255.0
    return (np.clip(np.nan_to_num(arr) / scale, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

class UnreadableImageError(OSError):
    """An image file that cannot be used: not an image, empty, truncated, corrupt, or over
    PIL's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``, the decompression-bomb guard)."""


def check_pixel_limit(im: Image.Image, path: str | os.PathLike) -> None:
    """Refuse an image whose header announces more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``
    (PIL itself only warns between 1x and 2x that limit, and would decode it)."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = im.size
    if limit and w * h > limit:
        raise UnreadableImageError(
            f"{path}: {w}x{h} = {w * h} pixels is over the limit of {int(limit)} pixels "
            f"(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); raise that limit to read it")


def _open_regular(path: str | os.PathLike, what: str = "as images"):
    """:func:`fastcolor.io.open_regular` refusing with :class:`UnreadableImageError`."""
    return open_regular(path, what, UnreadableImageError)


@contextlib.contextmanager
def open_image(path: str | os.PathLike, data: bytes | None = None):
    """``PIL.Image.open`` that checks the pixel limit and turns every failure into
    :class:`UnreadableImageError` naming the file and the reason. Only regular files are read:
    a FIFO, a device or a directory with an image's name is refused without reading from it.
    With ``data`` (the file's bytes, already read) nothing is opened: ``path`` only names it."""
    if data is not None and not data:
        raise UnreadableImageError(f"{path}: empty file (0 bytes)")
    f = io.BytesIO(data) if data is not None else _open_regular(path)
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_pixel_limit refuses those
                im = Image.open(f)
        except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, DecompressionBombError, SyntaxError, ...
            why = str(e).replace(repr(f), repr(str(path)))  # PIL names the file object
            raise UnreadableImageError(f"{path}: not a readable image ({type(e).__name__}: {why})") from e
        with im:
            check_pixel_limit(im, path)
            try:
                yield im
            except UnreadableImageError:
                raise
            except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, TypeError) as e:
                raise UnreadableImageError(f"{path}: truncated or corrupt image ({type(e).__name__}: {e})") from e
    finally:
        f.close()


#: EXIF orientations (tag 0x0112) that turn the stored image by 90 degrees (width and height swap).
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def draft_jpeg(im: Image.Image, min_size: int | tuple[int, int]) -> int:
    """Ask libjpeg to decode ``im`` (opened, not loaded) at 1/2, 1/4 or 1/8 scale, the largest
    reduction that keeps the *upright* image at least ``min_size`` (an int: a square) in both
    directions: ``Image.draft`` scales in the DCT domain, so a 12-megapixel JPEG bound for a
    256-pixel square decodes an eighth of its pixels. The EXIF orientation is taken into account
    (a 90-degree turn swaps the requested width and height). Other formats are left alone.
    Returns the reduction factor (1 when nothing was drafted)."""
    if im.format != "JPEG":
        return 1
    w, h = (min_size, min_size) if isinstance(min_size, int) else min_size
    if w < 1 or h < 1:
        raise ValueError(f"min_size must be positive, got {min_size!r}")
    if im.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
        w, h = h, w
    before = im.size[0]
    drafted = im.draft(im.mode, (w, h))  # (mode, box of the reduced image in the original's units)
    return 1 if drafted is None else round(before / drafted[1][2])  # None: several tiles, or drafted already


def load_rgb(path: str | os.PathLike, min_size: int | tuple[int, int] | None = None,
             data: bytes | None = None) -> Image.Image:
    """Open any image as an upright 8-bit RGB PIL image. Raises :class:`UnreadableImageError`
    (an ``OSError``) naming the file if it is not an image, empty, truncated or corrupt, or has
    more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``. With ``min_size`` (width, height or an int
    for a square), a JPEG at least twice that size decodes at a reduced scale that keeps it at
    least that large (:func:`draft_jpeg`). With ``data`` the image is decoded from these bytes
    of the file ``path`` (which only names it in messages)."""
    with open_image(path, data) as im:
        if min_size is not None:
            draft_jpeg(im, min_size)
        im.load()
        return pil_to_rgb(im)


def pil_to_rgb(im: Image.Image) -> Image.Image:
    """A PIL image (any mode) as :func:`load_rgb` reads a file: upright by its EXIF orientation,
    16-bit and float modes scaled to 8 bits, transparency composited over white; a new image."""
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(im), mode)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, ...


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W) uint8, one copy


def load_square(path: str | os.PathLike, size: int, data: bytes | None = None) -> torch.Tensor:
    """The image at ``path`` as uint8 RGB (3, size, size), resized (antialiased) to a square:
    what :class:`ColorizationDataset` augments and converts to Lab. A JPEG of at least four
    times ``size`` each way decodes at a reduced scale that keeps it at least twice ``size``
    (:func:`draft_jpeg`), so the antialiased resize still reduces by 2 or more and decides the
    result: on a 12-megapixel photo the drafted square is within 0.2-0.35 levels (mean; 99% within
    2) of a full decode's, at a quarter to an eighth of the decode time (tests/test_loader.py;
    drafting to ``size`` itself differed by up to 3 levels on average on sharp 500x375 photos).
    ``data``: the file's bytes, already read (see :func:`load_rgb`)."""
    from torchvision.transforms.v2.functional import resize  # here: torchvision imports torch._dynamo (~1 s)

    return resize(_pil_to_tensor(load_rgb(path, 2 * size, data)), [size, size], antialias=True)


def load_l(path: str | os.PathLike, size: int) -> torch.Tensor:
    """L (1, size, size) in 0..100 of the image at ``path`` resized to a square: exactly the
    ``L`` a :class:`ColorizationDataset` of that ``size`` yields without augmentation, so the
    embedding cache of a fusion model is computed from what the network sees."""
    return rgb_to_lab(load_square(path, size))[:1]
