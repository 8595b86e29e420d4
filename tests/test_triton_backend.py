"""The triton backend against fastcolor.reference, on the GPU when there is one, else on CPU tensors
through Triton's interpreter (small shapes: the interpreter runs every program in Python).

The generic matrix over the public API is tests/test_backends.py, the shared acceptance test of
the k-nearest search tests/test_encode_exact.py; this file adds the backend's own paths: the
contract called directly (:class:`LossCall` with pixel_scale, image_mask, grad_scale,
need_grad=False, precomputed targets), the candidate-table search with its float64 scan for
pixels outside the table's box and the NaN/Inf rule mixed in one program, both encode modes,
the launch-config hooks, and (no GPU needed) the kernels compiled for sm_90 by triton's own
toolchain, with the explicit-rounding distances in the PTX.

On a machine without CUDA the ``dev`` fixture sets TRITON_INTERPRET=1 for each test (the backend
builds interpreted kernels for CPU tensors whatever the variable said at import time), under which
the registry hands "triton" CPU tensors.
"""
from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import fastcolor as fc  # noqa: E402
from fastcolor import backends, gamut  # noqa: E402
from fastcolor import reference as R  # noqa: E402
from fastcolor.backends import triton_backend as tb  # noqa: E402
from fastcolor.backends.contract import LossCall  # noqa: E402
from fastcolor.gamut import AB_BINS, Q  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def dev(monkeypatch):
    if CUDA:
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.unavailable_reason("triton", "cpu") is None
    return "cpu"


def _ab(n, p, seed, spread=130.0):
    """ab over and beyond the gamut, as (N, 2, P) float32."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 2, p, generator=g) * 2 - 1) * spread


def _gamut_ab(n, p, seed):
    """ab within 6 units of a bin centre."""
    rng = np.random.default_rng(seed)
    c = AB_BINS[rng.integers(0, Q, n * p)] + rng.uniform(-6, 6, (n * p, 2))
    return torch.tensor(c.reshape(n, p, 2).transpose(0, 2, 1).copy(), dtype=torch.float32)


def _mixed_ab(seed):
    """(2, 2, P) float32 pixels of every kind in the same programs: random in the box, on the 0.25
    grid (exact float32 distances, true ties), the box's edges, outside the box (just beyond it,
    far, float32's range) and NaN / Inf."""
    rng = np.random.default_rng(seed)
    lo, hi = gamut.TABLE_LO, gamut.TABLE_HI
    below = float(np.nextafter(np.float32(hi), np.float32(0)))
    box = rng.uniform(lo, hi, (120, 2))
    grid = rng.integers(-480, 480, (120, 2)) * 0.25
    edges = [[lo, lo], [lo, below], [below, below], [below, -50.0], [lo, 7.5], [hi, 0.0], [0.0, hi], [lo - 1e-3, 0.0]]
    far = np.stack([rng.uniform(128.0, 2e3, 20) * rng.choice([-1, 1], 20), rng.uniform(-100, 100, 20)], 1)
    big = [[1e6, 0.0], [1e5, 3.0], [-3e5, 47.0], [2e4, -2e4], [3e38, -3e38], [2.0**24 + 3, 7.0], [-1e30, 5.0]]
    nan, inf = float("nan"), float("inf")
    bad = [[nan, 0.0], [0.0, nan], [inf, 0.0], [-inf, 3.0], [2.0, inf], [nan, inf]]
    px = np.concatenate([box, grid, edges, far, far[:, ::-1], big, bad]).astype(np.float32)
    px = px[rng.permutation(len(px))]
    if len(px) % 2:
        px = px[:-1]
    return torch.from_numpy(px.reshape(2, -1, 2).transpose(0, 2, 1).copy())


def _rule_indices(ab: np.ndarray, k: int) -> np.ndarray:
    """The k bins the rule of fastcolor.gamut picks, by brute force: float32 d^2 (no FMA) over all
    bins in the box, the reference's float64 outside it, bins 0..k-1 for NaN/Inf. (N, k, P)."""
    n, _, p = ab.shape
    px = ab.transpose(0, 2, 1).reshape(-1, 2).astype(np.float32)
    c = AB_BINS.astype(np.float32)
    with np.errstate(all="ignore"):
        da = px[:, None, 0] - c[None, :, 0]
        db = px[:, None, 1] - c[None, :, 1]
        d32 = da * da + db * db
    order = np.argsort(d32, axis=1, kind="stable")[:, :k]
    ref, _ = R.soft_encode(ab.astype(np.float64), k)
    ref = ref.transpose(0, 2, 1).reshape(-1, k)
    inbox = ((px >= gamut.TABLE_LO) & (px < gamut.TABLE_HI)).all(1)
    out = np.where(inbox[:, None], order, ref)
    return out.reshape(n, p, k).transpose(0, 2, 1)


