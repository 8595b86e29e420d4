"""The triton backend against fastcolor.reference, on the GPU when there is one, else on CPU tensors
through Triton's interpreter (tiny shapes: the interpreter runs every program in Python).

The generic matrix over the public API is tests/test_backends.py (triton on cuda); this file adds
the backend's own paths: the contract called directly (pixel_scale, image_mask, grad_scale,
need_grad=False, precomputed targets), the windowed k-nearest search and its full-scan fallback
(out-of-gamut, huge, exact ties, NaN ab), both encode modes, the launch-config hooks.

On a machine without CUDA the ``dev`` fixture sets TRITON_INTERPRET=1 for each test (the backend
builds interpreted kernels for CPU tensors whatever the variable said at import time) and lets the
registry hand "triton" CPU tensors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import fastcolor as fc  # noqa: E402
from fastcolor import backends  # noqa: E402
from fastcolor import reference as R  # noqa: E402
from fastcolor.backends import triton_backend as tb  # noqa: E402
from fastcolor.gamut import AB_BINS, Q  # noqa: E402

pytestmark = pytest.mark.triton
CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def dev(monkeypatch):
    if CUDA:
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name, devices = backends.BACKENDS["triton"]
    if "cpu" not in devices:
        monkeypatch.setitem(backends.BACKENDS, "triton", (name, devices + ("cpu",)))
    assert backends.unavailable_reason("triton", "cpu") is None
    return "cpu"


def _ab(n, p, seed, spread=130.0):
    """ab over and beyond the gamut, as (N, 2, P) float32."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 2, p, generator=g) * 2 - 1) * spread


def _gamut_ab(n, p, seed):
    """ab within 6 units of a bin centre: the windowed search never falls back."""
    rng = np.random.default_rng(seed)
    c = AB_BINS[rng.integers(0, Q, n * p)] + rng.uniform(-6, 6, (n * p, 2))
    return torch.tensor(c.reshape(n, p, 2).transpose(0, 2, 1).copy(), dtype=torch.float32)


def _check_encoding(ab, idx, w, k):
    """Indices equal the reference's away from float32 near-ties; weights within 2e-5."""
    ri, rw = R.soft_encode(ab.double().numpy(), k)
    px = ab.double().numpy().transpose(0, 2, 1).reshape(-1, 2)
    d2 = np.sort(((px[:, None, :] - AB_BINS[None]) ** 2).sum(-1), axis=1)[:, : k + 1]
    clear = np.diff(d2, axis=1).min(1) > 1e-3 * (1 + d2[:, -1]) if k < Q else np.ones(len(px), bool)
    gi = idx.cpu().numpy().transpose(0, 2, 1).reshape(-1, k)
    np.testing.assert_array_equal(gi[clear], ri.transpose(0, 2, 1).reshape(-1, k)[clear])
    assert clear.mean() > 0.8
    np.testing.assert_allclose(w.cpu().numpy(), rw, atol=2e-5)


@pytest.mark.parametrize("k", [1, 5, 10, 16])
def test_soft_encode_window_and_fallback(dev, k):
    # 40 pixels near bin centres (window path) and 30 anywhere in [-130, 130]^2 (some fall back)
    ab = torch.cat([_gamut_ab(1, 40, k), _ab(1, 30, k)], dim=2)
    idx, w = tb.soft_encode(ab.to(dev), k, 5.0)
    assert idx.dtype == torch.int32 and w.dtype == torch.float32 and idx.shape == (1, k, 70)
    _check_encoding(ab, idx, w, k)


def test_soft_encode_exact_ties_take_the_lower_bin(dev):
    # Grid points and half-grid points: many candidates at exactly equal distances.
    g = torch.Generator().manual_seed(3)
    ab = (torch.randint(-22, 21, (2, 2, 33), generator=g) * 5).float()
    for k in (2, 7):
        idx, w = tb.soft_encode(ab.to(dev), k, 5.0)
        ri, rw = R.soft_encode(ab.double().numpy(), k)
        np.testing.assert_array_equal(idx.cpu().numpy(), ri)
        np.testing.assert_allclose(w.cpu().numpy(), rw, atol=2e-6)


def test_far_ab_keeps_the_small_differences_float32_distances_would_lose(dev):
    """ab = (1e6, 0): every bin of the a = 100 column is ~1e12 away, equal in float32 (ulp 131072);
    the nearest is still b = 0 (bin 312), and the weights are the reference's."""
    ab = torch.tensor([[[1e6, 1e5, -3e5, 2e4], [0.0, 3.0, 47.0, -2e4]]])
    for k in (1, 4):
        idx, w = tb.soft_encode(ab.to(dev), k, 5.0)
        ri, rw = R.soft_encode(ab.double().numpy(), k)
        np.testing.assert_array_equal(idx.cpu().numpy(), ri)
        np.testing.assert_allclose(w.cpu().numpy(), rw, atol=1e-5)
    assert idx[0, 0, 0].item() == 312 and idx[0, 0, 1].item() == 312
    x = torch.zeros(1, Q, 1)
    x[0, 312] = 12.0
    loss, _ = tb.ce_forward(x.to(dev), ab[..., :1].to(dev), None, None, None, None, 1, 5.0, 1.0, False)
    assert loss.item() < 0.01


