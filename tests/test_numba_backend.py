"""numba-specific tests: the candidate-table search (dense grid, ties, the box's edges), the
float64 scan outside the box (no fused multiply-add), NaN / Inf input, the exp/log rule of the
CPU backends, empty input, large k, huge-page gradients, thread-count independence, fork
safety, and the on-disk cache (its fallback when no cache folder is writable, and one stamp for
the whole package). The table's own proof is tests/test_gamut_table.py; the generic matrix
(tests/test_backends.py) covers the public API against the reference for every backend."""
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fastcolor as fc
from fastcolor import reference as R
from fastcolor.backends.contract import LossCall
from fastcolor.gamut import AB_BINS, TABLE_HI, TABLE_LO, candidate_table

nb = pytest.importorskip("fastcolor.backends.numba_backend")
if nb.unavailable_reason("cpu") is not None:
    pytest.skip(nb.unavailable_reason("cpu"), allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]


def _encode(ab_pixels: np.ndarray, k: int):
    """(M, 2) float32 pixels -> numba (indices (M, k), weights (M, k)) through the backend."""
    ab = torch.from_numpy(np.ascontiguousarray(ab_pixels.T[None], dtype=np.float32))
    idx, w = nb.soft_encode(ab, k=k, sigma=5.0)
    return idx[0].T.numpy(), w[0].T.numpy()


def _ref(ab_pixels: np.ndarray, k: int):
    idx, w = R.soft_encode(np.asarray(ab_pixels, np.float64).T[None], k=k)
    return idx[0].T, w[0].T


# ----------------------------------------------------------------------------- exhaustive grid


def test_dense_grid_matches_reference_exactly():
    """Every integer ab in [-120, 120]^2 (exact midpoints and exact ties included: the squared
    distances are integers, exact in float32 and float64, so ties must resolve identically,
    lower bin index first), for k of every table size, plus the gamut edge and beyond."""
    g = np.arange(-120, 121, dtype=np.float32)
    pix = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    ref_idx16, _ = _ref(pix, 16)  # the k nearest are a prefix of the 16 nearest (stable sort)
    sub = slice(None, None, 37)
    for k in (1, 2, 4, 5, 9, 10, 16):
        idx, w = _encode(pix, k)
        np.testing.assert_array_equal(idx, ref_idx16[:, :k], err_msg=f"k={k}")
        ref_idx, ref_w = _ref(pix[sub], k)
        np.testing.assert_array_equal(idx[sub], ref_idx)
        np.testing.assert_allclose(w[sub], ref_w, atol=2e-6)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)


def test_random_float_ab_matches_reference_away_from_ties():
    rng = np.random.default_rng(0)
    pix = np.concatenate([rng.uniform(-130, 130, (8000, 2)), rng.normal(0, 25, (8000, 2))]).astype(np.float32)
    d2 = ((pix[:, None, :].astype(np.float64) - AB_BINS[None]) ** 2).sum(-1)
    srt = np.sort(d2, 1)
    for k in (1, 5, 10, 16):
        idx, w = _encode(pix, k)
        ref_idx, ref_w = _ref(pix, k)
        clear = np.diff(srt[:, : k + 1], axis=1).min(1) > 1e-2
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(idx[clear], ref_idx[clear])
        np.testing.assert_allclose(w, ref_w, atol=3e-5)


def test_exact_ties_resolve_to_the_lower_bin_index():
    # (5, 5): four bins at sqrt(50); (0, 0): itself, then four at distance 10; (5, 0): two at 5.
    for pt, k in [((5.0, 5.0), 4), ((0.0, 0.0), 5), ((5.0, 0.0), 2), ((-85.0, 55.0), 4), ((95.0, -105.0), 3)]:
        pix = np.array([pt], np.float32)
        idx, _ = _encode(pix, k)
        ref_idx, _ = _ref(pix, k)
        np.testing.assert_array_equal(idx, ref_idx)
        d2 = ((AB_BINS[idx[0]] - np.array(pt)) ** 2).sum(1)
        for i in range(k - 1):  # among equal distances, increasing index
            assert d2[i] < d2[i + 1] or (d2[i] == d2[i + 1] and idx[0, i] < idx[0, i + 1])


# ----------------------------------------------------------------------------- far off, NaN, Inf