@pytest.mark.parametrize("k", [1, 5, 10, 16])
def test_soft_encode_follows_the_rule(dev, k):
    ab = _mixed_ab(k)
    idx, w = tb.soft_encode(ab.to(dev), k=k, sigma=5.0)
    assert idx.dtype == torch.int32 and w.dtype == torch.float32 and idx.shape == (2, k, ab.shape[2])
    got_i, got_w = idx.cpu().numpy(), w.cpu().double().numpy()
    np.testing.assert_array_equal(got_i, _rule_indices(ab.numpy(), k))
    ri, rw = R.soft_encode(ab.double().numpy(), k)
    # The reference's own bins wherever float32 distances are exact (the 0.25 grid) or not used.
    a = ab.numpy().astype(np.float64)
    exact = (np.abs(a) >= gamut.TABLE_HI).any(1) | ~np.isfinite(a).all(1) | (a * 4 == np.round(a * 4)).all(1)
    np.testing.assert_array_equal(np.moveaxis(got_i, 1, 2)[exact], np.moveaxis(ri, 1, 2)[exact])
    np.testing.assert_allclose(got_w, rw, rtol=0, atol=1e-6, equal_nan=True)
    bad = ~np.isfinite(ab.numpy()).all(1)
    assert np.isnan(got_w.transpose(0, 2, 1)[bad]).all()
    assert (got_i.transpose(0, 2, 1)[bad] == np.arange(k)).all()


def test_soft_encode_exact_ties_take_the_lower_bin(dev):
    # Grid points and half-grid points: many candidates at exactly equal distances, in the box
    # (float32) and, for k = 2, beyond it (float64: (500, 5) is as far from (100, 0) as from (100, 10)).
    g = torch.Generator().manual_seed(3)
    box = (torch.randint(-25, 26, (2, 2, 33), generator=g) * 5).float()
    far = torch.tensor([[500.0, -300.0, 5.0, -2e3], [5.0, 15.0, 400.0, -115.0]]).expand(2, 2, 4)
    for k, ab in ((2, torch.cat([box, far], 2)), (7, box)):
        idx, w = tb.soft_encode(ab.to(dev), k=k, sigma=5.0)
        ri, rw = R.soft_encode(ab.double().numpy(), k)
        np.testing.assert_array_equal(idx.cpu().numpy(), ri)
        np.testing.assert_allclose(w.cpu().numpy(), rw, atol=1e-6)


def test_far_ab_keeps_the_small_differences_float32_distances_would_lose(dev):
    """ab = (1e6, 0): every bin of the a = 100 column is ~1e12 away, equal in float32 (ulp 131072);
    the nearest is still b = 0 (bin 312), and the weights are the reference's."""
    ab = torch.tensor([[[1e6, 1e5, -3e5, 2e4], [0.0, 3.0, 47.0, -2e4]]])
    for k in (1, 4):
        idx, w = tb.soft_encode(ab.to(dev), k=k, sigma=5.0)
        ri, rw = R.soft_encode(ab.double().numpy(), k)
        np.testing.assert_array_equal(idx.cpu().numpy(), ri)
        np.testing.assert_allclose(w.cpu().numpy(), rw, atol=1e-6)
    assert idx[0, 0, 0].item() == 312 and idx[0, 0, 1].item() == 312
    x = torch.zeros(1, Q, 1)
    x[0, 312] = 12.0
    loss, _ = tb.ce_forward(LossCall(logits=x.to(dev), ab=ab[..., :1].to(dev), k=1, need_grad=False))
    assert loss.item() < 0.01


def _ref_loss(x, idx, w, cw, scale, grad_scale):
    want_l, want_g = R.rebalanced_cross_entropy(x.double().numpy(), None, cw.double().numpy(), idx.shape[1],
                                                reduction="none", target=(idx, w))
    return want_l * scale, want_g * grad_scale * scale[:, None, :]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoded", [True, False], ids=["ab", "indices"])
