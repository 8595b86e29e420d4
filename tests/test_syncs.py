"""No op reads a device value on the host on its default path (issue 12, point 1).

The recorder (:func:`host_reads.record_host_reads`) is checked first: it must see each way of
reading a value that a sync-free op must not use, or the tests below could not fail.

How a CPU run proves the GPU path: the ops read a tensor's values on the host only where
:func:`fastcolor.ops._common.host_readable` says so, which is for CPU tensors (there a read is
no sync, and it buys the exact error message, or skips a multiply). Every other tensor (a GPU's)
takes the device route: ``torch._assert_async`` checks and the backward's scale read by a
kernel. ``device_route`` patches ``host_readable`` to answer False, so these CPU tensors take
exactly the code a GPU tensor takes, for every backend that runs here (numba, cpp, torch, and
triton through its interpreter), and the recorder must find nothing; a counter shows the patched
rule was consulted, and the results must equal the CPU route's. A last test pins down that the
CPU route's host reads are only those guarded checks. (The kernels themselves are device code:
a numba/cpp kernel reading CPU memory is the computation, not a host read; see host_reads.py for
what the recorder cannot see.)
"""
from __future__ import annotations

import re
import time

import pytest
import torch
from host_reads import record_host_reads

import fastcolor as fc
from fastcolor import backends
from fastcolor.ops import _common
from fastcolor.ops.encode import SoftLabels

BACKENDS = ["numba", "cpp", "torch", "triton"]


# ----------------------------------------------------------------------------- the recorder