def test_ab_outside_the_box_takes_the_float64_scan():
    pts = np.array([(1e4, -1e4), (-1e4, 1e4), (1e6, 0.0), (0.0, -1e6), (-3e5, 2e5), (150.0, 150.0),
                    (-200.0, 0.0), (101.0, -111.0), (99999.0, 5.0), (100001.0, 5.0), (130.0, 60.0),
                    (3e38, -3e38), (-1e20, 1e-30), (5.0, 1e6), (0.0, 1e7)], np.float32)
    for k in (1, 5, 10, 16):
        idx, w = _encode(pts, k)
        ref_idx, ref_w = _ref(pts, k)
        np.testing.assert_array_equal(idx, ref_idx, err_msg=f"k={k}")
        np.testing.assert_allclose(w, ref_w, atol=1e-7)  # float64 weights, rounded once


def _rule(pix: np.ndarray, k: int):
    """numpy restatement of the rule of fastcolor.gamut: in the box, the k smallest float32
    squared distances (a stable sort: ties to the lower index; the table's lists hold every
    bin that can be among them); elsewhere the reference (float64). The weights: the
    reference's (the kernel takes float64 differences where float32 ones would be ~1e-6 off)."""
    pix = np.asarray(pix, np.float32)
    inside = ((pix >= np.float32(TABLE_LO)) & (pix < np.float32(TABLE_HI))).all(1)
    with np.errstate(invalid="ignore", over="ignore"):
        idx, w = _ref(pix, k)
        c = AB_BINS.astype(np.float32)
        d = pix[inside, None, :] - c[None]
        d2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]  # float32, no FMA
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    d64 = ((pix[inside, None, :].astype(np.float64) - AB_BINS[order]) ** 2).sum(-1)
    g = np.exp(-(d64 - d64[:, :1]) / 50.0)
    idx[inside], w[inside] = order, g / g.sum(1, keepdims=True)
    return idx, w


def test_the_edges_of_the_box():
    """lo <= a, b < hi is the box (rule 1, float32 distances); one float32 step outside takes
    the float64 scan (rule 2): both sides of every edge follow the rule exactly. (There the
    float32 distances, ~1.5e4, cannot tell apart bins that float64 can: the rule decides.)"""
    lo, hi = np.float32(TABLE_LO), np.float32(TABLE_HI)
    edge = [lo, np.nextafter(lo, np.float32(-np.inf)), np.nextafter(lo, np.float32(np.inf)),
            hi, np.nextafter(hi, np.float32(-np.inf)), np.float32(0.0), np.float32(-0.0), np.float32(1e-40),
            np.float32(-97.3), np.float32(121.7)]
    pix = np.array([(a, b) for a in edge for b in edge], np.float32)
    for k in (1, 5, 16):
        idx, w = _encode(pix, k)
        want_idx, want_w = _rule(pix, k)
        np.testing.assert_array_equal(idx, want_idx, err_msg=f"k={k}")
        np.testing.assert_allclose(w, want_w, atol=1e-6)


def test_random_in_box_pixels_follow_the_rule_exactly():
    rng = np.random.default_rng(7)
    pix = np.concatenate([rng.uniform(TABLE_LO, TABLE_HI, (20000, 2)),
                          rng.normal(0, 30, (20000, 2))]).astype(np.float32)
    pix = np.clip(pix, TABLE_LO, np.nextafter(np.float32(TABLE_HI), np.float32(0)))
    for k in (1, 5, 10, 16):
        idx, w = _encode(pix, k)
        want_idx, want_w = _rule(pix, k)
        np.testing.assert_array_equal(idx, want_idx, err_msg=f"k={k}")
        np.testing.assert_allclose(w, want_w, atol=1e-6)


def test_the_kernels_take_the_table_of_gamut_py():
    """No copy of the table in the backend: the kernels' arguments are candidate_table(k)'s
    arrays (the bins viewed as uint16, the same memory) and its geometry."""
    from fastcolor.backends.numba_backend.encode import encoder_args

    for k in (1, 7, 16):
        t = candidate_table(k)
        offsets, bins, lo, hi, inv_cell, n = encoder_args(k, 5.0)[:6]
        assert offsets is t.offsets and bins.base is t.bins
        assert (lo, hi, inv_cell, n) == (t.lo, t.hi, 1.0 / t.cell, t.n)


