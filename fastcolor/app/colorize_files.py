"""The ``colorize`` command's pipeline: plan which file goes where (:func:`plan_colorize`), then
colorize them in batches at full resolution and write each output atomically, never replacing
an existing file unless asked (:func:`colorize_files`).

The network sees each image resized to ``size``; its ab is upsampled and joined with the
input's own full-resolution L, strip by strip. Transparency is kept where the output format
can store it. A :class:`Job` is one input file and its output path.
"""
from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from fastcolor.app.messages import EXIT_FAILURE, CLIError, one_line, warn
from fastcolor.color import l_ab_to_rgb, rgb_to_l
from fastcolor.colorize import (
    STRIP_PIXELS,
    MemoryLimitError,
    activation_bytes,
    check_memory,
    memory_guard,
    predict_ab,
    to_l_tensor,
)
from fastcolor.data import IMAGE_EXTENSIONS, file_kind, load_rgb, open_image, read_bytes
from fastcolor.data.decode import decode_full
from fastcolor.io import atomic_write_bytes, temp_prefix

__all__ = ["Job", "plan_colorize", "colorize_files", "write_new_file"]

#: Output suffixes written as they are; any other input suffix is written as .png.
_WRITABLE = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".bmp": "BMP",
             ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM", ".tga": "TGA"}
#: Of those, the ones that can keep an alpha channel.
_ALPHA_OK = {".png", ".tif", ".tiff", ".webp", ".tga"}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass
class Job:
    """One image to colorize: read ``src``, write ``dst``."""

    src: Path
    dst: Path
    shown: str  #: the source as named for messages


