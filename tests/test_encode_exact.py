"""Issue 11's acceptance test of the one k-nearest search (fastcolor/gamut.py, "k-nearest
search"): every fast backend gives exactly the reference's bins, and weights within 1e-6,

* on a dense grid: every 0.25 ab unit over a = -100..110, b = -120..110 (774,561 pixels; there
  float32 squared distances are exact, so every tie is a true tie and must go to the lower index);
* on far-off pixels (outside the table's box, up to float32's range), exact ties, the box's edges,
  and NaN / Inf (bins 0..k-1, NaN weights);

through the backend's ``soft_encode`` and through the fused loss, whose on-the-fly encoding must
give the same per-pixel loss as the reference's precomputed encoding.

Triton runs through its interpreter on a machine without CUDA (its grid is strided: the
interpreter runs the kernels in Python).
"""
from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch
from conftest import require_backend

import fastcolor as fc
from fastcolor import gamut
from fastcolor import reference as R

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

CUDA = torch.cuda.is_available()
TARGETS = [("numba", "cpu"), ("cpp", "cpu"), ("triton", "cuda" if CUDA else "cpu"), ("cuda", "cuda")]
KS = [1, 5, 10, 16]
#: The interpreter runs a kernel program by program in Python: triton sees every GRID_STRIDE-th
#: grid point (still every tie pattern: the stride is odd).
TRITON_STRIDE = 1 if CUDA else 7


@pytest.fixture(params=TARGETS, ids=[f"{b}-{d}" for b, d in TARGETS])
def target(request, monkeypatch):
    name, device = request.param
    if name == "triton":
        pytest.importorskip("triton")
        if device == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    require_backend(name, device)
    return name, device


def _grid() -> np.ndarray:
    a = np.arange(-100.0, 110.0 + 1e-9, 0.25)
    b = np.arange(-120.0, 110.0 + 1e-9, 0.25)
    aa, bb = np.meshgrid(a, b, indexing="ij")
    return np.stack([aa.ravel(), bb.ravel()]).astype(np.float32)  # (2, P)


@cache
def _grid_reference(k: int) -> tuple[np.ndarray, np.ndarray]:
    ab = _grid()
    idx, w = [], []
    for s in range(0, ab.shape[1], 100_000):
        i, ww = R.soft_encode(ab[None, :, s:s + 100_000], k)
        idx.append(i[0])
        w.append(ww[0])
    return np.concatenate(idx, axis=1), np.concatenate(w, axis=1)


def _special_points() -> np.ndarray:
    """(2, P) float32: far-off, exact ties, the table's edges, and non-finite pixels."""
    rng = np.random.default_rng(11)
    mag = 10 ** rng.uniform(np.log10(129.0), 6.0, size=400)
    ang = rng.uniform(0, 2 * np.pi, size=400)
    far = np.stack([mag * np.cos(ang), mag * np.sin(ang)], axis=1)
    one_axis = np.stack([rng.uniform(128.0, 1e4, 100) * rng.choice([-1, 1], 100), rng.uniform(-100, 100, 100)], 1)
    big = np.array([[1e30, 0.0], [-1e30, 5.0], [3e38, -3e38], [0.0, -3.4e38], [2.0**24 + 3, 7.0], [-1e7, 1e7]])
    ties = np.array([[5.0, 0.0], [5.0, 5.0], [-5.0, -5.0], [0.0, 5.0], [95.0, -5.0], [-85.0, 55.0], [100.0, -95.0],
                     [0.0, 0.0], [45.0, 45.0], [-95.0, 100.0], [105.0, 105.0], [-100.0, -120.0]])
    lo, hi = gamut.TABLE_LO, gamut.TABLE_HI
    below = float(np.nextafter(np.float32(hi), np.float32(0)))
    edges = np.array([[lo, lo], [lo, below], [below, below], [hi, 0.0], [0.0, hi], [lo - 1e-3, 0.0], [below, -50.0],
                      [-127.5, 120.0], [126.0, -126.0]])
    nan, inf = math.nan, math.inf
    bad = np.array([[nan, 0.0], [0.0, nan], [inf, 0.0], [-inf, 3.0], [2.0, inf], [nan, inf], [inf, -inf]])
    return np.concatenate([far, one_axis, big, ties, edges, bad]).astype(np.float32).T