def test_nan_inf_ab_give_nan_weights_and_valid_indices():
    pts = np.array([(np.nan, 0.0), (0.0, np.inf), (-np.inf, -np.inf), (3.0, 4.0)], np.float32)
    idx, w = _encode(pts, 5)
    assert ((idx >= 0) & (idx < 313)).all()
    assert np.isnan(w[:3]).all() and np.isfinite(w[3]).all()
    with np.errstate(invalid="ignore"):
        ref_idx, _ = _ref(pts, 5)
    np.testing.assert_array_equal(idx, ref_idx)  # 0..k-1, as a stable argsort of all-inf/NaN rows


def test_nan_inf_logits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 313, 2, 3, generator=g) * 3
    ab = torch.rand(1, 2, 2, 3, generator=g) * 100 - 50
    x[0, 7, 0, 0] = float("nan")
    x[0, 9, 0, 1] = float("inf")
    x[0, :, 0, 2] = -float("inf")  # every logit -inf: NaN as in log_softmax
    idx = fc.soft_encode(ab, k=5, backend="numba").indices
    x[0, idx[0, 0, 1, 0], 1, 0] = -float("inf")  # the nearest bin's logit -inf: loss +inf
    xr = x.clone().requires_grad_(True)
    loss = fc.rebalanced_cross_entropy(xr, ab, reduction="none", backend="numba")
    loss.sum().backward()
    with np.errstate(invalid="ignore"):
        want, want_grad = R.rebalanced_cross_entropy(x.double().numpy(), ab.double().numpy(), reduction="none")
    got = loss.detach().double().numpy()
    assert np.isnan(got[0, 0, :]).all() and np.isnan(want[0, 0, :]).all()
    assert got[0, 1, 0] == np.inf == want[0, 1, 0]
    np.testing.assert_allclose(got[0, 1, 1:], want[0, 1, 1:], rtol=1e-5)
    gg = xr.grad.double().numpy()
    np.testing.assert_allclose(gg[..., 1, :], want_grad[..., 1, :], atol=1e-6)  # finite row, -inf logit included
    dec = fc.annealed_mean(x, backend="numba")
    assert torch.isnan(dec[0, :, 0, :]).all() and torch.isfinite(dec[0, :, 1, :]).all()


def test_bad_precomputed_indices_give_nan_not_a_crash():
    """The ops layer rejects out-of-range indices; the kernel itself must still never write
    out of bounds: a bad index gives a NaN loss for that pixel."""
    x = torch.randn(1, 313, 4)
    idx, w = nb.soft_encode(torch.zeros(1, 2, 4), k=3, sigma=5.0)
    idx[0, 1, 2] = 313
    idx[0, 2, 3] = -1
    idx[0, 0, 1] = 10**6
    loss, grad = nb.ce_forward(LossCall(logits=x, indices=idx, weights=w, class_weights=torch.ones(313), k=3))
    assert torch.isnan(loss[0, 1:]).all() and torch.isfinite(loss[0, 0])
    assert torch.isfinite(grad[0, :, 0]).all()


# ----------------------------------------------------------------------------- shapes


def test_empty_inputs_at_the_backend_level():
    for n, p in [(0, 5), (3, 0)]:
        idx, w = nb.soft_encode(torch.zeros(n, 2, p), k=5, sigma=5.0)
        assert idx.shape == (n, 5, p) and idx.dtype == torch.int32 and w.dtype == torch.float32
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            loss, grad = nb.ce_forward(LossCall(logits=torch.zeros(n, 313, p, dtype=dt), ab=torch.zeros(n, 2, p)))
            assert loss.shape == (n, p) and grad.shape == (n, 313, p) and grad.dtype == dt
        assert nb.annealed_mean(torch.zeros(n, 313, p), T=0.38, is_probs=False).shape == (n, 2, p)