def _image_files(folder: Path, exclude: Path | None) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or (rootp / d).resolve() != exclude))
        out += [rootp / f for f in sorted(files)
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return out


def _kind(path: Path) -> str:
    """What is at ``path`` ("a character device", "a regular file", ...), for messages."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "something unreadable"
    return "a regular file" if stat.S_ISREG(mode) else file_kind(mode)


def _identity(path: Path):
    """What two names of one file share: (device, inode) where it exists (hard links, symbolic
    links, bind mounts), else its resolved path."""
    try:
        st = path.stat()
        return (st.st_dev, st.st_ino)
    except OSError:
        return path.resolve()


def _output_suffix(src: Path, has_alpha: bool) -> str:
    suffix = src.suffix.lower()
    if suffix not in _WRITABLE or (has_alpha and suffix not in _ALPHA_OK):
        return ".png"
    return src.suffix


def _header(path: Path) -> tuple[str | None, str | None]:
    """(PIL mode, None) if ``path`` opens as an image (header only), else (None, why not)."""
    try:
        with open_image(path) as im:
            return im.mode + ("A" if im.mode == "P" and "transparency" in im.info else ""), None
    except OSError as exc:  # UnreadableImageError names the file
        return None, one_line(str(exc), 300)


def plan_colorize(inputs: Sequence[str], output: str, overwrite: bool = False,
                  skip_existing: bool = False) -> tuple[list[Job], list[str], int]:
    """(jobs, skipped-with-reason, existing outputs left alone) for the colorize command."""
    out = Path(output)
    sources: list[tuple[Path, Path | None, str]] = []  # (file, path under OUT or None = as file, shown)
    single_file_out = (len(inputs) == 1 and Path(inputs[0]).is_file() and out.suffix.lower() in IMAGE_EXTENSIONS
                       and not out.is_dir())
    out_resolved = out.resolve()
    if not single_file_out and out.exists() and not out.is_dir():
        raise CLIError(f"-o {output}: {_kind(out)} is there, not a folder; -o must be a folder (or, for a single "
                       f"input file, an image file name such as out.png)")
    dangling: list[str] = []
    for name in inputs:
        p = Path(name)
        if not p.exists():
            if p.is_symlink():  # a link to nothing: an unreadable input, skipped like the others
                dangling.append(f"{name}: a symbolic link to {os.readlink(p)!r}, which does not exist; fix or "
                                f"remove the link")
                continue
            raise CLIError(f"no such file or directory: {name}")
        if p.is_dir():
            if p.resolve() == out_resolved:
                raise CLIError(f"-o {output} is the input folder {name} itself; choose another output folder")
            files = _image_files(p, out_resolved)
            if not files:
                warn(f"no image files in folder {name}")
            sources += [(f, f.relative_to(p), str(f)) for f in files]
        else:
            sources.append((p, None if single_file_out else Path(p.name), name))
    if not sources and not dangling:
        raise CLIError(f"no image files found in {', '.join(inputs)}")

    inputs_at = {_identity(src): shown for src, _, shown in sources}
    jobs, skipped, existing, seen = [], list(dangling), 0, {}
    for src, rel, shown in sources:
        mode, reason = _header(src)
        if mode is None:
            skipped.append(reason if shown in reason else f"{shown}: {reason}")
            continue
        has_alpha = mode in _ALPHA_MODES or mode.endswith("A")
        dst = out if rel is None else (out / rel).with_suffix(_output_suffix(rel, has_alpha))
        if dst.resolve() == src.resolve():
            raise CLIError(f"the output for {shown} would replace the input itself; choose another -o")
        if _identity(dst) in inputs_at:  # never replaced, --overwrite or not
            other = inputs_at[_identity(dst)]
            named = "" if other == str(dst) else f" ({other})"
            raise CLIError(f"the output for {shown} would be {dst}, which is also an input of this command{named} "
                           f"(never replaced, even with --overwrite); choose an -o outside the inputs")
        if dst.exists() and not dst.is_file():
            raise CLIError(f"the output for {shown} would be {dst}, but {_kind(dst)} is there, not a regular file; "
                           f"choose another -o")
        if dst.resolve() in seen:
            raise CLIError(f"{seen[dst.resolve()]} and {shown} would both be written to {dst}; "
                           f"colorize them in separate runs or into different -o folders")
        seen[dst.resolve()] = shown
        if dst.exists() and not overwrite:
            if skip_existing:
                existing += 1
                continue
            others = sum(1 for s, r, _ in sources if r is not None and (out / r).exists()) - 1
            more = f" (and {others} more)" if others > 0 else ""
            raise CLIError(f"output {dst} already exists{more}; pass --overwrite to replace or --skip-existing "
                           f"to keep existing outputs")
        jobs.append(Job(src, dst, shown))
    return jobs, skipped, existing


def _encode(rgb_u8, alpha, dst: Path) -> bytes:
    im = Image.fromarray(rgb_u8, "RGB")
    fmt = _WRITABLE.get(dst.suffix.lower(), "PNG")
    if alpha is not None:
        if dst.suffix.lower() in _ALPHA_OK:
            im.putalpha(alpha)
        else:
            warn(f"{dst.name}: its format cannot store transparency; the alpha channel is dropped")
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_new_file(path: Path, data: bytes, overwrite: bool, skip_existing: bool = False) -> bool:
    """Write ``data`` to ``path`` atomically (complete temp file, fsync, then rename; see
    :func:`fastcolor.io.atomic_write_bytes`). Without ``overwrite`` an existing ``path`` is never
    replaced, even one created meanwhile: the temp file is hard-linked to ``path``, which fails
    if the name is taken; then ``skip_existing`` leaves it alone (returns False), else
    :class:`CLIError`. Returns True once written."""
    part = path.with_name(f"{temp_prefix(path)}{os.getpid()}.part")  # short: path's name may be 255 bytes
    atomic_write_bytes(part, data)
    taken = CLIError(f"output {path} appeared while colorizing; not replaced (pass --overwrite to replace it or "
                     f"--skip-existing to leave it)")
    try:
        if overwrite:
            os.replace(part, path)
            return True
        try:
            os.link(part, path)
        except FileExistsError:
            if skip_existing:
                return False
            raise taken from None
        except OSError:  # file systems without hard links: check, then rename
            if path.exists():
                if skip_existing:
                    return False
                raise taken from None
            os.replace(part, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)


def _decoded_l(path: Path, device: torch.device | str) -> torch.Tensor | None:
    """L (1, H, W) on the CPU of a JPEG decoded on ``device`` (nvjpeg on CUDA), computed there strip
    by strip as :func:`~fastcolor.colorize.to_l_tensor` does; None for any other file, or a JPEG
    the decoder refuses (PIL reads those)."""
    rgb = decode_full(read_bytes(path), device)
    if rgb is None:
        return None
    H, W = rgb.shape[-2:]
    L = torch.empty((1, H, W), dtype=torch.float32)
    step = max(1, STRIP_PIXELS // max(W, 1))
    for r0 in range(0, H, step):
        L[:, r0:r0 + step] = rgb_to_l(rgb[:, r0:r0 + step]).cpu()
    return L


def _read_image(path: Path, decode_device: torch.device | str | None = None):
    """(L the network sees, L joined with the predicted ab, alpha band or None); L (1, H, W) in 0..100.

    With transparency, the network sees the image composited over white, while the output
    keeps the input's own (straight) colour lightness and its alpha, so that the output
    composited over anything looks as light as the input does. With ``decode_device`` a JPEG
    is decoded there (:func:`_decoded_l`); every other file as without it.
    """
    if decode_device is not None:
        L = _decoded_l(path, decode_device)
        if L is not None:
            return L, L, None  # a JPEG has no alpha
    rgb = load_rgb(path)  # any mode -> upright 8-bit RGB (alpha composited over white)
    L_seen = to_l_tensor(np.array(rgb)).float()  # np.array: a writable copy for torch
    with open_image(path) as im:  # only a regular file is opened
        if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
            rgba = ImageOps.exif_transpose(im.convert("RGBA"))
            return L_seen, to_l_tensor(np.array(rgba.convert("RGB"))).float(), rgba.getchannel("A")
    return L_seen, L_seen, None


def _rgb_u8_in_strips(L: torch.Tensor, ab: torch.Tensor) -> np.ndarray:
    """L (1, H, W) joined with ab (2, h, w) upsampled to (H, W) -> (H, W, 3) uint8, strip by strip
    (so that only L, the upsampled ab and the output are ever full size)."""
    H, W = L.shape[-2:]
    ab_full = F.interpolate(ab[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    out = np.empty((H, W, 3), dtype=np.uint8)
    step = max(1, STRIP_PIXELS // max(W, 1))
    for r0 in range(0, H, step):
        rgb = l_ab_to_rgb(L[:, r0:r0 + step], ab_full[:, r0:r0 + step])
        out[r0:r0 + step] = (rgb.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return out


def colorize_files(model: torch.nn.Module, jobs: Sequence[Job], size: int, T: float | None = None,
                   batch_size: int = 8, overwrite: bool = False, progress: bool = True,
                   on_skip: Callable[[str], None] | None = None, skip_existing: bool = False,
                   on_existing: Callable[[Path], None] | None = None,
                   decode_device: torch.device | str | None = None) -> list[Path]:
    """Colorize ``jobs`` with ``model``; returns the written paths. ``T=None`` decodes at the
    model's own temperature (:func:`fastcolor.colorize.decode_temperature`: 0.38, or 1.0 for the
    authors' released weights). Unreadable inputs are passed to ``on_skip`` (a message) and left
    out. An output that another process created meanwhile is left alone with ``skip_existing``
    (passed to ``on_existing``), else a :class:`CLIError`. Not enough memory raises
    :class:`CLIError` (exit 1) before anything of the batch concerned is written. ``decode_device``:
    decode JPEGs there (nvjpeg on CUDA; ``fastcolor colorize --decode gpu``), PIL otherwise."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.eval()
    written: list[Path] = []
    advice = "try a smaller --batch-size or --size" + (", or --device cpu" if device.type == "cuda" else "")
    bar = tqdm(total=len(jobs), unit="img", desc="colorize", disable=None if progress else True, file=sys.stderr)
    try:
        for start in range(0, len(jobs), batch_size):
            batch, Ls, L_joins, alphas = [], [], [], []
            for job in jobs[start:start + batch_size]:
                try:
                    L, L_join, alpha = _read_image(job.src, decode_device)
                except (OSError, ValueError, MemoryError) as exc:  # a bad file is skipped, not fatal
                    reason = one_line(str(exc), 300)
                    (on_skip or warn)(reason if job.shown in reason else f"{job.shown}: {reason}")
                    bar.update(1)
                    continue
                batch.append(job)
                Ls.append(L)
                L_joins.append(L_join)
                alphas.append(alpha)
            if not batch:
                continue
            what = f"colorizing {len(batch)} image(s) at network input {size}x{size} on {device}"
            try:
                check_memory(activation_bytes(model, len(batch), size) or 0, device, what, advice)
                with torch.no_grad(), memory_guard(device, what, advice):
                    L_in = torch.cat([F.interpolate(L[None], size=(size, size), mode="bilinear", antialias=True,
                                                    align_corners=False) for L in Ls]).to(device)
                    ab = predict_ab(model, L_in, T).float().cpu()
                if not torch.isfinite(ab).all():
                    raise CLIError("the model produced non-finite colours (NaN/inf): its weights are broken; "
                                   "nothing was written for this batch", EXIT_FAILURE)
                for job, L, alpha, ab_i in zip(batch, L_joins, alphas, ab, strict=True):
                    H, W = L.shape[-2:]
                    what = f"joining the colours with the full-resolution {W}x{H} lightness of {job.shown}"
                    check_memory(H * W * (4 + 8 + 3) + (1 << 26), "cpu", what, "colorize it on a larger machine")
                    with memory_guard("cpu", what, "colorize it on a larger machine"):
                        rgb_u8 = _rgb_u8_in_strips(L, ab_i)
                    try:
                        fresh = write_new_file(job.dst, _encode(rgb_u8, alpha, job.dst), overwrite, skip_existing)
                    except OSError as exc:  # disk full, read-only file system, ...
                        raise CLIError(f"cannot write {job.dst}: {exc.strerror or exc}", EXIT_FAILURE) from exc
                    if fresh:
                        written.append(job.dst)
                    elif on_existing is not None:  # appeared meanwhile: left alone (--skip-existing)
                        on_existing(job.dst)
                    bar.update(1)
            except MemoryLimitError as exc:
                done = f"; {len(written)} image(s) were written before" if written else "; nothing was written"
                raise CLIError(f"{exc}{done}", EXIT_FAILURE) from exc
    finally:
        bar.close()
    return written


