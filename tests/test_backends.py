"""Every backend, through the public API, against fastcolor.reference (float64 ground truth).

Parametrised by the ``target`` fixture (tests/conftest.py): torch, numba and cpp on the CPU,
and torch, triton and cuda where a GPU is present. Triton on the CPU (interpreter) has its
own smaller matrix in tests/test_triton_backend.py.
"""
from itertools import product

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reference import duplicate_target

import fastcolor as fc
from fastcolor import reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1), (3, 7, 9), (1, 33, 65)]
REDUCTIONS = ["mean", "sum", "none"]
# Every dtype x reduction x shape once; k, weights and nongray cycle through those 27 cases.
LOSS_CASES = [
    (dtype, red, shape, [1, 5, 10][i % 3], i % 2 == 0, (i // 2) % 2 == 0)
    for i, (dtype, red, shape) in enumerate(product(DTYPES, REDUCTIONS, SHAPES))
]
# Tolerance on the gradient, relative to its largest entry, for the dtype it is returned in.
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-6}


def make_inputs(n, h, w, seed, grey_first=True, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 313, h, w, generator=g, dtype=torch.float64) * scale
    ab = torch.rand(n, 2, h, w, generator=g, dtype=torch.float64) * 260 - 130
    if grey_first and n > 1:
        ab[0] = ab[0] / 40  # within |a|, |b| <= 5: a grey image for nongray
    weights = torch.rand(313, generator=g, dtype=torch.float64) * 5 + 0.1
    return logits, ab, weights


def ref_loss(logits, ab, weights, k, reduction, nongray, grad_output):
    return R.rebalanced_cross_entropy(
        logits.double().numpy(), ab.double().numpy(), None if weights is None else weights.numpy(),
        k=k, reduction=reduction, nongray=nongray, grad_output=np.asarray(grad_output.double()),
    )


@pytest.mark.parametrize("dtype,reduction,shape,k,use_weights,nongray", LOSS_CASES,
                         ids=[f"{str(c[0])[6:]}-{c[1]}-{'x'.join(map(str, c[2]))}-k{c[3]}-w{int(c[4])}-ng{int(c[5])}"
                              for c in LOSS_CASES])
def test_loss_and_gradient_match_reference(target, dtype, reduction, shape, k, use_weights, nongray):
    name, device = target
    n, h, w = shape
    logits64, ab, weights = make_inputs(n, h, w, seed=hash((reduction, shape, k)) % 2**31)
    weights = weights if use_weights else None
    x = logits64.to(dtype).to(device).requires_grad_(True)
    w_dev = None if weights is None else weights.float().to(device)
    loss = fc.rebalanced_cross_entropy(x, ab.float().to(device), w_dev, k=k, reduction=reduction, nongray=nongray,
                                       backend=name)
    if reduction == "none":
        g = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    else:
        g = torch.tensor(1.7, dtype=torch.float64)
    loss.backward(g.to(loss.dtype).to(device))
    # Ground truth: the reference in float64 on the very logits the backend saw.
    want_loss, want_grad = ref_loss(x.detach().cpu().double(), ab.float().double(), weights, k, reduction, nongray, g)
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype and x.grad.shape == x.shape
    got = loss.detach().cpu().double().numpy()
    np.testing.assert_allclose(got, want_loss, rtol=2e-5,
                               atol=2e-5 * (np.abs(want_loss).max() if np.size(want_loss) else 0))
    gg = x.grad.cpu().double().numpy()
    assert np.all(np.isfinite(gg))
    np.testing.assert_allclose(gg, want_grad, rtol=0, atol=GRAD_TOL[dtype] * max(np.abs(want_grad).max(), 1e-30))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 5, 10])
def test_soft_encode_matches_reference(target, shape, k):
    name, device = target
    n, h, w = shape
    _, ab, _ = make_inputs(n, h, w, seed=k)
    ab = ab.float()
    got = fc.soft_encode(ab.to(device), k=k, backend=name)
    idx, wts = R.soft_encode(ab.double().numpy(), k=k)
    assert got.indices.shape == (n, k, h, w) and got.weights.dtype == torch.float32
    # Indices must agree except where two candidates are within float32 rounding of a tie.
    d2 = ((np.moveaxis(ab.double().numpy(), 1, -1)[..., None, :] - fc.AB_BINS) ** 2).sum(-1)  # (n, h, w, 313)
    gaps = np.diff(np.sort(d2, axis=-1)[..., : k + 1], axis=-1).min(-1)
    clear = gaps > 1e-2
    assert clear.mean() > 0.9
    gi = np.moveaxis(got.indices.cpu().long().numpy(), 1, -1)
    assert np.array_equal(gi[clear], np.moveaxis(idx, 1, -1)[clear])
    np.testing.assert_allclose(got.weights.cpu().numpy(), wts, atol=2e-5)
    np.testing.assert_allclose(got.dense().cpu().double().numpy(), R.densify(idx, wts), atol=2e-5)


