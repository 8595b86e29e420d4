"""The loss as a PyTorch user reads it (issue 22.4): ``weight=``, a per-pixel ``mask``, the mean's
divisor, the one-time warning for normalised ab.

Every backend (the ``target`` fixture of tests/conftest.py; triton in its interpreter on small
shapes) is compared with :func:`fastcolor.reference.rebalanced_cross_entropy` in float64, forward
and gradient, with no pixel, some pixels and every pixel masked and ``grad_output != 1``; the
reference itself is checked against a computation on the kept pixels alone.
"""
import warnings

import numpy as np
import pytest
import torch

import fastcolor as fc
from fastcolor import backends
from fastcolor import reference as R
from fastcolor.backends.contract import LossCall
from fastcolor.ops import loss as loss_mod

GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MASKS = ["none", "some", "all"]
# Odd shapes, dtypes, reductions, and every mask kind; weights and nongray alternate.
CASES = [
    ((3, 7, 9), torch.float32, "mean"), ((1, 33, 5), torch.float32, "sum"), ((2, 5, 3), torch.float16, "none"),
    ((4, 1, 11), torch.bfloat16, "mean"), ((2, 3, 3), torch.float32, "none"),
]


def make_inputs(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 313, h, w, generator=g, dtype=torch.float64) * 4
    ab = torch.rand(n, 2, h, w, generator=g, dtype=torch.float64) * 260 - 130
    if n > 1:
        ab[0] = ab[0] / 40  # a grey image for nongray
    weights = torch.rand(313, generator=g, dtype=torch.float64) * 5 + 0.1
    return logits, ab, weights


def make_mask(kind, n, h, w, seed):
    if kind == "all":
        return torch.ones(n, h, w, dtype=torch.bool)
    m = torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)) < 0.4
    if kind == "some" and n > 1:
        m[0] = True  # every pixel of the grey image out, and one image's worth of the mean's divisor
    return m


def check_against_reference(name, device, shape, dtype, reduction, kind, use_weights, nongray, seed=0):
    n, h, w = shape
    logits64, ab, weights = make_inputs(n, h, w, seed)
    mask = None if kind == "none" else make_mask(kind, n, h, w, seed)
    weights = weights if use_weights else None
    x = logits64.to(dtype).to(device).requires_grad_(True)
    loss = fc.rebalanced_cross_entropy(x, ab.float().to(device), weight=None if weights is None else
                                       weights.float().to(device), reduction=reduction, nongray=nongray,
                                       mask=None if mask is None else mask.to(device), backend=name)
    g = (torch.rand(loss.shape, dtype=torch.float64) + 0.5) if reduction == "none" else torch.tensor(1.7).double()
    loss.backward(g.to(loss.dtype).to(device))
    want_loss, want_grad = R.rebalanced_cross_entropy(
        x.detach().cpu().double().numpy(), ab.float().double().numpy(), None if weights is None else weights.numpy(),
        reduction=reduction, nongray=nongray, grad_output=g.numpy(), mask=None if mask is None else mask.numpy())
    got = loss.detach().cpu().double().numpy()
    if kind == "all" and reduction == "mean":
        assert np.isnan(want_loss) and np.isnan(got)  # a mean over no pixels, as PyTorch's
    else:
        np.testing.assert_allclose(got, want_loss, rtol=2e-5, atol=2e-5 * max(np.abs(want_loss).max(), 1e-30))
    gg = x.grad.cpu().double().numpy()
    assert np.all(np.isfinite(gg))
    if mask is not None:  # left-out pixels: exactly 0, not merely small
        assert np.all(np.moveaxis(gg, 1, -1)[mask.numpy()] == 0)
        if reduction == "none":
            assert np.all(got[mask.numpy()] == 0)
    np.testing.assert_allclose(gg, want_grad, rtol=0, atol=GRAD_TOL[dtype] * max(np.abs(want_grad).max(), 1e-30))


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape,dtype,reduction", CASES, ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-{c[2]}"
                                                               for c in CASES])
