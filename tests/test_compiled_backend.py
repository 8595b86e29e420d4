"""Backend-specific tests of ``cpp`` (C++/OpenMP) and ``cuda`` (CUDA kernels): fastcolor._C.

The generic matrix (tests/test_backends.py) covers the public API on every backend; here:
the gamut tables compiled into the kernels, the window search of the soft-encoding on a
dense ab grid (midpoints, exact ties, far-off and non-finite ab), every CPU instruction-set
variant, float16/bfloat16 rounding of the gradient, per-pixel scales, bad indices, the
OpenMP path, and the same checks on the GPU where one is present (the only skip).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

import fastcolor as fc
from fastcolor import _ext, backends
from fastcolor import reference as R
from fastcolor.backends import compiled_backend as cb
from fastcolor.gamut import AB_BINS

C = _ext.load_extension()
NO_EXT = bool(os.environ.get("FASTCOLOR_NO_EXT"))
pytestmark = pytest.mark.skipif(C is None and NO_EXT, reason="FASTCOLOR_NO_EXT is set: the extension was not built")

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="no CUDA device on this machine"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def isa_variants():
    """The CPU instruction-set variants this machine runs; restores the default afterwards."""
    default = C.cpu_isa()
    yield [name for name in ("default", "avx2", "avx512") if C.cpu_set_isa(name)]
    assert C.cpu_set_isa(default)


def test_extension_present_and_backend_available():
    assert C is not None, fc.build_info()["reason"]
    assert cb.unavailable_reason("cpu") is None
    assert backends.unavailable_reason("cpp", "cpu") is None
    reason = cb.unavailable_reason("cuda")
    if HAS_GPU:
        assert reason is None
    else:
        assert isinstance(reason, str) and reason


def test_build_info_lists_the_kernels():
    info = fc.build_info()
    assert set(info["cpu_kernels"]) == {"soft_encode", "ce_forward", "annealed_mean"}
    assert info["cpu_isa"] in ("default", "avx2", "avx512")
    assert info["has_cuda_kernels"] == C.has_cuda_kernels == bool(info["cuda_kernels"])
    if info["cuda"]:  # nvcc was found at build time: the kernels must be in the module
        assert C.has_cuda_kernels
        assert any(name.startswith("ce_forward_kernel") for name in info["cuda_kernels"])
        assert any(name.startswith("annealed_mean_kernel") for name in info["cuda_kernels"])
        assert all(hasattr(C, f) for f in ("cuda_soft_encode", "cuda_ce_forward", "cuda_annealed_mean"))


@pytest.mark.skipif(shutil.which("nvcc") is None or bool(os.environ.get("FASTCOLOR_NO_CUDA")),
                    reason="nvcc not on PATH (or FASTCOLOR_NO_CUDA set): CUDA kernels are optional")
def test_cuda_kernels_built_when_nvcc_present():
    assert C.has_cuda_kernels, fc.build_info()
    assert len(C.cuda_kernels) >= 3


def test_gamut_tables_match_gamut_module():
    np.testing.assert_array_equal(np.asarray(C.gamut_bins(), dtype=np.float64), AB_BINS)


def test_unavailable_reason_names_the_cause(monkeypatch):
    monkeypatch.setattr(_ext, "load_extension", lambda force=False: None)
    assert "fastcolor._C" in cb.unavailable_reason("cpu")
    assert "fastcolor._C" in cb.unavailable_reason("cuda")
    monkeypatch.undo()
    if not HAS_GPU:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert cb.unavailable_reason("cuda")


def test_bad_arguments_raise_not_crash():
    with pytest.raises(ValueError):
        C.cpu_soft_encode(0, 0, 0, 1, 1, 0, 5.0)  # k = 0
    with pytest.raises(ValueError):
        C.cpu_soft_encode(0, 0, 0, 1, 1, 5, 5.0)  # null pointers with N * P > 0
    with pytest.raises(ValueError):
        C.cpu_annealed_mean(0, 7, 0, 0, 0, 0.38, False)  # dtype code
    with pytest.raises(ValueError):
        C.cpu_annealed_mean(0, 0, 0, 0, 0, 1e-9, False)  # T below the mode threshold
    C.cpu_soft_encode(0, 0, 0, 0, 5, 5, 5.0)  # empty: no-op


# ----------------------------------------------------------------------------- soft-encoding


def dense_ab_grid(step=2.5, lo=-135.0, hi=135.0):
    """(1, 2, n, n) ab on a grid through every bin centre, cell edge and midpoint (exact in float32)."""
    v = np.arange(lo, hi + step / 2, step)
    a, b = np.meshgrid(v, v, indexing="ij")
    return np.stack([a, b])[None]


def assert_encoding_matches(got_idx, got_w, ab64, k, exact=True):
    """got_* (N, k, ...) numpy; exact: indices equal the reference's (no float32 near-ties here)."""
    ref_idx, ref_w = R.soft_encode(ab64, k=k)
    if exact:
        np.testing.assert_array_equal(got_idx, ref_idx)
    else:  # the chosen bins are as near as the reference's, up to float32 rounding of the distances
        pix = np.moveaxis(ab64, 1, -1)
        d_got = ((pix[..., None, :] - AB_BINS[np.moveaxis(got_idx, 1, -1)]) ** 2).sum(-1)
        d_ref = ((pix[..., None, :] - AB_BINS[np.moveaxis(ref_idx, 1, -1)]) ** 2).sum(-1)
        np.testing.assert_allclose(np.sort(d_got, -1), np.sort(d_ref, -1), rtol=1e-5)
        return
    np.testing.assert_allclose(got_w, ref_w, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 2, 5, 10, 11, 16])
