"""``torch.library.opcheck`` on every custom op of fastcolor (issue 21, point 8): the schema, the
fake implementation against the real one, the autograd registration, and AOT dispatch with
dynamic shapes, for every backend that runs on this machine's CPU (triton through its
interpreter). What ``torch.compile(fullgraph=True)`` relies on, checked op by op."""
from __future__ import annotations

import pytest
import torch

from fastcolor import backends
from fastcolor.ops.decode import _annealed_mean_op
from fastcolor.ops.encode import _soft_encode_op
from fastcolor.ops.loss import _ce_op

CPU_BACKENDS = ["torch", "numba", "cpp", "triton"]
#: every custom op fastcolor registers (a new one must be added here: see the last test)
OPS = {"fastcolor::ce_forward": _ce_op, "fastcolor::annealed_mean": _annealed_mean_op,
       "fastcolor::soft_encode": _soft_encode_op}


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch):
    name = request.param
    if name == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = backends.unavailable_reason(name, "cpu")
    if reason is not None:
        pytest.fail(f"backend {name!r} should run on the CPU here but: {reason}")
    return name


def _inputs(n=2, p=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 313, p, generator=g) * 3
    ab = torch.rand(n, 2, p, generator=g) * 200 - 100
    return logits, ab


@pytest.mark.parametrize("need_grad", [True, False])
@pytest.mark.parametrize("target", ["ab", "labels"])
def test_ce_forward(backend, target, need_grad):
    logits, ab = _inputs()
    x = logits.requires_grad_(need_grad)
    cw = torch.rand(313) + 0.5
    mask = torch.tensor([1.0, 0.0])
    if target == "ab":
        args = (x, ab, None, None, cw, mask, None, 5, 5.0, need_grad, backend)
    else:
        idx, w = backends.get("torch").soft_encode(ab, k=5, sigma=5.0)
        ps = torch.rand(2, 6) + 0.5
        args = (x, None, idx, w, None, None, ps, 5, 5.0, need_grad, backend)
    torch.library.opcheck(_ce_op, args)


@pytest.mark.parametrize("is_probs", [False, True])
def test_annealed_mean(backend, is_probs):
    logits, _ = _inputs(seed=1)
    x = torch.softmax(logits, 1) if is_probs else logits
    torch.library.opcheck(_annealed_mean_op, (x.requires_grad_(True), 0.38, is_probs, backend))


def test_soft_encode(backend):
    _, ab = _inputs(seed=2)
    ab[0, :, 0] = torch.tensor([400.0, -300.0])  # far outside the gamut
    for k in (1, 5):
        torch.library.opcheck(_soft_encode_op, (ab, k, 5.0, backend))


def test_every_fastcolor_custom_op_is_checked_here():
    import fastcolor.ops  # noqa: F401 - registers the ops

    registered = {f"fastcolor::{name}" for name in dir(torch.ops.fastcolor) if not name.startswith("_")
                  and isinstance(getattr(torch.ops.fastcolor, name), torch._ops.OpOverloadPacket)}
    assert registered == set(OPS), registered
