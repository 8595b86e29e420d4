"""The gamut and the numpy reference: hand-computed cases, finite differences, invariances,
and agreement with a second, independent implementation of the formulas written here."""
from pathlib import Path

import numpy as np
import pytest

from fastcolor import gamut
from fastcolor import reference as R

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
rng = np.random.default_rng(1234)


# ----------------------------------------------------------------------------- gamut


def test_gamut_has_313_bins_in_lexicographic_order():
    assert gamut.AB_BINS.shape == (313, 2) and gamut.Q == 313
    keys = [tuple(p) for p in gamut.AB_BINS]
    assert keys == sorted(keys) and len(set(keys)) == 313
    assert np.all(gamut.AB_BINS % 10 == 0)


def test_cell_table_inverts_the_bins():
    q = gamut.CELL_TO_BIN[((gamut.AB_BINS[:, 0] - gamut.A_MIN) / 10).astype(int),
                         ((gamut.AB_BINS[:, 1] - gamut.B_MIN) / 10).astype(int)]
    assert np.array_equal(q, np.arange(313))
    assert (gamut.CELL_TO_BIN >= 0).sum() == 313


@pytest.mark.skipif(not (SHARED / "pts_in_hull.npy").exists(), reason="../shared/reference absent")
def test_gamut_equals_published_hull():
    assert np.array_equal(gamut.AB_BINS, np.load(SHARED / "pts_in_hull.npy"))


@pytest.mark.skipif(not (SHARED / "prior_probs.npy").exists(), reason="../shared/reference absent")
def test_rarity_weights_of_published_prior():
    p = np.load(SHARED / "prior_probs.npy")
    w = R.rarity_weights(p, 0.5)
    assert w.min() == pytest.approx(0.0965, abs=1e-4)
    assert w.max() == pytest.approx(6.1749, abs=1e-4)
    assert np.median(w) == pytest.approx(5.9987, abs=1e-4)
    assert (p * w).sum() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- an independent implementation
# Written from the formulas in the issue, pixel by pixel with plain Python loops, sharing no code
# with fastcolor.reference.


def _indep_encode_pixel(a, b, k, sigma):
    d = [((a - ca) ** 2 + (b - cb) ** 2, q) for q, (ca, cb) in enumerate(gamut.AB_BINS.tolist())]
    d.sort()  # by distance, then by index: ties go to the lower index
    near = d[:k]
    g = [np.exp(-(dd - near[0][0]) / (2 * sigma * sigma)) for dd, _ in near]
    s = sum(g)
    return [q for _, q in near], [x / s for x in g]


def _indep_loss(logits, ab, weights, k, sigma, reduction, nongray):
    n, _, h, w = logits.shape
    total, per = 0.0, np.zeros((n, h, w))
    for i in range(n):
        m = 1.0
        if nongray and np.abs(ab[i]).max() <= 5:
            m = 0.0
        for y in range(h):
            for x in range(w):
                idx, z = _indep_encode_pixel(ab[i, 0, y, x], ab[i, 1, y, x], k, sigma)
                col = logits[i, :, y, x]
                lse = np.log(np.sum(np.exp(col - col.max()))) + col.max()
                v = 1.0 if weights is None else weights[idx[0]]
                per[i, y, x] = -m * v * sum(zj * (col[q] - lse) for q, zj in zip(idx, z, strict=True))
    total = per.sum()
    return {"mean": total / per.size, "sum": total, "none": per}[reduction]


