"""Forked children (DataLoader workers, ``multiprocessing``'s fork) run the CPU kernels, whatever
the parent ran before the fork (issue 23.1).

GNU OpenMP, shared by torch, numba's default threading layer and the cpp backend, hangs in a child
forked after the parent ran any parallel region. Each case runs in a fresh interpreter (the state
of the parent's thread pools is what is tested): the parent runs one op (a multi-threaded torch
matmul, a parallel numba or cpp kernel, or nothing), then soft-encodes a parallel-sized input in a
``DataLoader(num_workers=1)`` worker and in a ``multiprocessing`` fork child (torch sets one thread
in DataLoader workers, not in a plain fork child, so the cpp backend is tested in both), with the
numba and the cpp backend. Two threads are asked for, so the pools exist on any machine. (torch's
own ops hang in a plain fork child after a parallel torch op, so that child gets its input made.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastcolor import backends

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

CHILD_BACKENDS = [b for b in ("numba", "cpp") if backends.unavailable_reason(b, "cpu") is None]

_SCRIPT = """
import json, multiprocessing as mp, sys, torch
from torch.utils.data import DataLoader, Dataset
import fastcolor

PARENT, CHILDREN, WAIT = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])

# 256 x 256 pixels: 512 tiles, past both backends' serial limits. Made here: in a plain fork child
# (torch's thread count not set to 1) a parallel torch op would hang in torch itself.
AB = torch.randn(1, 2, 256, 256) * 30

def encode(backend):
    return fastcolor.soft_encode(AB, backend=backend).indices.shape[1]

class Encode(Dataset):
    def __init__(self, backend):
        self.backend = backend
    def __len__(self):
        return 2
    def __getitem__(self, i):
        return encode(self.backend)

def child(backend, queue):
    queue.put(encode(backend))

if PARENT == "torch":
    a = torch.randn(1000, 1000)
    (a @ a).sum()
elif PARENT != "none":
    encode(PARENT)
out = {}
for backend in CHILDREN:
    try:
        out[f"dataloader/{backend}"] = [int(k) for k in DataLoader(Encode(backend), num_workers=1, timeout=WAIT)]
    except RuntimeError as exc:  # DataLoader's timeout
        out[f"dataloader/{backend}"] = f"hung: {exc}"
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(backend, queue))
    proc.start()
    proc.join(WAIT)
    if proc.is_alive():
        proc.kill()
        out[f"fork/{backend}"] = "hung"
    else:
        out[f"fork/{backend}"] = [queue.get(timeout=5)] if proc.exitcode == 0 else f"exit {proc.exitcode}"
print(json.dumps(out))
"""


@pytest.mark.skipif(not CHILD_BACKENDS, reason="neither numba nor the native extension is available")
@pytest.mark.parametrize("parent", ["torch", "numba", "cpp", "none"])
def test_forked_workers_run_the_cpu_kernels_whatever_the_parent_ran(parent):
    if parent in ("numba", "cpp") and parent not in CHILD_BACKENDS:
        pytest.skip(f"backend {parent!r} is unavailable")
    env = dict(os.environ, OMP_NUM_THREADS="2", NUMBA_NUM_THREADS="2", FASTCOLOR_BACKEND="")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT), parent, ",".join(CHILD_BACKENDS), "90"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    want = {f"{how}/{b}": ([5, 5] if how == "dataloader" else [5]) for b in CHILD_BACKENDS
            for how in ("dataloader", "fork")}
    assert out == want


def test_forked_flag_is_set_in_a_fork_child_only():
    """The flag the kernels read: False here, True in a child of ``os.fork``."""
    from fastcolor.backends._fork import forked

    assert not forked()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once (no pytest teardown in the child)
        os.write(w, b"1" if forked() else b"0")
        os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == b"1"
