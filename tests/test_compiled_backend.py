"""Backend-specific tests of ``cpp`` (C++/OpenMP) and ``cuda`` (CUDA kernels): fastcolor._C.

The generic matrix (tests/test_backends.py) and the shared acceptance test of the search
(tests/test_encode_exact.py) cover the public API; here, through the backend contract
(``compiled_backend``) and the bindings directly: the gamut reaching the kernels as arguments,
the bindings' argument checks, the search's three rules (float32 in the table's box without
fused multiply-add, float64 far off, NaN/Inf) on dense grids, exact ties and far-off ab, the
exp/log rule of the CPU code, every CPU instruction-set variant, float16/bfloat16 rounding of
the gradient, per-pixel scales, bad indices, the OpenMP path, and the same checks on the GPU
where one is present (the only skip).
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
from fastcolor.backends._tables import bin_centres, device_table
from fastcolor.backends.contract import LossCall
from fastcolor.gamut import AB_BINS, candidate_table

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
        assert any(name.startswith("soft_encode_kernel") for name in info["cuda_kernels"])
        assert any(name.startswith("ce_forward_kernel") for name in info["cuda_kernels"])
        assert any(name.startswith("annealed_mean_kernel") for name in info["cuda_kernels"])


@pytest.mark.skipif(shutil.which("nvcc") is None or bool(os.environ.get("FASTCOLOR_NO_CUDA")),
                    reason="nvcc not on PATH (or FASTCOLOR_NO_CUDA set): CUDA kernels are optional")
def test_cuda_kernels_built_when_nvcc_present():
    assert C.has_cuda_kernels, fc.build_info()
    assert len(C.cuda_kernels) >= 3


def test_unavailable_reason_names_the_cause(monkeypatch):
    monkeypatch.setattr(_ext, "load_extension", lambda force=False: None)
    assert "fastcolor._C" in cb.unavailable_reason("cpu")
    assert "fastcolor._C" in cb.unavailable_reason("cuda")
    monkeypatch.undo()
    if not HAS_GPU:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert cb.unavailable_reason("cuda")


def test_kernels_take_the_bin_centres_they_are_given():
    """No bin table is compiled in: the annealed mean uses the centres passed (here doubled)."""
    x = torch.randn(2, 313, 50)
    out1, out2 = torch.empty(2, 2, 50), torch.empty(2, 2, 50)
    C.annealed_mean(x, out1, bin_centres("cpu"), 0.38, False)
    C.annealed_mean(x, out2, bin_centres("cpu") * 2, 0.38, False)
    torch.testing.assert_close(out2, 2 * out1, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out1.double().numpy(), R.annealed_mean(x.double().numpy(), T=0.38), atol=2e-3)


def test_bad_arguments_raise_not_crash():
    ab = torch.zeros(1, 2, 4)
    idx, w = torch.zeros(1, 5, 4, dtype=torch.int32), torch.zeros(1, 5, 4)
    table, centres = device_table(5, "cpu"), bin_centres("cpu")
    C.soft_encode(ab, idx, w, table, centres, 5.0)  # fine
    bad = [
        lambda: C.soft_encode(ab.double(), idx, w, table, centres, 5.0),  # dtype
        lambda: C.soft_encode(ab[:, :1], idx, w, table, centres, 5.0),  # shape
        lambda: C.soft_encode(torch.zeros(1, 4, 2).transpose(1, 2), idx, w, table, centres, 5.0),  # strides
        lambda: C.soft_encode(ab, idx.long(), w, table, centres, 5.0),
        lambda: C.soft_encode(ab, idx, w[:, :3], table, centres, 5.0),  # k mismatch
        lambda: C.soft_encode(ab, idx[:, :0], w[:, :0], table, centres, 5.0),  # k = 0
        lambda: C.soft_encode(ab, idx, w, table, centres, 0.0),  # sigma
        lambda: C.soft_encode(ab, idx, w, table, centres[:100], 5.0),  # not the 313 centres
        lambda: C.soft_encode(ab, idx, w, None, centres, 5.0),
        lambda: C.soft_encode(ab, idx, w, "table", centres, 5.0),
        lambda: C.soft_encode(ab, idx, w, table, centres.numpy(), 5.0),  # not a tensor
        lambda: C.annealed_mean(torch.zeros(1, 313, 4, dtype=torch.float64), torch.zeros(1, 2, 4), centres, 0.38,
                                False),
        lambda: C.annealed_mean(torch.zeros(1, 313, 4), torch.zeros(1, 2, 4), centres, 1e-9, False),  # T
        lambda: C.annealed_mean(torch.zeros(1, 300, 4), torch.zeros(1, 2, 4), centres, 0.38, False),
    ]
    for call in bad:
        with pytest.raises((ValueError, TypeError)):
            call()
    from dataclasses import replace
    shifted = replace(table, bins=torch.zeros(len(table.bins) + 1, dtype=torch.int16)[1:])  # 2-byte aligned
    with pytest.raises(ValueError, match="aligned"):
        C.soft_encode(ab, idx, w, shifted, centres, 5.0)
    x = torch.zeros(1, 313, 4)
    with pytest.raises(ValueError):  # the gradient must have the logits' dtype and shape
        C.ce_forward(LossCall(logits=x, ab=ab), torch.zeros(1, 4), torch.zeros(1, 313, 4, dtype=torch.float16),
                     table, centres)
    with pytest.raises(ValueError):  # encoding ab needs the table
        C.ce_forward(LossCall(logits=x, ab=ab), torch.zeros(1, 4), None)
    C.soft_encode(torch.zeros(0, 2, 4), idx[:0], w[:0], table, centres, 5.0)  # empty: no-op


# ----------------------------------------------------------------------------- soft-encoding


def dense_ab_grid(step=2.5, lo=-135.0, hi=135.0):
    """(1, 2, n*n) ab on a grid through every bin centre, cell edge and midpoint (exact in float32)."""
    v = np.arange(lo, hi + step / 2, step)
    a, b = np.meshgrid(v, v, indexing="ij")
    return np.stack([a, b]).reshape(1, 2, -1)


def encode(ab64, device, k, sigma=5.0):
    """cb.soft_encode of float64 numpy ab (N, 2, P), as numpy (int64 indices, float64 weights)."""
    idx, w = cb.soft_encode(torch.tensor(ab64, dtype=torch.float32, device=device), k=k, sigma=sigma)
    return idx.cpu().long().numpy(), w.cpu().double().numpy()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 2, 5, 10, 11, 16])
def test_soft_encode_dense_grid_exact_ties(device, k):
    """Grid through bin centres, cell edges and midpoints, inside and outside the table's box:
    every distance is exact in float32, so the indices (ties -> lower bin) must equal the
    reference's, and the weights agree to float32 rounding."""
    ab64 = dense_ab_grid()
    gi, gw = encode(ab64, device, k)
    ref_idx, ref_w = R.soft_encode(ab64, k=k)
    np.testing.assert_array_equal(gi, ref_idx)
    np.testing.assert_allclose(gw, ref_w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 5, 10, 16])
