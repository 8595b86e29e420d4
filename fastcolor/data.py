"""Image folders for colorization training.

A data directory is either flat (images directly inside: one class, named after the
directory) or has one subfolder per class. Any image PIL can open is accepted and turned
into 8-bit sRGB (grayscale, palette, RGBA/LA over white, CMYK, 16-bit, EXIF orientation).
Files that cannot be opened are found when the folder is indexed and skipped with one
warning; a file that becomes unreadable later is skipped at load time (another sample is
returned in its place), so an epoch never crashes on one bad file.

Samples are dicts: ``L`` (1, S, S) in 0..100 and ``ab`` (2, S/stride, S/stride) in Lab
units (``stride`` 4 for :class:`~fastcolor.models.ZhangNet`, 1 for
:class:`~fastcolor.models.FusionNet`; reduced by :func:`reduce_target`, subsampled by
default as Zhang et al. do), plus ``index`` and, with an embedding cache (no augmentation
only), ``embedding``. The loss gets ab values, never 313-bin vectors. The run-time
augmentation (:func:`augmentation`) fills the uncovered border from the nearest edge pixel,
as Keras' ``ImageDataGenerator`` does.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2

from fastcolor.color import rgb_to_lab
from fastcolor.io import atomic_write_json

__all__ = ["IMAGE_EXTENSIONS", "ImageItem", "UnreadableImageError", "NoReadableImagesError", "check_pixel_limit",
           "open_image", "file_kind", "load_rgb", "load_l", "list_images", "scan_images", "index_images", "split_items",
           "save_split", "load_split", "files_fingerprint", "split_source", "split_change", "ColorizationDataset",
           "augmentation", "Augmentation", "FILL_MODES", "load_square", "TARGET_REDUCTIONS", "reduce_target"]

IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass(frozen=True)
class ImageItem:
    """One image: its path relative to the data directory and its class (subfolder name)."""

    path: str
    label: str


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


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    """What ``st_mode`` says a path is, in words ("a FIFO (named pipe)", ...), for messages."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _open_regular(path: str | os.PathLike):
    """A binary file object for ``path``, refusing anything but a regular file *before* reading
    from it: opening a FIFO for reading waits for a writer (forever), a device never ends. The
    file is opened non-blocking and checked with ``fstat``, so what is checked is what is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise UnreadableImageError(f"{path}: a symbolic link to {os.readlink(path)!r}, which does not exist; "
                                       f"fix or remove the link") from None
        raise
    except OSError as e:  # permission denied, a loop of symbolic links, ...
        raise UnreadableImageError(f"{path}: cannot be opened ({e.strerror or e})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableImageError(f"{path}: {file_kind(st.st_mode)}, not a regular file; only regular files "
                                       f"are read as images")
        if st.st_size == 0:
            raise UnreadableImageError(f"{path}: empty file (0 bytes)")
        return open(path, "rb", opener=lambda _p, _f: fd)  # noqa: SIM115 - closed by open_image
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def open_image(path: str | os.PathLike):
    """``PIL.Image.open`` that checks the pixel limit and turns every failure into
    :class:`UnreadableImageError` naming the file and the reason. Only regular files are read:
    a FIFO, a device or a directory with an image's name is refused without reading from it."""
    f = _open_regular(path)
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


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open any image as an upright 8-bit RGB PIL image. Raises :class:`UnreadableImageError`
    (an ``OSError``) naming the file if it is not an image, empty, truncated or corrupt, or has
    more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``."""
    with open_image(path) as im:
        im.load()
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
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def load_square(path: str | os.PathLike, size: int) -> torch.Tensor:
    """The image at ``path`` as uint8 RGB (3, size, size), resized (antialiased) to a square:
    what :class:`ColorizationDataset` augments and converts to Lab."""
    return v2.functional.resize(_pil_to_tensor(load_rgb(path)), [size, size], antialias=True)


def load_l(path: str | os.PathLike, size: int) -> torch.Tensor:
    """L (1, size, size) in 0..100 of the image at ``path`` resized to a square: exactly the
    ``L`` a :class:`ColorizationDataset` of that ``size`` yields without augmentation, so the
    embedding cache of a fusion model is computed from what the network sees."""
    return rgb_to_lab(load_square(path, size))[:1]


def _verify(path: Path) -> str | None:
    """Cheap check (header + PIL verify, no full decode): None if fine, else the reason."""
    try:
        with open_image(path) as im:
            im.verify()
        return None
    except UnreadableImageError as e:
        return str(e).removeprefix(f"{path}: ")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"


def _not_regular(path: Path) -> str | None:
    """Without reading it: why ``path`` is no image file to read (a FIFO, a dangling link...), or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a symbolic link to a file that does not exist" if path.is_symlink() else "vanished"
    except OSError as e:
        return f"cannot be opened ({e.strerror or e})"
    return None if stat.S_ISREG(mode) else f"{file_kind(mode)}, not a regular file"