def test_ce_forward_contract(dev, dtype, encoded):
    """The contract called directly: every scale (class weights, image mask, pixel scale, grad_scale),
    the target encoded in the kernel (pixels in and beyond the box) or precomputed."""
    n, k = 2, 5
    g = torch.Generator().manual_seed(int(encoded) + 10 * DTYPES.index(dtype))
    far = torch.tensor([[[300.0, -2e3]], [[1e4, 40.0]]]).expand(n, 2, 2)
    ab = torch.cat([_gamut_ab(n, 30, 1), _ab(n, 7, 2), far], 2)
    p = ab.shape[2]
    x = (torch.randn(n, Q, p, generator=g) * 3).to(dtype)
    cw = torch.rand(Q, generator=g) * 3 + 0.1
    mask = torch.tensor([1.0, 0.5])
    ps = torch.rand(n, p, generator=g) + 0.5
    idx, w = R.soft_encode(ab.double().numpy(), k)
    target = dict(ab=ab.to(dev)) if encoded else \
        dict(indices=torch.tensor(idx, dtype=torch.int32).to(dev), weights=torch.tensor(w, dtype=torch.float32).to(dev))
    common = dict(logits=x.to(dev), class_weights=cw.to(dev), image_mask=mask.to(dev), pixel_scale=ps.to(dev),
                  k=k, sigma=5.0, grad_scale=0.75, **target)
    loss, grad = tb.ce_forward(LossCall(**common, need_grad=True))
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == x.shape
    want_l, want_g = _ref_loss(x, idx, w, cw, (mask[:, None] * ps).double().numpy(), 0.75)
    np.testing.assert_allclose(loss.cpu().double().numpy(), want_l, rtol=2e-5, atol=2e-5 * np.abs(want_l).max())
    np.testing.assert_allclose(grad.cpu().double().numpy(), want_g, rtol=0, atol=GRAD_TOL[dtype] * np.abs(want_g).max())
    loss2, grad2 = tb.ce_forward(LossCall(**common, need_grad=False))
    assert grad2 is None
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)


