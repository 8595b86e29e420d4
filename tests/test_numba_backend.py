"""numba-specific tests: the grid-window search and its fallback, exact ties, far-off / NaN / Inf
input, empty input, large k, huge-page gradients, thread-count independence, and the on-disk
cache falling back when no cache folder is writable. The generic matrix (tests/test_backends.py)
covers the public API against the reference for every backend, numba included."""
import math
import os
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
from fastcolor.gamut import A_CELLS, AB_BINS, B_CELLS

nb = pytest.importorskip("fastcolor.backends.numba_backend")
if nb.unavailable_reason("cpu") is not None:
    pytest.skip(nb.unavailable_reason("cpu"), allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]


def _encode(ab_pixels: np.ndarray, k: int):
    """(M, 2) float32 pixels -> numba (indices (M, k), weights (M, k)) through the backend."""
    ab = torch.from_numpy(np.ascontiguousarray(ab_pixels.T[None], dtype=np.float32))
    idx, w = nb.soft_encode(ab, k, 5.0)
    return idx[0].T.numpy(), w[0].T.numpy()


def _ref(ab_pixels: np.ndarray, k: int):
    idx, w = R.soft_encode(np.asarray(ab_pixels, np.float64).T[None], k=k)
    return idx[0].T, w[0].T


# ----------------------------------------------------------------------------- the window bound


@pytest.mark.parametrize("s,kmax", [(2, 1), (3, 4), (4, 9), (5, 16)])
def test_window_bound_holds_the_claimed_k_on_the_full_lattice(s, kmax):
    """The docstring of _window_size: inside the full lattice, for every pixel position, at
    least kmax window points are strictly closer than the window's bound (so the proof check
    passes away from the gamut edge). Positions: a dense grid of the unit cell, edges included."""
    assert nb._window_size(kmax) == s
    f = np.linspace(0.0, 1.0, 101)
    worst = 10**9
    for fa in f + 8:  # far from the grid border: no clamping
        for fb in f + 8:
            la = nb._window_lo.py_func(np.float32(fa), s, 1000)
            lb = nb._window_lo.py_func(np.float32(fb), s, 1000)
            bound = min(fa - (la - 1), la + s - fa, fb - (lb - 1), lb + s - fb)
            ia = np.arange(la, la + s)[:, None]
            ib = np.arange(lb, lb + s)[None, :]
            d = np.sqrt((ia - fa) ** 2 + (ib - fb) ** 2)
            worst = min(worst, int((d < bound).sum()))
    assert worst >= kmax


# ----------------------------------------------------------------------------- exhaustive grid


def test_dense_grid_matches_reference_exactly():
    """Every integer ab in [-120, 120]^2 (exact midpoints and exact ties included: the squared
    distances are integers, exact in float32 and float64, so ties must resolve identically,
    lower bin index first), for every window size, plus the gamut edge and beyond."""
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


def test_far_off_ab_falls_back_to_the_full_scan():
    pts = np.array([(1e4, -1e4), (-1e4, 1e4), (1e6, 0.0), (0.0, -1e6), (-3e5, 2e5), (150.0, 150.0),
                    (-200.0, 0.0), (101.0, -111.0), (99999.0, 5.0), (100001.0, 5.0), (130.0, 60.0)], np.float32)
    for k in (1, 5, 10, 16):
        idx, w = _encode(pts, k)
        ref_idx, ref_w = _ref(pts, k)
        np.testing.assert_array_equal(idx, ref_idx, err_msg=f"k={k}")
        np.testing.assert_allclose(w, ref_w, atol=1e-5)


def _window_passes(pix: np.ndarray, k: int) -> np.ndarray:
    """numpy restatement of the kernel's window check: the window's top-k is provably the
    global top-k iff the k nearest (reference) all lie in the window and the k-th is closer
    than the window's bound."""
    s = nb._window_size(k)
    f = np.stack([(pix[:, 0] + 90) / 10, (pix[:, 1] + 110) / 10], 1)
    lo = np.floor(f) - s // 2 + 1 if s % 2 == 0 else np.floor(f + 0.5) - s // 2
    lo = np.clip(lo, 0, np.array([A_CELLS, B_CELLS]) - s)
    side_lo = np.where(lo > 0, f - (lo - 1), np.inf)
    side_hi = np.where(lo + s < np.array([A_CELLS, B_CELLS]), lo + s - f, np.inf)
    bound = 10 * np.minimum(side_lo, side_hi).min(1)
    idx, _ = _ref(pix, k)
    cells = np.rint((AB_BINS[idx] - (-90, -110)) / 10)  # (M, k, 2)
    inside = ((cells >= lo[:, None]) & (cells < lo[:, None] + s)).all((1, 2))
    dk = np.sqrt(((AB_BINS[idx[:, -1]] - pix) ** 2).sum(1))
    return inside & (dk < bound * 0.99999)


def test_fallback_is_rare_for_typical_ab():
    """The window is enough for nearly every natural pixel (else the speed claims are void)."""
    rng = np.random.default_rng(1)
    pix = rng.normal(0, 25, (20000, 2))
    for k, want in ((1, 0.99), (5, 0.99), (10, 0.98), (16, 0.95)):
        rate = _window_passes(pix, k).mean()
        assert rate > want, (k, rate)


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
    idx, w = nb.soft_encode(torch.zeros(1, 2, 4), 3, 5.0)
    idx[0, 1, 2] = 313
    idx[0, 2, 3] = -1
    idx[0, 0, 1] = 10**6
    loss, grad = nb.ce_forward(x, None, idx, w, torch.ones(313), None, 3, 5.0, 1.0, True)
    assert torch.isnan(loss[0, 1:]).all() and torch.isfinite(loss[0, 0])
    assert torch.isfinite(grad[0, :, 0]).all()


