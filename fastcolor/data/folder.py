"""Image folders: listing, the train/val/test split and what a split was made from.

A data directory is either flat (images directly inside: one class, named after the directory)
or has one subfolder per class. Listing opens nothing; :func:`index_images` also checks each
file's header and skips unreadable ones with one warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastcolor.data.images import IMAGE_EXTENSIONS, UnreadableImageError, file_kind, open_image
from fastcolor.io import atomic_write_json

__all__ = ["ImageItem", "NoReadableImagesError", "Listing", "list_folder", "folder_times", "list_images", "scan_images",
           "index_images", "split_items", "save_split", "load_split", "files_fingerprint", "split_source",
           "split_change", "split_current"]


@dataclass(frozen=True)
class ImageItem:
    """One image: its path relative to the data directory and its class (subfolder name)."""

    path: str
    label: str

def _verify(path: Path, data: bytes | None = None) -> str | None:
    """Cheap check (header + PIL verify, no full decode): None if fine, else the reason. With
    ``data`` (the file's bytes, already read) nothing is opened: ``path`` names it."""
    try:
        with open_image(path, data) as im:
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


@dataclass(frozen=True)
class Listing:
    """One listing of a data folder (:func:`list_folder`): ``items`` every entry with an image
    suffix, ``regular`` whether each is a regular file (a FIFO or a dangling link is not; told
    from the directory entry, without opening or, mostly, stat-ing it), ``folders`` the folders
    listed (``"."`` and every subfolder) -> their modification time in ns (:func:`folder_times`)."""

    items: list[ImageItem]
    regular: list[bool]
    folders: dict[str, int]


def folder_times(root: str | os.PathLike, names: Sequence[str]) -> dict[str, int | None]:
    """The modification times (ns) of ``root/name`` for each name (``"."``: root itself); None
    for one that is gone. A file added to, or removed from, a folder changes its time, so equal
    times mean the same files without listing them (what lets a resumed run skip the listing), to
    the file system's resolution of times (a few milliseconds on Linux: a file added within that
    much of the listing can go unseen)."""
    out: dict[str, int | None] = {}
    for name in names:
        try:
            out[name] = os.stat(os.path.join(root, name)).st_mtime_ns
        except OSError:
            out[name] = None
    return out


def list_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> Listing:
    """The one listing a run makes of its data folder (see :func:`list_images`), with each
    file's kind and the folders' times; ``os.scandir``, so no file is stat-ed or opened."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root must be an existing directory of images, got {str(root)!r}")

    def scan(folder: Path) -> tuple[list[os.DirEntry], list[str]]:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        images = [e for e in entries if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and not e.is_dir()]
        return images, [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]

    # each folder's time is taken before it is read: a file added while it is read changes the
    # time after the one recorded, so the next run lists again rather than miss it
    root_time = folder_times(root, ["."])
    top, subdirs = scan(root)
    times = {**root_time, **folder_times(root, subdirs)}
    per_class = {d: scan(root / d)[0] for d in subdirs}
    per_class = {k: [(f"{k}/{e.name}", e) for e in v] for k, v in per_class.items() if v}
    if top:  # images directly in root: one class named after it, beside any subfolders' classes
        if per_class:
            warnings.warn(f"{root} holds {len(top)} image file(s) at its top level beside the class subfolders "
                          f"{sorted(per_class)[:3]}{'...' if len(per_class) > 3 else ''}: they are used too, as one "
                          f"more class named {root.resolve().name!r}; move them into a subfolder to name their class",
                          stacklevel=3)
        per_class.setdefault(root.resolve().name, [])
        per_class[root.resolve().name] = [(e.name, e) for e in top] + per_class[root.resolve().name]
    if classes is not None:
        unknown = sorted(set(classes) - set(per_class))
        if unknown:
            raise ValueError(f"classes must be subfolders of {str(root)!r} ({sorted(per_class)}), "
                             f"got unknown {unknown}")
        per_class = {k: v for k, v in per_class.items() if k in set(classes)}
    pairs = [(ImageItem(rel, label), e) for label in sorted(per_class) for rel, e in per_class[label]]
    return Listing([it for it, _ in pairs], [e.is_file() for _, e in pairs], times)


def list_images(root: str | os.PathLike, classes: Sequence[str] | None = None) -> list[ImageItem]:
    """Every entry of ``root`` with an image suffix, flat or one subfolder per class (see
    :func:`index_images`), as found in the folder: nothing is opened, so unreadable files,
    FIFOs and dangling symbolic links are included. What a split is made from."""
    return list_folder(root, classes).items


def scan_images(root: str | os.PathLike, classes: Sequence[str] | None = None, verify: bool = True,
                listing: Listing | None = None) -> tuple[list[ImageItem], list[tuple[ImageItem, str]]]:
    """(readable images, [(skipped image file, reason)]) of :func:`list_images` (or of
    ``listing``, made by :func:`list_folder`). Only regular files are kept (a FIFO named ``x.png``
    is skipped without being opened); ``verify`` also opens each one (header and PIL's
    ``verify``, no full decode)."""
    root = Path(root)
    listing = listing or list_folder(root, classes)
    items, bad = [], []
    for it, regular in zip(listing.items, listing.regular, strict=True):
        p = root / it.path
        reason = (None if regular else _not_regular(p) or "not a regular file") or (_verify(p) if verify else None)
        if reason is None:
            items.append(it)
        else:
            bad.append((it, reason))
    return items, bad


def index_images(root: str | os.PathLike, classes: Sequence[str] | None = None, verify: bool = True,
                 listing: Listing | None = None) -> list[ImageItem]:
    """All images under ``root``: flat (class = the folder's name) or one subfolder per class
    (images directly in a folder that also has class subfolders are one more class, named after
    the folder, with a warning saying so).

    ``classes`` restricts to those subfolders. Unreadable files (and anything with an image's
    name that is not a regular file: FIFOs, devices, dangling symbolic links) are skipped with
    one warning naming them all. Sorted by path, so the result is deterministic. A folder
    without a readable image raises :class:`NoReadableImagesError` (a ``ValueError``).
    """
    items, bad = scan_images(root, classes, verify, listing)
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
    by_label: dict[str, list[ImageItem]] = {}
    for it in items:  # one pass (ImageNet: 1.28 M images in 1000 classes)
        by_label.setdefault(it.label, []).append(it)
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda it: it.path)
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
                 fractions: Sequence[float], folders: dict[str, int | None] | None = None,
                 val_data: str | os.PathLike | None = None, val_listed: Sequence[ImageItem] = (),
                 val_folders: dict[str, int | None] | None = None) -> dict[str, Any]:
    """What a split is made from: the image files listed (their number and fingerprint), those
    of them that were skipped as unreadable, the classes asked for and the fractions; with
    ``folders`` (:attr:`Listing.folders`) the folders' times, which let :func:`split_current`
    tell an unchanged folder without listing it; with ``val_data``, the validation folder, its
    files (``val_listed``) and its folders' times."""
    src = {"files": len(listed), "fingerprint": files_fingerprint(listed),
           "skipped": [[it.path, it.label] for it in sorted(skipped, key=lambda it: it.path)],
           "classes": None if classes is None else sorted(classes), "fractions": [float(f) for f in fractions]}
    if folders is not None:
        src["folders"] = folders
    if val_data is not None:
        src.update(val_data=os.path.abspath(val_data), val_files=len(val_listed),
                   val_fingerprint=files_fingerprint(val_listed), val_folders=val_folders or {})
    return src


def _setting_changes(raw: dict[str, Any], seed: int, classes: Sequence[str] | None, fractions: Sequence[float],
                     val_data: str | os.PathLike | None) -> list[str]:
    src = raw.get("source") or {}
    changes = []
    if raw.get("seed") != seed:
        changes.append(f"seed {raw.get('seed')} -> {seed}")
    wanted = None if classes is None else sorted(classes)
    if src.get("classes") != wanted:
        changes.append(f"classes {src.get('classes') or 'all'} -> {wanted or 'all'}")
    if [round(float(f), 9) for f in src.get("fractions", [])] != [round(float(f), 9) for f in fractions]:
        changes.append(f"fractions {src.get('fractions')} -> {list(fractions)}")
    val = None if val_data is None else os.path.abspath(val_data)
    if src.get("val_data") != val:
        changes.append(f"val_data {src.get('val_data') or 'none (a split of the data)'} -> {val or 'none'}")
    return changes


def split_current(path: str | os.PathLike, root: str | os.PathLike, seed: int, classes: Sequence[str] | None,
                  fractions: Sequence[float], val_data: str | os.PathLike | None = None) -> bool:
    """True if the split in ``path`` was made with these settings from the folders as they are
    now, told from the folders' modification times alone (no listing: a stat per folder);
    False when it cannot be told so (then :func:`split_change` compares a listing)."""
    try:
        raw = json.loads(Path(path).read_text())
        src = raw["source"]
        if not isinstance(src.get("folders"), dict) or _setting_changes(raw, seed, classes, fractions, val_data):
            return False
        if folder_times(root, list(src["folders"])) != src["folders"]:
            return False
        return val_data is None or folder_times(val_data, list(src["val_folders"])) == src["val_folders"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def split_change(path: str | os.PathLike, listed: Sequence[ImageItem], seed: int, classes: Sequence[str] | None,
                 fractions: Sequence[float], val_data: str | os.PathLike | None = None,
                 val_listed: Sequence[ImageItem] = ()) -> str | None:
    """None if the split in ``path`` was made from the image files ``listed`` (by
    :func:`list_images`; with ``val_data``, the validation images ``val_listed`` of that folder)
    with this seed, these classes and fractions; otherwise what changed, in words ("3 image
    files added (a.png, ...)", "seed 0 -> 1", ...). A split written before splits recorded their
    source says so."""
    raw = json.loads(Path(path).read_text())
    src = raw.get("source")
    if not isinstance(src, dict):
        return "it does not record what it was made from (written by an older fastcolor)"
    changes = []
    if src.get("fingerprint") != files_fingerprint(listed):
        parts = ("train", "test") if src.get("val_data") else ("train", "val", "test")
        old = {(p, c) for k in parts for p, c in raw.get(k, [])}
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
    if val_data is not None and src.get("val_fingerprint") not in (None, files_fingerprint(val_listed)):
        changes.append(f"the validation images in {val_data} differ ({src.get('val_files')} -> {len(val_listed)} "
                       f"image files)")
    changes += _setting_changes(raw, seed, classes, fractions, val_data)
    return "; ".join(changes) or None