def test_soft_encode_random_and_far_off(device, k):
    g = np.random.default_rng(k)
    near = g.uniform(-140, 140, size=(1, 2, 2000))
    ab64 = torch.tensor(near, dtype=torch.float32).double().numpy()  # the float32 values
    gi, gw = encode(ab64, device, k)
    np.testing.assert_allclose(gw.sum(1), 1.0, rtol=1e-5)
    # Random float32 ab: ties only within float32 rounding (rule 1); compare away from them.
    d2 = ((np.moveaxis(ab64, 1, -1)[..., None, :] - AB_BINS) ** 2).sum(-1)
    gaps = np.diff(np.sort(d2, axis=-1)[..., : k + 1], axis=-1).min(-1)
    clear = gaps > 1e-3
    ref_idx, ref_w = R.soft_encode(ab64, k=k)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.moveaxis(gi, 1, -1)[clear], np.moveaxis(ref_idx, 1, -1)[clear])
    np.testing.assert_allclose(gw, ref_w, rtol=0, atol=1e-6)
    # Far off (rule 2, float64 over all bins): exactly the reference, ties included.
    far = np.concatenate([g.uniform(-1e6, 1e6, size=(1, 2, 300)),
                          np.array([[1e6, -1e6, 1e3, -1e3, 0, 0, 3e4, -5e5, 1e30, 3e38],
                                    [0, 0, 0, 0, 1e6, -1e6, 3e4, 7, -1e30, 3e38]])[None]], axis=2)
    far = torch.tensor(far, dtype=torch.float32).double().numpy()
    gi, gw = encode(far, device, k)
    ref_idx, ref_w = R.soft_encode(far, k=k)
    np.testing.assert_array_equal(gi, ref_idx)
    np.testing.assert_allclose(gw, ref_w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_soft_encode_far_off_ab_exactly(device):
    """Far outside the table's box float32 |ab - c|^2 (~1e12, ulp 65536) would tie whole columns
    of bins; rule 2 compares all 313 bins in float64, as the reference does, and finds its bins."""
    pts = np.array([[1e6, 0.0], [1e5, 3.0], [-1e6, 50.0], [0.0, -1e7], [-3e4, 2e4], [250.0, -260.0],
                    [128.0, 0.0], [-128.001, 5.0], [0.0, 128.0]])
    ab64 = pts.T.reshape(1, 2, -1)
    gi, gw = encode(ab64, device, 3)
    ref_idx, ref_w = R.soft_encode(ab64, k=3)
    np.testing.assert_array_equal(gi, ref_idx)
    np.testing.assert_allclose(gw, ref_w, rtol=0, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_soft_encode_non_finite_ab(device):
    ab = torch.tensor([[[float("nan"), 0.0, float("inf"), -float("inf"), 3.0]],
                       [[0.0, float("nan"), 1.0, 2.0, -float("inf")]]]).permute(1, 0, 2).contiguous()
    idx, w = cb.soft_encode(ab.to(device), k=3, sigma=5.0)
    assert torch.equal(idx[0].cpu(), torch.arange(3, dtype=torch.int32)[:, None].expand(3, 5))
    assert torch.isnan(w.cpu()).all()  # like the reference: every distance is NaN/inf, all tie


def rule1_float32(ab32: np.ndarray, k: int, fma: bool = False) -> np.ndarray:
    """Rule 1 in numpy: the sub-cell's list, float32 d^2 = round(round(da^2) + round(db^2)) (numpy
    never fuses), stable order (the list ascends in bin index). ab32: (2, P) in the box -> (P, k).
    fma: what a fused multiply-add would give instead, round(da^2 + round(db^2))."""
    t = candidate_table(k)
    f32 = np.float32
    ia = np.minimum(((ab32[0] - f32(t.lo)) / f32(t.cell)).astype(np.int64), t.n - 1)
    ib = np.minimum(((ab32[1] - f32(t.lo)) / f32(t.cell)).astype(np.int64), t.n - 1)
    cell = ia * t.n + ib
    off, ln = t.offsets[cell], t.offsets[cell + 1] - t.offsets[cell]
    e = np.arange(t.max_len)[None]
    has = e < ln[:, None]
    q = t.bins[np.where(has, off[:, None] + e, off[:, None])].astype(np.int64)
    c = AB_BINS.astype(f32)
    da, db = ab32[0][:, None] - c[q, 0], ab32[1][:, None] - c[q, 1]
    d2 = (da.astype(np.float64) ** 2 + (db * db).astype(np.float64)).astype(f32) if fma else da * da + db * db
    d = np.where(has, d2, np.inf)
    return np.take_along_axis(q, np.argsort(d, axis=1, kind="stable")[:, :k], 1)


def bisector_points(n=60_000, seed=1):
    """float32 points on the bisectors of diagonal neighbour bins (a + b = multiple of 10): the
    two squared distances tie up to rounding, and an FMA (one rounding instead of two) flips
    the order of many of them."""
    g = np.random.default_rng(seed)
    a = g.uniform(-60, 60, size=n).astype(np.float32)
    return np.stack([a, (g.integers(-6, 7, size=n) * 10 - a).astype(np.float32)])


@pytest.mark.parametrize("k", [2, 5, 16])
def test_rule1_is_float32_without_fma_on_every_isa(isa_variants, k):
    """Near-ties in the box: exactly the float32 rule (two roundings per d^2, never an FMA) for
    every CPU instruction set, the AVX2/AVX-512 builds included (csrc/fc_encode.cpp is compiled
    with -ffp-contract=off)."""
    ab = bisector_points()
    want = rule1_float32(ab, k)
    assert (rule1_float32(ab, k, fma=True) != want).any(1).sum() > 1000  # the points are sensitive
    for isa in isa_variants:
        assert C.cpu_set_isa(isa)
        idx, _ = cb.soft_encode(torch.from_numpy(ab)[None], k=k, sigma=5.0)
        np.testing.assert_array_equal(idx[0].numpy().T, want, err_msg=isa)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device on this machine")
@pytest.mark.parametrize("k", [2, 5, 16])
def test_cuda_rule1_is_float32_without_fma(k):
    ab = bisector_points()
    idx, _ = cb.soft_encode(torch.from_numpy(ab)[None].cuda(), k=k, sigma=5.0)
    np.testing.assert_array_equal(idx[0].cpu().numpy().T, rule1_float32(ab, k))


# ----------------------------------------------------------------------------- exp / log rule


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| in units of the float32 spacing at want (float64 want)."""
    sp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - want) / sp


def test_exp_log_rule(isa_variants):
    """kernels/fc_math.cuh's exp_/log_ on the CPU (the rule written next to them, shared with numba)."""
    sub = np.array([1e-45, 1e-42, 3e-40, 1e-39, 1.1754942e-38], dtype=np.float32)  # subnormals
    ex = np.concatenate([np.linspace(-87, 88, 200_001), np.linspace(-88.5, -87, 30_001),
                         [-87.5, -87, -100, -1e30, -np.inf, 88.5, np.inf, np.nan,
                          0, -0.0, 88, 1e-38, -1e-38, *sub]]).astype(np.float32)
    lx = np.concatenate([np.geomspace(1.1754944e-38, 3.4e38, 200_001), 1 + np.linspace(-1e-3, 1e-3, 20_001),
                         sub, [0, -0.0, -1, -1e-30, -np.inf, np.inf, np.nan, 1e-38, 1, 2, 0.5]]).astype(np.float32)
    with np.errstate(all="ignore"):
        want_e, want_l = np.exp(ex.astype(np.float64)), np.log(lx.astype(np.float64))
    for isa in isa_variants:
        assert C.cpu_set_isa(isa)
        e, lg = C.cpu_exp(ex), C.cpu_log(lx)
        assert e.dtype == np.float32 and e.shape == ex.shape
        band = (ex >= -87) & (ex <= 88)
        assert _ulps(e[band], want_e[band]).max() <= 2, isa
        # below -87: within 2 ulp of the subnormal spacing, or exactly +0 where x / ln 2 rounds to
        # -127 (the true value < 2^-126.5); always +0 from -88 down, -inf included
        low = ex < -87
        zero = low & (e == 0)
        assert np.all(e[ex <= -88] == 0) and not np.signbit(e[low]).any(), isa
        assert np.all(want_e[zero] < 2.0 ** -126.5 * (1 + 1e-6)), isa
        assert _ulps(e[low & ~zero], want_e[low & ~zero]).max() <= 2, isa
        assert np.all(np.isposinf(e[ex > 88])), isa
        assert np.isnan(e[np.isnan(ex)]).all(), isa
        normal = lx >= np.float32(1.1754944e-38)
        fin = normal & np.isfinite(lx)
        assert _ulps(lg[fin], want_l[fin]).max() <= 1, isa
        s = (lx > 0) & ~normal  # subnormals: the log of the true value, like normals
        assert _ulps(lg[s], want_l[s]).max() <= 2, isa
        assert np.all(np.isneginf(lg[lx == 0])), isa  # 0 and -0
        assert np.isnan(lg[(lx < 0) | np.isnan(lx)]).all(), isa
        assert np.isposinf(lg[np.isposinf(lx)]).all(), isa


# ----------------------------------------------------------------------------- fused loss


def ref_grad_loss(x, ab, cw, k, grad_scale=1.0, pixel_scale=None, mask=None):
    """Per-pixel loss and gradient (N, P) / (N, 313, P) from the reference, with the backend's factors."""
    loss, grad = R.rebalanced_cross_entropy(x, ab, cw, k=k, reduction="none",
                                            grad_output=np.ones(x.shape[:1] + x.shape[2:]))
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
    ab[0, :, :5] = torch.tensor([[1e5, -300.0, 200.0, 0.0, 130.0], [0.0, 40.0, -200.0, 1e4, 20.0]])  # rule 2
    cw = torch.rand(313, generator=g) + 0.2
    mask = torch.tensor([1.0, 0.0, 1.0])
    ps = torch.rand(n, p, generator=g) + 0.5
    x64 = x.double().numpy()
    want_loss, want_grad = ref_grad_loss(x64, ab.double().numpy(), cw.double().numpy(), k, 0.37, ps.double().numpy(),
                                         mask.numpy())
    dev = lambda t: t.to(device)  # noqa: E731
    call = LossCall(logits=dev(x), ab=dev(ab), class_weights=dev(cw), image_mask=dev(mask), pixel_scale=dev(ps),
                    k=k, sigma=5.0, grad_scale=0.37, need_grad=True)
    loss, grad = cb.ce_forward(call)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == x.shape
    np.testing.assert_allclose(loss.cpu().double().numpy(), want_loss, rtol=2e-5, atol=2e-5)
    tol = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    np.testing.assert_allclose(grad.cpu().double().numpy(), want_grad, atol=tol * np.abs(want_grad).max())
    idx, w = cb.soft_encode(dev(ab), k=k, sigma=5.0)
    from dataclasses import replace
    loss2, grad2 = cb.ce_forward(replace(call, ab=None, indices=idx, weights=w))
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad2.float(), grad.float(), rtol=0, atol=0)
    loss3, grad3 = cb.ce_forward(LossCall(logits=dev(x), ab=dev(ab), k=k, need_grad=False))
    assert grad3 is None
    want3, _ = ref_grad_loss(x64, ab.double().numpy(), None, k)
    np.testing.assert_allclose(loss3.cpu().double().numpy(), want3, rtol=2e-5, atol=2e-5)


def test_ce_forward_casts_and_empty_inputs():
    """The backend makes the tensors what the kernels take: int64 indices, float64 factors,
    non-contiguous logits; empty inputs give empty outputs."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 40, 313, generator=g).transpose(1, 2)  # (2, 313, 40), not contiguous
    ab = torch.rand(2, 2, 40, generator=g) * 200 - 100
    idx, w = cb.soft_encode(ab, k=5, sigma=5.0)
    want, _ = cb.ce_forward(LossCall(logits=x.contiguous(), indices=idx, weights=w, k=5))
    got, _ = cb.ce_forward(LossCall(logits=x, indices=idx.long(), weights=w.double(), k=5,
                                    class_weights=torch.ones(313, dtype=torch.float64)))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    loss, grad = cb.ce_forward(LossCall(logits=torch.zeros(0, 313, 4), ab=torch.zeros(0, 2, 4)))
    assert loss.shape == (0, 4) and grad.shape == (0, 313, 4)
    assert cb.annealed_mean(torch.zeros(2, 313, 0), T=0.38, is_probs=False).shape == (2, 2, 0)
    with pytest.raises(TypeError):
        cb.ce_forward(LossCall(logits=torch.zeros(1, 313, 4, dtype=torch.float64), ab=torch.zeros(1, 2, 4)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradient_rounding_and_subnormals(device, dtype):
    """The gradient is rounded once, from float32 to the logits' dtype (incl. float16 subnormals)."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 313, 65, generator=g) * 2).to(dtype)
    ab = torch.rand(2, 2, 65, generator=g) * 200 - 100
    for scale in (1.0, 3e-6):  # 3e-6: float16 gradients deep in the subnormal range
        _, grad = cb.ce_forward(LossCall(logits=x.to(device), ab=ab.to(device), k=5, grad_scale=scale))
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
    loss, grad = cb.ce_forward(LossCall(logits=x.to(device), ab=ab.to(device), k=5))
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
    loss, _ = cb.ce_forward(LossCall(logits=torch.randn(1, 313, 6).to(device), indices=idx.to(device),
                                     weights=w.to(device), k=2))
    loss = loss.cpu()
    assert torch.isnan(loss[0, 4:]).all() and torch.isfinite(loss[0, :4]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_isa_variant_agrees(isa_variants, dtype):
    """Baseline, AVX2 and AVX-512 builds of the CPU loops (those this CPU runs) against the reference."""
    g = torch.Generator().manual_seed(3)
    n, p = 2, 300  # 300: a partial last tile
    x = (torch.randn(n, 313, p, generator=g) * 4).to(dtype)
    ab = torch.rand(n, 2, p, generator=g) * 300 - 150  # some outside the table's box (rule 2)
    ab[1, :, :3] = float("nan")
    cw = torch.rand(313, generator=g) + 0.1
    want_loss, want_grad = ref_grad_loss(x.double().numpy(), ab.double().numpy(), cw.double().numpy(), 10, 0.5)
    probs = torch.softmax(x.float(), 1).to(dtype)
    want_am = R.annealed_mean(x.double().numpy(), T=0.38)
    want_amp = R.annealed_mean(probs=probs.double().numpy(), T=0.38)
    tol = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    fin = np.isfinite(want_loss)
    assert not fin[1, :3].any() and fin.sum() == n * p - 3
    results = {}
    for isa in isa_variants:
        assert C.cpu_set_isa(isa) and C.cpu_isa() == isa
        loss, grad = cb.ce_forward(LossCall(logits=x, ab=ab, class_weights=cw, k=10, grad_scale=0.5))
        loss, grad = loss.double().numpy(), grad.double().numpy()
        np.testing.assert_array_equal(np.isfinite(loss), fin, err_msg=isa)
        np.testing.assert_allclose(loss[fin], want_loss[fin], rtol=2e-5, atol=2e-5, err_msg=isa)
        gf = np.broadcast_to(fin[:, None], grad.shape)
        np.testing.assert_allclose(grad[gf], want_grad[gf], atol=tol * np.abs(want_grad[gf]).max(), err_msg=isa)
        am = cb.annealed_mean(x, T=0.38, is_probs=False)
        np.testing.assert_allclose(am.double().numpy(), want_am, atol=2e-3, rtol=1e-4, err_msg=isa)
        amp = cb.annealed_mean(probs, T=0.38, is_probs=True)
        np.testing.assert_allclose(amp.double().numpy(), want_amp, atol=2e-3, rtol=1e-4, err_msg=isa)
        results[isa] = cb.soft_encode(ab, k=16, sigma=5.0)
    base = results[isa_variants[0]]
    for isa, (idx, w) in results.items():  # the same float operations on every ISA: identical
        assert torch.equal(idx, base[0]), isa
        torch.testing.assert_close(w, base[1], rtol=0, atol=2e-7, equal_nan=True, msg=isa)


def test_openmp_threads_give_identical_results():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 313, 1000, generator=g)  # large enough for the parallel path
    ab = torch.rand(3, 2, 1000, generator=g) * 200 - 100
    before = torch.get_num_threads()
    out = {}
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            loss, grad = cb.ce_forward(LossCall(logits=x, ab=ab, k=5))
            out[nt] = (loss, grad, cb.annealed_mean(x, T=0.38, is_probs=False), *cb.soft_encode(ab, k=5, sigma=5.0))
    finally:
        torch.set_num_threads(before)
    for nt in (2, 3):
        for a, b in zip(out[1], out[nt], strict=True):
            assert torch.equal(a, b)


def _encode_in_child(queue):
    ab = torch.rand(3, 2, 1000) * 200 - 100
    x = torch.randn(3, 313, 1000)
    loss, _ = cb.ce_forward(LossCall(logits=x, ab=ab, k=5))
    queue.put(bool(torch.isfinite(loss).all()) and cb.soft_encode(ab, k=5, sigma=5.0)[0].shape == (3, 5, 1000))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_after_parallel_parent_does_not_hang():
    """GNU OpenMP hangs in a child forked after the parent used its thread pool (DataLoader
    workers); the CPU loops run serially in such a child."""
    import multiprocessing as mp

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cb.ce_forward(LossCall(logits=torch.randn(3, 313, 1000), ab=torch.zeros(3, 2, 1000), k=5))
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
    got = cb.annealed_mean(x.to(device), T=T, is_probs=False).cpu()
    want = R.annealed_mean(x.double().numpy(), T=T)
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-3, rtol=1e-4)
    probs = torch.softmax(x, 1)
    probs[0, :10, 3] = 0.0  # zero probabilities: log 0 = -inf, weight 0
    got = cb.annealed_mean(probs.to(device), T=T, is_probs=True).cpu()
    np.testing.assert_allclose(got.double().numpy(), R.annealed_mean(probs=probs.double().numpy(), T=T),
                               atol=2e-3, rtol=1e-4)