def test_mask_matches_reference_on_every_backend(target, shape, dtype, reduction, kind):
    name, device = target
    i = CASES.index((shape, dtype, reduction))
    check_against_reference(name, device, shape, dtype, reduction, kind, use_weights=i % 2 == 0,
                            nongray=i % 3 == 0, seed=i)


@pytest.mark.triton
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mask_matches_reference_on_triton(monkeypatch, kind, reduction):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.unavailable_reason("triton", device) is None
    check_against_reference("triton", device, (2, 3, 5), torch.float32, reduction, kind, use_weights=True,
                            nongray=True, seed=7)


def test_reference_mask_equals_the_loss_over_the_kept_pixels_alone():
    logits, ab, weights = (t.numpy() for t in make_inputs(3, 4, 6, seed=5))
    mask = make_mask("some", 3, 4, 6, seed=5).numpy()
    keep = ~mask
    # The kept pixels as one image of U pixels: (1, 313, U) logits and (1, 2, U) ab.
    kept_logits = np.moveaxis(logits, 1, -1)[keep].T[None]
    kept_ab = np.moveaxis(ab, 1, -1)[keep].T[None]
    for reduction in ("mean", "sum"):
        got, grad = R.rebalanced_cross_entropy(logits, ab, weights, reduction=reduction, mask=mask, grad_output=0.7)
        want, want_grad = R.rebalanced_cross_entropy(kept_logits, kept_ab, weights, reduction=reduction,
                                                     grad_output=0.7)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        np.testing.assert_allclose(np.moveaxis(grad, 1, -1)[keep].T[None], want_grad, rtol=1e-12, atol=1e-15)
        assert np.all(np.moveaxis(grad, 1, -1)[mask] == 0)


def test_mask_of_zeros_is_no_mask_and_zero_one_masks_equal_bool_masks():
    logits, ab, weights = make_inputs(2, 3, 5, seed=1)
    x, ab, w = logits.float(), ab.float(), weights.float()
    plain = fc.rebalanced_cross_entropy(x, ab, w)
    assert fc.rebalanced_cross_entropy(x, ab, w, mask=torch.zeros(2, 3, 5, dtype=torch.bool)).item() == \
        pytest.approx(plain.item(), rel=1e-6)
    m = make_mask("some", 2, 3, 5, seed=1)
    by_bool = fc.rebalanced_cross_entropy(x, ab, w, mask=m)
    for as_number in (m.float(), m.to(torch.uint8), m.long()):
        assert fc.rebalanced_cross_entropy(x, ab, w, mask=as_number).item() == by_bool.item()


def test_left_out_pixels_may_hold_nan_ground_truth_and_extreme_logits():
    """Missing ground truth (NaN ab) and a pixel whose loss would be +inf in float32: left out,
    neither reaches the loss or the gradient, on every CPU backend."""
    logits, ab, _ = make_inputs(2, 3, 4, seed=2)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, 2, :] = True
    ab[1, :, 2, :] = float("nan")
    logits[0, :, 0, 0] = 0.0
    logits[0, 200, 0, 0] = 3e38  # every other bin, the target's among them, 3e38 below: loss +inf in float32
    mask[0, 0, 0] = True
    ab_kept = torch.where(mask[:, None], 0.0, ab)
    want, _ = R.rebalanced_cross_entropy(logits.numpy(), ab_kept.numpy(), mask=mask.numpy())
    for name in backends.available("cpu"):
        x = logits.float().requires_grad_(True)
        loss = fc.rebalanced_cross_entropy(x, ab.float(), mask=mask, backend=name)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), name
        assert loss.item() == pytest.approx(float(want), rel=1e-5), name


def test_left_out_pixels_do_not_make_an_image_coloured_for_nongray():
    logits, ab, _ = make_inputs(2, 3, 4, seed=4)
    ab[0] = 1.0  # grey image ...
    ab[0, :, 0, 0] = 90.0  # ... but for one pixel, which is left out
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, 0, 0] = True
    per_px = fc.rebalanced_cross_entropy(logits.float(), ab.float(), nongray=True, mask=mask, reduction="none")
    assert (per_px[0] == 0).all() and (per_px[1] > 0).all()


