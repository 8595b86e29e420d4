"""Record every place where code reads a tensor's value on the host (a device sync on a GPU).

``record_host_reads()`` is a context manager that yields a list; every call made inside it that
reads a tensor's value into Python (or needs a value to know an output's size) appends one
entry, the op's name::

    with record_host_reads() as reads:
        loss = rebalanced_cross_entropy(logits, ab)
        loss.backward()
    assert reads == [], reads.sites

On a GPU each of these calls stalls the CPU until the device has drained its queue, so nothing is
queued behind it; on the CPU the same calls are cheap but are seen all the same, which is what
lets a CPU test prove a GPU path free of syncs.

What is recorded, and how:

* a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op below autograd:
  ``aten._local_scalar_dense`` (``t.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``t[i]`` used
  as an index, ...), ``aten.item``, ``aten.is_nonzero``, ``aten.equal``, ``aten.allclose``; the
  ops whose output size depends on the values (``aten.nonzero``, ``aten.masked_select``, the
  ``unique`` family, ``aten.bincount``, ``aten.repeat_interleave`` without ``output_size``,
  indexing with a boolean mask), which a GPU must finish before the host can size the output;
  and copies from a non-CPU tensor to the CPU (``t.cpu()``, ``t.to("cpu")``, ``t.numpy()``
  after them), which only a GPU run can show;
* a :class:`~torch.overrides.TorchFunctionMode` sees ``Tensor.tolist``, which reads a CPU
  tensor's memory without calling an aten op;
* host-to-device copies of pageable memory (issue 21.5): not a read, but on a GPU a copy that
  waits for the host and that a CUDA graph capture forbids. A copy from an unpinned CPU tensor
  to another device is recorded as ``"pageable host-to-device copy"``; and, since a CPU-only run
  has no other device to copy to, so is every tensor the library makes from host data
  (``torch.tensor(...)``, ``torch.as_tensor(array)``: ``aten.lift_fresh``), which on a GPU route is
  exactly such a copy. Only copies made by the library itself count (the innermost caller outside
  torch is under ``fastcolor/``), not a test building its inputs.

A custom op (any namespace but aten/prims, e.g. ``fastcolor::ce_forward``) is opaque to a plain
dispatch mode, which would record the op and miss the host reads of its Python implementation.
Here such an op is recorded by nothing and redispatched to its kernel for the tensors' device
with the mode still active, so the reads inside its implementation are seen too.

Not seen: ``Tensor.numpy()`` on a CPU tensor (a zero-copy view that CPU backends hand to their
kernels; on a GPU tensor it raises, after a ``.cpu()`` that is recorded), and a host read made
by an op's C++/CUDA kernel itself below the dispatcher (``torch.cuda.set_sync_debug_mode`` is
the check for those on a GPU).
"""
from __future__ import annotations

import contextlib
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that hand a tensor's value to the host.
VALUE_READS = frozenset({
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.allclose",
})
#: aten ops whose output shape depends on the values (the host waits for them to size it).
DATA_DEPENDENT_SHAPE = frozenset({
    "aten.nonzero", "aten.masked_select", "aten._unique", "aten._unique2", "aten.unique_dim",
    "aten.unique_consecutive", "aten.unique_dim_consecutive", "aten.bincount",
})
_COPIES = frozenset({"aten._to_copy", "aten.copy_", "aten._copy_from", "aten._copy_from_and_resize"})
_LIFT = frozenset({"aten.lift_fresh", "aten.lift_fresh_copy"})
#: the package whose own host-to-device copies are recorded
_LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastcolor") + os.sep
_INDEXING = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
_KEYS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA, "meta": torch._C.DispatchKey.Meta}
_HERE = os.path.dirname(torch.__file__)
#: torch's own wrappers around a mode's handler: never the code that made a read
_WRAPPERS = ("torch/_dynamo/", "torch/_compile.py", "torch/utils/_python_dispatch.py", "torch/overrides.py")