def test_fused_loss_encodes_like_soft_encode(dev):
    """The loss kernel's on-the-fly encoding is the encode kernel's (one search): the same
    per-pixel loss as with soft_encode's output, for pixels of every kind, NaN/Inf included."""
    ab = _mixed_ab(7)
    n, _, p = ab.shape
    x = (torch.randn(n, Q, p, generator=torch.Generator().manual_seed(0)) * 3).to(dev)
    idx, w = tb.soft_encode(ab.to(dev), k=5, sigma=5.0)
    fused, g1 = tb.ce_forward(LossCall(logits=x, ab=ab.to(dev), k=5))
    pre, g2 = tb.ce_forward(LossCall(logits=x, indices=idx, weights=w, k=5))
    torch.testing.assert_close(fused, pre, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7, equal_nan=True)
    bad = ~torch.isfinite(ab).all(1)
    assert torch.isnan(fused.cpu()[bad]).all() and torch.isfinite(fused.cpu()[~bad]).all()
    # NaN / Inf ab: NaN only at bins 0..k-1 of the gradient (the reference's NaN weights there)
    g1 = g1.cpu().permute(0, 2, 1)[bad]
    assert torch.isnan(g1[:, :5]).all() and torch.isfinite(g1[:, 5:]).all()


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
    loss = fc.rebalanced_cross_entropy(x, ab.to(dev), weights.to(dev), k=k, reduction=reduction, nongray=nongray,
                                       backend="triton")
    if reduction == "none":
        go = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    else:
        go = torch.tensor(1.7, dtype=torch.float64)
    loss.backward(go.float().to(dev))
    want, want_g = R.rebalanced_cross_entropy(logits.double().numpy(), ab.double().numpy(), weights.double().numpy(), k,
                                              reduction=reduction, nongray=nongray, grad_output=go.numpy())
    np.testing.assert_allclose(loss.detach().cpu().double().numpy(), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    np.testing.assert_allclose(x.grad.cpu().double().numpy(), want_g, rtol=0,
                               atol=GRAD_TOL[dtype] * np.abs(want_g).max())


def test_separate_encode_mode_equals_fused(dev, monkeypatch):
    x = torch.randn(2, Q, 41).to(dev)
    ab = torch.cat([_ab(2, 40, 5), torch.tensor([[[500.0]], [[-7.0]]]).expand(2, 2, 1)], 2).to(dev)
    call = LossCall(logits=x, ab=ab, k=7)
    fused = tb.ce_forward(call)
    monkeypatch.setenv("FASTCOLOR_TRITON_ENCODE", "separate")
    sep = tb.ce_forward(call)
    torch.testing.assert_close(sep[0], fused[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sep[1], fused[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("T", [0.01, 0.38, 1.0])
def test_annealed_mean_logits_and_probs(dev, T):
    for dtype in DTYPES:
        x = (torch.randn(2, Q, 7, 9, dtype=torch.float64) * 2).to(dtype)
        got = fc.annealed_mean(x.to(dev), T=T, backend="triton")
        np.testing.assert_allclose(got.cpu().double().numpy(), R.annealed_mean(x.double().numpy(), T=T),
                                   atol=2e-3, rtol=1e-4)
    p = torch.softmax(torch.randn(1, Q, 1, 1, dtype=torch.float64) * 3, 1)
    p[0, 7] = 0.0  # log(0) = -inf: weight 0
    got = tb.annealed_mean(p.float().reshape(1, Q, 1).to(dev), T=T, is_probs=True)
    np.testing.assert_allclose(got.cpu().double().numpy().reshape(1, 2, 1, 1),
                               R.annealed_mean(probs=p.float().double().numpy(), T=T), atol=2e-3)


def test_non_finite_logits_and_empty_inputs(dev):
    x = torch.randn(1, Q, 6)
    x[0, 3, 2] = float("nan")
    x[0, 9, 4] = float("inf")
    ab = _gamut_ab(1, 6, 0)
    loss, grad = tb.ce_forward(LossCall(logits=x.to(dev), ab=ab.to(dev), k=5))
    loss = loss.cpu()
    assert torch.isnan(loss[0, 2]) and torch.isnan(loss[0, 4]) and torch.isfinite(loss[0, [0, 1, 3, 5]]).all()
    assert torch.isfinite(grad.cpu()[0, :, [0, 1, 3, 5]]).all()
    out = tb.annealed_mean(x.to(dev), T=0.38, is_probs=False).cpu()
    assert torch.isnan(out[0, :, 2]).all() and torch.isfinite(out[0, :, 0]).all()
    for n, p in [(0, 5), (2, 0)]:
        loss, grad = tb.ce_forward(LossCall(logits=torch.randn(n, Q, p).to(dev), ab=torch.zeros(n, 2, p).to(dev), k=5))
        assert loss.shape == (n, p) and grad.shape == (n, Q, p)
        idx, w = tb.soft_encode(torch.zeros(n, 2, p).to(dev), k=3, sigma=5.0)
        assert idx.shape == (n, 3, p)
        assert tb.annealed_mean(torch.randn(n, Q, p).to(dev), T=0.38, is_probs=False).shape == (n, 2, p)


_MAGNITUDES = [1.0, 6e4, -6e4, 1e7, 1e8, -1e8, 1e30, -1e30, 3.3e38, 3.4e38, -3.4e38]


@pytest.mark.parametrize("dtype, magnitude", [
    pytest.param(dt, mag, id=f"{str(dt)[6:]}-{mag:g}") for dt in DTYPES for mag in _MAGNITUDES
    if np.isfinite(torch.tensor(mag, dtype=dt).item())])
def test_constant_logits_give_log_313_at_any_magnitude(dev, dtype, magnitude):
    """Issue 13 item 10: the loss from the shifted logits. Before, m + log(s) in float32 gave
    6.0 at 1e7, 8.0 at 1e8, 0.0 at 1e30, and exp2(fma(x, log2 e, -m log2 e)) NaN near 3.4e38."""
    ab = torch.tensor([[[3.0, -41.0, 0.0, 66.0], [-7.0, 20.0, 0.0, 1.0]]])
    x = torch.full((1, Q, 4), magnitude, dtype=dtype)
    idx, w = R.soft_encode(ab.double().numpy(), 5)
    _, want_g = R.rebalanced_cross_entropy(np.zeros((1, Q, 4)), ab.double().numpy(), reduction="none")
    for target in (dict(ab=ab.to(dev)), dict(indices=torch.tensor(idx, dtype=torch.int32).to(dev),
                                              weights=torch.tensor(w, dtype=torch.float32).to(dev))):
        loss, grad = tb.ce_forward(LossCall(logits=x.to(dev), k=5, **target))
        np.testing.assert_allclose(loss.cpu().double().numpy(), np.full((1, 4), np.log(313)), rtol=1e-5)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        # softmax - target, with softmax = 1/313: to one rounding of the logits' dtype
        torch.testing.assert_close(grad.cpu().double(), torch.from_numpy(want_g), rtol=torch.finfo(dtype).eps,
                                   atol=1e-7)


def test_logits_near_float32_max_give_the_shifted_logits_answer(dev):
    """Finite logits near +-3.4e38: a finite loss where x_j - max is finite, +inf where a target
    bin's logit lies more than float32's max below the max (beyond float32's range: the float64
    reference cast to float32 is inf too), a finite gradient everywhere (as numba and cpp)."""
    x = torch.full((1, Q, 3), -3.4e38)
    x[0, 5] = 3.4e38
    x[0, 10:12] = 3.3e38
    x[0, :, 2] = 3.4e38
    idx = torch.tensor([[[10, 10, 30], [11, 20, 31]]], dtype=torch.int32)
    w = torch.tensor([[[0.75, 0.4, 0.5], [0.25, 0.6, 0.5]]])
    loss, grad = tb.ce_forward(LossCall(logits=x.to(dev), indices=idx.to(dev), weights=w.to(dev), k=2))
    want, want_g = R.rebalanced_cross_entropy(x.double().numpy(), target=(idx.numpy(), w.double().numpy()),
                                              reduction="none")
    got = loss.cpu().double().numpy()
    assert np.isfinite(got[0, [0, 2]]).all() and got[0, 1] == np.inf and want[0, 1] > np.finfo(np.float32).max
    np.testing.assert_allclose(got[0, [0, 2]], want[0, [0, 2]], rtol=1e-5)
    assert torch.isfinite(grad).all()
    np.testing.assert_allclose(grad.cpu().double().numpy(), want_g, atol=1e-6)


def test_config_hooks(monkeypatch):
    monkeypatch.setenv("FASTCOLOR_TRITON_CONFIG", "ce=64x8x0,am=16x2x128")
    assert tb.config("ce", torch.float32) == (64, 8, None)
    assert tb.config("am", torch.bfloat16) == (16, 2, 128)
    assert tb.config("enc", torch.float32) == (128, 4, 168)
    monkeypatch.setattr(tb, "CONFIG_OVERRIDE", {"enc": (256, 8)})
    assert tb.config("enc", torch.float32) == (256, 8, None)
    monkeypatch.setenv("FASTCOLOR_TRITON_CONFIG", "ce=bad")
    with pytest.raises(ValueError, match="FASTCOLOR_TRITON_CONFIG"):
        tb.config("ce", torch.float32)
    monkeypatch.delenv("FASTCOLOR_TRITON_CONFIG")
    # the interpreter: one big block (a power of two, within triton's 2^20 elements a tile)
    assert tb.config("ce", torch.float32, 37, device=torch.device("cpu"))[0] == 64
    assert tb.config("enc", torch.float32, 10**6, device=torch.device("cpu"))[0] * 16 <= 2**20
    monkeypatch.setenv("FASTCOLOR_TRITON_ENCODE", "sideways")
    with pytest.raises(ValueError, match="FASTCOLOR_TRITON_ENCODE"):
        tb.encode_mode()


def test_cpu_needs_the_interpreter_and_auto_never_picks_it(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in tb.unavailable_reason("cpu")
    assert "TRITON_INTERPRET" in backends.unavailable_reason("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.unavailable_reason("cpu") is None
    assert backends.unavailable_reason("triton", "cpu") is None
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("auto", "cpu") != "triton"


# ----------------------------------------------------------------------------- the persistent loss kernel


@pytest.fixture
def persistent(monkeypatch):
    monkeypatch.setenv("FASTCOLOR_TRITON_LOSS", "persistent")


@pytest.mark.parametrize("shape,dtype,weighted,nongray,reduction", [
    ((1, Q, 3, 5), torch.float32, True, False, "mean"),
    ((3, Q, 3, 5), torch.float16, False, True, "sum"),
    ((2, Q, 7, 9), torch.float32, True, True, "none"),
] + ([((2, Q, 7, 9), torch.bfloat16, True, True, "mean")] if CUDA else []))
def test_persistent_loss_matches_reference(dev, persistent, shape, dtype, weighted, nongray, reduction):
    """FASTCOLOR_TRITON_LOSS=persistent through the public op: loss and gradient against the float64
    reference, odd shapes (3 images on 2 interpreter programs: one loops over two tiles)."""
    n, _, h, w = shape
    g = torch.Generator().manual_seed(n * h)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    ab = torch.cat([_gamut_ab(n, h * w - 4, n), _ab(n, 4, h)], dim=2).reshape(n, 2, h, w)
    ab[0] = ab[0] / 40  # a grey image
    cw = torch.rand(Q, generator=g) * 4 + 0.1 if weighted else None
    x = logits.to(dev).clone().requires_grad_(True)
    loss = fc.rebalanced_cross_entropy(x, ab.to(dev), None if cw is None else cw.to(dev), k=5, reduction=reduction,
                                       nongray=nongray, backend="triton")
    go = torch.rand(loss.shape, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.7)
    loss.backward(go.float().to(dev))
    want, want_g = R.rebalanced_cross_entropy(logits.double().numpy(), ab.double().numpy(),
                                              None if cw is None else cw.double().numpy(), 5, reduction=reduction,
                                              nongray=nongray, grad_output=go.double().numpy())
    np.testing.assert_allclose(loss.detach().cpu().double().numpy(), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    np.testing.assert_allclose(x.grad.cpu().double().numpy(), want_g, rtol=0,
                               atol=GRAD_TOL[dtype] * np.abs(want_g).max())


@pytest.mark.parametrize("encoded", [True, False], ids=["ab", "indices"])
def test_persistent_kernel_equals_ce_kernel(dev, monkeypatch, encoded):
    """The contract called directly with every scale, pixels of every kind (NaN/Inf ab included),
    tiles of 32 pixels (three per image, the last one partial) on 2 programs: the loss and
    gradient of ce_kernel to rounding (the online sum rounds differently), the NaN where it has
    them, and the reference; forward-only gives the same loss (precomputed target)."""
    ab = _mixed_ab(11)[..., :70]
    n, _, p = ab.shape
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(n, Q, p, generator=g) * 3).to(dev)
    if encoded:
        target = dict(ab=ab.to(dev))
    else:
        idx, w = tb.soft_encode(ab.to(dev), k=5, sigma=5.0)
        target = dict(indices=idx, weights=w)
    common = dict(logits=x, class_weights=(torch.rand(Q, generator=g) + 0.1).to(dev),
                  image_mask=torch.tensor([1.0, 0.5]).to(dev),
                  pixel_scale=(torch.rand(n, p, generator=g) + 0.5).to(dev),
                  k=5, grad_scale=0.75, **target)
    want_l, want_g = tb.ce_forward(LossCall(**common))
    monkeypatch.setenv("FASTCOLOR_TRITON_LOSS", "persistent")
    monkeypatch.setattr(tb, "CONFIG_OVERRIDE", {"ce_persistent": (32, 4)})
    loss, grad = tb.ce_forward(LossCall(**common))
    torch.testing.assert_close(loss, want_l, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(grad, want_g, rtol=1e-5, atol=1e-7, equal_nan=True)
    ok = torch.isfinite(ab).all(1)
    assert (~ok).any() and torch.equal(torch.isnan(loss.cpu()), ~ok)
    gb = grad.cpu().permute(0, 2, 1)[~ok]  # NaN/Inf ab: NaN at bins 0..k-1 only (NaN weights)
    assert torch.isnan(gb[:, :5]).all() and torch.isfinite(gb[:, 5:]).all()
    ri, rw = R.soft_encode(ab.double().numpy(), 5)
    rl, rg = _ref_loss(x.cpu(), ri, rw, common["class_weights"].cpu(),
                       (common["image_mask"][:, None] * common["pixel_scale"]).cpu().double().numpy(), 0.75)
    np.testing.assert_allclose(loss.cpu().double().numpy()[ok], rl[ok], rtol=2e-5, atol=2e-5 * np.abs(rl[ok]).max())
    gm, rgm = grad.cpu().double().numpy().transpose(0, 2, 1)[ok], rg.transpose(0, 2, 1)[ok]
    np.testing.assert_allclose(gm, rgm, rtol=0, atol=2e-5 * np.abs(rgm).max())
    if not encoded:
        loss2, grad2 = tb.ce_forward(LossCall(**common, need_grad=False))
        assert grad2 is None
        torch.testing.assert_close(loss2, loss, rtol=0, atol=0, equal_nan=True)


def test_loss_mode(monkeypatch):
    monkeypatch.delenv("FASTCOLOR_TRITON_LOSS", raising=False)
    assert tb.loss_mode() == "registers"
    monkeypatch.setenv("FASTCOLOR_TRITON_LOSS", "Persistent")
    assert tb.loss_mode() == "persistent"
    monkeypatch.setenv("FASTCOLOR_TRITON_LOSS", "fast")
    with pytest.raises(ValueError, match="FASTCOLOR_TRITON_LOSS"):
        tb.loss_mode()
    assert tb.persistent_programs(torch.device("cpu")) == tb.INTERP_PROGRAMS


def test_persistent_programs_per_sm_from_registers():
    """Issue 21.7: as many persistent programs per SM as the compiled kernel's registers allow
    (4 were launched where 166 registers x 4 warps let 3 fit on an sm_90 SM's 65536)."""
    assert tb.programs_per_sm(166, 4) == 3
    assert tb.programs_per_sm(232, 4) == 2
    assert tb.programs_per_sm(64, 4) == tb.PERSISTENT_PROGRAMS_PER_SM  # no more than the cap
    assert tb.programs_per_sm(255, 8) == 1  # at least one
    assert tb.programs_per_sm(64, 4, shared_bytes=80_000, shared_per_sm=228 * 1024) == 2


# ----------------------------------------------------------------------------- duplicates, lists of pixels, grids


@pytest.mark.parametrize("mode", ["registers", "persistent"])
def test_duplicate_bins_are_summed(dev, monkeypatch, mode):
    """Issue 21.6: a precomputed target listing a bin twice gets the sum of its weights in the
    gradient (every duplicate stores that one value, so no store order matters on a GPU) and the
    loss, in both loss kernels, as the reference's densify."""
    monkeypatch.setenv("FASTCOLOR_TRITON_LOSS", mode)
    n, p = 2, 37
    r = np.random.default_rng(4)
    idx = r.integers(0, Q, size=(n, 4, p))
    idx[:, 1] = idx[:, 0]
    idx[0, 3, :5] = idx[0, 0, :5]  # three times
    idx[1, 3] = idx[1, 2]
    w = r.uniform(0.05, 1.0, size=idx.shape)
    w /= w.sum(1, keepdims=True)
    x = torch.randn(n, Q, p, generator=torch.Generator().manual_seed(1)) * 3
    cw = torch.rand(Q, generator=torch.Generator().manual_seed(2)) + 0.5
    loss, grad = tb.ce_forward(LossCall(logits=x.to(dev), indices=torch.tensor(idx, dtype=torch.int32).to(dev),
                                        weights=torch.tensor(w, dtype=torch.float32).to(dev),
                                        class_weights=cw.to(dev), k=4, grad_scale=0.5))
    want_l, want_g = _ref_loss(x, idx, w, cw, np.ones((n, p)), 0.5)
    np.testing.assert_allclose(loss.cpu().double().numpy(), want_l, rtol=2e-5)
    np.testing.assert_allclose(grad.cpu().double().numpy(), want_g, rtol=0, atol=2e-5 * np.abs(want_g).max())


@pytest.mark.parametrize("mode", ["default", "opt-in"])
def test_lists_of_pixels_take_the_row_wise_path(dev, monkeypatch, mode):
    """(M, 2) ab and (M, 313) logits arrive as (M, C, 1): read as one image of M pixels with
    contiguous channels (ROWS), every op, both kernels of each, against the reference; with the
    image factor (nongray) per row and a per-row grad_output."""
    if mode == "opt-in":
        monkeypatch.setenv("FASTCOLOR_TRITON_LOSS", "persistent")
        monkeypatch.setenv("FASTCOLOR_TRITON_DECODE", "stream")
    m = 45
    ab = torch.cat([_gamut_ab(1, m - 3, 9)[0].T, torch.tensor([[300.0, -4.0], [1.0, 2.0], [float("nan"), 0.0]])])
    x64 = torch.randn(m, Q, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    cw = torch.rand(Q, generator=torch.Generator().manual_seed(4)) + 0.5
    calls = []
    real = tb._launch
    monkeypatch.setattr(tb, "_launch", lambda kernel, grid, args, consts, *a: calls.append(consts.get("ROWS"))
                        or real(kernel, grid, args, consts, *a))
    labels = fc.soft_encode(ab.to(dev), k=5, backend="triton")
    ri, rw = R.soft_encode(ab.double().numpy()[..., None], 5)
    np.testing.assert_array_equal(labels.indices.cpu().numpy()[:-1], ri[:-1, :, 0])
    np.testing.assert_allclose(labels.weights.cpu().double().numpy(), rw[..., 0], atol=1e-6, equal_nan=True)
    xr = x64.float().to(dev).requires_grad_(True)
    loss = fc.rebalanced_cross_entropy(xr, ab.to(dev), cw.to(dev), reduction="none", nongray=True, backend="triton")
    go = torch.rand(m, dtype=torch.float64) + 0.5
    loss.backward(go.float().to(dev))
    want, want_g = R.rebalanced_cross_entropy(x64.numpy(), ab.double().numpy(), cw.double().numpy(), reduction="none",
                                              nongray=True, grad_output=go.numpy())
    np.testing.assert_allclose(loss.detach().cpu().double().numpy(), want, rtol=2e-5, atol=1e-6, equal_nan=True)
    ok = np.isfinite(want)
    np.testing.assert_allclose(xr.grad.cpu().double().numpy()[ok], want_g[ok], rtol=0,
                               atol=2e-5 * np.abs(want_g[ok]).max())
    got = fc.annealed_mean(x64.float().to(dev), T=0.38, backend="triton")
    np.testing.assert_allclose(got.cpu().double().numpy(), R.annealed_mean(x64.float().double().numpy(), T=0.38),
                               atol=2e-3, rtol=1e-4)
    assert calls and all(calls), calls  # every launch took the row-wise layout


def test_every_launch_keeps_grid_axes_1_and_2_within_cuda_limits(monkeypatch):
    """Issue 21.4: CUDA caps grid axes 1 and 2 at 65535 (the interpreter has no limit, triton 3.6
    passes a larger one through). 70000 pixels of (M, 2) ab, (M, 313) logits and (N, 313, P) images
    with N = 70000: every launch's grid is recorded (the kernels not run: the grid is the point)."""
    seen = []
    monkeypatch.setattr(tb, "_launch", lambda kernel, grid, *a: seen.append((kernel.__name__, grid)))
    monkeypatch.setattr(tb, "_kernels", lambda device: _StubKernels())
    m = 70_000
    ab = torch.zeros(m, 2, 1)
    x = torch.zeros(m, Q, 1)
    for mode in ("registers", "persistent"):
        monkeypatch.setenv("FASTCOLOR_TRITON_LOSS", mode)
        monkeypatch.setenv("FASTCOLOR_TRITON_DECODE", "stream" if mode == "persistent" else "registers")
        tb.soft_encode(ab, k=5, sigma=5.0)
        tb.ce_forward(LossCall(logits=x, ab=ab, k=5))
        tb.ce_forward(LossCall(logits=x.reshape(m // 2, Q, 2), ab=ab.reshape(m // 2, 2, 2), k=5))
        tb.annealed_mean(x, T=0.38, is_probs=False)
        tb.annealed_mean(x.reshape(m // 2, Q, 2), T=0.38, is_probs=False)
        tb.soft_encode(ab.reshape(m // 2, 2, 2), k=5, sigma=5.0)
    tb.scale_(torch.zeros(m, Q, 1), torch.ones(1))
    assert len(seen) == 13, seen
    assert [name for name, _ in seen].count("ce_persistent_kernel") == 1  # (M, C, 1) lists take ce_kernel
    seen.clear()
    monkeypatch.setenv("FASTCOLOR_TRITON_LOSS", "persistent")
    for k in (5, tb.PERSISTENT_K_MAX + 1):  # a larger k takes ce_kernel: the persistent one spills there
        tb.ce_forward(LossCall(logits=x.reshape(m // 2, Q, 2), ab=ab.reshape(m // 2, 2, 2), k=k))
    assert [name for name, _ in seen if name.startswith("ce")] == ["ce_persistent_kernel", "ce_kernel"], seen
    for name, grid in seen:
        assert all(g <= tb.GRID_YZ_MAX for g in grid[1:]) and 1 <= grid[0] < 2**31, (name, grid)
    with pytest.raises(ValueError, match="axes 1 and 2 hold at most 65535"):
        _real_launch(None, (1, 65536), (), {}, None, torch.device("cpu"))


_real_launch = tb._launch


class _StubKernels:
    """Kernels that are never launched (the grid test replaces _launch)."""

    def __getattr__(self, name):
        return types.SimpleNamespace(__name__=name)


# ----------------------------------------------------------------------------- the GPU build, without a GPU


def test_kernels_compile_for_sm90_without_contracted_distances():
    """triton.compile for an sm_90 target runs triton's own LLVM and ptxas on the host: the GPU
    build is checked here even without a GPU (every variant, with the spill bound:
    tests/test_triton_compile.py). The search's squared distances are explicit-rounding PTX
    (mul.rn / add.rn, never fused into an FMA), float32 and float64; the persistent kernel loads the
    logits 16 bytes at a time and stores the gradient in vectors."""
    from fastcolor.backends.triton_backend import compile_check as cc

    pick = {v.name: v for v in cc.variants()}
    enc = cc.compile_variant(pick["encode_kernel fp32 aligned k5"], 90)
    ce = cc.compile_variant(pick["ce_kernel bf16 aligned k5 ENCODE WRITE_GRAD"], 90)
    am = cc.compile_variant(pick["annealed_mean_kernel fp32 aligned IS_PROBS"], 90)
    pers = [cc.compile_variant(pick[f"ce_persistent_kernel {dt} aligned k5 ENCODE WRITE_GRAD"], 90)
            for dt in ("bf16", "fp32")]
    for c in pers:
        assert re.search(r"\bld\.global(\.\w+)*\.v4\.b32\b", c.asm["ptx"]), "no 16-byte loads of the logits"
        assert re.search(r"\bst\.global(\.\w+)*\.v[24]\.b32\b", c.asm["ptx"]), "no vector stores of the gradient"
    for c in (enc, ce, am, *pers):
        assert c.asm["cubin"]
    for c in (enc, ce, *pers):
        ptx = c.asm["ptx"]
        # float32 (rule 1): d^2 and the weights' difference; float64 (rule 2): d^2
        assert len(re.findall(r"\bmul\.rn(\.ftz)?\.f32\b", ptx)) >= 4, "float32 distances not explicitly rounded"
        assert len(re.findall(r"\bmul\.rn\.f64\b", ptx)) >= 2 and re.search(r"\badd\.rn\.f64\b", ptx)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with ~10 GB free")
def test_offsets_beyond_int32_on_gpu():
    """N * 313 * P > 2**31: the last image must match the same image computed on its own."""
    n, p = 7, 1 << 20
    x = torch.randn(n, Q, p, device="cuda", dtype=torch.bfloat16)
    ab = torch.rand(n, 2, p, device="cuda") * 160 - 80
    loss, grad = tb.ce_forward(LossCall(logits=x, ab=ab, k=5))
    l1, g1 = tb.ce_forward(LossCall(logits=x[-1:].contiguous(), ab=ab[-1:].contiguous(), k=5))
    torch.testing.assert_close(loss[-1:], l1)
    assert torch.equal(grad[-1:], g1)
    torch.testing.assert_close(tb.annealed_mean(x, T=0.38, is_probs=False)[-1:],
                               tb.annealed_mean(x[-1:].contiguous(), T=0.38, is_probs=False))