@pytest.mark.parametrize("p", [1, nb.TILE - 1, nb.TILE, nb.TILE + 1, 3 * nb.TILE + 5])
def test_tile_edges_large_k_and_weights(p):
    g = torch.Generator().manual_seed(p)
    x = (torch.randn(2, 313, p, generator=g) * 4).requires_grad_(True)
    ab = torch.rand(2, 2, p, generator=g) * 240 - 120
    wts = torch.rand(313, generator=g) + 0.5
    loss = fc.rebalanced_cross_entropy(x, ab, wts, k=16, reduction="sum", backend="numba")
    loss.backward()
    want, want_grad = R.rebalanced_cross_entropy(x.detach().double().numpy(), ab.double().numpy(), wts.double().numpy(),
                                                 k=16, reduction="sum")
    assert loss.item() == pytest.approx(want, rel=2e-5)
    np.testing.assert_allclose(x.grad.double().numpy(), want_grad, atol=2e-5 * np.abs(want_grad).max())
    # precomputed k=16 target: same numbers
    labels = fc.soft_encode(ab, k=16, backend="numba")
    loss2 = fc.rebalanced_cross_entropy(x.detach(), labels, wts, reduction="sum", backend="numba")
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_pixel_scale_and_mask_at_the_backend_level():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 313, 50, generator=g)
    ab = torch.rand(2, 2, 50, generator=g) * 200 - 100
    ps = torch.rand(2, 50, generator=g)
    mask = torch.tensor([0.0, 1.0])
    cw = torch.rand(313, generator=g) + 0.1
    call = LossCall(logits=x, ab=ab, class_weights=cw, image_mask=mask, pixel_scale=ps, grad_scale=0.25)
    loss, grad = nb.ce_forward(call)
    want, want_grad = R.rebalanced_cross_entropy(x.double().numpy(), ab.double().numpy(), cw.double().numpy(),
                                                 reduction="none", nongray=False, grad_output=ps.double().numpy())
    m = mask.double().numpy()[:, None]
    np.testing.assert_allclose(loss.double().numpy(), want * m * ps.double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad.double().numpy(), 0.25 * want_grad * m[:, :, None], atol=1e-6)
    loss_ng, grad_ng = nb.ce_forward(dataclasses.replace(call, need_grad=False))
    assert grad_ng is None
    torch.testing.assert_close(loss_ng, loss)


def test_result_does_not_depend_on_the_thread_count():
    numba = pytest.importorskip("numba")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 313, 700, generator=g).to(torch.bfloat16)
    ab = torch.rand(3, 2, 700, generator=g) * 200 - 100
    before = numba.get_num_threads()
    try:
        outs = []
        for t in sorted({1, before}):
            numba.set_num_threads(t)
            outs.append((nb.ce_forward(LossCall(logits=x, ab=ab)), nb.annealed_mean(x, T=0.38, is_probs=False),
                         nb.soft_encode(ab, k=10, sigma=5.0)))
    finally:
        numba.set_num_threads(before)
    (l0, g0), a0, (i0, w0) = outs[0]
    (l1, g1), a1, (i1, w1) = outs[-1]
    assert torch.equal(l0, l1) and torch.equal(g0, g1) and torch.equal(a0, a1)
    assert torch.equal(i0, i1) and torch.equal(w0, w1)


def test_huge_page_gradient_is_an_ordinary_tensor(monkeypatch):
    """Large gradients come from an mmap advised MADV_HUGEPAGE: they must behave like any
    tensor through autograd (accumulation into .grad, in-place ops, freeing)."""
    from fastcolor.backends import _alloc

    monkeypatch.setattr(_alloc, "HUGE_PAGE_MIN_BYTES", 0)
    if not _alloc._HUGE_OK:
        pytest.skip("no MADV_HUGEPAGE here")
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 313, 5, 7, generator=g)).requires_grad_(True)
    ab = torch.rand(2, 2, 5, 7, generator=g) * 100 - 50
    for _ in range(2):
        fc.rebalanced_cross_entropy(x, ab, backend="numba").backward()
    _, want_grad = R.rebalanced_cross_entropy(x.detach().double().numpy(), ab.double().numpy())
    np.testing.assert_allclose(x.grad.double().numpy(), 2 * want_grad, atol=1e-7)
    x.grad.mul_(0.5).add_(1.0)
    del x


# ----------------------------------------------------------------------------- exp / log rule
# The rule shared with the C++ CPU code (fc_math.cuh exp_/log_), see _math.fexp / _math.flog:
# exp: <= 2 ulp on [-87, 88] (1.06 measured over every float32 in [-88, 88]), below -87 within
# 2 ulp of the subnormal spacing or exactly +0 where x / ln 2 rounds to -127 (-88 and below,
# -inf, always 0), +inf above 88, NaN for NaN;
# log: ~1 ulp on normals, subnormals as exactly as normals (<= 2 ulp), log(0) = -inf,
# log(x < 0) = NaN, log(+inf) = +inf, log(NaN) = NaN.