def _check(got_idx, got_w, want_idx, want_w, what):
    got_idx, got_w = got_idx.cpu().long().numpy(), got_w.cpu().double().numpy()
    bad = np.nonzero((got_idx != want_idx).any(0))[0]
    assert bad.size == 0, (f"{what}: {bad.size} pixels with other bins than the reference, e.g. pixel "
                           f"{bad[0]}: got {got_idx[:, bad[0]]}, want {want_idx[:, bad[0]]}")
    np.testing.assert_allclose(got_w, want_w, rtol=0, atol=1e-6, equal_nan=True, err_msg=what)


@pytest.mark.parametrize("k", KS)
def test_dense_grid_matches_reference_exactly(target, k):
    name, device = target
    stride = TRITON_STRIDE if name == "triton" else 1
    ab = _grid()[:, ::stride]
    want_idx, want_w = (x[:, ::stride] for x in _grid_reference(k))
    lab = fc.soft_encode(torch.from_numpy(ab)[None].to(device), k=k, backend=name)
    _check(lab.indices[0], lab.weights[0], want_idx, want_w, f"{name} k={k} dense grid")


@pytest.mark.parametrize("k", KS)
def test_far_off_ties_edges_and_non_finite_match_reference(target, k):
    name, device = target
    ab = _special_points()
    want_idx, want_w = R.soft_encode(ab[None].astype(np.float64), k)
    lab = fc.soft_encode(torch.from_numpy(ab)[None].to(device), k=k, backend=name)
    _check(lab.indices[0], lab.weights[0], want_idx[0], want_w[0], f"{name} k={k} special points")
    bad = ~np.isfinite(ab).all(0)
    assert np.array_equal(want_idx[0][:, bad], np.broadcast_to(np.arange(k)[:, None], (k, bad.sum())))
    assert np.isnan(want_w[0][:, bad]).all()  # the documented rule for NaN / Inf is the reference's


@pytest.mark.parametrize("k", KS)
def test_fused_loss_encodes_like_the_reference(target, k):
    """The loss's on-the-fly encoding: the same per-pixel loss as with the reference's SoftLabels."""
    name, device = target
    stride = 31 * (TRITON_STRIDE if name == "triton" else 1)
    grid = _grid()[:, ::stride]
    ab = np.concatenate([grid, _special_points()], axis=1)
    want_idx, want_w = R.soft_encode(ab[None].astype(np.float64), k)
    g = torch.Generator().manual_seed(k)
    logits = (torch.randn(1, gamut.Q, ab.shape[1], generator=g) * 3).to(device)
    ab_t = torch.from_numpy(ab)[None].to(device)
    got = fc.rebalanced_cross_entropy(logits, ab_t, k=k, reduction="none", backend=name).cpu().double().numpy()
    finite = np.isfinite(ab).all(0)  # (a SoftLabels with the reference's NaN weights would be refused)
    precomputed = fc.SoftLabels(torch.from_numpy(want_idx[..., finite]).int().to(device),
                                torch.from_numpy(want_w[..., finite]).float().to(device))
    want = fc.rebalanced_cross_entropy(logits[..., finite].contiguous(), precomputed, reduction="none",
                                       backend=name).cpu().double().numpy()
    np.testing.assert_allclose(got[..., finite], want, rtol=1e-6, atol=1e-6)
    assert np.isfinite(got[0, finite]).all() and np.isnan(got[0, ~finite]).all()
    ref, _ = R.rebalanced_cross_entropy(logits.cpu().double().numpy(), ab[None].astype(np.float64), k=k,
                                        reduction="none")
    np.testing.assert_allclose(got[0, finite], ref[0, finite], rtol=1e-5, atol=1e-5)