# ----------------------------------------------------------------------------- shapes


def test_empty_inputs_at_the_backend_level():
    for n, p in [(0, 5), (3, 0)]:
        idx, w = nb.soft_encode(torch.zeros(n, 2, p), 5, 5.0)
        assert idx.shape == (n, 5, p) and idx.dtype == torch.int32 and w.dtype == torch.float32
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            loss, grad = nb.ce_forward(torch.zeros(n, 313, p, dtype=dt), torch.zeros(n, 2, p), None, None, None, None,
                                       5, 5.0, 1.0, True)
            assert loss.shape == (n, p) and grad.shape == (n, 313, p) and grad.dtype == dt
        assert nb.annealed_mean(torch.zeros(n, 313, p), 0.38, False).shape == (n, 2, p)


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
    loss, grad = nb.ce_forward(x, ab, None, None, cw, mask, 5, 5.0, 0.25, True, ps)
    want, want_grad = R.rebalanced_cross_entropy(x.double().numpy(), ab.double().numpy(), cw.double().numpy(),
                                                 reduction="none", nongray=False, grad_output=ps.double().numpy())
    m = mask.double().numpy()[:, None]
    np.testing.assert_allclose(loss.double().numpy(), want * m * ps.double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad.double().numpy(), 0.25 * want_grad * m[:, :, None], atol=1e-6)
    loss_ng, grad_ng = nb.ce_forward(x, ab, None, None, cw, mask, 5, 5.0, 0.25, False, ps)
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
            outs.append((nb.ce_forward(x, ab, None, None, None, None, 5, 5.0, 1.0, True), nb.annealed_mean(x, 0.38, False)))
    finally:
        numba.set_num_threads(before)
    (l0, g0), a0 = outs[0]
    (l1, g1), a1 = outs[-1]
    assert torch.equal(l0, l1) and torch.equal(g0, g1) and torch.equal(a0, a1)


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


# ----------------------------------------------------------------------------- on-disk cache


_CHILD = textwrap.dedent("""
    import torch
    from fastcolor.backends import numba_backend as nb
    idx, w = nb.soft_encode(torch.tensor([[[5.0, 1e4], [5.0, 0.0]]]), 2, 5.0)
    print("CACHE", nb.CACHE, "IDX", idx.flatten().tolist())
""")


def _run_child(tmp_path, env_extra, pkg_parent):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(env_extra)
    env["PYTHONPATH"] = str(pkg_parent)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _copy_package(dst: Path) -> Path:
    shutil.copytree(REPO / "fastcolor", dst / "fastcolor", ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    return dst


def test_cache_falls_back_when_no_cache_folder_is_writable(tmp_path):
    """NUMBA_CACHE_DIR unwritable, the package's __pycache__ unusable (a file in its way) and
    no user-wide cache folder: the backend must compile without a cache, not fail at import."""
    parent = _copy_package(tmp_path / "ro")
    (parent / "fastcolor" / "backends" / "__pycache__").write_text("not a folder")
    out = _run_child(tmp_path, {"NUMBA_CACHE_DIR": "/dev/null/numba", "HOME": "/dev/null", "XDG_CACHE_HOME": "/dev/null/x"}, parent)
    assert "CACHE False" in out, out
    want = np.moveaxis(R.soft_encode(np.array([[[5.0, 1e4], [5.0, 0.0]]]), k=2)[0], 1, -1).ravel()
    assert f"IDX {np.moveaxis(want.reshape(1, 2, 2), -1, 1).ravel().tolist()}" in out, out


def test_cache_is_written_to_a_writable_cache_dir(tmp_path):
    parent = _copy_package(tmp_path / "rw")
    cache = tmp_path / "cache"
    out = _run_child(tmp_path, {"NUMBA_CACHE_DIR": str(cache)}, parent)
    assert "CACHE True" in out, out
    assert list(cache.rglob("*.nbi")), "numba wrote no cache index"


def _child_encode(q):
    ab = torch.rand(2, 2, 40 * nb.TILE) * 100 - 50
    idx, _ = nb.soft_encode(ab, 5, 5.0)
    loss, _ = nb.ce_forward(torch.randn(2, 313, 40 * nb.TILE), ab, None, None, None, None, 5, 5.0, 1.0, False)
    q.put((idx.shape, bool(torch.isfinite(loss).all())))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_after_parallel_use_does_not_die():
    """GNU OpenMP cannot run in a child forked after the parent used it (numba terminates
    such a child): a DataLoader worker soft-encoding its batches. The backend then runs
    serially in the child."""
    import multiprocessing as mp

    numba = pytest.importorskip("numba")
    if numba.get_num_threads() < 2:
        pytest.skip("one thread: never parallel")
    ab = torch.rand(2, 2, 40 * nb.TILE) * 100 - 50
    nb.ce_forward(torch.randn(2, 313, 40 * nb.TILE), ab, None, None, None, None, 5, 5.0, 1.0, False)  # parallel
    assert nb._PARALLEL_PID == os.getpid()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child_encode, args=(q,))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    assert q.get(timeout=5) == ((2, 5, 40 * nb.TILE), True)


def test_k_out_of_range_is_refused_at_the_backend_level():
    with pytest.raises(ValueError, match="k"):
        nb.soft_encode(torch.zeros(1, 2, 3), 17, 5.0)
    with pytest.raises(ValueError, match="k"):
        nb.ce_forward(torch.zeros(1, 313, 3), torch.zeros(1, 2, 3), None, None, None, None, 0, 5.0, 1.0, False)