def _vectorised(fn):
    numba = pytest.importorskip("numba")

    @numba.njit
    def run(x, out):
        for i in range(x.size):
            out[i] = fn(x[i])

    def call(x):
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty_like(x)
        run(x, out)
        return out

    return call


_SPECIAL = np.array([-87.5, -87.0, -86.99999, -100.0, -1e30, -np.inf, 88.0, 88.00001, 88.5, 100.0, np.inf, np.nan,
                     0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.1754942e-38, 1.1754944e-38, 1e-38, 1.0, -1.0, -2.5, 3e38,
                     -3e38, 1e-7, -1e-7], np.float32)


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| in units of float32's spacing at want (want: float64, finite)."""
    w32 = want.astype(np.float32)
    return np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(w32)).astype(np.float64)


def test_fexp_follows_the_rule():
    from fastcolor.backends.numba_backend._math import fexp

    vexp = _vectorised(fexp)
    rng = np.random.default_rng(0)
    x = np.concatenate([_SPECIAL, np.linspace(-87, 88, 400001, dtype=np.float32),
                        np.linspace(-88.5, -87, 30001, dtype=np.float32),
                        rng.uniform(-87, 88, 100000).astype(np.float32),
                        np.float32(10.0) ** rng.uniform(-45, 1.9, 20000).astype(np.float32)
                        * rng.choice([-1, 1], 20000)])
    x = x.astype(np.float32)
    got = vexp(x)
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64))
    low, high, nan = x < -87, x > 88, np.isnan(x)
    mid = ~(low | high | nan)
    # below -87: exp(x) to 2 ulp of the subnormal spacing, or exactly +0 where x / ln 2 rounds
    # to -127 or below (the true value < 2^-126.5), and +0 from -88 down (-inf included)
    zero = low & (got == 0)
    assert (np.signbit(got[low]) == 0).all() and (got[x <= -88] == 0).all()
    assert (want[zero] < 2.0 ** -126.5 * (1 + 1e-6)).all() and (x[zero] < -87.6).all()
    assert _ulps(got[low & ~zero], want[low & ~zero]).max() <= 2.0
    assert (got[high] == np.inf).all()
    assert np.isnan(got[nan]).all()
    assert _ulps(got[mid], want[mid]).max() <= 2.0
    assert vexp(np.float32([-87.0]))[0] > 0 and vexp(np.float32([88.0]))[0] < np.inf


def test_fexp_nonpos_is_fexp_up_to_88():
    """The softmax loops' exp (no x > 88 select): bit for bit fexp on x <= 88 and NaN."""
    from fastcolor.backends.numba_backend._math import fexp, fexp_nonpos

    x = np.concatenate([_SPECIAL, np.linspace(-100, 88, 200001, dtype=np.float32)])
    x = x[(x <= 88) | np.isnan(x)]
    a, b = _vectorised(fexp)(x), _vectorised(fexp_nonpos)(x)
    assert np.array_equal(np.isnan(a), np.isnan(x)) and np.array_equal(np.isnan(b), np.isnan(x))
    assert np.array_equal(a[~np.isnan(x)].view(np.int32), b[~np.isnan(x)].view(np.int32))