def test_soft_encode_dense_grid_exact_ties(device, k):
    """Grid through bin centres, cell edges and midpoints, inside and outside the gamut: every
    distance is exact in float32, so the indices (ties -> lower bin) must equal the reference's."""
    ab64 = dense_ab_grid()
    got = fc.soft_encode(torch.tensor(ab64, dtype=torch.float32, device=device), k=k, backend=_name(device))
    assert_encoding_matches(got.indices.cpu().long().numpy(), got.weights.cpu().numpy(), ab64, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 5, 10, 16])
def test_soft_encode_random_and_far_off(device, k):
    g = np.random.default_rng(k)
    near = g.uniform(-140, 140, size=(1, 2, 40, 50))
    far = np.concatenate([g.uniform(-1e6, 1e6, size=(1, 2, 3, 50)),
                          np.array([[1e6, -1e6, 1e3, -1e3, 0, 0, 3e4, -5e5], [0, 0, 0, 0, 1e6, -1e6, 3e4, 7]])
                          .reshape(1, 2, 1, 8).repeat(50 // 8 + 1, -1)[..., :50]], axis=2)
    for ab64, exact in ((near, True), (far, False)):
        ab32 = torch.tensor(ab64, dtype=torch.float32)
        got = fc.soft_encode(ab32.to(device), k=k, backend=_name(device))
        gi, gw = got.indices.cpu().long().numpy(), got.weights.cpu().numpy()
        assert np.all((gi >= 0) & (gi < 313)) and np.all(np.isfinite(gw))
        np.testing.assert_allclose(gw.sum(1), 1.0, rtol=1e-5)
        if exact:  # random float32 ab: ties only within rounding; compare away from them
            ab = ab32.double().numpy()
            d2 = ((np.moveaxis(ab, 1, -1)[..., None, :] - AB_BINS) ** 2).sum(-1)
            gaps = np.diff(np.sort(d2, axis=-1)[..., : k + 1], axis=-1).min(-1)
            clear = gaps > 1e-3
            ref_idx, ref_w = R.soft_encode(ab, k=k)
            assert clear.mean() > 0.9
            np.testing.assert_array_equal(np.moveaxis(gi, 1, -1)[clear], np.moveaxis(ref_idx, 1, -1)[clear])
            np.testing.assert_allclose(gw, ref_w, atol=2e-5)
        else:
            assert_encoding_matches(gi, gw, ab32.double().numpy(), k, exact=False)


@pytest.mark.parametrize("device", DEVICES)
def test_soft_encode_far_off_ab_exactly(device):
    """Far outside the bins' box, float32 |ab - c|^2 (~1e12, ulp 65536) would tie whole columns;
    the kernels compare distances reduced by the distance to the box and find the reference's bins."""
    pts = np.array([[1e6, 0.0], [1e5, 3.0], [-1e6, 50.0], [0.0, -1e7], [-3e4, 2e4], [250.0, -260.0]])
    ab64 = pts.T.reshape(1, 2, -1)
    got = cb.soft_encode(torch.tensor(ab64, dtype=torch.float32, device=device), 3, 5.0)
    ref_idx, ref_w = R.soft_encode(ab64, k=3)
    np.testing.assert_array_equal(got[0].cpu().numpy(), ref_idx)
    np.testing.assert_allclose(got[1].cpu().numpy(), ref_w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_soft_encode_non_finite_ab(device):
    ab = torch.tensor([[[float("nan"), 0.0, float("inf"), -float("inf"), 3.0]],
                       [[0.0, float("nan"), 1.0, 2.0, -float("inf")]]]).permute(1, 0, 2).contiguous()
    got = fc.soft_encode(ab.to(device), k=3, backend=_name(device))
    idx, w = got.indices.cpu(), got.weights.cpu()
    assert torch.equal(idx[0], torch.arange(3, dtype=torch.int32)[:, None].expand(3, 5))
    assert torch.isnan(w).all()  # like the reference: every distance is NaN/inf, all tie


# ----------------------------------------------------------------------------- fused loss


def _name(device):
    return "cpp" if device == "cpu" else "cuda"


def ref_grad_loss(x, ab, cw, k, grad_scale=1.0, pixel_scale=None, mask=None):
    """Per-pixel loss and gradient (N, P) / (N, 313, P) from the reference, with the backend's factors."""
    loss, grad = R.rebalanced_cross_entropy(x, ab, cw, k=k, reduction="none", grad_output=np.ones(x.shape[:1] + x.shape[2:]))
    s = np.ones(loss.shape) if pixel_scale is None else pixel_scale
    m = np.ones(loss.shape[0]) if mask is None else mask
    f = s * m[:, None]
    return loss * f, grad * (grad_scale * f)[:, None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_forward_contract_with_every_factor(device, dtype):
    """Backend call as the ops layer makes it (and the compiled custom op's backward): grad_scale,
    pixel_scale, image_mask, class weights, ab or precomputed target, need_grad off."""
    g = torch.Generator().manual_seed(1)
    n, p, k = 3, 301, 7
    x = (torch.randn(n, 313, p, generator=g) * 3).to(dtype)
    ab = torch.rand(n, 2, p, generator=g) * 240 - 120
    cw = torch.rand(313, generator=g) + 0.2
    mask = torch.tensor([1.0, 0.0, 1.0])
    ps = torch.rand(n, p, generator=g) + 0.5
    x64 = x.double().numpy()
    want_loss, want_grad = ref_grad_loss(x64, ab.double().numpy(), cw.double().numpy(), k, 0.37, ps.double().numpy(), mask.numpy())
    dev = lambda t: t.to(device)  # noqa: E731
    loss, grad = cb.ce_forward(dev(x), dev(ab), None, None, dev(cw), dev(mask), k, 5.0, 0.37, True, dev(ps))
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == x.shape
    np.testing.assert_allclose(loss.cpu().double().numpy(), want_loss, rtol=2e-5, atol=2e-5)
    tol = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    np.testing.assert_allclose(grad.cpu().double().numpy(), want_grad, atol=tol * np.abs(want_grad).max())
    idx, w = cb.soft_encode(dev(ab), k, 5.0)
    loss2, grad2 = cb.ce_forward(dev(x), None, idx, w, dev(cw), dev(mask), k, 5.0, 0.37, True, dev(ps))
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad2.float(), grad.float(), rtol=0, atol=0)
    loss3, grad3 = cb.ce_forward(dev(x), dev(ab), None, None, None, None, k, 5.0, 1.0, False)
    assert grad3 is None
    want3, _ = ref_grad_loss(x64, ab.double().numpy(), None, k)
    np.testing.assert_allclose(loss3.cpu().double().numpy(), want3, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradient_rounding_and_subnormals(device, dtype):
    """The gradient is rounded once, from float32 to the logits' dtype (incl. float16 subnormals)."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 313, 65, generator=g) * 2).to(dtype)
    ab = torch.rand(2, 2, 65, generator=g) * 200 - 100
    for scale in (1.0, 3e-6):  # 3e-6: float16 gradients deep in the subnormal range
        _, grad = cb.ce_forward(x.to(device), ab.to(device), None, None, None, None, 5, 5.0, scale, True)
        _, want = ref_grad_loss(x.double().numpy(), ab.double().numpy(), None, 5, scale)
        want_t = torch.from_numpy(want).to(dtype)  # correctly rounded reference
        got = grad.cpu()
        ulp = torch.maximum(*((want_t.double() - torch.nextafter(want_t, torch.full_like(want_t, d)).double()).abs()
                              for d in (float("inf"), -float("inf"))))
        assert ((got.double() - want_t.double()).abs() <= ulp + 1e-12).all()


@pytest.mark.parametrize("device", DEVICES)
def test_special_logits_and_bad_indices(device):
    x = torch.randn(1, 313, 6) * 2
    x[0, 3, 0] = float("nan")
    x[0, :, 1] = -float("inf")  # all -inf: NaN like log_softmax
    x[0, 7, 2] = float("inf")
    x[0, 9, 3] = -float("inf")  # one -inf logit (a masked class): finite loss, zero softmax there
    ab = torch.zeros(1, 2, 6)
    loss, grad = cb.ce_forward(x.to(device), ab.to(device), None, None, None, None, 5, 5.0, 1.0, True)
    loss, grad = loss.cpu(), grad.cpu()
    assert torch.isnan(loss[0, :3]).all() and torch.isfinite(loss[0, 3:]).all()
    assert grad[0, 9, 3] == 0 and torch.isfinite(grad[0, :, 3:]).all()
    # (The reference, like a torch composition, gives NaN there: 0 * log 0. The fused kernels
    # never form Z * log p for classes outside the target, so a masked logit is harmless.)
    x_ref = x[:, :, 3:].double().clone()
    x_ref[0, 9, 0] = -1e30
    want, want_g = ref_grad_loss(x_ref.numpy(), ab[:, :, 3:].double().numpy(), None, 5)
    np.testing.assert_allclose(loss[:, 3:].double().numpy(), want, rtol=2e-5)
    np.testing.assert_allclose(grad[:, :, 3:].double().numpy(), want_g, atol=2e-6)
    # Out-of-range precomputed indices: NaN loss for those pixels, never a crash.
    idx = torch.zeros(1, 2, 6, dtype=torch.int32)
    idx[0, 1] = 1
    idx[0, 1, 4] = 313
    idx[0, 0, 5] = -1
    w = torch.full((1, 2, 6), 0.5)
    loss, grad = cb.ce_forward(torch.randn(1, 313, 6).to(device), None, idx.to(device), w.to(device), None, None, 2, 5.0, 1.0, True)
    loss = loss.cpu()
    assert torch.isnan(loss[0, 4:]).all() and torch.isfinite(loss[0, :4]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_isa_variant_agrees(isa_variants, dtype):
    """Baseline, AVX2 and AVX-512 builds of the CPU loops (those this CPU runs) against the reference."""
    g = torch.Generator().manual_seed(3)
    n, p = 2, 300  # 300: a partial last tile
    x = (torch.randn(n, 313, p, generator=g) * 4).to(dtype)
    ab = torch.rand(n, 2, p, generator=g) * 260 - 130
    cw = torch.rand(313, generator=g) + 0.1
    want_loss, want_grad = ref_grad_loss(x.double().numpy(), ab.double().numpy(), cw.double().numpy(), 10, 0.5)
    probs = torch.softmax(x.float(), 1).to(dtype)
    want_am = R.annealed_mean(x.double().numpy(), T=0.38)
    want_amp = R.annealed_mean(probs=probs.double().numpy(), T=0.38)
    tol = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    results = {}
    for isa in isa_variants:
        assert C.cpu_set_isa(isa) and C.cpu_isa() == isa
        loss, grad = cb.ce_forward(x, ab, None, None, cw, None, 10, 5.0, 0.5, True)
        np.testing.assert_allclose(loss.double().numpy(), want_loss, rtol=2e-5, atol=2e-5, err_msg=isa)
        np.testing.assert_allclose(grad.double().numpy(), want_grad, atol=tol * np.abs(want_grad).max(), err_msg=isa)
        am = cb.annealed_mean(x, 0.38, False)
        np.testing.assert_allclose(am.double().numpy(), want_am, atol=2e-3, rtol=1e-4, err_msg=isa)
        amp = cb.annealed_mean(probs, 0.38, True)
        np.testing.assert_allclose(amp.double().numpy(), want_amp, atol=2e-3, rtol=1e-4, err_msg=isa)
        idx, w = cb.soft_encode(ab, 16, 5.0)
        results[isa] = idx
    for isa, idx in results.items():  # the search is integer logic: identical across ISAs
        assert torch.equal(idx, results[isa_variants[0]]), isa


def test_openmp_threads_give_identical_results():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 313, 1000, generator=g)  # large enough for the parallel path
    ab = torch.rand(3, 2, 1000, generator=g) * 200 - 100
    before = torch.get_num_threads()
    out = {}
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            loss, grad = cb.ce_forward(x, ab, None, None, None, None, 5, 5.0, 1.0, True)
            out[nt] = (loss, grad, cb.annealed_mean(x, 0.38, False), *cb.soft_encode(ab, 5, 5.0))
    finally:
        torch.set_num_threads(before)
    for nt in (2, 3):
        for a, b in zip(out[1], out[nt]):
            assert torch.equal(a, b)


def _encode_in_child(queue):
    ab = torch.rand(3, 2, 1000) * 200 - 100
    x = torch.randn(3, 313, 1000)
    loss, _ = cb.ce_forward(x, ab, None, None, None, None, 5, 5.0, 1.0, True)
    queue.put(bool(torch.isfinite(loss).all()) and cb.soft_encode(ab, 5, 5.0)[0].shape == (3, 5, 1000))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_after_parallel_parent_does_not_hang():
    """GNU OpenMP hangs in a child forked after the parent used its thread pool (DataLoader
    workers); the CPU loops run serially in such a child."""
    import multiprocessing as mp

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cb.ce_forward(torch.randn(3, 313, 1000), torch.zeros(3, 2, 1000), None, None, None, None, 5, 5.0, 1.0, True)
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_encode_in_child, args=(queue,))
        child.start()
        child.join(30)
        hung = child.is_alive()
        if hung:
            child.kill()
        assert not hung, "the forked child hung in the CPU loops"
        assert child.exitcode == 0 and queue.get(timeout=5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1e-6, 0.01, 0.38, 1.0, 3.0])
def test_annealed_mean_temperatures_and_extremes(device, T):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 313, 37, generator=g) * 3
    x[0, :, 0] = 0.0  # uniform: the mean of all bins
    x[0, 100, 1] = 80.0  # one dominant bin
    x[1, :, 2] = -1e4  # very negative, still a distribution
    got = cb.annealed_mean(x.to(device), T, False).cpu()
    want = R.annealed_mean(x.double().numpy(), T=T)
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-3, rtol=1e-4)
    probs = torch.softmax(x, 1)
    probs[0, :10, 3] = 0.0  # zero probabilities: log 0 = -inf, weight 0
    got = cb.annealed_mean(probs.to(device), T, True).cpu()
    np.testing.assert_allclose(got.double().numpy(), R.annealed_mean(probs=probs.double().numpy(), T=T), atol=2e-3, rtol=1e-4)


# ----------------------------------------------------------------------------- CUDA specifics


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_with_both_launch_bounds(dtype):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 313, 1111, generator=g) * 3).to(dtype)
    ab = torch.rand(3, 2, 1111, generator=g) * 260 - 130
    cw = torch.rand(313, generator=g) + 0.2
    idx5, w5 = cb.soft_encode(ab, 5, 5.0)  # one encoding for both devices (near-ties aside, they agree)
    want_loss, want_grad = cb.ce_forward(x, None, idx5, w5, cw, None, 5, 5.0, 0.5, True)
    want_am = cb.annealed_mean(x, 0.38, False)
    one_ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype] * want_grad.float().abs().max().item()
    try:
        for min_blocks in (4, 0):
            assert C.cuda_set_min_blocks(min_blocks)
            loss, grad = cb.ce_forward(x.cuda(), None, idx5.cuda(), w5.cuda(), cw.cuda(), None, 5, 5.0, 0.5, True)
            torch.testing.assert_close(loss.cpu(), want_loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad.cpu().float(), want_grad.float(), rtol=0, atol=one_ulp)
            torch.testing.assert_close(cb.annealed_mean(x.cuda(), 0.38, False).cpu(), want_am, rtol=1e-5, atol=1e-4)
    finally:
        C.cuda_set_min_blocks(4)
    assert not C.cuda_set_min_blocks(2)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device on this machine")
def test_cuda_soft_encode_matches_cpu_for_every_capacity():
    ab = torch.rand(3, 2, 1111, generator=torch.Generator().manual_seed(8)) * 260 - 130
    for k in (7, 10, 12):  # top-k capacity 8, 10 and 16
        want_idx, want_w = cb.soft_encode(ab, k, 5.0)
        idx, w = cb.soft_encode(ab.cuda(), k, 5.0)
        # Same search; nvcc contracts da^2 + db^2 into an FMA, so only float32 near-ties may differ.
        d2 = ((ab.double().permute(0, 2, 1)[..., None, :] - torch.tensor(AB_BINS)) ** 2).sum(-1)
        gaps = torch.sort(d2, -1).values[..., : k + 1].diff(dim=-1).min(-1).values
        clear = (gaps > 1e-3)[:, None, :].expand_as(want_idx)
        assert clear.float().mean() > 0.95
        assert torch.equal(idx.cpu()[clear], want_idx[clear])
        torch.testing.assert_close(w.cpu(), want_w, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device on this machine")
def test_cuda_runs_on_the_current_stream():
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 313, 4096, generator=g) * 3).cuda()
    ab = (torch.rand(4, 2, 4096, generator=g) * 200 - 100).cuda()
    want = cb.ce_forward(x, ab, None, None, None, None, 5, 5.0, 1.0, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = cb.ce_forward(x, ab, None, None, None, None, 5, 5.0, 1.0, True)
        am = cb.annealed_mean(x, 0.38, False)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(am, cb.annealed_mean(x, 0.38, False), rtol=0, atol=0)