@torch.library.custom_op("fastcolor_test::reads_inside", mutates_args=())
def _reads_inside(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if bool(x.sum() > 0) else x.clone()


@_reads_inside.register_fake
def _(x):
    return torch.empty_like(x)


READS = {
    "bool": lambda t: bool(t[0]),
    "item": lambda t: t[0].item(),
    "float": lambda t: float(t[0]),
    "int": lambda t: int(t[0]),
    "tolist": lambda t: t.tolist(),
    "index": lambda t: [0, 1, 2][t[0].long()],
    "if": lambda t: 1 if (t > 0).all() else 0,
    "equal": lambda t: torch.equal(t, t),
    "allclose": lambda t: torch.allclose(t, t),
    "nonzero": lambda t: t.nonzero(),
    "mask": lambda t: t[t > 0],
    "unique": lambda t: torch.unique(t),
    "inside_custom_op": lambda t: _reads_inside(t),
}


@pytest.mark.parametrize("how", list(READS))
def test_recorder_sees_each_host_read(how):
    t = torch.tensor([1.0, 2.0, 0.0])
    with record_host_reads() as reads:
        READS[how](t)
    assert len(reads) >= 1, how
    assert len(reads.sites) == len(reads) and __file__ in reads.sites[0], reads.sites


def test_recorder_sees_the_librarys_host_to_device_copies():
    """Issue 21.5: a tensor the library makes from host data (a pageable host-to-device copy on a
    GPU route; here ``fastcolor.gamut.ab_bins``) is recorded; a test building its inputs is not."""
    from fastcolor.gamut import ab_bins

    with record_host_reads() as reads:
        torch.tensor([1.0, 2.0])  # the test's own input
        ab_bins("cpu")
    assert len(reads) == 1 and "pageable host-to-device" in reads[0] and "gamut.py" in reads.sites[0], reads.sites


def test_recorder_sees_nothing_in_device_side_code():
    t = torch.tensor([1.0, 2.0, 0.0])
    with record_host_reads() as reads:
        y = torch.where(t > 0, t * 2, t).sum() / t.numel()
        torch._assert_async(torch.isfinite(y))
        _reads_inside(-t)  # its own reads happen: recorded, but not the op itself
        t.numpy()  # a zero-copy view of CPU memory: what CPU kernels are handed, not a sync
    assert len(reads) == 1 and "in _reads_inside" in reads.sites[0], reads.sites


# ----------------------------------------------------------------------------- the ops


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    name = request.param
    if name == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # as tests/test_triton_backend.py does
    reason = backends.unavailable_reason(name, "cpu")
    if reason is not None:
        pytest.fail(f"backend {name!r} should run on the CPU here but: {reason}")
    fc.warmup("cpu")  # the tables and bin centres uploaded ahead, as before a CUDA graph capture
    return name


@pytest.fixture
def device_route(monkeypatch):
    """Make CPU tensors take the route of GPU tensors (``host_readable`` -> False); count asks."""
    asked = []
    monkeypatch.setattr(_common, "host_readable", lambda t: asked.append(t.device.type) is not None)
    return asked


def _inputs(seed=0, n=2, h=2, w=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 313, h, w, generator=g) * 3
    ab = torch.rand(n, 2, h, w, generator=g) * 260 - 130
    ab[0] /= 40  # a grey image, for nongray
    ab[-1, :, 0, 0] = torch.tensor([400.0, -300.0])  # far outside the gamut: the kernels' own rule
    weights = torch.rand(313, generator=g) * 5 + 0.1
    return logits, ab, weights


#: (reduction, options, grad_output) of the fused loss; grad_output None: a plain backward().
LOSS_CASES = [
    ("mean", {}, None), ("mean", {"weights": True, "nongray": True}, 2.5), ("sum", {"weights": True}, None),
    ("sum", {"nongray": True}, 0.5), ("none", {}, None), ("none", {"weights": True, "nongray": True}, "pixels"),
    ("mean", {"labels": True}, None), ("sum", {"labels": True, "weights": True, "nongray": True}, 3.0),
]


def _loss_step(name, reduction, opts, grad_output):
    logits, ab, weights = _inputs()
    x = logits.clone().requires_grad_(True)
    target = fc.soft_encode(ab, backend=name) if opts.get("labels") else ab
    if opts.get("labels"):  # a precomputed target from the user: validated (indices and weights)
        target = SoftLabels(target.indices, target.weights)
    loss = fc.rebalanced_cross_entropy(
        x, target, weights if opts.get("weights") else None, reduction=reduction, nongray=bool(opts.get("nongray")),
        backend=name, target_ab=ab if opts.get("labels") else None)
    if grad_output is None:
        (loss.sum() if reduction == "none" else loss).backward()
    elif grad_output == "pixels":
        loss.backward(torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    else:
        loss.backward(torch.tensor(grad_output))
    return loss.detach(), x.grad


#: The interpreter is slow: triton runs the cases that cover its scale kernel (grad_output 1 and
#: not 1), a per-pixel grad_output and precomputed labels, and is compared with numba's CPU route.
TRITON_CASES = {0, 1, 5, 7}


LOSS_PAIRS = [pytest.param(b, c, id=f"{b}-{c[0]}-{'-'.join(c[1]) or 'plain'}-{c[2]}")
              for b in BACKENDS for i, c in enumerate(LOSS_CASES) if b != "triton" or i in TRITON_CASES]


@pytest.mark.parametrize("backend,case", LOSS_PAIRS, indirect=["backend"])
def test_fused_loss_forward_backward_reads_nothing_on_the_host(backend, case, monkeypatch):
    # The CPU route of the same backend (numba's for triton) is the expected answer.
    want_loss, want_grad = _loss_step("numba" if backend == "triton" else backend, *case)
    tol = dict(rtol=1e-5, atol=1e-6) if backend == "triton" else dict(rtol=1e-6, atol=1e-9)
    asked = []
    monkeypatch.setattr(_common, "host_readable", lambda t: asked.append(t.device.type) is not None)
    with record_host_reads() as reads:
        loss, grad = _loss_step(backend, *case)
    assert reads == [], reads.sites
    # A guarded value check (weights, precomputed labels) or the fused backward's scale of a
    # reduced loss is on this path: it must have taken the device route.
    if {"weights", "labels"} & set(case[1]) or (backend != "torch" and case[0] != "none"):
        assert asked, "the ops never consulted host_readable: this test would prove nothing"
    torch.testing.assert_close(loss, want_loss, **tol)
    torch.testing.assert_close(grad, want_grad, **tol)


def test_encode_and_decode_read_nothing_on_the_host(backend, device_route):
    logits, ab, _ = _inputs()
    x = logits.clone().requires_grad_(True)
    p = torch.softmax(logits, 1).requires_grad_(True)
    g = torch.rand(2, 2, 2, 3, generator=torch.Generator().manual_seed(4))
    with record_host_reads() as reads:
        labels = fc.soft_encode(ab, backend=backend)
        fc.annealed_mean(x, T=0.38, backend=backend).backward(g)
        fc.annealed_mean(probs=p, T=1.0, backend=backend).backward(g)
        mode = fc.annealed_mean(logits, T=1e-9, backend=backend)  # T < 1e-6: the mode (argmax, no kernel)
    assert reads == [], reads.sites
    assert labels.indices.shape == (2, 5, 2, 3) and mode.shape == (2, 2, 2, 3)
    assert x.grad is not None and p.grad is not None


def test_tables_refuse_a_first_upload_during_capture(monkeypatch):
    """A first use of a table or the bin centres inside ``torch.cuda.graph`` would copy pageable
    host memory: a clear error naming fastcolor.warmup; warmed up, nothing is uploaded again."""
    from fastcolor.backends import _tables

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(RuntimeError, match=r"capture.*fastcolor\.warmup\('cuda:0'\)"):
        _tables.bin_centres("cuda")
    with pytest.raises(RuntimeError, match=r"candidate table of k = 7 is not on cuda:0"):
        _tables.device_table(7, torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    fc.warmup("cpu")
    with record_host_reads() as reads:
        for k in range(1, 17):
            _tables.device_table(k, "cpu")
        _tables.bin_centres("cpu")
    assert reads == [], reads.sites


def test_loss_module_moves_its_weights_once():
    """RebalancedCrossEntropyLoss keeps its weights where the logits are after the first call (on
    a GPU: no host-to-device copy per call); on the same device the buffer is left as it is."""
    logits, ab, weights = _inputs()
    criterion = fc.RebalancedCrossEntropyLoss(weights)
    buf = criterion.weights
    criterion(logits, ab)
    assert criterion.weights is buf and "weights" in dict(criterion.named_buffers())
    if torch.cuda.is_available():
        criterion(logits.cuda(), ab.cuda())
        moved = criterion.weights
        assert moved.is_cuda and "weights" in dict(criterion.named_buffers())
        criterion(logits.cuda(), ab.cuda())
        assert criterion.weights is moved


def test_the_loss_reduction_is_deterministic(backend, device_route):
    logits, ab, weights = _inputs(seed=5, n=3, h=3, w=5) if backend != "triton" else _inputs(seed=5)
    runs = [fc.rebalanced_cross_entropy(logits, ab, weights, backend=backend) for _ in range(2)]
    assert all(torch.equal(r, runs[0]) for r in runs), runs  # bit for bit: a fixed order


def test_device_route_still_refuses_bad_targets(device_route):
    logits, ab, _ = _inputs()
    labels = fc.soft_encode(ab, backend="torch")
    bad = labels.indices.clone()
    bad[0, 0, 0, 0] = 313
    with pytest.raises(RuntimeError, match=r"target.indices: expected bin indices in 0..312"):
        fc.rebalanced_cross_entropy(logits, SoftLabels(bad, labels.weights), backend="torch")
    w = labels.weights.clone()
    w[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="SoftLabels.weights: expected finite, non-negative weights"):
        SoftLabels(labels.indices, w)
    with pytest.raises(RuntimeError, match="weights: expected finite, non-negative weights"):
        fc.rebalanced_cross_entropy(logits, ab, -torch.ones(313), backend="torch")


def test_cpu_route_reads_only_in_its_guarded_checks():
    """On CPU tensors the host reads are the explicit, sync-free CPU checks, and nothing else."""
    logits, ab, weights = _inputs()
    x = logits.clone().requires_grad_(True)
    name = backends.resolve("auto", "cpu")
    labels = fc.soft_encode(ab, backend=name)
    with record_host_reads() as reads:
        fc.rebalanced_cross_entropy(x, SoftLabels(labels.indices, labels.weights), weights, backend=name,
                                    target_ab=ab, nongray=True).backward()
    where = {re.sub(r".* in ", "", s) for s in reads.sites}
    guarded = {"check_bin_indices", "check_finite_non_negative", "check_class_weights", "scale_grad_"}
    assert where == guarded, reads.sites
    with pytest.raises(ValueError, match=r"got values in \d+..313"):
        bad = labels.indices.clone()
        bad[0, 0, 0, 0] = 313
        fc.rebalanced_cross_entropy(logits, SoftLabels(bad, labels.weights), backend=name)


# ----------------------------------------------------------------------------- the scale kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_scale_kernel(monkeypatch, dtype):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from fastcolor.backends import triton_backend as tb

    g0 = torch.randn(3, 313, 5).to(dtype)
    for f in (1.0, 0.37, 0.0, -2.0):
        g = g0.clone()
        tb.scale_(g, torch.tensor([f]))
        torch.testing.assert_close(g, (g0.float() * f).to(dtype), rtol=0, atol=0)


# ----------------------------------------------------------------------------- eager dispatch


class _CustomOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastcolor":
            self.seen.append(func.name())
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_custom_op_dispatch():
    """Eager calls go straight to the backend (the custom ops are for torch.compile, where
    tests/test_compile_ready.py finds them in the graph); the per-call saving is printed."""
    logits, ab, _ = _inputs()
    x = logits.clone().requires_grad_(True)
    name = backends.resolve("auto", "cpu")
    with _CustomOps() as mode:
        fc.soft_encode(ab, backend=name)
        fc.annealed_mean(x, backend=name).sum().backward()
        fc.rebalanced_cross_entropy(x, ab, backend=name).backward()
    assert mode.seen == []
    from fastcolor.ops.encode import _soft_encode_op

    flat = ab.reshape(2, 2, -1).contiguous()

    def per_call(fn, n=200):
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e6

    direct = per_call(lambda: backends.get(name).soft_encode(flat, k=5, sigma=5.0))
    via_op = per_call(lambda: _soft_encode_op(flat, 5, 5.0, name))
    print(f"soft_encode on {name}, 12 pixels: {direct:.1f} us direct, {via_op:.1f} us through the custom op")


# ----------------------------------------------------------------------------- streaming decode


#: (dtype, (N, P), T): every dtype and odd shape once, temperatures cycling.
STREAM_CASES = [(dt, shape, [0.01, 0.38, 1.0][(i + j) % 3])
                for i, dt in enumerate([torch.float32, torch.float16, torch.bfloat16])
                for j, shape in enumerate([(1, 1), (2, 63), (3, 17)])]


@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype, shape, T", STREAM_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_triton_streaming_decode_matches_the_reference(monkeypatch, dtype, shape, T):
    """``FASTCOLOR_TRITON_DECODE=stream``: chunks of classes, a running max and three running sums
    (issue 12, point 4), against fastcolor.reference and the register kernel, in the interpreter."""
    pytest.importorskip("triton")
    import numpy as np

    from fastcolor import reference as R
    from fastcolor.backends import triton_backend as tb

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(shape[1])
    n, p = shape
    x = (torch.randn(n, 313, p, generator=g, dtype=torch.float64) * 3).to(dtype)
    probs = torch.softmax(torch.randn(n, 313, p, generator=g, dtype=torch.float64) * 3, 1)
    probs[0, 7] = 0.0  # log(0) = -inf: weight 0
    probs = probs.to(dtype)
    for inp, is_probs, ref in [(x, False, R.annealed_mean(x.double().numpy(), T=T)),
                               (probs, True, R.annealed_mean(probs=probs.double().numpy(), T=T))]:
        monkeypatch.setenv("FASTCOLOR_TRITON_DECODE", "stream")
        got = tb.annealed_mean(inp, T=T, is_probs=is_probs)
        monkeypatch.setenv("FASTCOLOR_TRITON_DECODE", "registers")
        reg = tb.annealed_mean(inp, T=T, is_probs=is_probs)
        np.testing.assert_allclose(got.double().numpy(), ref, atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(got, reg, atol=5e-4, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_streaming_decode_non_finite_like_the_register_kernel(monkeypatch):
    pytest.importorskip("triton")
    from fastcolor.backends import triton_backend as tb

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 313, 7, generator=torch.Generator().manual_seed(2))
    x[0, 3, 2] = float("nan")
    x[0, 9, 4] = float("inf")
    x[0, :, 5] = float("-inf")  # all -inf: 0 / 0
    x[0, :300, 1] = float("-inf")  # -inf in the first chunks only: the running max starts late
    x[0, 40:, 6] = float("-inf")  # -inf in the last chunks only
    monkeypatch.setenv("FASTCOLOR_TRITON_DECODE", "stream")
    got = tb.annealed_mean(x, T=0.38, is_probs=False)
    monkeypatch.setenv("FASTCOLOR_TRITON_DECODE", "registers")
    want = tb.annealed_mean(x, T=0.38, is_probs=False)
    torch.testing.assert_close(got, want, equal_nan=True, atol=5e-4, rtol=1e-5)
    assert torch.isnan(got[0, :, [2, 4, 5]]).all() and torch.isfinite(got[0, :, [0, 1, 3, 6]]).all()
    with pytest.raises(ValueError, match="FASTCOLOR_TRITON_DECODE: expected 'registers' or 'stream', got 'fast'"):
        monkeypatch.setenv("FASTCOLOR_TRITON_DECODE", "fast")
        tb.annealed_mean(x, T=0.38, is_probs=False)


def test_new_triton_kernels_compile_for_sm90():
    """The scale and streaming-decode kernels built for an sm_90 target by triton's own LLVM and
    ptxas on the host (no GPU needed), through the compile check of every variant
    (tests/test_triton_compile.py runs all of them, with the spill bound)."""
    pytest.importorskip("triton")
    from fastcolor.backends.triton_backend import compile_check as cc

    chosen = [v for v in cc.variants() if v.kernel == "scale_kernel" and v.dtype != torch.float16
              or v.kernel == "annealed_mean_stream_kernel" and v.layout == "aligned" and v.dtype != torch.float16]
    assert len(chosen) == 6
    for v in chosen:
        assert cc.compile_variant(v, 90).asm["cubin"], v.name