@pytest.mark.parametrize("T", [0.01, 0.38, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_annealed_mean_matches_reference(target, T, dtype):
    name, device = target
    for n, h, w in SHAPES:
        logits64, _, _ = make_inputs(n, h, w, seed=7, scale=2.0)
        x = logits64.to(dtype)
        got = fc.annealed_mean(x.to(device), T=T, backend=name)
        want = R.annealed_mean(x.double().numpy(), T=T)
        assert got.shape == (n, 2, h, w) and got.dtype == torch.float32
        np.testing.assert_allclose(got.cpu().double().numpy(), want, atol=2e-3, rtol=1e-4)
    p = torch.softmax(logits64, 1).to(dtype)
    got = fc.annealed_mean(probs=p.to(device), T=0.38, backend=name)
    np.testing.assert_allclose(got.cpu().double().numpy(), R.annealed_mean(probs=p.double().numpy(), T=0.38), atol=2e-3)


def test_annealed_mean_mode_and_gradient(target):
    name, device = target
    logits64, _, _ = make_inputs(2, 3, 5, seed=3)
    got = fc.annealed_mean(logits64.float().to(device), T=1e-7, backend=name)
    np.testing.assert_array_equal(got.cpu().numpy(), R.annealed_mean(logits64.float().double().numpy(), T=1e-7))
    # Gradient: against autograd through the float64 torch composition.
    x = logits64.float().to(device).requires_grad_(True)
    g = torch.randn(2, 2, 3, 5, dtype=torch.float64)
    fc.annealed_mean(x, T=0.38, backend=name).backward(g.float().to(device))
    y = logits64.float().double().requires_grad_(True)
    fc.annealed_mean(y, T=0.38, backend="torch").backward(g)
    np.testing.assert_allclose(x.grad.cpu().double().numpy(), y.grad.numpy(), atol=1e-4 * y.grad.abs().max().item())


def test_precomputed_target_equals_ab_target(target):
    name, device = target
    logits64, ab, weights = make_inputs(3, 7, 9, seed=11)
    x = logits64.float().to(device)
    ab, weights = ab.float().to(device), weights.float().to(device)
    labels = fc.soft_encode(ab, k=10, backend=name)
    for red in REDUCTIONS:
        a = fc.rebalanced_cross_entropy(x, ab, weights, k=10, reduction=red, backend=name)
        b = fc.rebalanced_cross_entropy(x, labels, weights, reduction=red, backend=name)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = fc.rebalanced_cross_entropy(x, labels, weights, nongray=True, target_ab=ab, backend=name)
    d = fc.rebalanced_cross_entropy(x, ab, weights, k=10, nongray=True, backend=name)
    torch.testing.assert_close(c, d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_duplicate_bins_in_a_target_are_summed(target, reduction):
    """Issue 21.6: a bin listed twice in a user's SoftLabels counts with the sum of its weights, in
    the loss and in the gradient (the reference's densify), on every backend; SoftLabels.dense too."""
    name, device = target
    logits64, _, weights = make_inputs(2, 3, 5, seed=21)
    idx, wts = duplicate_target(2, 3, 5, seed=2)  # shared with tests/test_reference.py
    labels = fc.SoftLabels(torch.tensor(idx, dtype=torch.int32).to(device), torch.tensor(wts).float().to(device))
    np.testing.assert_allclose(labels.dense().cpu().double().numpy(), R.densify(idx, wts), atol=1e-7)
    x = logits64.float().to(device).requires_grad_(True)
    loss = fc.rebalanced_cross_entropy(x, labels, weights.float().to(device), reduction=reduction, backend=name)
    go = torch.rand(loss.shape, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.3)
    loss.backward(go.float().to(device))
    want, want_g = R.rebalanced_cross_entropy(logits64.float().double().numpy(), None, weights.numpy(),
                                              target=(idx, wts), reduction=reduction, grad_output=go.double().numpy())
    np.testing.assert_allclose(loss.detach().cpu().double().numpy(), want, rtol=2e-5)
    np.testing.assert_allclose(x.grad.cpu().double().numpy(), want_g, rtol=0, atol=2e-5 * np.abs(want_g).max())


def test_non_contiguous_and_channels_last_inputs(target):
    name, device = target
    logits64, ab, weights = make_inputs(2, 9, 11, seed=5)
    base = logits64.float().to(device)
    cl = base.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    wide = torch.zeros(2, 2, 9, 22, device=device)
    wide[..., ::2] = ab.float().to(device)
    ab_strided = wide[..., ::2]  # non-contiguous view
    assert not ab_strided.is_contiguous()
    loss = fc.rebalanced_cross_entropy(cl, ab_strided, weights.float().to(device), backend=name)
    loss.backward()
    want_loss, want_grad = R.rebalanced_cross_entropy(base.cpu().double().numpy(), ab.float().double().numpy(),
                                                      weights.float().double().numpy())
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(cl.grad.cpu().double().numpy(), want_grad, atol=2e-5 * np.abs(want_grad).max())
    dec = fc.annealed_mean(base.permute(0, 1, 3, 2), backend=name)  # transposed spatial axes
    np.testing.assert_allclose(dec.cpu().double().numpy(),
                               R.annealed_mean(base.permute(0, 1, 3, 2).cpu().double().numpy()), atol=2e-3)


def test_loss_module_and_decoder_module(target):
    name, device = target
    logits64, ab, weights = make_inputs(2, 4, 4, seed=9)
    crit = fc.RebalancedCrossEntropyLoss(weights.numpy(), backend=name).to(device)
    assert crit.weights.device.type == device and "rebalanced" in repr(crit)
    x = logits64.float().to(device)
    loss = crit(x, ab.float().to(device))
    want, _ = R.rebalanced_cross_entropy(x.cpu().double().numpy(), ab.float().double().numpy(),
                                         weights.float().double().numpy())
    assert loss.item() == pytest.approx(want, rel=1e-5)
    dec = fc.AnnealedMeanDecoder(T=0.38, backend=name)
    torch.testing.assert_close(dec(x), fc.annealed_mean(x, T=0.38, backend="torch"), atol=2e-3, rtol=1e-4)
    decp = fc.AnnealedMeanDecoder(T=0.38, from_probs=True, backend=name)
    torch.testing.assert_close(decp(torch.softmax(x, 1)), dec(x), atol=2e-3, rtol=1e-4)


def test_empty_batch_and_empty_image(target):
    name, device = target
    for n, h, w in [(0, 4, 4), (2, 0, 5)]:
        x = torch.randn(n, 313, h, w, device=device, requires_grad=True)
        ab = torch.zeros(n, 2, h, w, device=device)
        assert fc.rebalanced_cross_entropy(x, ab, reduction="sum", backend=name).item() == 0.0
        assert torch.isnan(fc.rebalanced_cross_entropy(x, ab, reduction="mean", backend=name))
        loss = fc.rebalanced_cross_entropy(x, ab, reduction="none", backend=name)
        assert loss.shape == (n, h, w)
        fc.rebalanced_cross_entropy(x, ab, reduction="sum", backend=name).backward()
        assert x.grad.shape == x.shape
        assert fc.annealed_mean(x.detach(), backend=name).shape == (n, 2, h, w)
        assert fc.soft_encode(ab, backend=name).indices.shape == (n, 5, h, w)


def test_nan_and_inf_follow_pytorch_convention(target):
    name, device = target
    logits64, ab, _ = make_inputs(1, 3, 3, seed=4)
    x = logits64.float().to(device)
    x[0, 5, 1, 1] = float("nan")
    loss = fc.rebalanced_cross_entropy(x, ab.float().to(device), reduction="none", backend=name)
    assert torch.isnan(loss[0, 1, 1]) and torch.isfinite(loss[0, 0, 0])
    ab_bad = ab.float().clone()
    ab_bad[0, 0, 2, 2] = float("inf")
    ab_bad[0, 1, 0, 1] = 1e6
    loss = fc.rebalanced_cross_entropy(logits64.float().to(device), ab_bad.to(device), reduction="none", backend=name)
    assert torch.isfinite(loss[0, 0, 1])  # far-off but finite ab encodes onto the nearest bins
    dec = fc.annealed_mean(x, backend=name)
    assert torch.isnan(dec[0, :, 1, 1]).all() and torch.isfinite(dec[0, :, 0, 0]).all()
    # A -inf logit outside the target bins is a masked-out class: the loss stays finite (reference).
    y = logits64.float().clone()
    targets = set(R.soft_encode(ab.float().double().numpy()[:, :, :1, :1], k=5)[0].ravel().tolist())
    y[0, min(set(range(313)) - targets), 0, 0] = float("-inf")
    got = fc.rebalanced_cross_entropy(y.to(device), ab.float().to(device), reduction="none", backend=name)
    want, _ = R.rebalanced_cross_entropy(y.double().numpy(), ab.float().double().numpy(), reduction="none")
    assert np.isfinite(want[0, 0, 0])
    np.testing.assert_allclose(got.cpu().double().numpy(), want, rtol=1e-5)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6), k=st.integers(1, 16),
    scale=st.floats(0.1, 30), spread=st.floats(1, 400), seed=st.integers(0, 2**31 - 1),
    reduction=st.sampled_from(REDUCTIONS), use_weights=st.booleans(),
)
def test_property_loss_matches_reference(target, n, h, w, k, scale, spread, seed, reduction, use_weights):
    name, device = target
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, 313, h, w, generator=g) * scale).to(device).requires_grad_(True)
    ab = ((torch.rand(n, 2, h, w, generator=g) - 0.5) * spread).to(device)
    weights = (torch.rand(313, generator=g) * 4 + 0.1) if use_weights else None
    loss = fc.rebalanced_cross_entropy(logits, ab, None if weights is None else weights.to(device), k=k,
                                       reduction=reduction, backend=name)
    loss.sum().backward()
    want, want_grad = R.rebalanced_cross_entropy(logits.detach().cpu().double().numpy(), ab.cpu().double().numpy(),
                                                 None if weights is None else weights.double().numpy(), k=k,
                                                 reduction=reduction)
    np.testing.assert_allclose(loss.detach().cpu().double().numpy(), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits.grad.cpu().double().numpy(), want_grad,
                               atol=1e-5 * max(np.abs(want_grad).max(), 1e-30))
