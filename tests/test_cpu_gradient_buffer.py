"""The CPU losses' gradient buffer (fastcolor/backends/_alloc.py): the previous call's pages
handed out again only once nothing uses them, and numba's streamed (non-temporal) stores."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import fastcolor as fc
import fastcolor.backends as fb
from fastcolor import reference as R
from fastcolor.backends import _alloc
from fastcolor.backends.contract import LossCall

CPU_BACKENDS = [b for b in ("numba", "cpp") if fb.unavailable_reason(b, "cpu") is None]
pytestmark = pytest.mark.skipif(not CPU_BACKENDS, reason="no CPU kernel backend here")


@pytest.fixture
def mapped(monkeypatch):
    """Every gradient through the mmap path (the tests' shapes are small), nothing kept at the
    start; yields a list that gets one entry per new mapping made."""
    if not _alloc._HUGE_OK:
        pytest.skip("no MADV_HUGEPAGE here: gradients are plain torch.empty")
    monkeypatch.setattr(_alloc, "HUGE_PAGE_MIN_BYTES", 0)
    monkeypatch.setattr(_alloc, "_REUSE_OK", True)
    made, new_mapping = [], _alloc._new_mapping

    def counting(nbytes):
        made.append(nbytes)
        return new_mapping(nbytes)

    monkeypatch.setattr(_alloc, "_new_mapping", counting)
    _alloc.release_kept()
    yield made
    _alloc.release_kept()


def _inputs(n=2, h=5, w=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 313, h * w, generator=g) * 3
    ab = torch.rand(n, 2, h * w, generator=g) * 160 - 80
    return x, ab


def _grad(backend, x, ab):
    call = LossCall(logits=x, ab=ab, grad_scale=1.0, need_grad=True)
    return fb.get(backend).ce_forward(call)


def _ref_grad(x, ab):
    _, g = R.rebalanced_cross_entropy(x.double().numpy(), ab.double().numpy(), reduction="none",
                                      grad_output=np.ones((x.shape[0], x.shape[2])))
    return g


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_freed_gradient_pages_are_handed_out_again(mapped, backend):
    x, ab = _inputs()
    _, g1 = _grad(backend, x, ab)
    ptr = g1.data_ptr()
    del g1
    x2, ab2 = _inputs(seed=1)
    _, g2 = _grad(backend, x2, ab2)
    assert len(mapped) == 1 and g2.data_ptr() == ptr  # the same pages
    np.testing.assert_allclose(g2.double().numpy(), _ref_grad(x2, ab2), atol=2e-6)


_HOLDERS = {
    "the tensor": lambda g: g,
    "a view": lambda g: g[1, 7:9],
    "a numpy array": lambda g: g.numpy()[0, 0],
    "a storage": lambda g: g.untyped_storage(),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("holder", list(_HOLDERS))
def test_a_gradient_still_in_use_is_never_handed_out(mapped, backend, holder):
    x, ab = _inputs()
    _, g1 = _grad(backend, x, ab)
    keep, want = _HOLDERS[holder](g1), g1.clone()
    ptr = g1.data_ptr()
    del g1
    _, g2 = _grad(backend, *_inputs(seed=1))
    assert len(mapped) == 2 and g2.data_ptr() != ptr
    if holder == "the tensor":
        assert torch.equal(keep, want)  # untouched by the second call
    del keep


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autograd_leaf_gradients_stay_correct_and_reuse_the_pages(mapped, backend):
    """x.grad is the kernel's buffer (AccumulateGrad takes it, the cache holds the mapping,
    not the tensor); with x.grad = None between steps the next step gets the same pages."""
    x, ab = _inputs()
    x = x.reshape(2, 313, 5, 9).requires_grad_(True)
    ab = ab.reshape(2, 2, 5, 9)
    fc.rebalanced_cross_entropy(x, ab, backend=backend).backward()
    first = x.grad
    _, want = R.rebalanced_cross_entropy(x.detach().double().numpy(), ab.double().numpy())
    np.testing.assert_allclose(first.double().numpy(), want, atol=1e-7)
    snapshot = first.clone()
    # x.grad held: the second backward accumulates into it; the loss needs a new buffer
    fc.rebalanced_cross_entropy(x, ab, backend=backend).backward()
    np.testing.assert_allclose(x.grad.double().numpy(), 2 * want, atol=2e-7)
    del first, snapshot
    assert len(mapped) == 2
    x.grad = None
    fc.rebalanced_cross_entropy(x, ab, backend=backend).backward()  # the second call's pages
    np.testing.assert_allclose(x.grad.double().numpy(), want, atol=1e-7)
    ptr = x.grad.data_ptr()
    x.grad = None
    fc.rebalanced_cross_entropy(x, ab, backend=backend).backward()
    assert len(mapped) == 2 and x.grad.data_ptr() == ptr
    np.testing.assert_allclose(x.grad.double().numpy(), want, atol=1e-7)


def test_sizes_that_reuse_and_sizes_that_do_not(mapped):
    a = _alloc.empty_cpu((1000, 100), torch.float32, reuse=True)
    a.fill_(7.0)
    del a
    b = _alloc.empty_cpu((600, 100), torch.float32, reuse=True)  # smaller, within 2x: reused
    assert len(mapped) == 1 and b.shape == (600, 100) and bool((b == 7.0).all())  # a's pages
    del b
    c = _alloc.empty_cpu((400, 100), torch.float32, reuse=True)  # under half: a new mapping
    assert len(mapped) == 2 and bool((c == 0).all())
    del c
    d = _alloc.empty_cpu((1000, 100), torch.float32, reuse=True)  # larger than the kept one: new
    assert len(mapped) == 3
    del d
    e = _alloc.empty_cpu((1000, 100), torch.float32)  # without reuse: never the kept one
    assert len(mapped) == 4
    del e


def test_reuse_can_be_turned_off_and_the_kept_buffer_released(mapped, monkeypatch):
    a = _alloc.empty_cpu((1000, 100), torch.float32, reuse=True)
    del a
    assert fb.release_cpu_gradient() == 1000 * 100 * 4
    assert fb.release_cpu_gradient() == 0
    b = _alloc.empty_cpu((1000, 100), torch.float32, reuse=True)  # nothing kept: new
    assert len(mapped) == 2
    del b
    monkeypatch.setattr(_alloc, "_REUSE_OK", False)
    for _ in range(2):
        c = _alloc.empty_cpu((1000, 100), torch.float32, reuse=True)  # reuse off: always new
        del c
    assert len(mapped) == 4


def test_threads_never_share_a_buffer(mapped):
    got, errors = [], []

    def work():
        try:
            for _ in range(50):
                t = _alloc.empty_cpu((64, 1024), torch.float32, reuse=True)
                t.fill_(threading.get_ident() % 1000)
                got.append(t)  # held: none of these may be handed out again
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({t.data_ptr() for t in got}) == len(got) == 200


# ----------------------------------------------------------------------------- streamed stores


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba is not available")
@pytest.mark.parametrize("p", [8, 152, 8 * 37, 2048])
@pytest.mark.parametrize("mapped_path", [False, True])
def test_streamed_gradient_is_the_plain_one_bit_for_bit(monkeypatch, p, mapped_path):
    """P % 8 == 0 float32: the gradient goes out through non-temporal stores; it must equal
    the plain stores' result exactly (tiles of 128 and a last one of p % 128 pixels)."""
    import fastcolor.backends.numba_backend as nb

    if mapped_path and _alloc._HUGE_OK:
        monkeypatch.setattr(_alloc, "HUGE_PAGE_MIN_BYTES", 0)
    g = torch.Generator().manual_seed(p)
    x = torch.randn(3, 313, p, generator=g) * 4
    ab = torch.rand(3, 2, p, generator=g) * 200 - 100
    w = torch.rand(313, generator=g) + 0.5
    call = LossCall(logits=x, ab=ab, class_weights=w, grad_scale=0.25, need_grad=True)
    loss_s, grad_s = nb.ce_forward(call)
    assert nb.streams_gradient(grad_s)
    monkeypatch.setattr(nb, "_STREAM_OK", False)
    loss_p, grad_p = nb.ce_forward(call)
    assert not nb.streams_gradient(grad_p)
    assert torch.equal(grad_s, grad_p) and torch.equal(loss_s, loss_p)
    _, want = R.rebalanced_cross_entropy(x.double().numpy(), ab.double().numpy(), w.double().numpy(),
                                         reduction="none", grad_output=np.full((3, p), 0.25))
    np.testing.assert_allclose(grad_s.double().numpy(), want, atol=1e-6)


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba is not available")
def test_which_gradients_are_streamed():
    import fastcolor.backends.numba_backend as nb

    base = torch.empty(2, 313, 64)
    assert nb.streams_gradient(base) == nb._STREAM_OK
    assert not nb.streams_gradient(torch.empty(2, 313, 63))  # rows not 32-byte aligned
    assert not nb.streams_gradient(torch.empty(2, 313, 64, dtype=torch.float16))
    assert not nb.streams_gradient(torch.empty(2 * 313 * 64 + 1)[1:].view(2, 313, 64))  # base misaligned


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba is not available")
@pytest.mark.parametrize("p, streamed", [(64, True), (63, False)])
def test_the_loss_kernel_is_handed_the_gradient_to_stream(monkeypatch, p, streamed):
    """ce_forward passes the gradient a second time, as the array to stream into, exactly
    when streams_gradient says so."""
    import fastcolor.backends.numba_backend as nb

    seen, real = [], nb.launch

    def spy(kernel, worker, ntiles, *args, **kw):
        seen.append(args)
        return real(kernel, worker, ntiles, *args, **kw)

    monkeypatch.setattr(nb, "launch", spy)
    x = torch.randn(2, 313, p)
    _, grad = nb.ce_forward(LossCall(logits=x, ab=torch.rand(2, 2, p) * 50, need_grad=True))
    gnp = grad.view(-1).numpy()
    sharing = [a for a in seen[-1] if isinstance(a, np.ndarray) and a.size and np.shares_memory(a, gnp)]
    assert len(sharing) == (2 if streamed and nb._STREAM_OK else 1)


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba is not available")
def test_stream_product8_is_a_non_temporal_vector_store():
    import platform

    import numba

    from fastcolor.backends.numba_backend._jit import store_fence, stream_product8

    @numba.njit
    def run(dst, a, b):
        for i in range(0, dst.size, 8):
            stream_product8(dst, i, a, i, b, i)
        store_fence()

    a = np.arange(64, dtype=np.float32)
    b = np.full(64, 0.5, np.float32)
    buf = np.zeros(64 + 8, np.float32)
    off = (-buf.ctypes.data % 32) // 4  # a 32-byte aligned start
    dst = buf[off: off + 64]
    run(dst, a, b)
    assert np.array_equal(dst, a * b)
    if platform.machine().lower() in ("x86_64", "amd64"):
        asm = run.inspect_asm(run.signatures[0])
        assert "movntps" in asm and "sfence" in asm


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba is not available")
@pytest.mark.parametrize("p", [20 * 128 + 40, 20 * 128 + 37, 3 * 128 + 40, 2 * 128])
def test_pipelined_tiles_match_the_reference(p):
    """The loss (streamed when p % 8 == 0) and the decode read the next tile's logits during
    this tile's exp pass and swap buffers: over many tiles, partial last tiles of every image,
    serial (2 x 128: 12 tiles) and parallel runs whose chunks hold one tile (3 x 128 + 40: 24
    tiles in 24 chunks) or several (20 x 128 + 40: 126 tiles in 32), each pixel must still be its
    own."""
    import fastcolor.backends.numba_backend as nb

    g = torch.Generator().manual_seed(p)
    n = 6
    x = torch.randn(n, 313, p, generator=g) * 5
    x += (torch.arange(p) // 128 % 2) * 150.0  # neighbouring tiles 150 apart: a stale max overflows exp
    ab = torch.rand(n, 2, p, generator=g) * 180 - 90
    loss, grad = nb.ce_forward(LossCall(logits=x, ab=ab, grad_scale=1.0, need_grad=True))
    want_loss, want_grad = R.rebalanced_cross_entropy(x.double().numpy(), ab.double().numpy(), reduction="none",
                                                      grad_output=np.ones((n, p)))
    np.testing.assert_allclose(loss.double().numpy(), want_loss, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(grad.double().numpy(), want_grad, rtol=1e-5, atol=2e-6)
    for probs in (False, True):
        xin = torch.softmax(x, 1) if probs else x
        got = nb.annealed_mean(xin, T=0.38, is_probs=probs)
        x64 = xin.double().numpy()
        want = R.annealed_mean(probs=x64, T=0.38) if probs else R.annealed_mean(x64, T=0.38)
        np.testing.assert_allclose(got.double().numpy(), want, atol=2e-3)