# ----------------------------------------------------------------------------- CUDA specifics


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_with_both_launch_bounds(dtype):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 313, 1111, generator=g) * 3).to(dtype)
    ab = torch.rand(3, 2, 1111, generator=g) * 260 - 130
    cw = torch.rand(313, generator=g) + 0.2
    idx5, w5 = cb.soft_encode(ab, k=5, sigma=5.0)  # one encoding for both devices
    want_loss, want_grad = cb.ce_forward(LossCall(logits=x, indices=idx5, weights=w5, class_weights=cw, k=5,
                                                  grad_scale=0.5))
    want_am = cb.annealed_mean(x, T=0.38, is_probs=False)
    ulp_rel = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    one_ulp = ulp_rel * want_grad.float().abs().max().item()
    try:
        for min_blocks in (4, 0):
            assert C.cuda_set_min_blocks(min_blocks)
            loss, grad = cb.ce_forward(LossCall(logits=x.cuda(), indices=idx5.cuda(), weights=w5.cuda(),
                                                class_weights=cw.cuda(), k=5, grad_scale=0.5))
            torch.testing.assert_close(loss.cpu(), want_loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad.cpu().float(), want_grad.float(), rtol=0, atol=one_ulp)
            torch.testing.assert_close(cb.annealed_mean(x.cuda(), T=0.38, is_probs=False).cpu(), want_am,
                                       rtol=1e-5, atol=1e-4)
    finally:
        C.cuda_set_min_blocks(4)
    assert not C.cuda_set_min_blocks(2)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device on this machine")