def test_mean_divides_by_the_pixels_kept_not_by_the_weight_sum():
    """The stated definition, beside PyTorch's: with a one-hot target (k=1, grid ab) fastcolor's
    per-pixel loss is nn.CrossEntropyLoss's ``w[y] * -log p_y``; the sums agree, and the means
    differ exactly by the divisor: U pixels kept for fastcolor, sum of w[y] kept for PyTorch."""
    g = torch.Generator().manual_seed(6)
    n, h, w = 2, 3, 4
    y = torch.randint(0, 313, (n, h, w), generator=g)
    ab = torch.tensor(fc.AB_BINS).float()[y].permute(0, 3, 1, 2)  # every pixel on a bin centre
    x = torch.randn(n, 313, h, w, generator=g, dtype=torch.float64)
    weights = torch.rand(313, generator=g, dtype=torch.float64) + 0.5
    mask = make_mask("some", n, h, w, seed=6)
    ours_sum = fc.rebalanced_cross_entropy(x, ab.double(), weight=weights, k=1, mask=mask, reduction="sum",
                                           backend="torch")
    ours_mean = fc.rebalanced_cross_entropy(x, ab.double(), weight=weights, k=1, mask=mask, backend="torch")
    target = torch.where(mask, -100, y)
    theirs_sum = torch.nn.CrossEntropyLoss(weight=weights, ignore_index=-100, reduction="sum")(x, target)
    theirs_mean = torch.nn.CrossEntropyLoss(weight=weights, ignore_index=-100)(x, target)
    torch.testing.assert_close(ours_sum, theirs_sum)
    kept = (~mask).sum()
    torch.testing.assert_close(ours_mean, theirs_sum / kept)
    torch.testing.assert_close(theirs_mean, theirs_sum / weights[y][~mask].sum())


def test_weight_is_pytorchs_spelling_of_weights():
    logits, ab, weights = make_inputs(2, 3, 4, seed=8)
    x, ab, w = logits.float(), ab.float(), weights.float()
    assert fc.rebalanced_cross_entropy(x, ab, weight=w).item() == fc.rebalanced_cross_entropy(x, ab, w).item()
    crit = fc.RebalancedCrossEntropyLoss(weight=w)
    assert crit.weight is crit.weights and torch.equal(crit.weights, w)
    assert crit(x, ab).item() == fc.RebalancedCrossEntropyLoss(w)(x, ab).item()
    m = make_mask("some", 2, 3, 4, seed=8)
    assert crit(x, ab, mask=m).item() == fc.rebalanced_cross_entropy(x, ab, w, mask=m).item()


def test_a_call_without_a_mask_passes_nothing_extra_to_the_kernel(monkeypatch):
    name = backends.resolve("auto", "cpu")
    seen = []
    real = backends.get(name).ce_forward

    def spy(call: LossCall):
        seen.append(call)
        return real(call)

    monkeypatch.setattr(backends.get(name), "ce_forward", spy)
    logits, ab, _ = make_inputs(2, 3, 4, seed=9)
    fc.rebalanced_cross_entropy(logits.float().requires_grad_(True), ab.float(), backend=name).backward()
    fc.rebalanced_cross_entropy(logits.float().requires_grad_(True), ab.float(), backend=name,
                                mask=make_mask("some", 2, 3, 4, seed=9)).backward()
    plain, masked = seen
    assert plain.pixel_scale is None and plain.grad_scale == pytest.approx(1 / 24)
    assert masked.pixel_scale is not None and masked.grad_scale == 1.0


# ----------------------------------------------------------------------------- units warning


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(loss_mod, "_units_warned", False)


def test_normalised_ab_warn_once_naming_lab_units(fresh_warning):
    logits, ab, _ = make_inputs(2, 3, 4, seed=10)
    with pytest.warns(UserWarning, match=r"ab in Lab units \(a and b about -110..110"):
        fc.rebalanced_cross_entropy(logits.float(), ab.float() / 131)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc.rebalanced_cross_entropy(logits.float(), ab.float() / 131)  # once per process


