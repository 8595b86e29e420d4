"""Crash-safe file writing and pickle-free checkpoints.

Every write goes to a temporary file in the destination's directory, is flushed and
fsync'ed, moved over the destination with :func:`os.replace` (atomic on POSIX and
Windows), and the directory is fsync'ed, so a kill at any moment leaves either the old
file or the new one, never a torn one.

Checkpoints are single safetensors files: tensors under ``model.`` / ``optim.`` prefixes,
everything else (model config, optimizer hyper-parameters, training state) as JSON in the
safetensors metadata. Loading never unpickles. Rebuilding a model from such a file is
:mod:`fastcolor.models.serialization`; this module knows nothing of the models (from fastcolor
it only borrows, when a weights file is opened, :mod:`fastcolor.data.images`' opener that refuses
anything but a regular file before reading it).

A write that runs out of space raises :class:`DiskFullError` (an ``OSError`` with errno
ENOSPC or EDQUOT) naming the file, the bytes it needed and the bytes free. A directory is owned
by one process at a time with :func:`lock_directory` (an OS file lock, ``fcntl.flock``, that the
kernel releases on any exit, ``kill -9`` included).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save

__all__ = [
    "DiskFullError", "DirectoryLockedError", "lock_directory", "check_unlocked", "LOCK_FILE", "temp_prefix",
    "file_kind", "open_regular",
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "append_jsonl",
    "save_tensors", "load_tensors", "flatten_optimizer_state", "unflatten_optimizer_state",
    "save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "tensor_shapes", "load_state_file",
    "open_weights_file", "weights_format", "MAX_SAFETENSORS_HEADER", "check_weight_values", "MAX_WEIGHT_MAGNITUDE",
    "check_torch_zip", "MAX_ZIP_EXPANSION", "ZIP_SLACK",
]


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's current umask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


class DiskFullError(OSError):
    """A write that found no space left (ENOSPC) or no quota left (EDQUOT): the message names the
    file, about how many bytes it needed and how many are free on its file system."""

    def __str__(self) -> str:
        return str(self.strerror)


def _disk_full(exc: OSError, path: Path, needed: int) -> DiskFullError:
    try:
        free = f"{_size(shutil.disk_usage(path.parent).free)} is free there"
    except OSError:
        free = "the free space there is unknown"
    why = "No space left on device" if exc.errno == errno.ENOSPC else "Disk quota exceeded"
    return DiskFullError(exc.errno, f"{why} writing {path}: it needs about {_size(needed)} and {free}; "
                                    f"free some space (or write elsewhere) and try again", str(path))


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def temp_prefix(path: str | os.PathLike) -> str:
    """The name prefix of a temporary file beside ``path``: a dot and at most the first 32
    characters of its name (at most 129 bytes in UTF-8), so that the temporary name stays under
    NAME_MAX (255 bytes) however long the final name is, and a leftover still says whose it was.

    Example:
        >>> temp_prefix("out/" + "x" * 250 + ".png")
        '.xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx.'
    """
    return f".{Path(path).name[:32]}."


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, os.replace, fsync dir).

    The file gets the mode of any new file (0o666 less the umask), not mkstemp's private 0o600.
    Running out of space raises :class:`DiskFullError` (the previous file, if any, is intact).

    Example::

        atomic_write_bytes("out/model.onnx", proto.SerializeToString())   # -> Path("out/model.onnx")
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno in _FULL:
            raise _disk_full(exc, path, len(data)) from exc
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, DiskFullError) and exc.errno in _FULL:
            raise _disk_full(exc, path, len(data)) from exc
        raise
    _fsync_dir(path.parent)
    return path


# ----------------------------------------------------------------------------- directory locks

#: The lock file :func:`lock_directory` keeps in a locked directory (it holds the owner's pid).
LOCK_FILE = ".fastcolor.lock"


class DirectoryLockedError(RuntimeError):
    """Another process holds the lock of ``directory`` (its pid is ``pid``, None if unknown)."""

    def __init__(self, directory: Path, pid: int | None, what: str):
        self.directory, self.pid = directory, pid
        owner = f"pid {pid}" if pid is not None else "a process whose pid is not known"
        super().__init__(f"{directory} is in use by another {what} ({owner}); wait for it to finish, "
                         f"stop it, or use another directory")


def _lock_owner(path: Path) -> int | None:
    for _ in range(20):  # the owner writes its pid right after taking the lock
        try:
            text = path.read_text().strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


def check_unlocked(directory: str | os.PathLike, what: str = "fastcolor process") -> None:
    """Raise :class:`DirectoryLockedError` if another process holds the lock of ``directory``;
    writes nothing (no lock file, no directory is created). For refusing early, before the
    real lock is taken with :func:`lock_directory`.

    Example::

        check_unlocked("runs/zhang", what="training run")   # raises if a training owns runs/zhang
    """
    directory = Path(directory)
    path = directory / LOCK_FILE
    try:
        import fcntl
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except (ImportError, OSError):  # no lock file (or no locks here): nobody holds it
        return
    try:
        _flock_or_refuse(fd, fcntl.LOCK_SH, directory, path, what)
    finally:
        os.close(fd)


def _flock_or_refuse(fd: int, mode: int, directory: Path, path: Path, what: str) -> None:
    """Take ``mode`` (shared or exclusive) on ``fd`` without waiting, or raise
    :class:`DirectoryLockedError` naming the owner recorded in ``path``."""
    import fcntl

    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise DirectoryLockedError(directory, _lock_owner(path), what) from None


@contextlib.contextmanager
def lock_directory(directory: str | os.PathLike, what: str = "fastcolor process") -> Iterator[Path]:
    """Own ``directory`` (created if missing) for the duration of the block: an exclusive
    ``fcntl.flock`` on ``directory/.fastcolor.lock``, which records the owner's pid.

    Raises :class:`DirectoryLockedError` at once if another process (or another open of the
    lock in this one) holds it. The kernel drops the lock when the owner exits in any way,
    ``kill -9`` included, so a lock is never stale. Where ``fcntl`` does not exist (Windows),
    nothing is locked.

    Example::

        with lock_directory("runs/zhang", what="training run"):   # a second process refuses here
            ...                                                     # write checkpoints
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks on this platform
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666 & ~umask())
    try:
        _flock_or_refuse(fd, fcntl.LOCK_EX, directory, path, what)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_write_bytes`.

    Example::

        atomic_write_text("demo_out/metrics.md", "| metric | value |\\n")
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON with sorted keys (and a final newline) to ``path`` atomically.

    Example::

        atomic_write_json("runs/zhang/split.json", {"train": [...], "val": [...], "test": [...]})
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Rewrite ``path`` atomically as JSON lines of ``rows`` (the whole log, so resume never duplicates lines).

    Example::

        rows.append({"epoch": 3, "train_loss": 2.41})
        append_jsonl("runs/zhang/metrics.jsonl", rows)   # the file holds all rows, one JSON object a line
    """
    return atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> Path:
    """Atomically save tensors as safetensors; ``metadata`` values are stored JSON-encoded.

    Example::

        save_tensors("prior.safetensors", {"prior": prior}, {"lam": 0.5})   # prior: a (313,) tensor
        tensors, meta = load_tensors("prior.safetensors")                  # meta == {"lam": 0.5}
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


#: The longest safetensors header the safetensors library reads (its own limit, 100 MB): a
#: longer announced length is not a safetensors header.
MAX_SAFETENSORS_HEADER = 100_000_000


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    """What ``st_mode`` says a path is, in words ("a FIFO (named pipe)", ...), for messages.

    Example:
        >>> import os
        >>> file_kind(os.stat("/").st_mode), file_kind(os.stat("/dev/null").st_mode)
        ('a directory', 'a character device')
    """
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike, what: str = "here", error: type[OSError] = OSError):
    """A binary file object for ``path``, refusing anything but a regular file *before* reading
    from it: opening a FIFO for reading waits for a writer (forever), a device never ends. The
    file is opened non-blocking and checked with ``fstat``, so what is checked is what is read.
    ``what`` ends the refusal ("only regular files are read <what>"); a refusal raises ``error``
    (an ``OSError`` subclass: :class:`fastcolor.data.UnreadableImageError` for images), a missing
    file ``FileNotFoundError``.

    Example:
        >>> with open_regular(__file__) as f:        # a regular file: opened
        ...     f.readable()
        True
        >>> open_regular("/dev/null", "as weights files")
        Traceback (most recent call last):
        OSError: /dev/null: a character device, not a regular file; only regular files are read as weights files
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(f"{path}: a symbolic link to {os.readlink(path)!r}, which does not exist; "
                        f"fix or remove the link") from None
        raise
    except OSError as e:  # permission denied, a loop of symbolic links, ...
        raise error(f"{path}: cannot be opened ({e.strerror or e})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: {file_kind(st.st_mode)}, not a regular file; only regular files "
                        f"are read {what}")
        if st.st_size == 0:
            raise error(f"{path}: empty file (0 bytes)")
        return open(path, "rb", opener=lambda _p, _f: fd)  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(fd)
        raise


class _RefusedFile(OSError):
    """:func:`open_regular`'s refusal of a weights file, turned into a ``ValueError`` by :func:`open_weights_file`."""


def open_weights_file(path: str | os.PathLike):
    """``path`` opened for binary reading, refusing before any byte is read anything but a regular,
    non-empty file: ``FileNotFoundError`` if nothing is there, ``ValueError`` naming the file and
    what it is otherwise (a FIFO, which would wait for a writer forever; ``/dev/zero``, which never
    ends; ``/dev/null``; a directory; a loop of symbolic links or a dangling one; unreadable).

    Example::

        with open_weights_file("model.safetensors") as f:   # os.mkfifo'd name: ValueError, no hang
            head = f.read(8)
    """
    try:
        return open_regular(path, "as weights files", _RefusedFile)
    except FileNotFoundError:
        raise FileNotFoundError(f"path: no such weights file: {path}") from None
    except _RefusedFile as exc:
        raise ValueError(f"path: cannot read {exc}") from None


def weights_format(path: str | os.PathLike) -> str:
    """What a weights file is, judged by what it holds: "safetensors" (an 8-byte little-endian
    length, then a JSON object of that length that parses), "zip" (``torch.save``'s format),
    "pickle" (a legacy ``torch.save`` file or a raw pickle stream: protocol 2-5 or a protocol
    0/1 opcode), "safetensors" again for a file that opens like one whose header does not fit
    (damaged: its loader says how), else "unknown". The safetensors test comes first: a header
    length's low byte may be any byte, 0x80 (a pickle's first byte) or "PK" included. Raises as
    :func:`open_weights_file` does for anything but a regular file, before reading it.

    Example::

        weights_format("colorization_release_v2-9b330a0b.pth")   # "zip"
        weights_format("runs/zhang/model.safetensors")           # "safetensors"
    """
    with open_weights_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{":
            n = int.from_bytes(head[:8], "little")
            if 2 <= n <= min(size - 8, MAX_SAFETENSORS_HEADER):
                try:
                    header = json.loads(head[8:] + f.read(n - 1))
                except (ValueError, UnicodeDecodeError):
                    header = None
                if isinstance(header, dict):
                    return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"  # torch.save's format: a pickle inside a zip
    if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:1] in (b"(", b"}", b"]"):
        return "pickle"
    if head[8:9] == b"{":
        return "safetensors"  # opens like one: truncated or damaged, as safetensors' own error will say
    return "unknown"


def _not_safetensors(path: Path, exc: BaseException) -> ValueError:
    try:
        kind = weights_format(path)
    except (OSError, ValueError):
        kind = "unknown"
    if kind in ("zip", "pickle"):
        why = ("it is a pickle (torch.save) file; fastcolor never unpickles model files (unpickling runs "
               "arbitrary code): save the weights as safetensors")
    else:
        why = f"not a valid safetensors file, or truncated ({exc})"
    return ValueError(f"path: cannot read {path}: {why}")


def _open_safetensors(path: Path, device: str | torch.device = "cpu"):
    """safe_open with errors that name the file and say what is wrong with it."""
    open_weights_file(path).close()  # nothing but a regular, non-empty file: a FIFO would hang safe_open
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except Exception as exc:  # SafetensorError, OSError, ...: a damaged or foreign file
        raise _not_safetensors(path, exc) from exc


def _decode_metadata(path: Path, meta: dict[str, str] | None) -> dict[str, Any]:
    out = {}
    for k, v in (meta or {}).items():
        try:
            out[k] = json.loads(v)
        except ValueError:  # another tool's safetensors file: plain-string metadata
            raise ValueError(f"path: {path} is not a fastcolor file (its metadata {k!r} = {v[:40]!r} is not "
                             f"JSON-encoded)") from None
    return out


def load_tensors(path: str | os.PathLike,
                 device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file: (tensors, JSON-decoded metadata). A damaged, truncated or
    non-safetensors file raises ValueError naming it.

    Example::

        tensors, meta = load_tensors("runs/zhang/model.safetensors")   # meta["model_config"]: the model's config
    """
    path = Path(path)
    with _open_safetensors(path, device) as f:
        meta = f.metadata() or {}
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - data that does not match the header
            raise _not_safetensors(path, exc) from exc
    return tensors, _decode_metadata(path, meta)


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors keyed ``state.<param>.<name>``, JSON-able rest).

    Example::

        tensors, rest = flatten_optimizer_state(opt.state_dict())   # e.g. "state.0.exp_avg" for Adam
        opt.load_state_dict(unflatten_optimizer_state(tensors, rest))
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state_dict["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict:
    """The inverse of :func:`flatten_optimizer_state`: an ``optimizer.state_dict()`` again.

    Example::

        opt.load_state_dict(unflatten_optimizer_state(*flatten_optimizer_state(opt.state_dict())))
    """
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, st in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(path: str | os.PathLike, model_state: dict[str, torch.Tensor], model_config: dict,
                    optimizer: torch.optim.Optimizer | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None, **meta: Any) -> Path:
    """One atomic safetensors file holding the model, the optimizer and JSON training state ``meta``.

    Example::

        save_checkpoint("runs/zhang/last.safetensors", model.state_dict(), model.config, opt, epoch=3)
        ckpt = load_checkpoint("runs/zhang/last.safetensors")   # ckpt["meta"] == {"epoch": 3}
    """
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    metadata: dict[str, Any] = {"format": "fastcolor-checkpoint-1", "model_config": model_config, "meta": meta}
    if optimizer is not None:
        opt_tensors, opt_rest = flatten_optimizer_state(optimizer.state_dict())
        tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
        metadata["optimizer"] = opt_rest
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v
    return save_tensors(path, tensors, metadata)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Inverse of :func:`save_checkpoint`: dict with ``model_state``, ``model_config``, ``optimizer_state``
    (``None`` if absent), ``extra`` tensors and ``meta``.

    Example::

        ckpt = load_checkpoint("runs/zhang/last.safetensors")
        model.load_state_dict(ckpt["model_state"])
        opt.load_state_dict(ckpt["optimizer_state"])
    """
    tensors, metadata = load_tensors(path, device)
    if metadata.get("format") != "fastcolor-checkpoint-1":
        raise ValueError(f"path: expected a fastcolor checkpoint, got a safetensors file with metadata "
                         f"keys {sorted(metadata)} ({path})")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}, "extra": {}}
    for k, v in tensors.items():
        prefix, _, rest = k.partition(".")
        if prefix not in groups or not rest:
            raise ValueError(f"path: damaged checkpoint {path}: unexpected tensor {k!r} (expected model.*, "
                             f"optim.* or extra.*)")
        groups[prefix][rest] = v
    opt, config, meta = metadata.get("optimizer"), metadata.get("model_config"), metadata.get("meta", {})
    if not isinstance(config, dict) or not isinstance(meta, dict):
        raise ValueError(f"path: damaged checkpoint {path}: expected JSON objects for model_config and meta, "
                         f"got {type(config).__name__} and {type(meta).__name__}")
    try:
        opt_state = unflatten_optimizer_state(groups["optim"], opt) if opt is not None else None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"path: damaged checkpoint {path}: its optimizer state does not parse ({exc!r})") from exc
    return {
        "model_state": groups["model"],
        "model_config": config,
        "optimizer_state": opt_state,
        "extra": groups["extra"],
        "meta": meta,
    }


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint/model file without reading its tensors.

    Example::

        read_checkpoint_meta("runs/zhang/model.safetensors")["model_config"]["arch"]   # "zhang"
    """
    path = Path(path)
    with _open_safetensors(path) as f:
        return _decode_metadata(path, f.metadata())


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a safetensors file, from its header (no tensor is read).

    Example::

        tensor_shapes("runs/zhang/model.safetensors")["classifier.weight"]   # (313, 256, 1, 1)
    """
    path = Path(path)
    with _open_safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


#: The largest magnitude a model file's float tensor may hold. Trained weights and BatchNorm
#: statistics are many orders smaller; past it a float32 forward pass overflows within a few
#: layers (a weight scaled by 1e30 gives Inf/NaN colours), so the file is refused as broken.
MAX_WEIGHT_MAGNITUDE = 1e10


def check_weight_values(tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse (``ValueError`` naming ``source`` and each bad tensor, up to three) a model's weights
    that cannot give finite colours: NaN or Inf values, magnitudes past :data:`MAX_WEIGHT_MAGNITUDE`,
    or a negative BatchNorm ``running_var`` (its square root is NaN). Integer tensors (counters)
    are not judged. A file with such weights would load silently and colorize black.

    Example:
        >>> import torch
        >>> check_weight_values({"conv.weight": torch.ones(3)}, "m.safetensors")   # fine: None
        >>> check_weight_values({"bn.running_var": torch.tensor([1.0, -2.0])}, "m.safetensors")
        Traceback (most recent call last):
        ...
        ValueError: path: m.safetensors holds broken weights: bn.running_var has 1 negative variance(s) of 2
    """
    problems = []
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        finite = torch.isfinite(t)
        bad = t.numel() - int(finite.sum())
        if bad:
            problems.append(f"{name} has {bad} NaN/Inf value(s) of {t.numel()}")
            continue
        top = float(t.detach().abs().max())
        if top > MAX_WEIGHT_MAGNITUDE:
            problems.append(f"{name} has values up to {top:.3g} in magnitude, past {MAX_WEIGHT_MAGNITUDE:g}")
        elif name.endswith("running_var") and bool((t < 0).any()):
            problems.append(f"{name} has {int((t < 0).sum())} negative variance(s) of {t.numel()}")
    if problems:
        more = f" (and {len(problems) - 3} more tensors)" if len(problems) > 3 else ""
        raise ValueError(f"path: {source} holds broken weights: {'; '.join(problems[:3])}{more}")


def _load_failure_cause(exc: BaseException) -> str:
    """The line of a torch.load error that says what was refused (torch's message opens with
    advice to retry with weights_only=False, which is exactly what must not be done)."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(exc).__name__]
    rest = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation",
                                                      "Please file an issue"))]
    return next((ln for ln in rest if "global" in ln.lower()), rest[0] if rest else lines[0])


#: How far a torch file's zip entries may expand: together they may declare at most this many
#: times the file's own size (plus :data:`ZIP_SLACK`). ``torch.save`` stores its entries
#: uncompressed (1x) and weights hardly compress (float noise); a zip bomb's entries expand
#: a thousandfold (a 4 MB file declaring 4.8 GB).
MAX_ZIP_EXPANSION = 10
#: Bytes of expansion allowed besides :data:`MAX_ZIP_EXPANSION` (small files' few small entries).
ZIP_SLACK = 1 << 20


def check_torch_zip(path: str | os.PathLike) -> None:
    """Judge a ``torch.save`` zip file from its central directory, before any entry is read or
    decompressed: every entry under one folder that holds ``data.pkl`` (torch's layout), and the
    entries' declared sizes summing to at most :data:`MAX_ZIP_EXPANSION` x the file's size +
    :data:`ZIP_SLACK` (torch allocates each entry at its declared size: a zip bomb would take
    gigabytes and seconds before being refused). ``ValueError`` naming the file otherwise.

    Example::

        check_torch_zip("colorization_release_v2-9b330a0b.pth")   # None: entries stored, 1x
    """
    path = Path(path)
    with open_weights_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            infos = zipfile.ZipFile(f).infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
            raise ValueError(f"path: cannot read {path}: a damaged zip archive ({exc})") from None
    tops = {info.filename.split("/", 1)[0] for info in infos}
    top = next(iter(tops)) if len(tops) == 1 else None
    if top is None or not any(info.filename == f"{top}/data.pkl" for info in infos):
        names = [info.filename for info in infos[:3]]
        raise ValueError(f"path: {path} is a zip archive but not a torch.save file (expected every entry under one "
                         f"folder holding data.pkl; got {len(infos)} entries, e.g. {names})")
    declared = sum(info.file_size for info in infos)
    if declared > MAX_ZIP_EXPANSION * size + ZIP_SLACK:
        biggest = max(infos, key=lambda info: info.file_size)
        raise ValueError(f"path: refused {path}: its zip entries declare {_size(declared)} from a {_size(size)} file "
                         f"(e.g. {biggest.filename}: {_size(biggest.file_size)} from {_size(biggest.compress_size)}), "
                         f"more than {MAX_ZIP_EXPANSION}x its size + {_size(ZIP_SLACK)}: a zip bomb, not weights "
                         f"(torch.save stores entries uncompressed); nothing of it was decompressed")


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.safetensors`` or a torch file loaded with ``weights_only=True``
    (never unpickles code). A torch zip file is first judged from its directory
    (:func:`check_torch_zip`: at most :data:`MAX_ZIP_EXPANSION` x its size once decompressed).

    Example::

        backbone.load_state_dict(load_state_file("resnet50-0676ba61.pth"))
    """
    path = Path(path)
    kind = weights_format(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - SafetensorError etc.
            raise _not_safetensors(path, exc) from exc
    if kind == "zip":
        check_torch_zip(path)  # from its directory, before torch decompresses anything
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, zip errors...
        first = _load_failure_cause(exc)
        raise ValueError(f"path: refused to load {path}: not a plain state dict of tensors that "
                         f"torch.load(weights_only=True) accepts (nothing in it was executed; fastcolor never "
                         f"unpickles code): {type(exc).__name__}: {first[:200]}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"path: expected a state dict (names -> tensors) in {path}, got {type(obj).__name__}")
    return obj