def test_cuda_soft_encode_matches_cpu_for_every_capacity():
    """The same search on both devices, no FMA on either: identical bins, ties and near-ties
    included; the weights differ by the exp only (__expf on the GPU)."""
    ab = torch.rand(3, 2, 1111, generator=torch.Generator().manual_seed(8)) * 300 - 150
    ab[0, :, :4] = torch.tensor([[float("nan"), 1e6, 3.0, -200.0], [0.0, 5.0, float("inf"), 1e4]])
    for k in (7, 10, 12):  # top-k capacity 8, 10 and 16
        want_idx, want_w = cb.soft_encode(ab, k=k, sigma=5.0)
        idx, w = cb.soft_encode(ab.cuda(), k=k, sigma=5.0)
        assert torch.equal(idx.cpu(), want_idx)
        torch.testing.assert_close(w.cpu(), want_w, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device on this machine")
def test_cuda_runs_on_the_current_stream():
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 313, 4096, generator=g) * 3).cuda()
    ab = (torch.rand(4, 2, 4096, generator=g) * 200 - 100).cuda()
    want = cb.ce_forward(LossCall(logits=x, ab=ab, k=5))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = cb.ce_forward(LossCall(logits=x, ab=ab, k=5))
        am = cb.annealed_mean(x, T=0.38, is_probs=False)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(am, cb.annealed_mean(x, T=0.38, is_probs=False), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the backward's scale (issue 21.7)


def test_cuda_backward_scale_kernel_is_built_and_refuses_cpu_tensors():
    """The cuda backend's backward scales the saved gradient by grad_output on the device (nothing
    moves when it is 1), like triton's; the CPU route (the tests' device route) multiplies."""
    lib = _ext.load_extension()
    if lib is None or not lib.has_cuda_kernels:
        pytest.skip("fastcolor._C without CUDA kernels here")
    assert "scale_kernel<f32|f16|bf16>" in lib.cuda_kernels
    with pytest.raises(ValueError, match="grad: scale_ is the CUDA kernel; expected a CUDA tensor"):
        lib.scale_(torch.ones(3), torch.ones(1))
    g = torch.full((2, 313, 3), 2.0)
    cb.scale_(g, torch.tensor([0.5]))
    assert torch.equal(g, torch.ones(2, 313, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_scale_kernel_on_gpu(dtype):
    g0 = (torch.randn(3, 313, 1001) * 4).to(dtype).cuda()
    for f in (1.0, 0.37, 0.0, -2.0):
        g = g0.clone()
        cb.scale_(g, torch.tensor([f], device="cuda"))
        torch.testing.assert_close(g, (g0.float() * f).to(dtype), rtol=0, atol=0)