def test_soft_encode_far_and_non_finite_ab(dev):
    ab = torch.tensor([[[1e6, -1e6, 3e4, 0.0, float("nan"), float("inf"), 12.0],
                        [-2e5, 7e5, 3e4, float("nan"), 1.0, 5.0, -float("inf")]]])
    idx, w = tb.soft_encode(ab.to(dev), 5, 5.0)
    idx, w = idx.cpu(), w.cpu()
    ri, _ = R.soft_encode(ab[..., :3].double().numpy(), 5)
    np.testing.assert_array_equal(idx[..., :3].numpy(), ri)  # far but finite: the true nearest bins
    assert torch.isfinite(w[..., :3]).all() and torch.allclose(w[..., :3].sum(1), torch.ones(1, 3))
    assert ((idx >= 0) & (idx < Q)).all()  # never out of range, even for NaN/inf
    assert torch.isnan(w[..., 3:]).all()  # NaN / inf ab: NaN weights, as the reference gives


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoded", [True, False], ids=["ab", "indices"])
def test_ce_forward_contract(dev, dtype, encoded):
    """The contract called directly: every scale (class weights, image mask, pixel scale, grad_scale)."""
    n, p, k = 2, 37, 5
    g = torch.Generator().manual_seed(int(encoded) + 10 * DTYPES.index(dtype))
    x = (torch.randn(n, Q, p, generator=g) * 3).to(dtype)
    ab = torch.cat([_gamut_ab(n, 30, 1), _ab(n, 7, 2)], dim=2)
    cw = torch.rand(Q, generator=g) * 3 + 0.1
    mask = torch.tensor([1.0, 0.5])
    ps = torch.rand(n, p, generator=g) + 0.5
    idx, w = R.soft_encode(ab.double().numpy(), k)
    args = (None, torch.tensor(idx, dtype=torch.int32).to(dev), torch.tensor(w, dtype=torch.float32).to(dev)) if not encoded \
        else (ab.to(dev), None, None)
    loss, grad = tb.ce_forward(x.to(dev), *args, cw.to(dev), mask.to(dev), k, 5.0, 0.75, True, ps.to(dev))
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == x.shape
    want_l, want_g = R.rebalanced_cross_entropy(x.double().numpy(), ab.double().numpy(), cw.double().numpy(), k,
                                                reduction="none", target=(idx, w))
    scale = (mask[:, None] * ps).double().numpy()
    want_l = want_l * scale
    want_g = want_g * 0.75 * scale[:, None, :]
    np.testing.assert_allclose(loss.cpu().double().numpy(), want_l, rtol=2e-5, atol=2e-5 * np.abs(want_l).max())
    np.testing.assert_allclose(grad.cpu().double().numpy(), want_g, rtol=0, atol=GRAD_TOL[dtype] * np.abs(want_g).max())
    loss2, grad2 = tb.ce_forward(x.to(dev), *args, cw.to(dev), mask.to(dev), k, 5.0, 0.75, False, ps.to(dev))
    assert grad2 is None
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,reduction,nongray,dtype", [
    (1, "mean", False, torch.float32), (5, "sum", True, torch.float16), (10, "none", True, torch.float32),
] + ([(5, "mean", True, torch.bfloat16)] if CUDA else []))
def test_public_loss_matches_reference(dev, k, reduction, nongray, dtype):
    n, h, w = 3, 3, 5
    g = torch.Generator().manual_seed(k)
    logits = (torch.randn(n, Q, h, w, generator=g, dtype=torch.float64) * 4).to(dtype)
    ab = torch.cat([_gamut_ab(n, 10, k), _ab(n, 5, k)], dim=2).reshape(n, 2, h, w)
    ab[0] = ab[0] / 40  # a grey image
    weights = torch.rand(Q, generator=g) * 4 + 0.1
    x = logits.to(dev).clone().requires_grad_(True)
    loss = fc.rebalanced_cross_entropy(x, ab.to(dev), weights.to(dev), k=k, reduction=reduction, nongray=nongray, backend="triton")
    go = torch.rand(loss.shape, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    loss.backward(go.float().to(dev))
    want, want_g = R.rebalanced_cross_entropy(logits.double().numpy(), ab.double().numpy(), weights.double().numpy(), k,
                                              reduction=reduction, nongray=nongray, grad_output=go.numpy())
    np.testing.assert_allclose(loss.detach().cpu().double().numpy(), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    np.testing.assert_allclose(x.grad.cpu().double().numpy(), want_g, rtol=0, atol=GRAD_TOL[dtype] * np.abs(want_g).max())


def test_separate_encode_mode_equals_fused(dev, monkeypatch):
    x = torch.randn(2, Q, 41).to(dev)
    ab = _ab(2, 41, 5).to(dev)
    fused = tb.ce_forward(x, ab, None, None, None, None, 10, 5.0, 1.0, True)
    monkeypatch.setenv("FASTCOLOR_TRITON_ENCODE", "separate")
    sep = tb.ce_forward(x, ab, None, None, None, None, 10, 5.0, 1.0, True)
    torch.testing.assert_close(sep[0], fused[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sep[1], fused[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("T", [0.01, 0.38, 1.0])
def test_annealed_mean_logits_and_probs(dev, T):
    for dtype in DTYPES:
        x = (torch.randn(2, Q, 7, 9, dtype=torch.float64) * 2).to(dtype)
        got = fc.annealed_mean(x.to(dev), T=T, backend="triton")
        np.testing.assert_allclose(got.cpu().double().numpy(), R.annealed_mean(x.double().numpy(), T=T), atol=2e-3, rtol=1e-4)
    p = torch.softmax(torch.randn(1, Q, 1, 1, dtype=torch.float64) * 3, 1)
    p[0, 7] = 0.0  # log(0) = -inf: weight 0
    got = tb.annealed_mean(p.float().reshape(1, Q, 1).to(dev), T, True)
    np.testing.assert_allclose(got.cpu().double().numpy().reshape(1, 2, 1, 1), R.annealed_mean(probs=p.float().double().numpy(), T=T), atol=2e-3)


def test_non_finite_logits_and_empty_inputs(dev):
    x = torch.randn(1, Q, 6)
    x[0, 3, 2] = float("nan")
    x[0, 9, 4] = float("inf")
    ab = _gamut_ab(1, 6, 0)
    loss, grad = tb.ce_forward(x.to(dev), ab.to(dev), None, None, None, None, 5, 5.0, 1.0, True)
    loss = loss.cpu()
    assert torch.isnan(loss[0, 2]) and torch.isnan(loss[0, 4]) and torch.isfinite(loss[0, [0, 1, 3, 5]]).all()
    assert torch.isfinite(grad.cpu()[0, :, [0, 1, 3, 5]]).all()
    out = tb.annealed_mean(x.to(dev), 0.38, False).cpu()
    assert torch.isnan(out[0, :, 2]).all() and torch.isfinite(out[0, :, 0]).all()
    for n, p in [(0, 5), (2, 0)]:
        loss, grad = tb.ce_forward(torch.randn(n, Q, p).to(dev), torch.zeros(n, 2, p).to(dev), None, None, None, None, 5, 5.0, 1.0, True)
        assert loss.shape == (n, p) and grad.shape == (n, Q, p)
        idx, w = tb.soft_encode(torch.zeros(n, 2, p).to(dev), 3, 5.0)
        assert idx.shape == (n, 3, p) and tb.annealed_mean(torch.randn(n, Q, p).to(dev), 0.38, False).shape == (n, 2, p)


def test_config_hooks(monkeypatch):
    monkeypatch.setenv("FASTCOLOR_TRITON_CONFIG", "ce=64x8x0,am=16x2x128")
    assert tb.config("ce", torch.float32) == (64, 8, None)
    assert tb.config("am", torch.bfloat16) == (16, 2, 128)
    assert tb.config("enc", torch.float32) == (128, 4, None)
    monkeypatch.setenv("FASTCOLOR_TRITON_CONFIG", "ce=bad")
    with pytest.raises(ValueError, match="FASTCOLOR_TRITON_CONFIG"):
        tb.config("ce", torch.float32)
    monkeypatch.setenv("FASTCOLOR_TRITON_ENCODE", "sideways")
    with pytest.raises(ValueError, match="FASTCOLOR_TRITON_ENCODE"):
        tb.encode_mode()


def test_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in tb.unavailable_reason("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.unavailable_reason("cpu") is None


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with ~10 GB free")
def test_offsets_beyond_int32_on_gpu():
    """N * 313 * P > 2**31: the last image must match the same image computed on its own."""
    n, p = 7, 1 << 20
    x = torch.randn(n, Q, p, device="cuda", dtype=torch.bfloat16)
    ab = torch.rand(n, 2, p, device="cuda") * 160 - 80
    loss, grad = tb.ce_forward(x, ab, None, None, None, None, 5, 5.0, 1.0, True)
    l1, g1 = tb.ce_forward(x[-1:].contiguous(), ab[-1:].contiguous(), None, None, None, None, 5, 5.0, 1.0, True)
    torch.testing.assert_close(loss[-1:], l1)
    assert torch.equal(grad[-1:], g1)
    torch.testing.assert_close(tb.annealed_mean(x, 0.38, False)[-1:], tb.annealed_mean(x[-1:].contiguous(), 0.38, False))