def test_flog_follows_the_rule():
    from fastcolor.backends.numba_backend._math import flog

    vlog = _vectorised(flog)
    rng = np.random.default_rng(1)
    tiny = np.float32(2.0) ** np.arange(-149, -125, dtype=np.float32)  # every subnormal binade
    sub = np.concatenate([tiny, rng.uniform(1e-45, 1.1754942e-38, 20000).astype(np.float32)])
    normal = np.concatenate([np.float32(2.0) ** rng.uniform(-126, 127.99, 100000).astype(np.float32),
                             np.linspace(0.5, 2.0, 200001, dtype=np.float32),
                             np.float32([1e-38, 1.1754944e-38, 3.4e38])])
    x = np.concatenate([_SPECIAL, sub, normal, -normal[:1000]]).astype(np.float32)
    got = vlog(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.log(x.astype(np.float64))
    pos = (x > 0) & np.isfinite(x)
    assert _ulps(got[pos], want[pos]).max() <= 2.0
    assert _ulps(vlog(normal), np.log(normal.astype(np.float64))).max() <= 1.0  # ~1 ulp on normals
    assert _ulps(vlog(sub), np.log(sub.astype(np.float64))).max() <= 2.0  # subnormals: exact as normals
    assert (got[x == 0] == -np.inf).all()  # 0 and -0
    assert np.isnan(got[(x < 0) | np.isnan(x)]).all()  # negative (-inf included) and NaN
    assert (got[x == np.inf] == np.inf).all()


# ----------------------------------------------------------------------------- no fused multiply-add


_NO_FMA_CHILD = textwrap.dedent(r"""
    import re, torch
    from fastcolor.backends import numba_backend as nb
    from fastcolor.backends.numba_backend import encode as E
    nb.soft_encode(torch.tensor([[[200.0, 0.3], [0.5, 7.0]]]), k=3, sigma=5.0)  # serial: the worker only
    ir = "".join(E.soft_encode_worker.inspect_llvm().values())
    asm = "".join(E.soft_encode_worker.inspect_asm().values())
    print("DOUBLE_ARITH", len(re.findall(r"= f(?:mul|add|sub) [^\n]*double", ir)))
    print("DOUBLE_CONTRACT", len(re.findall(r"= f(?:mul|add|sub) [^\n]*contract[^\n]*double", ir)))
    fma_ir = len(re.findall(r"llvm\.(?:fma|fmuladd)\.(?:v\d+)?f64", ir))
    fma_asm = len(re.findall(r"vfn?m(?:add|sub)\w*[sp]d\b", asm))
    print("FMA64", fma_ir + fma_asm)
""")


def test_the_float64_scan_has_no_fused_multiply_add(tmp_path):
    """Rule 2 forbids FMA in the float64 distances. numba lets a callee without its own
    fast-math flags inherit its caller's (the kernels allow ``contract``): the search functions
    must say fastmath=False explicitly. Checked in the compiled worker (uncached, in a child)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["FASTCOLOR_NUMBA_CACHE"] = "0"
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", _NO_FMA_CHILD], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+) (\d+)$", out.stdout, re.M))
    assert int(counts["DOUBLE_ARITH"]) > 0, out.stdout  # the scan is there
    assert counts["DOUBLE_CONTRACT"] == "0" and counts["FMA64"] == "0", out.stdout


# ----------------------------------------------------------------------------- on-disk cache


_CHILD = textwrap.dedent("""
    import torch
    from fastcolor.backends import numba_backend as nb
    idx, w = nb.soft_encode(torch.tensor([[[3.0, 1e4], [4.0, 0.0]]]), k=2, sigma=5.0)
    print("CACHE", nb.CACHE, "IDX", idx.flatten().tolist())
    print("W", [round(v, 4) for v in w.flatten().tolist()])
""")


def _run_child(tmp_path, env_extra, pkg_parent):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(env_extra)
    env["PYTHONPATH"] = str(pkg_parent)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def _copy_package(dst: Path) -> Path:
    shutil.copytree(REPO / "fastcolor", dst / "fastcolor",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    return dst


def test_cache_falls_back_when_no_cache_folder_is_writable(tmp_path):
    """NUMBA_CACHE_DIR unwritable, the package's __pycache__ unusable (a file in its way) and
    no user-wide cache folder: the backend must compile without a cache, not fail at import,
    and say once where the cache could not be written and what to set (issue 23, "Also")."""
    parent = _copy_package(tmp_path / "ro")
    (parent / "fastcolor" / "backends" / "numba_backend" / "__pycache__").write_text("not a folder")
    unwritable = {"NUMBA_CACHE_DIR": "/dev/null/numba", "HOME": "/dev/null", "XDG_CACHE_HOME": "/dev/null/x"}
    out = _run_child(tmp_path, unwritable, parent)
    assert "CACHE False" in out, out
    assert out.count("RuntimeWarning: numba's cache folder /dev/null/numba/fastcolor/") == 1, out
    assert "compile again in every process" in out and "set FASTCOLOR_CACHE_DIR" in out, out
    want = np.moveaxis(R.soft_encode(np.array([[[3.0, 1e4], [4.0, 0.0]]]), k=2)[0], 1, -1).ravel()
    assert f"IDX {np.moveaxis(want.reshape(1, 2, 2), -1, 1).ravel().tolist()}" in out, out


def test_cache_is_written_read_back_and_stamped_by_the_whole_package(tmp_path):
    """The default cache folder ($XDG_CACHE_HOME/fastcolor/numba): the first run writes the cache
    there (nothing inside the package, which pip uninstall would leave behind: issue 22.3) and
    says so on stderr, the second loads it silently,
    and an edit of a helper file alone (_math.py: fexp, compiled into encode.py's kernels)
    recompiles them: numba's own stamp is per file, which would have served the stale kernels."""
    parent = _copy_package(tmp_path / "rw")
    cache = tmp_path / "xdg"
    env = {"XDG_CACHE_HOME": str(cache), "NUMBA_DEBUG_CACHE": "1"}
    out = _run_child(tmp_path, env, parent)
    assert "CACHE True" in out, out
    assert out.count("fastcolor: compiling the numba CPU kernels") == 1, out
    assert list((cache / "fastcolor" / "numba").rglob("*.nbi")), "numba wrote no cache index"
    assert not list((parent / "fastcolor").rglob("__pycache__")), "files written inside the package"
    assert "data saved to" in out and "W [0.5987, 0.8808, 0.4013, 0.1192]" in out, out
    out = _run_child(tmp_path, env, parent)
    assert "data loaded from" in out and "data saved to" not in out, out  # all from the cache
    assert "compiling the numba CPU kernels" not in out, out
    math_py = parent / "fastcolor" / "backends" / "numba_backend" / "_math.py"
    src = math_py.read_text()
    assert "    return p * pow2_of_magic(t)\n" in src
    math_py.write_text(src.replace("    return p * pow2_of_magic(t)\n", "    return ONE\n"))
    out = _run_child(tmp_path, env, parent)
    assert "W [0.5, 0.8808, 0.5, 0.1192]" in out, out  # every fexp is 1: weights 1/k (the far-off pixel: float64 exp)


# ----------------------------------------------------------------------------- threads, fork


def _child_encode(q):
    ab = torch.rand(2, 2, 40 * nb.TILE) * 100 - 50
    idx, _ = nb.soft_encode(ab, k=5, sigma=5.0)
    loss, _ = nb.ce_forward(LossCall(logits=torch.randn(2, 313, 40 * nb.TILE), ab=ab, need_grad=False))
    q.put((idx.shape, bool(torch.isfinite(loss).all())))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_after_parallel_use_does_not_die():
    """GNU OpenMP cannot run in a child forked after the parent used it (numba terminates
    such a child): a DataLoader worker soft-encoding its batches. The backend then runs
    serially in the child (tests/test_fork.py: after torch's and cpp's parallel ops too)."""
    import multiprocessing as mp

    numba = pytest.importorskip("numba")
    if numba.get_num_threads() < 2:
        pytest.skip("one thread: never parallel")
    ab = torch.rand(2, 2, 40 * nb.TILE) * 100 - 50
    nb.ce_forward(LossCall(logits=torch.randn(2, 313, 40 * nb.TILE), ab=ab, need_grad=False))  # parallel
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child_encode, args=(q,))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    assert q.get(timeout=5) == ((2, 5, 40 * nb.TILE), True)


# ----------------------------------------------------------------------------- contract


def test_k_out_of_range_is_refused_at_the_backend_level():
    with pytest.raises(ValueError, match="k"):
        nb.soft_encode(torch.zeros(1, 2, 3), k=17, sigma=5.0)
    with pytest.raises(ValueError, match="k"):
        nb.ce_forward(LossCall(logits=torch.zeros(1, 313, 3), ab=torch.zeros(1, 2, 3), k=0, need_grad=False))


def test_the_contract_is_keyword_only():
    """The typed contract: soft_encode(ab, *, k, sigma), ce_forward(call), annealed_mean(x, *, T, is_probs)."""
    import inspect

    for fn, names in ((nb.soft_encode, ("k", "sigma")), (nb.annealed_mean, ("T", "is_probs"))):
        params = inspect.signature(fn).parameters
        assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in names), fn
    assert list(inspect.signature(nb.ce_forward).parameters) == ["call"]
    assert nb.SUPPORTS_FLOAT64 is False
    with pytest.raises(TypeError):
        nb.soft_encode(torch.zeros(1, 2, 3), 5, 5.0)