@pytest.mark.parametrize("k", [1, 5, 10, 16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_agrees_with_independent_implementation(k, reduction):
    n, h, w = 2, 3, 4
    logits = rng.normal(size=(n, 313, h, w)) * 4
    ab = rng.uniform(-120, 120, size=(n, 2, h, w))
    ab[1] = rng.uniform(-4, 4, size=(2, h, w))  # a grey image
    weights = rng.uniform(0.1, 6, size=313)
    for wts in (None, weights):
        for nongray in (False, True):
            got, _ = R.rebalanced_cross_entropy(logits, ab, wts, k=k, sigma=5.0, reduction=reduction, nongray=nongray)
            want = _indep_loss(logits, ab, wts, k, 5.0, reduction, nongray)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_encoding_agrees_with_independent_implementation_including_ties():
    # Integer ab on the 5-grid puts many pixels exactly between bins: ties go to the lower index.
    a, b = np.meshgrid(np.arange(-115, 116, 5.0), np.arange(-115, 116, 5.0), indexing="ij")
    ab = np.stack([a, b])[None]
    for k in (1, 4, 5, 10):
        idx, wts = R.soft_encode(ab, k=k, sigma=5.0)
        for (i, j) in [(0, 0), (3, 7), (23, 23), (24, 25), (40, 11), (46, 46)]:
            qi, zi = _indep_encode_pixel(a[i, j], b[i, j], k, 5.0)
            assert idx[0, :, i, j].tolist() == qi
            np.testing.assert_allclose(wts[0, :, i, j], zi, rtol=1e-12)


# ----------------------------------------------------------------------------- hand-computed cases


def test_soft_encode_on_a_bin_centre_and_midpoint():
    # ab exactly at bin (0, 0): nearest is itself, then the four 10-away neighbours.
    idx, w = R.soft_encode(np.array([[0.0, 0.0]]), k=5, sigma=5.0)
    q0 = int(np.where((gamut.AB_BINS == [0, 0]).all(1))[0][0])
    assert idx[0, 0] == q0
    e = np.exp(-100 / 50)
    np.testing.assert_allclose(w[0], [1 / (1 + 4 * e)] + [e / (1 + 4 * e)] * 4)
    # Midway between (0, 0) and (0, 10): equal weights, lower index first.
    idx, w = R.soft_encode(np.array([[0.0, 5.0]]), k=2)
    assert idx[0].tolist() == [q0, q0 + 1] and np.allclose(w[0], 0.5)


def test_soft_encode_weights_sum_to_one_and_densify():
    ab = rng.uniform(-200, 200, size=(3, 2, 5, 6))
    for k in (1, 5, 16):
        idx, w = R.soft_encode(ab, k=k)
        assert idx.shape == (3, k, 5, 6)
        np.testing.assert_allclose(w.sum(1), 1.0)
        assert np.all(np.diff(w, axis=1) <= 1e-15)  # nearest first
        d = R.densify(idx, w)
        assert d.shape == (3, 313, 5, 6)
        np.testing.assert_allclose(d.sum(1), 1.0)


def test_far_off_ab_still_encodes():
    idx, w = R.soft_encode(np.array([[1e6, -1e6], [-500.0, 3.0]]), k=5)
    assert np.all(np.isfinite(w)) and np.allclose(w.sum(1), 1)


def test_soft_encode_rejects_bad_k():
    for k in (0, 17, 2.5):
        with pytest.raises(ValueError, match="k"):
            R.soft_encode(np.zeros((1, 2)), k=k)


def test_plain_ce_hand_computed():
    # Two classes carry all the logit mass difference; target exactly on a bin with k = 1.
    logits = np.zeros((1, 313, 1, 1))
    q = 100
    logits[0, q] = 2.0
    ab = gamut.AB_BINS[q].reshape(1, 2, 1, 1)
    loss, grad = R.rebalanced_cross_entropy(logits, ab, k=1)
    lse = np.log(312 + np.exp(2.0))
    assert loss == pytest.approx(-(2.0 - lse))
    sm = np.full(313, 1 / (312 + np.exp(2)))
    sm[q] = np.exp(2) / (312 + np.exp(2))
    onehot = np.zeros(313)
    onehot[q] = 1
    np.testing.assert_allclose(grad[0, :, 0, 0], sm - onehot)


def test_weights_scale_by_nearest_bin_and_nongray_masks_grey_images():
    logits = rng.normal(size=(2, 313, 2, 2))
    ab = rng.uniform(-60, 60, size=(2, 2, 2, 2))
    ab[1] = 3.0  # grey
    plain, _ = R.rebalanced_cross_entropy(logits, ab, reduction="none")
    w = rng.uniform(0.5, 2.0, size=313)
    weighted, _ = R.rebalanced_cross_entropy(logits, ab, w, reduction="none")
    np.testing.assert_allclose(weighted, plain * w[R.nearest_bin(ab)])
    masked, _ = R.rebalanced_cross_entropy(logits, ab, reduction="none", nongray=True)
    np.testing.assert_allclose(masked[0], plain[0])
    assert np.all(masked[1] == 0)
    np.testing.assert_array_equal(R.image_mask_nongray(ab), [1.0, 0.0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_matches_finite_differences(reduction):
    logits = rng.normal(size=(2, 313, 2, 3))
    ab = rng.uniform(-100, 100, size=(2, 2, 2, 3))
    w = rng.uniform(0.2, 3, size=313)
    g = rng.normal(size=(2, 2, 3)) if reduction == "none" else 0.7
    _, grad = R.rebalanced_cross_entropy(logits, ab, w, reduction=reduction, nongray=True, grad_output=g)
    eps = 1e-6
    for pos in [(0, 0, 0, 0), (1, 312, 1, 2), (0, 150, 1, 1), (1, 5, 0, 2)]:
        lp, lm = logits.copy(), logits.copy()
        lp[pos] += eps
        lm[pos] -= eps
        fp = np.sum(g * R.rebalanced_cross_entropy(lp, ab, w, reduction=reduction, nongray=True)[0])
        fm = np.sum(g * R.rebalanced_cross_entropy(lm, ab, w, reduction=reduction, nongray=True)[0])
        assert grad[pos] == pytest.approx((fp - fm) / (2 * eps), rel=1e-5, abs=1e-9)


def duplicate_target(n=2, h=2, w=3, seed=0):
    """A hand-made (N, 4, H, W) target listing some bins twice or three times per pixel."""
    r = np.random.default_rng(seed)
    idx = r.integers(0, 313, size=(n, 4, h, w))
    idx[:, 1] = idx[:, 0]  # the nearest bin again
    idx[0, 3, 0, 0] = idx[0, 0, 0, 0]  # three times
    idx[1, 3] = idx[1, 2]
    wts = r.uniform(0.05, 1.0, size=idx.shape)
    return idx, wts / wts.sum(1, keepdims=True)


def test_duplicate_bins_are_summed_in_the_target_and_the_gradient():
    """Issue 21.6: a bin listed twice counts with the sum of its weights, in the dense target, the
    loss and its gradient (which must be the loss's true derivative, checked by differences)."""
    idx, wts = duplicate_target()
    d = R.densify(idx, wts)
    np.testing.assert_allclose(d.sum(1), 1.0)
    q = idx[0, 0, 0, 0]
    assert d[0, q, 0, 0] == pytest.approx(wts[0, [0, 1, 3], 0, 0].sum())
    logits = rng.normal(size=(2, 313, 2, 3))
    cw = rng.uniform(0.2, 3, size=313)
    loss, grad = R.rebalanced_cross_entropy(logits, None, cw, target=(idx, wts), reduction="sum")
    eps = 1e-6
    for pos in [(0, q, 0, 0), (1, idx[1, 2, 1, 2], 1, 2), (0, idx[0, 2, 1, 1], 1, 1), (1, 7, 0, 0)]:
        lp, lm = logits.copy(), logits.copy()
        lp[pos] += eps
        lm[pos] -= eps
        px = (pos[0],) + pos[2:]  # the only pixel whose loss moves: no rounding of the others' sum
        fp = R.rebalanced_cross_entropy(lp, None, cw, target=(idx, wts), reduction="none")[0][px]
        fm = R.rebalanced_cross_entropy(lm, None, cw, target=(idx, wts), reduction="none")[0][px]
        assert grad[pos] == pytest.approx((fp - fm) / (2 * eps), rel=1e-5, abs=1e-9)
    np.testing.assert_allclose(grad.sum(1), 0, atol=1e-12)  # softmax and the summed Z both sum to 1


def test_loss_invariant_to_adding_a_constant_to_logits():
    logits = rng.normal(size=(1, 313, 3, 3))
    ab = rng.uniform(-80, 80, size=(1, 2, 3, 3))
    a, ga = R.rebalanced_cross_entropy(logits, ab)
    b, gb = R.rebalanced_cross_entropy(logits + 123.0, ab)
    assert a == pytest.approx(b)
    np.testing.assert_allclose(ga, gb, atol=1e-15)
    np.testing.assert_allclose(ga.sum(1), 0, atol=1e-15)  # softmax and Z both sum to 1


def test_loss_with_precomputed_target_equals_loss_with_ab():
    logits = rng.normal(size=(2, 313, 3, 2))
    ab = rng.uniform(-80, 80, size=(2, 2, 3, 2))
    w = rng.uniform(0.5, 2, size=313)
    a, ga = R.rebalanced_cross_entropy(logits, ab, w, k=10)
    b, gb = R.rebalanced_cross_entropy(logits, None, w, target=R.soft_encode(ab, k=10))
    assert a == b
    np.testing.assert_array_equal(ga, gb)


# ----------------------------------------------------------------------------- decoding


def test_annealed_mean_limits():
    logits = rng.normal(size=(2, 313, 3, 4)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(R.annealed_mean(logits, T=1.0), np.einsum("nqhw,qc->nchw", p, gamut.AB_BINS))
    mode = gamut.AB_BINS[logits.argmax(1)].transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(R.annealed_mean(logits, T=1e-7), mode)
    np.testing.assert_allclose(R.annealed_mean(logits, T=1e-4), mode, atol=1e-6)
    np.testing.assert_allclose(R.annealed_mean(probs=p, T=0.38), R.annealed_mean(logits, T=0.38), atol=1e-10)
    np.testing.assert_allclose(R.annealed_mean(logits + 7.0, T=0.38), R.annealed_mean(logits, T=0.38))


def test_annealed_mean_of_a_sharp_distribution_is_its_bin():
    logits = np.full((1, 313, 1, 1), -50.0)
    logits[0, 42] = 50.0
    np.testing.assert_allclose(R.annealed_mean(logits, T=0.38)[0, :, 0, 0], gamut.AB_BINS[42])


def test_annealed_mean_rejects_bad_arguments():
    with pytest.raises(ValueError, match="T"):
        R.annealed_mean(np.zeros((1, 313, 1, 1)), T=0)
    with pytest.raises(ValueError, match="exactly one"):
        R.annealed_mean()
    with pytest.raises(ValueError, match="logits"):
        R.annealed_mean(np.zeros((1, 312, 1, 1)))


# ----------------------------------------------------------------------------- prior


def test_class_prior_counts_nearest_bins_and_smooths():
    ab = np.repeat(gamut.AB_BINS[[3, 3, 3, 200]].T[None], 1, 0)  # (1, 2, 4)
    p = R.class_prior(ab)
    assert p[3] == 0.75 and p[200] == 0.25 and p.sum() == 1
    ps = R.class_prior(ab, smooth_sigma=5.0)
    assert ps.sum() == pytest.approx(1) and 0 < ps[3] < 0.75 and ps[4] > 0


def test_rarity_weights_properties():
    p = rng.dirichlet(np.ones(313))
    for lam in (0.0, 0.5, 1.0):
        w = R.rarity_weights(p, lam)
        assert (p * w).sum() == pytest.approx(1)
    assert np.allclose(R.rarity_weights(p, 1.0), 1.0)
    w = R.rarity_weights(p, 0.5)
    assert np.all(np.diff(w[np.argsort(p)]) <= 1e-12)  # rarer bins weigh more


def test_regression_loss():
    pred = rng.normal(size=(3, 2, 4, 5))
    true = rng.normal(size=(3, 2, 4, 5))
    per = R.regression_loss(pred, true, reduction="none")
    np.testing.assert_allclose(per, ((pred - true) ** 2).sum((1, 2, 3)) / (2 * 4 * 5))
    assert R.regression_loss(pred, true) == pytest.approx(per.mean())
    with pytest.raises(ValueError, match="pred_ab"):
        R.regression_loss(pred, true[:, :, :3])
