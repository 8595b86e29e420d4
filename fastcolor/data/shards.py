"""Sharded datasets: tar shards in the WebDataset format, for many machines without a shared file system.

Writing (:func:`write_shards`, ``fastcolor shard DATA OUT``) needs only the standard library's
``tarfile``: a data folder is indexed and split as the trainer splits folders
(:func:`~fastcolor.data.split_items`, same seed, same fractions), and each split becomes its own
shard set, ``OUT/train-000000.tar``, ``OUT/val-000000.tar``, ``OUT/test-000000.tar``, ... . Separate
sets, not one set with the split recorded: a rank reads only the bytes of its split (a recorded
split would make every rank read and discard the validation and test images of every shard). The
training images are shuffled (seeded) before they are cut into shards, so every shard holds a mix
of classes and a shuffle buffer of a few hundred images is enough. Each image is stored as the
file's own bytes (no recompression) beside its class, WebDataset's way: members ``<key>.<ext>``
(the original suffix, lower case), ``<key>.cls`` (the class number, decimal text) and
``<key>.json`` (``{"path", "label"}``), keys ``<split>-<position, 8 digits>``. Each shard is built
in memory and written with :func:`fastcolor.io.atomic_write_bytes` (temporary name, fsync,
rename), so a failure never leaves a partial ``.tar``. (The standard library's ``tarfile``, not
webdataset's ``TarWriter``, which streams into the final name: a shard is a plain tar, and
atomicity stays with the one writer every fastcolor file goes through.) The index
``shards.json`` (classes, seed, fractions, what the split was made from, the images per file
suffix, and per shard its images, bytes and images per class) is written last: a set without one
did not finish.

Reading (:class:`ShardDataset`) uses the ``webdataset`` library (the ``shards`` extra, imported
only here): local paths and the URLs it opens (``pipe:``, ``http(s)://``, ``gs://`` ...). The
shard list is permuted by (seed, epoch), the same on every rank, and dealt round-robin to the
ranks, then each rank's to its DataLoader workers, so each shard is read by exactly one worker of
one rank per pass; a worker shuffles its samples in a buffer. Samples are what
:class:`~fastcolor.data.ColorizationDataset` gives (``L``, ``ab``, ``index``: the image's position
in its split), decoded from the bytes with :mod:`fastcolor.data.images`' reading rules.

Errors: a local shard that does not exist is refused before anything is read
(:class:`ShardError`, one line naming it). A shard that breaks while it is read (truncated, not a
tar, gone, a URL that fails) cannot stop a run that can go on: with ``on_damaged="skip"`` (the
default) the rest of it is skipped with one warning naming it, what was read of it and how many
shards were skipped so far in that worker; ``on_damaged="raise"`` raises :class:`ShardError`
instead. A shard that ends early without a tar error (cut at a member boundary) is found by
comparing what was read with the index's count. An image that does not decode is skipped with one
warning, the folder dataset's rule.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from fastcolor.data.folder import ImageItem, _verify, index_images, list_folder, split_items, split_source
from fastcolor.data.images import UnreadableImageError
from fastcolor.io import atomic_write_bytes, atomic_write_json

__all__ = ["SHARD_INDEX", "SHARDS_FORMAT", "SPLITS", "Shard", "ShardError", "write_shards", "read_shard_index",
           "resolve_shards", "is_shard_source", "ShardDataset", "sample_shards", "require_webdataset"]

#: The index written beside the shards.
SHARD_INDEX = "shards.json"
#: The index's ``format`` field.
SHARDS_FORMAT = "fastcolor-shards-1"
#: The shard sets a shard folder holds, one per split.
SPLITS = ("train", "val", "test")


class ShardError(OSError):
    """A shard that is missing or cannot be read; the message names it."""


def require_webdataset():
    """The ``webdataset`` module, or an ImportError naming the extra that installs it."""
    try:
        import webdataset
    except ImportError as exc:
        from fastcolor._extras import MissingExtraError

        raise MissingExtraError(f"reading shards needs the webdataset package ({exc}); install it with "
                                f"pip install 'fastcolor[shards]'") from None
    return webdataset


# ----------------------------------------------------------------------------- writing


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # no time stamp: the same data gives the same bytes
    return info, io.BytesIO(data)


def _shard_bytes(root: Path, items: Sequence[ImageItem], keys: Sequence[str], class_ids: dict[str, int],
                 skipped: list[str]) -> tuple[bytes, Counter]:
    """One tar of ``items`` (the files' own bytes); files that cannot be read, or whose bytes are no
    image PIL can open (header and ``verify``, no decode), go to ``skipped``."""
    buf, counts = io.BytesIO(), Counter()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for it, key in zip(items, keys, strict=True):
            try:
                data = (root / it.path).read_bytes()
            except OSError as exc:  # vanished or unreadable since it was listed
                skipped.append(f"{it.path} ({exc.strerror or exc})")
                continue
            why = _verify(root / it.path, data)
            if why is not None:
                skipped.append(f"{it.path} ({why})")
                continue
            ext = Path(it.path).suffix.lower().lstrip(".")
            meta = json.dumps({"path": it.path, "label": it.label}, sort_keys=True).encode()
            for name, content in ((f"{key}.{ext}", data), (f"{key}.cls", str(class_ids[it.label]).encode()),
                                  (f"{key}.json", meta)):
                tar.addfile(*_member(name, content))
            counts[it.label] += 1
    return buf.getvalue(), counts


def write_shards(data_dir: str | os.PathLike, out_dir: str | os.PathLike, images_per_shard: int = 1000, *,
                 seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 classes: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the images of ``data_dir`` as WebDataset tar shards in ``out_dir``; returns the index.

    Args:
        data_dir: a data folder (flat, or one subfolder per class), listed and split as the
            trainer does (no file opened); a file that is no readable image is left out of its
            shard when its bytes are read (header and ``verify``), with one warning for all, and
            listed in the index's ``skipped``.
        out_dir: a new or empty directory; gets ``<split>-NNNNNN.tar`` for each split and
            :data:`SHARD_INDEX`.
        images_per_shard: images per shard (the last of each split may hold fewer). The
            WebDataset authors suggest shards of 100 MB to a few GB; ImageNet's JPEGs average about
            110 KB, so 1000 per shard is about 110 MB. A shard is built in memory before it is
            written, so this also bounds the memory used.
        seed, fractions, classes: the split, as the trainer's (:func:`~fastcolor.data.split_items`).
        progress: a tqdm bar over the images.
    """
    if isinstance(images_per_shard, bool) or not isinstance(images_per_shard, int) or images_per_shard < 1:
        raise ValueError(f"images_per_shard must be a positive int, got {images_per_shard!r}")
    root, out = Path(data_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else f"a directory holding {sum(1 for _ in out.iterdir())} entries"
        raise ValueError(f"out_dir: expected a new or empty directory, got {str(out)!r}, {what}; choose another "
                         f"or empty it")
    # the trainer's split of this folder: of every image file listed (no file opened); a file that
    # is no readable image is left out of its shard when its bytes are read (one warning for all)
    listing = list_folder(root, classes)
    listed, items = listing.items, index_images(root, classes, verify=False, listing=listing)
    readable = set(items)
    split = split_items(items, seed, fractions)
    labels = sorted({it.label for it in items})
    class_ids = {label: i for i, label in enumerate(labels)}
    order = np.random.default_rng(seed).permutation(len(split["train"]))
    split["train"] = [split["train"][i] for i in order]  # mixed classes in every training shard
    index: dict[str, Any] = {
        "format": SHARDS_FORMAT, "classes": labels, "seed": seed, "images_per_shard": images_per_shard,
        "data_dir": str(root.resolve()),
        "source": split_source(listed, [it for it in listed if it not in readable], classes, fractions),
        "suffixes": dict(sorted(Counter(Path(it.path).suffix.lower().lstrip(".") for it in items).items())),
        "splits": {}}
    from tqdm.auto import tqdm

    skipped: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(items), desc="shards", unit="img", disable=not progress) as bar:
        for name in SPLITS:
            entries = []
            chunk_items = split[name]
            for s, start in enumerate(range(0, len(chunk_items), images_per_shard)):
                chunk = chunk_items[start:start + images_per_shard]
                keys = [f"{name}-{start + i:08d}" for i in range(len(chunk))]
                data, counts = _shard_bytes(root, chunk, keys, class_ids, skipped)
                shard = f"{name}-{s:06d}.tar"
                atomic_write_bytes(out / shard, data)
                entries.append({"name": shard, "images": sum(counts.values()), "bytes": len(data),
                                "classes": dict(sorted(counts.items()))})
                bar.update(len(chunk))
            index["splits"][name] = entries
    if skipped:
        warnings.warn(f"skipped {len(skipped)} image file(s) that could not be read while sharding: "
                      + "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else ""), stacklevel=2)
    index["skipped"] = skipped
    atomic_write_json(out / SHARD_INDEX, index)  # last: a set without an index did not finish
    return index


# ----------------------------------------------------------------------------- finding shards


@dataclass(frozen=True)
class Shard:
    """One shard: its path or URL and how many images the index says it holds."""

    url: str
    images: int


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> Path:
    parsed = urlparse(url)
    return Path(parsed.path if parsed.scheme == "file" else url)


def _parent(url: str) -> str:
    """The folder (local) or URL prefix (remote) of a shard."""
    return str(_local_path(url).parent) if _is_local(url) else url.rsplit("/", 1)[0]


def _join(base: str, name: str) -> str:
    return str(_local_path(base) / name) if _is_local(base) else f"{base.rstrip('/')}/{name}"


def read_shard_index(where: str | os.PathLike) -> dict[str, Any]:
    """The index of a shard set, checked: ``where`` is its folder, or the URL prefix of remote
    shards (the index is read from ``<prefix>/shards.json`` through webdataset's ``gopen``)."""
    where = str(where)
    path = _join(where, SHARD_INDEX) if not where.endswith(SHARD_INDEX) else where
    try:
        if _is_local(path):
            if not _local_path(path).is_file():
                raise ShardError(f"shards: no index {path!r}; expected the {SHARD_INDEX} that fastcolor shard writes "
                                 f"beside the shards")
            text = _local_path(path).read_text()
        else:
            with require_webdataset().gopen(path) as f:
                text = f.read().decode()
        index = json.loads(text)
        ok = (index.get("format") == SHARDS_FORMAT and isinstance(index.get("classes"), list)
              and all(isinstance(e.get("name"), str) and isinstance(e.get("images"), int)
                      for k in SPLITS for e in index["splits"][k]))
    except ShardError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ShardError(f"shards: cannot read the index {path!r} ({type(exc).__name__}: {exc})") from exc
    if not ok:
        raise ShardError(f"shards: {path!r} is not a fastcolor shard index (expected format {SHARDS_FORMAT!r}, got "
                         f"{index.get('format')!r})")
    return index


def is_shard_source(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names shards: a folder holding :data:`SHARD_INDEX`, a ``.tar`` path or URL,
    or a brace pattern of them (``out/train-{000000..000099}.tar``)."""
    s = str(spec)
    return Path(s, SHARD_INDEX).is_file() if Path(s).is_dir() else s.rstrip("}").endswith(".tar")


def resolve_shards(spec: str | os.PathLike, split: str = "train") -> tuple[list[Shard], dict[str, Any]]:
    """The ``split`` shards of the shard set ``spec`` names, and its index.

    ``spec`` is a shard folder, or a path, URL or brace pattern of ``.tar`` shards
    (``out/train-{000000..000099}.tar``, ``https://host/s/train-{000000..000099}.tar``) with the
    set's :data:`SHARD_INDEX` beside them: for ``split="train"`` its shards are the pattern's, for
    another split the index's shards of that split beside them; ``split="all"``: every shard of
    the set. A local shard that does not exist raises :class:`ShardError` naming it (a remote
    one fails when it is read).
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
    spec = str(spec)
    if Path(spec).is_dir():
        base, urls = spec, None
    else:
        require_webdataset()  # says which extra to install; braceexpand comes with it
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
        base = _parent(urls[0])
    index = read_shard_index(base)
    if urls is None or split != "train":
        urls = [_join(base, e["name"]) for k in (SPLITS if split == "all" else (split,)) for e in index["splits"][k]]
    known = {e["name"]: e["images"] for k in SPLITS for e in index["splits"][k]}
    unknown = [u for u in urls if u.rsplit("/", 1)[-1] not in known]
    if unknown:
        raise ShardError(f"shards: {unknown[0]!r} is not in the index {_join(base, SHARD_INDEX)!r}"
                         + (f" (nor are {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    if not urls:
        raise ShardError(f"shards: {spec!r} holds no {split} shard")
    missing = [u for u in urls if _is_local(u) and not _local_path(u).is_file()]
    if missing:
        raise ShardError(f"shards: missing shard {missing[0]!r}"
                         + (f" and {len(missing) - 1} more of {len(urls)}" if len(missing) > 1 else ""))
    return [Shard(u, known[u.rsplit("/", 1)[-1]]) for u in urls], index


def sample_shards(shards: Sequence[Shard], n: int, seed: int = 0) -> list[tuple[Shard, int]]:
    """A few shards drawn at random (seeded) holding ``n`` images in all (all shards if they
    hold fewer), each with how many of its images to take: the last one drawn gives only what
    is still missing. Training shards are shuffled when written, so a few whole shards are a
    random sample of the training images (for the class prior, ``--prior sample:N``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    picked, left = [], n
    for i in np.random.default_rng(seed).permutation(len(shards)):
        if left <= 0:
            break
        take = min(shards[i].images, left)
        if take:
            picked.append((shards[i], take))
            left -= take
    return picked


# ----------------------------------------------------------------------------- reading


class ShardDataset(IterableDataset):
    """The samples of tar shards, split by rank then by DataLoader worker, shuffled in a buffer.

    Samples are :class:`~fastcolor.data.ColorizationDataset`'s (the same ``size``,
    ``target_stride``, ``augment``, ``target_reduction`` and ``output``), with ``index`` the
    image's position in its split; each image is decoded from its bytes by
    :func:`~fastcolor.data.images.load_square` (the folder's reading rules).

    Args:
        shards: the shards (:func:`resolve_shards`), or (shard, images to take from it) pairs
            (:func:`sample_shards`).
        rank, world: this process's rank and the number of ranks (the trainer's; tests pass them).
        seed: the shard order and the shuffle buffers derive from (seed, epoch, pass).
        shuffle: permute the shards each epoch (the same permutation on every rank, so each
            shard goes to one rank) and shuffle each worker's samples in a buffer of
            ``shuffle_buffer`` images; False: in order, for validation and the prior.
        repeat: a worker that has read its shards goes on with its shards of the next pass (a
            new permutation): an endless stream, for a trainer that takes the same number of
            batches per epoch on every rank.
        on_damaged: a shard that breaks while read: ``"skip"`` the rest of it with a warning
            (counted), or ``"raise"`` :class:`ShardError`.
        report_skips: an image that does not decode is skipped and ``"warn"``-ed (once per
            process), or reported in the next sample's ``skipped`` (``"sample"``: ``"name\treason"``
            lines, ``""`` for none; every sample has the key), for the main process to warn once
            per run as :class:`~fastcolor.data.ColorizationDataset` does.
    """

    def __init__(self, shards: Sequence[Shard | tuple[Shard, int]], size: int = 128, target_stride: int = 4,
                 augment: bool | Any = False, target_reduction: str = "subsample", output: str = "lab", *,
                 rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 repeat: bool = False, on_damaged: str = "skip", report_skips: str = "warn"):
        from fastcolor.data.dataset import OUTPUTS
        from fastcolor.data.transforms import TARGET_REDUCTIONS, augmentation

        if on_damaged not in ("skip", "raise"):
            raise ValueError(f"on_damaged must be 'skip' or 'raise', got {on_damaged!r}")
        if report_skips not in ("warn", "sample"):
            raise ValueError(f"report_skips must be 'warn' or 'sample', got {report_skips!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if target_reduction not in TARGET_REDUCTIONS:
            raise ValueError(f"target_reduction must be one of {TARGET_REDUCTIONS}, got {target_reduction!r}")
        if not isinstance(size, int) or size < 1 or not isinstance(target_stride, int) or size % target_stride:
            raise ValueError(f"size and target_stride must be positive ints, target_stride dividing size, got "
                             f"{size!r} and {target_stride!r}")
        if isinstance(world, bool) or not isinstance(world, int) or world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank, world: expected 0 <= rank < world, got rank={rank!r}, world={world!r}")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be a positive int, got {shuffle_buffer!r}")
        if not shards:
            raise ValueError("shards must hold at least one shard, got none")
        self.shards = [s if isinstance(s, tuple) else (s, s.images) for s in shards]
        if repeat and len(self.shards) < world:  # a rank without a shard would have no batch to train on
            raise ValueError(f"shards: {len(self.shards)} shard(s) for {world} ranks; every rank needs at least one "
                             f"(write smaller shards: fastcolor shard --images-per-shard)")
        self.size, self.target_stride, self.target_reduction = size, target_stride, target_reduction
        self.output = output
        self.transform = augmentation() if augment is True else (augment or None)
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle, self.shuffle_buffer, self.repeat, self.on_damaged = shuffle, shuffle_buffer, repeat, on_damaged
        self.report_skips = report_skips
        self.epoch, self.skip_batches, self.batch_size = 0, 0, 1
        self.max_retries = 20  #: unreadable images in a row before a worker gives up (the folder dataset's rule)
        self.damaged: list[str] = []  #: the damaged shards this process skipped (each worker counts its own)
        self._reported: set[str] = set()

    @property
    def images(self) -> int:
        """Images in all the shards, as the index counts them (what one pass reads, all ranks together)."""
        return sum(take for _, take in self.shards)

    def __len__(self) -> int:
        """Images this rank reads in one pass (the DataLoader's length; endless with ``repeat``)."""
        return self.rank_images()

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 1) -> None:
        """The epoch whose shard order and shuffle the next iteration uses (set before making a
        DataLoader), and how many of its batches of ``batch_size`` a resumed run already trained
        on: they are passed over without decoding (each worker its share of them, as the
        DataLoader takes batches from its workers in turn)."""
        self.epoch, self.skip_batches, self.batch_size = epoch, skip_batches, batch_size

    def assigned(self, rank: int, worker: int = 0, workers: int = 1, step: int = 0) -> list[tuple[Shard, int]]:
        """The shards that ``worker`` (of ``workers``) of ``rank`` reads in pass ``step`` of this
        epoch: the list permuted by (seed, epoch, pass) when shuffling, dealt round-robin to the
        ranks, then each rank's to its workers."""
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, step]).permutation(order)
        return [self.shards[i] for i in order[rank::self.world][worker::workers]]

    def rank_images(self, rank: int | None = None) -> int:
        """Images that ``rank`` (default: this one) reads in one pass of this epoch."""
        return sum(take for _, take in self.assigned(self.rank if rank is None else rank))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wds = require_webdataset()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        active = min(workers, len(self.assigned(self.rank)))  # workers with a shard (the others stop at once)
        if worker >= active:
            return
        # The DataLoader takes batch i from worker i % active. After k skipped batches, worker w
        # plays the part worker (w + k) % active had in the whole epoch, past its share of the k.
        part = (worker + self.skip_batches) % active
        skip = len(range(part, self.skip_batches, active)) * self.batch_size
        bad, last, skipped = 0, "", []
        for group in itertools.islice(self._groups(wds, part, workers), skip, None):
            sample, why = self._sample(group)
            if sample is not None:
                if self.report_skips == "sample":  # the images skipped since the last sample
                    sample["skipped"], skipped = "\n".join(skipped), []
                bad = 0
                yield sample
                continue
            name, _, last = why.partition("\t")
            if self.report_skips == "sample":
                skipped.append(why)
            elif name not in self._reported:
                self._reported.add(name)
                warnings.warn(f"skipping unreadable image {name!r} ({last})", stacklevel=2)
            bad += 1
            if bad >= self.max_retries:
                raise UnreadableImageError(f"shards: none of {bad} image(s) in a row of rank {self.rank}, worker "
                                           f"{worker} could be read (the last: {last}); expected readable images")

    def _groups(self, wds, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """This worker's images (their tar members, undecoded) of one pass, or of pass after pass
        with ``repeat``, through the shuffle buffer."""
        for step in itertools.count() if self.repeat else range(1):
            mine = self.assigned(self.rank, worker, workers, step)
            if not mine:  # more workers than this rank has shards: this one idles (every pass alike)
                return
            stream = self._read(wds, mine)
            if self.shuffle:
                rng = random.Random(int(np.random.default_rng([self.seed, self.epoch, step, self.rank, worker])
                                        .integers(2**62)))
                stream = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(stream)
            got = 0
            for group in stream:
                got += 1
                yield group
            if got == 0:
                raise ShardError(f"shards: none of the {len(mine)} shard(s) of rank {self.rank}, worker {worker} gave "
                                 f"an image (the first: {mine[0][0].url}; damaged: "
                                 f"{'; '.join(self.damaged[-3:]) or 'none'})")

    def _read(self, wds, shards: Sequence[tuple[Shard, int]]) -> Iterator[dict[str, Any]]:
        """The samples of ``shards`` in order. A shard whose tar breaks, or that ends before the
        index's count, is damaged: the rest of it is skipped (or :class:`ShardError`)."""
        for shard, take in shards:
            failures: list[str] = []

            def stop(exc: BaseException, failures=failures) -> bool:
                failures.append(_reason(exc))
                return False  # what follows a tar error cannot be trusted: leave the shard

            opened = list(wds.tariterators.url_opener([{"url": shard.url}], handler=stop))  # [] if it fails
            got = 0
            try:
                for group in _group(wds.tariterators.tar_file_expander(opened, handler=stop, eof_value=None)):
                    if got == take:
                        break
                    got += 1
                    group["__url__"] = shard.url
                    yield group
            finally:
                for source in opened:
                    try:
                        source["stream"].close()
                    except OSError as exc:  # a pipe (curl, ...) that failed says so when closed
                        failures.append(_reason(exc))
            if failures or got < take:
                reason = "; ".join(dict.fromkeys(failures)) or f"it ends after {got} image(s)"
                self._damaged(shard, reason, got, take)

    def _damaged(self, shard: Shard, reason: str, got: int, take: int) -> None:
        what = f"{shard.url} ({reason}; {got} of the {take} image(s) wanted from it were read)"
        if self.on_damaged == "raise":
            raise ShardError(f"shards: damaged shard {what}")
        self.damaged.append(what)
        warnings.warn(f"skipping the rest of damaged shard {what}; {len(self.damaged)} damaged shard(s) skipped so "
                      f"far by rank {self.rank} (this worker)", stacklevel=3)

    def _sample(self, group: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """(the sample of one image's members, "") or (None, "<name>\t<why>") if its members are
        not an image and a class, or its bytes do not decode. Only decoding is judged here: a
        transform that fails is a mistake of the caller's, raised."""
        from fastcolor.data.dataset import _square_sample
        from fastcolor.data.images import load_square

        key = group["__key__"]
        image = [k for k in group if k not in ("__key__", "__url__", "cls", "json")]
        name = f"{group['__url__']}/{key}.{image[0] if image else 'jpg'}"
        index = int(key.rsplit("-", 1)[-1])
        try:
            if len(image) != 1 or "cls" not in group:
                got = sorted(k for k in group if not k.startswith("__"))
                raise ValueError(f"expected an image and a .cls member, got {got}")
            data = group[image[0]]
            if self.output == "bytes":
                return {"data": torch.frombuffer(bytearray(data), dtype=torch.uint8), "path": name, "index": index}, ""
            x = load_square(name, self.size, data=data)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            return None, f"{name}\t{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        return _square_sample(self, x, index), ""


def _reason(exc: BaseException) -> str:
    """Why reading a shard failed, in one short line (webdataset appends the stream and URL to
    the arguments, and its pipes report their whole command)."""
    text = str(exc.args[0]) if exc.args else ""
    pipe = re.search(r"\(\[['\"]([^'\"]+)['\"].*: exit (\d+) \(read\)", text)
    if pipe:
        return f"{pipe.group(1)} exited with status {pipe.group(2)}"
    return f"{type(exc).__name__}: {text.split(' @ <')[0]}" if text else type(exc).__name__


def _group(members: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Consecutive tar members of one key (``<key>.<ext>``) -> {"__key__": key, ext: bytes, ...}."""
    current: dict[str, Any] | None = None
    for m in members:
        key, _, ext = m["fname"].rpartition("/")[2].partition(".")
        if current is not None and key != current["__key__"]:
            yield current
            current = None
        if current is None:
            current = {"__key__": key}
        current[ext.lower()] = m["data"]
    if current is not None:
        yield current