def one_nan(ab):
    ab = ab / 131
    ab[0, 0, 0, 0] = float("nan")  # a NaN hides the warning (min/max are NaN): accepted, documented
    return ab


@pytest.mark.parametrize("ab_of", [lambda ab: ab, lambda ab: ab * 0, one_nan], ids=["lab-units", "all-zero", "nan"])
def test_lab_units_zeros_and_nan_do_not_warn(fresh_warning, ab_of):
    logits, ab, _ = make_inputs(2, 3, 4, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc.rebalanced_cross_entropy(logits.float(), ab_of(ab.float()))
    assert not loss_mod._units_warned


def test_units_check_reads_no_device_value(fresh_warning, monkeypatch):
    """Off the host (a GPU tensor: patched here as test_syncs.py does) the check does not run."""
    from fastcolor.ops import _common
    monkeypatch.setattr(_common, "host_readable", lambda t: False)
    logits, ab, _ = make_inputs(2, 3, 4, seed=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc.rebalanced_cross_entropy(logits.float(), ab.float() / 131, backend="torch")
    assert not loss_mod._units_warned


# ----------------------------------------------------------------------------- routes


@pytest.mark.parametrize("as_bool", [True, False], ids=["bool", "float01"])
def test_a_masked_call_reads_nothing_on_the_host(monkeypatch, as_bool):
    """The GPU route (no host read: the count kept stays on the device, a 0/1 mask is checked by a
    device-side assert), run on CPU tensors as tests/test_syncs.py does; every CPU backend."""
    from host_reads import record_host_reads

    from fastcolor.ops import _common

    logits, ab, _ = make_inputs(2, 3, 5, seed=13)  # (CPU class weights are checked on the host: not here)
    mask = make_mask("some", 2, 3, 5, seed=13)
    mask = mask if as_bool else mask.float()
    for name in backends.available("cpu"):
        want = []
        for patched in (False, True):
            if patched:
                monkeypatch.setattr(_common, "host_readable", lambda t: False)
            x = logits.float().clone().requires_grad_(True)
            with record_host_reads() as reads:
                loss = fc.rebalanced_cross_entropy(x, ab.float(), mask=mask, backend=name)
                loss.backward()
            if patched:
                assert reads == [], (name, reads.sites)
            want.append((loss.detach(), x.grad))
        monkeypatch.undo()
        torch.testing.assert_close(want[1], want[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_masked_loss_compiles_whole(reduction):
    """Under torch.compile the op is the custom op whose backward re-runs the kernel with the upstream
    gradient as its per-pixel factor: the mask's factor must reach that backward too."""
    name = backends.resolve("auto", "cpu")
    logits, ab, _ = make_inputs(2, 4, 3, seed=14)
    mask = make_mask("some", 2, 4, 3, seed=14)
    crit = fc.RebalancedCrossEntropyLoss(reduction=reduction, backend=name)

    def step(x):
        return crit(x, ab.float(), mask=mask)

    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        x = logits.float().clone().requires_grad_(True)
        loss = fn(x)
        loss.backward(torch.full_like(loss, 1.3))
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)
    assert (results[0][1].permute(0, 2, 3, 1)[mask] == 0).all()


def test_a_precomputed_target_takes_the_mask_too():
    logits, ab, weights = make_inputs(2, 3, 4, seed=15)
    mask = make_mask("some", 2, 3, 4, seed=15)
    labels = fc.soft_encode(ab.float())
    for name in backends.available("cpu"):
        x1 = logits.float().clone().requires_grad_(True)
        x2 = logits.float().clone().requires_grad_(True)
        a = fc.rebalanced_cross_entropy(x1, ab.float(), weights.float(), mask=mask, backend=name)
        b = fc.rebalanced_cross_entropy(x2, labels, weights.float(), mask=mask, backend=name)
        a.backward()
        b.backward()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-8)