class HostReads(list):
    """The recorded op names; ``.sites`` holds, for each, the innermost caller outside torch."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def add(self, name: str, library_only: bool = False) -> None:
        stack = traceback.extract_stack()
        user = [i for i, f in enumerate(stack) if f.filename != __file__ and not f.filename.startswith(_HERE)]
        if library_only and not (user and os.path.abspath(stack[user[-1]].filename).startswith(_LIBRARY)):
            return
        self.append(name)
        if not user:
            self.sites.append(name)
            return
        f = stack[user[-1]]
        site = f"{name} at {f.filename}:{f.lineno} in {f.name}"
        # torch code between that frame and this recorder made the read (e.g. an optimizer): say where
        below = stack[user[-1] + 1:]
        below = [g for g in below[:next((i for i, g in enumerate(below) if g.filename == __file__), len(below))]
                 if not any(w in g.filename for w in _WRAPPERS)]
        if below:
            site += f" (via {os.path.relpath(below[-1].filename, os.path.dirname(_HERE))}:{below[-1].lineno})"
        self.sites.append(site)


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _host_read(name: str, func, args, kwargs) -> str | None:
    """The name to record for this call, or None."""
    if name in VALUE_READS or name in DATA_DEPENDENT_SHAPE:
        return name
    if name == "aten.repeat_interleave" and kwargs.get("output_size") is None and func._overloadname == "Tensor":
        return name
    if name in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
            return f"{name} (boolean mask)"
    if name in _COPIES:
        tensors = list(_tensors(args, kwargs))
        if name == "aten._to_copy":
            dst = kwargs.get("device")
            src = tensors[0].device if tensors else None
        else:  # copy_(self=dst, src)
            dst = tensors[0].device if tensors else None
            src = tensors[1].device if len(tensors) > 1 else None
        if src is not None and dst is not None and torch.device(dst).type == "cpu" and src.type not in ("cpu", "meta"):
            return f"{name} ({src.type} -> cpu)"
    return None


def _pageable_upload(name: str, args, kwargs) -> str | None:
    """The name to record for a host-to-device copy of pageable memory (or a tensor made from host
    data, which is one on a GPU route), or None."""
    if name in _LIFT:
        return f"{name} (a tensor from host data: a pageable host-to-device copy on a GPU)"
    if name in _COPIES:
        tensors = list(_tensors(args, kwargs))
        if name == "aten._to_copy":
            src, dst = (tensors[0] if tensors else None), kwargs.get("device")
        else:  # copy_(self=dst, src)
            src = tensors[1] if len(tensors) > 1 else None
            dst = tensors[0].device if tensors else None
        if src is not None and dst is not None and src.device.type == "cpu" and torch.device(dst).type != "cpu":
            if not src.is_pinned():
                return f"{name} (pageable host-to-device copy)"
    return None


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, reads: HostReads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"{func.namespace}.{func._opname}"
        if func.namespace not in ("aten", "prims", "prim"):
            devices = {t.device.type for t in _tensors(args, kwargs)}
            key = _KEYS.get(devices.pop()) if len(devices) == 1 else None
            if key is not None:
                # Run the custom op's own kernel with this mode active again, so that the host
                # reads of its Python implementation are recorded (a plain dispatch mode is
                # popped while an op runs and would see none of them).
                with self:
                    return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
            return func(*args, **kwargs)
        read = _host_read(name, func, args, kwargs)
        if read is not None:
            self.reads.add(read)
        upload = _pageable_upload(name, args, kwargs)
        if upload is not None:
            self.reads.add(upload, library_only=True)
        return func(*args, **kwargs)


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, reads: HostReads):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.reads.add("Tensor.tolist")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_host_reads():
    """Yield a list (:class:`HostReads`) of every host read of a tensor value made inside."""
    reads = HostReads()
    with _FunctionRecorder(reads), _DispatchRecorder(reads):
        yield reads