class NoReadableImagesError(ValueError):
    """A data folder without one readable image: ``skipped`` lists (relative path, reason) of
    the image files that could not be used (empty when there was no image file at all)."""

    def __init__(self, root: Path, skipped: list[tuple[str, str]]):
        self.root, self.skipped = root, skipped
        if skipped:
            shown = "; ".join(f"{p} ({why})" for p, why in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
            what = f"all {len(skipped)} image file(s) there are unreadable: {shown}"
        else:
            what = "there is no file with an image suffix (.png, .jpg, ...) in it or in its subfolders"
        self.detail = what
        super().__init__(f"root: expected at least one readable image in {str(root)!r}, found none: {what}")


def list_images(root: str | os.PathLike, classes: Sequence[str] | None = None) -> list[ImageItem]:
    """Every entry of ``root`` with an image suffix, flat or one subfolder per class (see
    :func:`index_images`), as found in the folder: nothing is opened, so unreadable files,
    FIFOs and dangling symbolic links are included. What a split is made from."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root must be an existing directory of images, got {str(root)!r}")

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: images_in(d) for d in subdirs}
    per_class = {k: v for k, v in per_class.items() if v}
    if not per_class:
        per_class = {root.resolve().name: images_in(root)}
    if classes is not None:
        unknown = sorted(set(classes) - set(per_class))
        if unknown:
            raise ValueError(f"classes must be subfolders of {str(root)!r} ({sorted(per_class)}), "
                             f"got unknown {unknown}")
        per_class = {k: v for k, v in per_class.items() if k in set(classes)}
    return [ImageItem(p.relative_to(root).as_posix(), label) for label, paths in per_class.items() for p in paths]


def scan_images(root: str | os.PathLike, classes: Sequence[str] | None = None,
                verify: bool = True) -> tuple[list[ImageItem], list[tuple[ImageItem, str]]]:
    """(readable images, [(skipped image file, reason)]) of :func:`list_images`. Only regular
    files are kept (a FIFO named ``x.png`` is skipped without being opened); ``verify`` also
    opens each one (header and PIL's ``verify``, no full decode)."""
    root = Path(root)
    items, bad = [], []
    for it in list_images(root, classes):
        p = root / it.path
        reason = _not_regular(p) or (_verify(p) if verify else None)
        if reason is None:
            items.append(it)
        else:
            bad.append((it, reason))
    return items, bad


def index_images(root: str | os.PathLike, classes: Sequence[str] | None = None, verify: bool = True) -> list[ImageItem]:
    """All images under ``root``: flat (class = the folder's name) or one subfolder per class.

    ``classes`` restricts to those subfolders. Unreadable files (and anything with an image's
    name that is not a regular file: FIFOs, devices, dangling symbolic links) are skipped with
    one warning naming them all. Sorted by path, so the result is deterministic. A folder
    without a readable image raises :class:`NoReadableImagesError` (a ``ValueError``).
    """
    items, bad = scan_images(root, classes, verify)
    if bad:
        warnings.warn(f"skipping {len(bad)} unreadable image file(s) in {root}: "
                      + "; ".join(f"{it.path} ({why})" for it, why in bad), stacklevel=2)
    if not items:
        raise NoReadableImagesError(Path(root), [(it.path, why) for it, why in bad])
    return items


def split_items(items: Sequence[ImageItem], seed: int = 0,
                fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list[ImageItem]]:
    """Deterministic stratified train/val/test split (per class, seeded shuffle of the sorted paths).

    Classes with at least 3 images get at least one validation and one test image.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions!r}")
    rng = np.random.default_rng(seed)
    out: dict[str, list[ImageItem]] = {"train": [], "val": [], "test": []}
    for label in sorted({it.label for it in items}):
        group = sorted((it for it in items if it.label == label), key=lambda it: it.path)
        group = [group[i] for i in rng.permutation(len(group))]
        n = len(group)
        n_val, n_test = int(round(n * fractions[1])), int(round(n * fractions[2]))
        if n >= 3:
            n_val, n_test = max(n_val, int(fractions[1] > 0)), max(n_test, int(fractions[2] > 0))
        out["val"] += group[:n_val]
        out["test"] += group[n_val:n_val + n_test]
        out["train"] += group[n_val + n_test:]
    return out


def files_fingerprint(items: Sequence[ImageItem]) -> str:
    """A short hash of a list of images (paths and classes, in any order)."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda it: (it.path, it.label)):
        h.update(f"{it.path}\t{it.label}\n".encode())
    return h.hexdigest()[:16]


def save_split(path: str | os.PathLike, split: dict[str, list[ImageItem]], seed: int | None = None,
               source: dict[str, Any] | None = None) -> None:
    """Write a split; ``source`` records what it was made from (see :func:`split_source`)."""
    raw: dict[str, Any] = {"seed": seed, **{k: [[it.path, it.label] for it in v] for k, v in split.items()}}
    if source is not None:
        raw["source"] = source
    atomic_write_json(path, raw)


def load_split(path: str | os.PathLike) -> dict[str, list[ImageItem]]:
    raw = json.loads(Path(path).read_text())
    return {k: [ImageItem(p, c) for p, c in raw[k]] for k in ("train", "val", "test")}


def split_source(listed: Sequence[ImageItem], skipped: Sequence[ImageItem], classes: Sequence[str] | None,
                 fractions: Sequence[float]) -> dict[str, Any]:
    """What a split is made from: the image files listed (their number and fingerprint), those
    of them that were skipped as unreadable, the classes asked for and the fractions."""
    return {"files": len(listed), "fingerprint": files_fingerprint(listed),
            "skipped": [[it.path, it.label] for it in sorted(skipped, key=lambda it: it.path)],
            "classes": None if classes is None else sorted(classes), "fractions": [float(f) for f in fractions]}


def split_change(path: str | os.PathLike, listed: Sequence[ImageItem], seed: int, classes: Sequence[str] | None,
                 fractions: Sequence[float]) -> str | None:
    """None if the split in ``path`` was made from the image files ``listed`` (by
    :func:`list_images`) with this seed, these classes and fractions; otherwise what changed, in
    words ("3 image files added (a.png, ...)", "seed 0 -> 1", ...). A split written before
    splits recorded their source says so."""
    raw = json.loads(Path(path).read_text())
    src = raw.get("source")
    if not isinstance(src, dict):
        return "it does not record what it was made from (written by an older fastcolor)"
    changes = []
    if src.get("fingerprint") != files_fingerprint(listed):
        old = {(p, c) for k in ("train", "val", "test") for p, c in raw.get(k, [])}
        old |= {(p, c) for p, c in src.get("skipped", [])}
        now = {(it.path, it.label) for it in listed}
        added, removed = sorted(now - old), sorted(old - now)
        for n, what, names in ((len(added), "added", added), (len(removed), "removed", removed)):
            if n:
                shown = ", ".join(p for p, _ in names[:3]) + (", ..." if n > 3 else "")
                changes.append(f"{n} image file(s) {what} ({shown})")
        if not changes:
            changes.append("the image files differ")
        changes.append(f"{src.get('files', len(old))} -> {len(listed)} image files")
    if raw.get("seed") != seed:
        changes.append(f"seed {raw.get('seed')} -> {seed}")
    wanted = None if classes is None else sorted(classes)
    if src.get("classes") != wanted:
        changes.append(f"classes {src.get('classes') or 'all'} -> {wanted or 'all'}")
    if [round(float(f), 9) for f in src.get("fractions", [])] != [round(float(f), 9) for f in fractions]:
        changes.append(f"fractions {src.get('fractions')} -> {list(fractions)}")
    return "; ".join(changes) or None


#: How :func:`reduce_target` brings the ab target down to the network's output resolution.
TARGET_REDUCTIONS = ("subsample", "area")


def reduce_target(ab: torch.Tensor, stride: int, how: str = "subsample") -> torch.Tensor:
    """The ab target at ``1/stride`` of the input resolution.

    Args:
        ab: (N, 2, H, W) or (2, H, W) float ab in Lab units; H and W divisible by ``stride``.
        stride: positive int, the network's output stride (4 for ZhangNet, 1 for FusionNet).
        how: ``"subsample"`` (default) takes the top-left pixel of every ``stride`` x ``stride``
            block, ``ab[..., ::stride, ::stride]``: Zhang et al.'s (ECCV 2016) training net
            takes the ab target at 1/4 resolution this way. ``"area"`` averages each block
            (fastcolor v1's behaviour, which mixes colours across edges into a value that may
            occur in none of the pixels).

    Returns:
        ab of shape (..., 2, H/stride, W/stride), contiguous, same dtype and device;
        ``stride == 1`` returns ``ab`` itself.

    Example:
        >>> ab = torch.arange(32.0).reshape(2, 4, 4)
        >>> reduce_target(ab, 2)[0].tolist()
        [[0.0, 2.0], [8.0, 10.0]]
        >>> reduce_target(ab, 2, "area")[0].tolist()
        [[2.5, 4.5], [10.5, 12.5]]
    """
    if how not in TARGET_REDUCTIONS:
        raise ValueError(f"how must be one of {TARGET_REDUCTIONS}, got {how!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if not isinstance(ab, torch.Tensor) or ab.dim() not in (3, 4) or ab.shape[-3] != 2:
        shape = tuple(ab.shape) if isinstance(ab, torch.Tensor) else type(ab).__name__
        raise ValueError(f"ab must be a (N, 2, H, W) or (2, H, W) tensor, got {shape}")
    if ab.shape[-1] % stride or ab.shape[-2] % stride:
        raise ValueError(f"ab's height and width must be divisible by stride={stride}, got {tuple(ab.shape[-2:])}")
    if stride == 1:
        return ab
    if how == "subsample":
        return ab[..., ::stride, ::stride].contiguous()  # a copy: the view would keep the full-size ab alive
    return F.avg_pool2d(ab, stride)


#: Fill modes of :func:`augmentation` (Keras' names) -> kornia's ``padding_mode``.
FILL_MODES = {"nearest": "border", "reflect": "reflection", "constant": "zeros"}


class Augmentation(torch.nn.Module):
    """Random horizontal flip, then a random affine map (rotation, zoom, shear), on one RGB
    image (3, H, W), uint8 or float in [0, 1] -> float32 (3, H, W) in [0, 1].

    Built on ``kornia.augmentation`` (``RandomHorizontalFlip`` and ``RandomAffine``, bilinear),
    because torchvision's ``RandomAffine`` fills the uncovered corners only with a constant.
    Its random draws come from torch's global generator, so the trainer's per-epoch
    ``torch.manual_seed`` (and the DataLoader's per-worker seeds) make it deterministic.
    See :func:`augmentation` for the arguments.
    """

    def __init__(self, degrees: float, zoom: tuple[float, float], shear: float, hflip: bool, fill_mode: str):
        super().__init__()
        import kornia.augmentation as K

        if fill_mode not in FILL_MODES:
            raise ValueError(f"fill_mode must be one of {sorted(FILL_MODES)}, got {fill_mode!r}")
        self.fill_mode = fill_mode
        ops: list[torch.nn.Module] = [K.RandomHorizontalFlip(p=0.5)] if hflip else []
        ops.append(K.RandomAffine(degrees=degrees, scale=tuple(zoom), shear=shear, resample="bilinear",
                                  padding_mode=FILL_MODES[fill_mode], align_corners=False, p=1.0))
        self.ops = torch.nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be an RGB image tensor of shape (3, H, W), got {got}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return self.ops(x[None])[0].clamp(0.0, 1.0)


def augmentation(degrees: float = 15.0, zoom: tuple[float, float] = (1.0, 1.25), shear: float = 8.0,
                 hflip: bool = True, fill_mode: str = "nearest") -> Augmentation:
    """The runtime augmentation: random zoom, rotation, shear and horizontal flip.

    Args:
        degrees: rotation drawn from (-degrees, degrees).
        zoom: scale factor drawn from this range (> 1 enlarges).
        shear: x shear angle in degrees drawn from (-shear, shear).
        hflip: mirror half of the images left-right.
        fill_mode: what fills the pixels the transformed image does not cover, in Keras'
            words: ``"nearest"`` (default: the nearest edge pixel, Keras ``ImageDataGenerator``'s
            default ``fill_mode``, which the study used), ``"reflect"`` (the image mirrored at
            its edge) or ``"constant"`` (black, as fastcolor v1's torchvision
            ``RandomAffine(fill=0)``: with these default parameters it left black pixels in 57% of
            500 draws, up to 11% of an image; tests/test_augmentation.py measures this).

    Returns:
        an :class:`Augmentation`: (3, H, W) uint8 or float in [0, 1] -> float32 (3, H, W) in [0, 1].

    Example:
        >>> aug = augmentation()
        >>> aug(torch.full((3, 16, 16), 255, dtype=torch.uint8)).min().item() > 0.99  # no black corners
        True
    """
    return Augmentation(degrees, zoom, shear, hflip, fill_mode)


class ColorizationDataset(Dataset):
    """L and ab target tensors from a list of :class:`ImageItem` under ``root``.

    Args:
        root: the data directory the items' paths are relative to.
        items: the images (e.g. one split of :func:`split_items`).
        size: square size the images are resized to (the model's input size).
        target_stride: ab targets are ``size / target_stride``; 4 for Zhang, 1 for fusion.
        target_reduction: how the target is reduced to that size (:func:`reduce_target`):
            ``"subsample"`` (default, the authors' choice: Zhang et al.'s training net subsamples
            the ab target at 1/4 resolution) or ``"area"`` (block means, fastcolor v1's).
        augment: ``True`` for :func:`augmentation` defaults (nearest-edge fill), a transform
            ((3, S, S) uint8 -> (3, S, S) uint8 or float in [0, 1]: an :class:`Augmentation`, a
            torchvision v2 transform), or ``False``.
        embeddings: an :class:`~fastcolor.models.EmbeddingCache`; adds ``embedding`` to samples.
            Only without augmentation (refused with it): a cached embedding is that of the
            un-augmented image, computed from this dataset's ``L`` (:func:`load_l` at ``size``);
            with augmentation a fusion model embeds the augmented ``L`` per batch instead.
    """

    def __init__(self, root: str | os.PathLike, items: Sequence[ImageItem], size: int = 128, target_stride: int = 4,
                 augment: bool | Any = False, embeddings: Any = None, max_retries: int = 20,
                 target_reduction: str = "subsample"):
        if target_reduction not in TARGET_REDUCTIONS:
            raise ValueError(f"target_reduction must be one of {TARGET_REDUCTIONS}, got {target_reduction!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(target_stride, int) or target_stride < 1 or size % target_stride:
            raise ValueError(f"target_stride must be a positive int dividing size={size}, got {target_stride!r}")
        if len(items) == 0:
            raise ValueError("items must contain at least one image, got none")
        if embeddings is not None and augment is not False and augment is not None:
            raise ValueError("embeddings: a cache holds embeddings of the un-augmented images, so it cannot be used "
                             "with augment on; embed the augmented L per batch (FusionNet.embed) instead")
        self.root = Path(root)
        self.items = list(items)
        self.size = size
        self.target_stride = target_stride
        self.target_reduction = target_reduction
        self.transform = augmentation() if augment is True else (augment or None)
        self.embeddings = embeddings
        self.max_retries = max_retries
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> dict[str, Any]:
        """The sample at ``index``; raises if the file cannot be read (see ``__getitem__``)."""
        item = self.items[index]
        path = self.root / item.path
        x = load_square(path, self.size)
        if self.transform is not None:
            x = self.transform(x)
        lab = rgb_to_lab(x)
        L, ab = lab[:1], lab[1:]
        ab = reduce_target(ab, self.target_stride, self.target_reduction)
        sample = {"L": L, "ab": ab, "index": index}
        if self.embeddings is not None:
            emb = self.embeddings.get(path)
            if emb is None:
                raise OSError(f"no cached embedding for {path}")
            sample["embedding"] = emb
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Like :meth:`load`, but an unreadable file is reported once and the next readable one is
        returned; :class:`UnreadableImageError` when none of ``max_retries`` in a row can be read."""
        tries = min(self.max_retries, len(self.items))
        last = ""
        for attempt in range(tries):
            i = (index + attempt) % len(self.items)
            try:
                return self.load(i)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                path = self.items[i].path
                last = f"{type(e).__name__}: {e}"
                if path not in self._reported:
                    self._reported.add(path)
                    warnings.warn(f"skipping unreadable image {path!r} ({last})", stacklevel=2)
        raise UnreadableImageError(
            f"{self.root}: none of {tries} image(s) in a row from {self.items[index].path!r} on could be read "
            f"(the last: {' '.join(last.split())[:300]}); expected readable image files there")
