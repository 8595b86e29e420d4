"""Reliability of the public ops: bad arguments, non-finite and far-off inputs, empty batches,
property tests of encode/decode against the reference on every CPU backend, and (slow) the
CPU kernels on a logits tensor past 2**31 elements (64-bit offsets).

The loss's own property test lives in tests/test_backends.py; the shrunk examples that
hypothesis found are kept as explicit ``@example``s here and in tests/regressions/.
"""
import math
import os
import time

import numpy as np
import pytest
import torch
from conftest import require_backend
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fastcolor as fc
from fastcolor import backends
from fastcolor import reference as R

CPU_BACKENDS = ["torch", "numba", "cpp"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    require_backend(request.param, "cpu")
    return request.param


def test_every_cpu_backend_is_covered():
    assert set(backends.available("cpu")) <= set(CPU_BACKENDS)


def _inputs(n=2, h=3, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 313, h, w, generator=g) * 3, torch.rand(n, 2, h, w, generator=g) * 200 - 100


# ----------------------------------------------------------------------------- argument errors
# Each message names the argument, what was expected and what was received.
# (tests/test_ops_api.py covers the basic loss/decoder cases; these are the rest.)

_LABELS = fc.soft_encode(torch.zeros(2, 2, 3, 4), k=5, backend="torch")


def _labels(indices=None, weights=None):
    return fc.SoftLabels(_LABELS.indices if indices is None else indices,
                         _LABELS.weights if weights is None else weights)


BAD_CALLS = [
    ("soft_encode list", lambda x, a, b: fc.soft_encode([[1.0, 2.0]], backend=b), TypeError,
     r"ab: expected a torch.Tensor, got list"),
    ("soft_encode int", lambda x, a, b: fc.soft_encode(a.long(), backend=b), TypeError,
     r"ab: expected a floating tensor .*got torch.int64"),
    ("soft_encode 1-d", lambda x, a, b: fc.soft_encode(torch.zeros(2), backend=b), ValueError,
     r"ab: expected shape \(N, 2, ...\), got \(2,\)"),
    ("soft_encode 3 channels", lambda x, a, b: fc.soft_encode(torch.zeros(1, 3, 2, 2), backend=b), ValueError,
     r"ab: expected 2 channels on axis 1.*got \(1, 3, 2, 2\)"),
    ("soft_encode k=17", lambda x, a, b: fc.soft_encode(a, k=17, backend=b), ValueError,
     r"k: expected an integer in 1..16, got 17"),
    ("soft_encode k=2.0", lambda x, a, b: fc.soft_encode(a, k=2.0, backend=b), ValueError,
     r"k: expected an integer in 1..16, got 2.0"),
    ("soft_encode k=True", lambda x, a, b: fc.soft_encode(a, k=True, backend=b), ValueError,
     r"k: expected an integer in 1..16, got True"),
    ("soft_encode sigma=nan", lambda x, a, b: fc.soft_encode(a, sigma=math.nan, backend=b), ValueError,
     r"sigma: expected a positive finite number, got nan"),
    ("soft_encode sigma=0", lambda x, a, b: fc.soft_encode(a, sigma=0, backend=b), ValueError,
     r"sigma: expected a positive finite number, got 0"),
    ("loss logits 2 classes", lambda x, a, b: fc.rebalanced_cross_entropy(x[:, :2], a, backend=b), ValueError,
     r"logits: expected 313 channels on axis 1.*got \(2, 2, 3, 4\)"),
    ("loss logits 314 classes", lambda x, a, b: fc.rebalanced_cross_entropy(torch.cat([x, x[:, :1]], 1), a, backend=b),
     ValueError, r"logits: expected 313 channels.*got \(2, 314, 3, 4\)"),
    ("loss logits 1-d", lambda x, a, b: fc.rebalanced_cross_entropy(torch.zeros(313), a, backend=b), ValueError,
     r"logits: expected shape \(N, 313, ...\), got \(313,\)"),
    ("loss logits numpy", lambda x, a, b: fc.rebalanced_cross_entropy(x.numpy(), a, backend=b), TypeError,
     r"logits: expected a torch.Tensor, got ndarray"),
    ("loss logits bool", lambda x, a, b: fc.rebalanced_cross_entropy(x > 0, a, backend=b), TypeError,
     r"logits: expected a floating tensor .*got torch.bool"),
    ("loss target int", lambda x, a, b: fc.rebalanced_cross_entropy(x, a.int(), backend=b), TypeError,
     r"target: expected a floating tensor .*got torch.int32"),
    ("loss target batch", lambda x, a, b: fc.rebalanced_cross_entropy(x, a[:1], backend=b), ValueError,
     r"target: expected batch and spatial shape \(2, 3, 4\) .*got \(1, 2, 3, 4\)"),
    ("loss weights 2-d", lambda x, a, b: fc.rebalanced_cross_entropy(x, a, torch.ones(1, 313), backend=b), ValueError,
     r"weights: expected shape \(313,\), got \(1, 313\)"),
    ("loss weights str", lambda x, a, b: fc.rebalanced_cross_entropy(x, a, "heavy", backend=b), TypeError,
     r"weights: expected a \(313,\) tensor or array, got str"),
    ("loss sigma tensor", lambda x, a, b: fc.rebalanced_cross_entropy(x, a, sigma=torch.tensor(5.0), backend=b),
     ValueError, r"sigma: expected a positive finite number, got tensor"),
    ("loss labels index 313", lambda x, a, b: fc.rebalanced_cross_entropy(
        x, _labels(_LABELS.indices.clone().index_fill_(3, torch.tensor([1]), 313)), backend=b), ValueError,
     r"target.indices: expected bin indices in 0..312, got values in [0-9]+\.\.313"),
    ("loss labels index -1", lambda x, a, b: fc.rebalanced_cross_entropy(
        x, _labels(_LABELS.indices.clone().fill_(-1)), backend=b), ValueError,
     r"target.indices: expected bin indices in 0..312, got values in -1..-1"),
    ("loss labels k=17", lambda x, a, b: fc.rebalanced_cross_entropy(
        x, _labels(torch.zeros(2, 17, 3, 4, dtype=torch.int32), torch.full((2, 17, 3, 4), 1 / 17)), backend=b),
     ValueError, r"target.indices: expected 1..16 bins per pixel on axis 1, got 17"),
    ("loss labels k=0", lambda x, a, b: fc.rebalanced_cross_entropy(
        x, _labels(torch.zeros(2, 0, 3, 4, dtype=torch.int32), torch.zeros(2, 0, 3, 4)), backend=b),
     ValueError, r"target.indices: expected 1..16 bins per pixel on axis 1, got 0"),
    ("loss labels spatial", lambda x, a, b: fc.rebalanced_cross_entropy(
        x, _labels(_LABELS.indices[..., :2], _LABELS.weights[..., :2]), backend=b), ValueError,
     r"target.indices: expected batch and spatial shape \(2, 3, 4\) .*got \(2, 5, 3, 2\)"),
    ("loss labels device", lambda x, a, b: fc.rebalanced_cross_entropy(x, _LABELS.to("meta"), backend=b), ValueError,
     r"target.indices: expected a tensor on cpu like logits, got meta"),
    ("loss target_ab shape", lambda x, a, b: fc.rebalanced_cross_entropy(x, _LABELS, target_ab=a[..., :1], backend=b),
     ValueError, r"target_ab: expected batch and spatial shape \(2, 3, 4\) .*got \(2, 2, 3, 1\)"),
    ("SoftLabels float indices", lambda x, a, b: fc.SoftLabels(_LABELS.weights, _LABELS.weights), TypeError,
     r"SoftLabels.indices: expected bin indices 0..312 as int16, int32 or int64, got torch.float32$"),
    ("SoftLabels uint8 indices", lambda x, a, b: fc.SoftLabels(_LABELS.indices.to(torch.uint8), _LABELS.weights),
     TypeError, r"SoftLabels.indices: expected bin indices 0..312 as int16, int32 or int64, got torch.uint8 \(too "
                r"narrow for bin 312\)"),
    ("SoftLabels shapes", lambda x, a, b: fc.SoftLabels(_LABELS.indices, _LABELS.weights[:, :2]), ValueError,
     r"SoftLabels: expected indices and weights of one shape .*got \(2, 5, 3, 4\) and \(2, 2, 3, 4\)"),
    ("decode probs int", lambda x, a, b: fc.annealed_mean(probs=x.long(), backend=b), TypeError,
     r"probs: expected a floating tensor .*got torch.int64"),
    ("decode probs 312", lambda x, a, b: fc.annealed_mean(probs=x[:, :312].softmax(1), backend=b), ValueError,
     r"probs: expected 313 channels on axis 1.*got \(2, 312, 3, 4\)"),
    ("decode T nan", lambda x, a, b: fc.annealed_mean(x, T=math.nan, backend=b), ValueError,
     r"T: expected a positive finite number, got nan"),
    ("decode T str", lambda x, a, b: fc.annealed_mean(x, T="0.38", backend=b), ValueError,
     r"T: expected a positive finite number, got '0.38'"),
    ("decoder module T", lambda x, a, b: fc.AnnealedMeanDecoder(T=-1), ValueError,
     r"T: expected a positive finite number, got -1"),
    ("loss module weights", lambda x, a, b: fc.RebalancedCrossEntropyLoss(weights=np.ones(5)), ValueError,
     r"weights: expected shape \(313,\), got \(5,\)"),
    ("loss module reduction", lambda x, a, b: fc.RebalancedCrossEntropyLoss(reduction="max"), ValueError,
     r"reduction: expected one of .*got 'max'"),
    ("nearest_bin int", lambda x, a, b: fc.nearest_bin(a.long()), TypeError,
     r"ab: expected a floating tensor .*got torch.int64"),
    ("prior update shape", lambda x, a, b: fc.PriorAccumulator().update(torch.zeros(4, 3)), ValueError,
     r"ab: expected 2 channels on axis 1.*got \(4, 3\)"),
    ("prior of nothing", lambda x, a, b: fc.PriorAccumulator().prior(), ValueError,
     r"expected at least one pixel before prior\(\), got none"),
    ("rarity shape", lambda x, a, b: fc.rarity_weights(np.ones(312) / 312), ValueError,
     r"prior: expected shape \(313,\), got \(312,\)"),
    ("rarity nan", lambda x, a, b: fc.rarity_weights(np.full(313, np.nan)), ValueError,
     r"prior: expected finite, non-negative values with a positive sum, got 313 NaN/Inf"),
    ("rarity negative", lambda x, a, b: fc.rarity_weights(np.r_[-1.0, np.full(312, 2 / 312)]), ValueError,
     r"prior: expected finite, non-negative values with a positive sum, got 1 negative"),
    ("rarity zeros", lambda x, a, b: fc.rarity_weights(np.zeros(313)), ValueError,
     r"prior: expected finite, non-negative values with a positive sum, got a sum of 0"),
    ("rarity lam", lambda x, a, b: fc.rarity_weights(np.ones(313) / 313, lam=1.5), ValueError,
     r"lam: expected a number in \[0, 1\], got 1.5"),
    ("rarity lam 0 empty bin", lambda x, a, b: fc.rarity_weights(np.r_[0.0, np.full(312, 1 / 312)], lam=0), ValueError,
     r"lam: 0 needs every prior entry > 0 .*got 1 empty bin"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_name_argument_expected_and_received(backend, call, exc, match):
    logits, ab = _inputs()
    with pytest.raises(exc, match=match):
        call(logits, ab, backend)


@pytest.mark.parametrize("backend_name", ["numba", "cpp"])
def test_float64_logits_on_a_float32_backend_say_which_backend(backend_name):
    require_backend(backend_name, "cpu")
    logits, ab = _inputs()
    with pytest.raises(TypeError, match=rf"logits: backend '{backend_name}' takes float32.*got float64"):
        fc.rebalanced_cross_entropy(logits.double(), ab, backend=backend_name)


def test_device_errors_name_the_backend_and_device():
    logits, ab = _inputs()
    with pytest.raises(fc.BackendUnavailable, match=r"'cuda'.*cuda tensors, not cpu"):
        fc.annealed_mean(logits, backend="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":  # triton runs on CPU tensors only in its interpreter
        with pytest.raises(fc.BackendUnavailable, match=r"'triton'.*set TRITON_INTERPRET=1"):
            fc.annealed_mean(logits, backend="triton")


# ----------------------------------------------------------------------------- far-off ab

FAR_AB = [(1e6, 0.0), (-1e6, 1e6), (0.0, -1e6), (200.0, -300.0), (-111.0, 111.0), (110.5, 0.0), (1e5, 3.0),
          (-500.0, -500.0)]


@pytest.mark.parametrize("backend", ["numba", "cpp"])
def test_far_off_ab_encodes_onto_the_nearest_bins(backend):
    """The fast backends' one search rule (fastcolor/gamut.py): float64 for pixels outside the
    table. The torch baseline is plain float32 topk, which ties every bin of a row at 1e6."""
    require_backend(backend, "cpu")
    ab = torch.tensor(FAR_AB, dtype=torch.float32).T.reshape(1, 2, 1, len(FAR_AB))
    enc = fc.soft_encode(ab, k=5, backend=backend)
    want_idx, want_w = R.soft_encode(ab.double().numpy(), k=5)
    got_idx = enc.indices.long().numpy()
    assert np.array_equal(got_idx[:, 0], want_idx[:, 0])  # the nearest bin, exactly
    np.testing.assert_allclose(enc.weights.numpy(), want_w, atol=1e-5)
    assert torch.isfinite(enc.weights).all()
    torch.testing.assert_close(enc.weights.sum(1), torch.ones(1, 1, len(FAR_AB)))
    assert np.array_equal(fc.nearest_bin(ab).numpy(), want_idx[:, 0])
    logits, _ = _inputs(1, 1, len(FAR_AB), seed=3)
    loss = fc.rebalanced_cross_entropy(logits, ab, reduction="none", backend=backend)
    assert torch.isfinite(loss).all()
    want, _ = R.rebalanced_cross_entropy(logits.double().numpy(), ab.double().numpy(), reduction="none")
    np.testing.assert_allclose(loss.double().numpy(), want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- NaN / Inf

NAN, INF = math.nan, math.inf


def _nonfinite_case():
    """8 pixels: 0 NaN logit, 1 +inf logit, 2 -inf at the nearest target bin, 3 a finite pixel,
    4 all -inf, 5 all +inf, 6 NaN a, 7 +inf b."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 313, 1, 8, generator=g) * 3
    ab = torch.rand(1, 2, 1, 8, generator=g) * 100 - 50
    nearest = fc.nearest_bin(ab)[0, 0]
    x[0, 5, 0, 0] = NAN
    x[0, 7, 0, 1] = INF
    x[0, nearest[2], 0, 2] = -INF
    x[0, :, 0, 4] = -INF
    x[0, :, 0, 5] = INF
    ab[0, 0, 0, 6] = NAN
    ab[0, 1, 0, 7] = INF
    return x, ab


@pytest.mark.timeout(60)
def test_nan_and_inf_give_nan_loss_like_pytorch_never_a_crash(backend):
    x, ab = _nonfinite_case()
    x = x.requires_grad_(True)
    loss = fc.rebalanced_cross_entropy(x, ab, reduction="none", backend=backend)[0, 0]
    isnan = torch.isnan(loss).tolist()
    assert isnan == [True, True, False, False, True, True, True, True]
    assert loss[2] == INF and torch.isfinite(loss[3])
    total = fc.rebalanced_cross_entropy(x, ab, reduction="sum", backend=backend)
    assert torch.isnan(total)  # NaN propagates through the reduction, as in PyTorch
    total.backward()
    g = x.grad[0, :, 0]
    bad_cols = torch.isnan(g).any(0).tolist()
    assert bad_cols == [True, True, False, False, True, True, True, True]
    assert torch.isfinite(g[:, 2:4]).all()
    # the very same pattern as PyTorch's own soft-target cross-entropy on the same target
    labels = fc.soft_encode(ab, backend=backend)
    ref = torch.nn.functional.cross_entropy(x.detach(), labels.dense(), reduction="none")[0, 0]
    assert torch.isnan(ref).tolist()[:6] == isnan[:6]


@pytest.mark.timeout(60)
def test_nan_and_inf_in_the_encoder_and_decoder(backend):
    x, ab = _nonfinite_case()
    enc = fc.soft_encode(ab, backend=backend)
    w = enc.weights[0, :, 0]
    assert torch.isnan(w[:, 6]).all() and torch.isnan(w[:, 7]).all()  # NaN in, NaN out
    assert torch.isfinite(w[:, :6]).all()
    assert ((enc.indices >= 0) & (enc.indices < 313)).all()  # indices stay valid even then
    dec = fc.annealed_mean(x, backend=backend)[0, :, 0]
    assert torch.isnan(dec).any(0).tolist() == [True, True, False, False, True, True, False, False]
    p = torch.softmax(torch.randn(1, 313, 1, 5), 1)
    p[0, :, 0, 0] = 0.0        # all zero: log 0 everywhere
    p[0, 3, 0, 1] = NAN
    p[0, 3, 0, 2] = -0.1       # not a distribution
    p[0, 3, 0, 3] = INF
    dec = fc.annealed_mean(probs=p, backend=backend)[0, :, 0]
    assert torch.isnan(dec).any(0).tolist() == [True, True, True, True, False]
    weights = torch.ones(313)
    weights[fc.nearest_bin(ab)[0, 0, 3]] = NAN  # a NaN rarity weight is refused (issue 13)
    with pytest.raises(ValueError, match="weights: expected finite, non-negative weights, got 1 NaN/Inf"):
        fc.rebalanced_cross_entropy(x, ab, weights, reduction="none", backend=backend)


def test_a_single_minus_inf_logit_outside_the_target_never_crashes(backend):
    """Known divergence (docs/RELIABILITY.md): the reference, the torch backend and PyTorch's
    soft-target cross-entropy give NaN (0 * -inf); numba and cpp give the finite limit."""
    x, ab = _inputs(1, 1, 1, seed=5)
    far = int((fc.nearest_bin(ab)[0, 0, 0] + 150) % 313)
    x[0, far] = -INF
    x.requires_grad_(True)
    loss = fc.rebalanced_cross_entropy(x, ab, reduction="sum", backend=backend)
    loss.backward()
    assert torch.isnan(loss) or torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and x.grad[0, far].abs() < 1e-30  # numba: a subnormal, not 0


# ----------------------------------------------------------------------------- empty inputs


def test_empty_batches_with_precomputed_targets_and_probs(backend):
    x = torch.zeros(0, 313, 4, 4, requires_grad=True)
    labels = fc.soft_encode(torch.zeros(0, 2, 4, 4), backend=backend)
    assert labels.indices.shape == (0, 5, 4, 4) and labels.dense().shape == (0, 313, 4, 4)
    loss = fc.rebalanced_cross_entropy(x, labels, torch.ones(313), reduction="none", backend=backend)
    assert loss.shape == (0, 4, 4)
    fc.rebalanced_cross_entropy(x, labels, reduction="sum", nongray=True, target_ab=torch.zeros(0, 2, 4, 4),
                                backend=backend).backward()
    assert x.grad.shape == x.shape
    assert fc.annealed_mean(probs=torch.zeros(0, 313, 3), backend=backend).shape == (0, 2, 3)
    assert fc.nearest_bin(torch.zeros(0, 2, 5)).shape == (0, 5)
    assert fc.PriorAccumulator().update(torch.zeros(0, 2, 3, 3)).pixels == 0


# ----------------------------------------------------------------------------- property tests


def _tie_free(ab64: np.ndarray, k: int) -> np.ndarray:
    """Pixels whose k nearest bins are not within float32 rounding of a tie."""
    d2 = ((np.moveaxis(ab64, 1, -1)[..., None, :] - fc.AB_BINS) ** 2).sum(-1)
    srt = np.sort(d2, axis=-1)[..., : k + 1]
    return np.diff(srt, axis=-1).min(-1) > 1e-3 * np.maximum(1.0, srt[..., -1]) * 1e-2


_AB_VALUE = st.one_of(st.floats(-130, 130, width=32), st.floats(-1e6, 1e6, width=32),
                      st.sampled_from([0.0, 5.0, -5.0, 110.0, -110.0, 1e6]))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 2), h=st.integers(1, 5), w=st.integers(1, 7), k=st.integers(1, 16),
       sigma=st.floats(0.5, 50), data=st.data())
@example(n=1, h=1, w=1, k=16, sigma=0.5, data=None)
def test_property_soft_encode_matches_reference(backend, n, h, w, k, sigma, data):
    if data is None:
        ab = torch.tensor([[[[1e6]], [[-1e6]]]])
    else:
        vals = data.draw(st.lists(_AB_VALUE, min_size=n * 2 * h * w, max_size=n * 2 * h * w))
        ab = torch.tensor(vals, dtype=torch.float32).reshape(n, 2, h, w)
    enc = fc.soft_encode(ab, k=k, sigma=sigma, backend=backend)
    want_idx, want_w = R.soft_encode(ab.double().numpy(), k=k, sigma=sigma)
    assert enc.indices.shape == (n, k, h, w) and enc.indices.dtype == torch.int32
    assert ((enc.indices >= 0) & (enc.indices < 313)).all()
    torch.testing.assert_close(enc.weights.sum(1), torch.ones(n, h, w), atol=1e-5, rtol=0)
    clear = _tie_free(ab.double().numpy(), k)
    gi = np.moveaxis(enc.indices.long().numpy(), 1, -1)
    assert np.array_equal(gi[clear], np.moveaxis(want_idx, 1, -1)[clear])
    gw = np.moveaxis(enc.weights.double().numpy(), 1, -1)
    tol = np.full(clear.shape, 2e-5)
    if backend == "torch":
        # the baseline's float32 squared distances (documented): d^2 rounds by up to eps * d^2,
        # so the weights' exponents (d_j^2 - d_0^2) / 2 sigma^2 move by ~2 eps d_k^2 / 2 sigma^2
        # (found by hypothesis: a = -4186 at sigma 10 put the weights 2.1e-5 off)
        d2 = ((np.moveaxis(ab.double().numpy(), 1, -1)[..., None, :] - fc.AB_BINS) ** 2).sum(-1)
        dk = np.sort(d2, axis=-1)[..., k - 1]
        tol = tol + 4 * float(np.finfo(np.float32).eps) * dk / (2 * sigma * sigma)
    err = np.abs(gw - np.moveaxis(want_w, 1, -1)).max(-1)
    assert (err[clear] <= tol[clear]).all(), (err[clear].max(), tol[clear].min())


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 2), h=st.integers(1, 4), w=st.integers(1, 6), scale=st.floats(0.01, 40),
       T=st.one_of(st.floats(0.01, 5), st.sampled_from([1e-7, 0.38, 1.0])), seed=st.integers(0, 2**31 - 1),
       probs=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
@example(n=1, h=1, w=1, scale=40.0, T=0.01, seed=0, probs=False, dtype=torch.float32)
@example(n=1, h=1, w=1, scale=40.0, T=0.01, seed=0, probs=True, dtype=torch.float16)
def test_property_annealed_mean_matches_reference(backend, n, h, w, scale, T, seed, probs, dtype):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, 313, h, w, generator=g, dtype=torch.float64) * scale)
    x = (torch.softmax(logits, 1) if probs else logits).to(dtype)
    got = fc.annealed_mean(probs=x, T=T, backend=backend) if probs else fc.annealed_mean(x, T=T, backend=backend)
    x64 = x.double().numpy()
    want = R.annealed_mean(probs=x64, T=T) if probs else R.annealed_mean(x64, T=T)
    assert got.shape == (n, 2, h, w) and got.dtype == torch.float32
    assert torch.isfinite(got).all() or probs  # probs underflowing to 0 in float16 give log(0) = -inf, still finite
    # The annealed mean moves by at most |c| * |d softmax| for a rounding of the input; the
    # bin centres span 220 units, and float32 arithmetic on x / T loses ~1e-7 * |x| / T.
    tol = 2e-3 + 220 * 4e-7 * float(np.nanmax(np.abs(x64[np.isfinite(x64)]), initial=1.0)) / T
    np.testing.assert_allclose(got.double().numpy(), want, atol=tol, rtol=1e-4)


# ----------------------------------------------------------------------------- 2**31 elements


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("backend_name", ["numba", "cpp"])
def test_cpu_kernels_index_past_2_31_elements(backend_name):
    """(1, 313, P) logits with 313 P > 2**31: the far-end pixels (whose last classes sit past
    element 2**31) must match the reference, for the loss (float32, no gradient), the annealed
    mean, and the loss with its gradient (float16 logits, so logits + gradient fit in ~8.6 GB)."""
    require_backend(backend_name, "cpu")
    P = 2**31 // 313 + 1
    assert 313 * P > 2**31 and 312 * P < 2**31
    need = 313 * P * 4 + (1 << 30)
    if _mem_available() < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free memory, {_mem_available() / 2**30:.1f} GiB available")
    tail, g = 16, torch.Generator().manual_seed(0)
    weights = torch.rand(313, generator=g) * 3 + 0.2
    timings = {}

    def fill(x):
        for sl in (slice(0, tail), slice(P - tail, P)):
            x[:, :, sl] = (torch.randn(1, 313, tail, generator=g) * 3).to(x.dtype)
            x[:, 312, sl] += 6.0  # the class past 2**31 matters: a wrong read changes every result
        return x

    ab = torch.zeros(1, 2, P)
    ab[..., P - tail:] = torch.rand(1, 2, tail, generator=g) * 200 - 100
    ab[..., :tail] = torch.rand(1, 2, tail, generator=g) * 200 - 100
    mid = torch.tensor([tail, P // 2, P - tail - 1])  # zero logits, ab = 0: uniform softmax

    t0 = time.perf_counter()
    x = fill(torch.zeros(1, 313, P))
    with torch.no_grad():
        loss = fc.rebalanced_cross_entropy(x, ab, weights, reduction="none", backend=backend_name)
        timings["loss fp32 (no grad)"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        dec = fc.annealed_mean(x, T=0.38, backend=backend_name)
        timings["annealed mean fp32"] = time.perf_counter() - t1
    for sl in (slice(0, tail), slice(P - tail, P)):
        want, _ = R.rebalanced_cross_entropy(x[..., sl].double().numpy(), ab[..., sl].double().numpy(),
                                             weights.double().numpy(), reduction="none")
        np.testing.assert_allclose(loss[..., sl].double().numpy(), want, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(dec[..., sl].double().numpy(), R.annealed_mean(x[..., sl].double().numpy()),
                                   atol=2e-3)
    w0 = float(weights[fc.nearest_bin(torch.zeros(1, 2, 1))[0, 0]])
    torch.testing.assert_close(loss[0, mid], torch.full((3,), math.log(313) * w0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dec[0, :, mid], torch.from_numpy(fc.AB_BINS.mean(0)).float()[:, None].expand(2, 3),
                               atol=1e-3, rtol=0)
    del x, loss, dec

    t2 = time.perf_counter()
    x16 = fill(torch.zeros(1, 313, P, dtype=torch.float16)).requires_grad_(True)
    loss = fc.rebalanced_cross_entropy(x16, ab, weights, reduction="sum", backend=backend_name)
    loss.backward()
    timings["loss+grad fp16"] = time.perf_counter() - t2
    grad = x16.grad
    for sl in (slice(0, tail), slice(P - tail, P)):
        xs = x16.detach()[..., sl].double().numpy()
        want, want_g = R.rebalanced_cross_entropy(xs, ab[..., sl].double().numpy(), weights.double().numpy(),
                                                  reduction="sum")
        np.testing.assert_allclose(grad[..., sl].double().numpy(), want_g, atol=2e-3 * np.abs(want_g).max())
    assert torch.isfinite(loss)
    print(f"\n{backend_name}: P={P}, 313*P={313 * P} elements; " +
          ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


# ----------------------------------------------------------------------------- issue 13 (second pass)


@pytest.mark.parametrize("backend_name", ["numba", "cpp"])
def test_double_backward_through_a_fused_backend_is_refused_never_silently_wrong(backend_name):
    require_backend(backend_name, "cpu")
    logits, ab = _inputs(1, 2, 2)
    x = logits.requires_grad_()
    loss = fc.rebalanced_cross_entropy(x, ab, backend=backend_name)
    with pytest.raises(RuntimeError, match=rf"backend '{backend_name}' has no double backward.*backend='torch'"):
        torch.autograd.grad(loss, x, create_graph=True)
    # a plain backward still works after the refusal
    (g,) = torch.autograd.grad(fc.rebalanced_cross_entropy(x, ab, backend=backend_name), x)
    assert torch.isfinite(g).all()


def test_double_backward_on_torch_gives_the_gradient_penalty():
    logits, ab = _inputs(1, 2, 2)
    x = logits.double().requires_grad_()
    (g,) = torch.autograd.grad(fc.rebalanced_cross_entropy(x, ab, backend="torch"), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    assert gg.abs().sum() > 0


def test_targets_and_class_weights_are_constants_on_every_backend(backend):
    logits, ab = _inputs(1, 2, 3)
    x = logits.requires_grad_()
    ab = ab.requires_grad_()
    w = torch.rand(313).add_(0.5).requires_grad_()
    loss = fc.rebalanced_cross_entropy(x, ab, w, nongray=True, backend=backend)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert ab.grad is None and w.grad is None
    labels = fc.soft_encode(ab, backend=backend)
    assert not labels.weights.requires_grad


def test_nongray_ignores_a_nan_target_pixel(backend):
    logits, ab = _inputs(1, 1, 4, seed=5)
    ab[0, :, 0, 0] = NAN
    loss = fc.rebalanced_cross_entropy(logits, ab, nongray=True, reduction="none", backend=backend)[0, 0]
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all() and (loss[1:] > 0).all()
    want, _ = R.rebalanced_cross_entropy(logits.double().numpy(), ab.double().numpy(), nongray=True, reduction="none")
    np.testing.assert_allclose(loss[1:].double().numpy(), want[0, 0, 1:], rtol=1e-5)
    assert R.image_mask_nongray(ab.double().numpy())[0] == 1.0


def test_prior_accumulator_skips_and_counts_non_finite_pixels():
    ab = torch.zeros(1, 2, 2, 3)
    ab[0, 0, 0, 0], ab[0, 1, 1, 2] = NAN, INF
    acc = fc.PriorAccumulator().update(ab)
    assert acc.pixels == 4 and acc.skipped == 2
    np.testing.assert_array_equal(acc.prior(smooth_sigma=None), R.class_prior(ab.double().numpy()))
    empty = fc.PriorAccumulator().update(torch.full((1, 2, 1, 2), NAN))
    with pytest.raises(ValueError, match="2 NaN/Inf pixels were skipped"):
        empty.prior()


@pytest.mark.parametrize("backend_name", ["numba", "cpp", "torch"])
def test_annealed_mean_float64_in_float64_out(backend_name):
    require_backend(backend_name, "cpu")
    logits, _ = _inputs(1, 2, 2)
    out = fc.annealed_mean(logits.double(), backend=backend_name)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), R.annealed_mean(logits.double().numpy()), atol=1e-4)


def test_annealed_mean_mode_keeps_nan_validates_backend_and_refuses_bad_t():
    logits, _ = _inputs(1, 1, 3)
    logits[0, 7, 0, 1] = NAN
    out = fc.annealed_mean(logits, T=1e-9)
    assert torch.isnan(out[0, :, 0, 1]).all() and torch.isfinite(out[0, :, 0, [0, 2]]).all()
    assert not out.requires_grad
    with pytest.raises(fc.BackendUnavailable, match="unknown backend 'nonsense'"):
        fc.annealed_mean(logits, T=1e-9, backend="nonsense")
    for bad in (INF, NAN, 0.0, -1.0):
        with pytest.raises(ValueError, match="T: expected a positive finite number"):
            fc.annealed_mean(logits, T=bad)


def test_out_of_range_softlabels_index_fails_under_torch_compile_too():
    logits, _ = _inputs(1, 1, 2)
    labels = fc.SoftLabels(torch.full((1, 1, 1, 2), 400, dtype=torch.int32), torch.ones(1, 1, 1, 2))
    with pytest.raises(ValueError, match="expected bin indices in 0..312"):
        fc.rebalanced_cross_entropy(logits, labels, backend="torch")
    compiled = torch.compile(lambda x, t: fc.rebalanced_cross_entropy(x, t, backend="torch"), backend="aot_eager",
                             fullgraph=True)
    with pytest.raises(RuntimeError, match="expected bin indices in 0..312"):
        compiled(logits, labels)


def test_numpy_scalars_are_accepted_for_k_sigma_and_t(backend):
    logits, ab = _inputs(1, 1, 2)
    a = fc.rebalanced_cross_entropy(logits, ab, k=np.int64(5), sigma=np.float32(5.0), backend=backend)
    b = fc.rebalanced_cross_entropy(logits, ab, k=5, sigma=5.0, backend=backend)
    torch.testing.assert_close(a, b)
    assert fc.soft_encode(ab, k=np.int32(3), backend=backend).k == 3
    torch.testing.assert_close(fc.annealed_mean(logits, T=np.float64(0.38), backend=backend),
                               fc.annealed_mean(logits, T=0.38, backend=backend))


@pytest.mark.parametrize("bad, match", [
    (-1.0, "weights: expected finite, non-negative weights, got 1 negative of 313"),
    (NAN, "weights: expected finite, non-negative weights, got 1 NaN/Inf of 313"),
    (INF, "weights: expected finite, non-negative weights, got 1 NaN/Inf of 313"),
])
def test_bad_class_weights_are_refused(backend, bad, match):
    logits, ab = _inputs(1, 1, 2)
    w = torch.ones(313)
    w[3] = bad
    with pytest.raises(ValueError, match=match):
        fc.rebalanced_cross_entropy(logits, ab, w, backend=backend)
    with pytest.raises(TypeError, match="weights: expected real numbers, got torch.complex64"):
        fc.rebalanced_cross_entropy(logits, ab, torch.ones(313, dtype=torch.complex64), backend=backend)


def test_bad_softlabels_weights_are_refused():
    idx = torch.zeros(1, 2, 3, dtype=torch.int32)
    for bad, what in ((-0.5, "1 negative"), (NAN, "1 NaN/Inf"), (INF, "1 NaN/Inf")):
        w = torch.full((1, 2, 3), 0.5)
        w[0, 1, 2] = bad
        with pytest.raises(ValueError, match=f"SoftLabels.weights: expected finite, non-negative weights, got {what}"):
            fc.SoftLabels(idx, w)
    with pytest.raises(TypeError, match="SoftLabels.weights: expected a floating tensor"):
        fc.SoftLabels(idx, torch.ones(1, 2, 3, dtype=torch.complex64))
    # the encoder's own NaN weights for NaN ab are its documented answer, not refused
    labels = fc.soft_encode(torch.full((1, 2, 1), NAN), k=2, backend="torch")
    assert torch.isnan(labels.weights).all() and labels.to("cpu").k == 2


def test_meta_tensors_get_a_clear_message(backend):
    logits, ab = _inputs(1, 1, 2)
    with pytest.raises(ValueError, match="logits: expected a tensor with data .*not a meta tensor"):
        fc.rebalanced_cross_entropy(logits.to("meta"), ab.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="ab: expected a tensor with data"):
        fc.soft_encode(ab.to("meta"), backend=backend)


@pytest.mark.parametrize("sigma", [1e-20, 1e-30, 1e-12])
def test_very_small_sigma_gives_the_one_hot_limit(backend, sigma):
    ab = torch.tensor([[[3.0, 5.0, -41.0], [-7.0, 0.0, 66.0]]])  # (5, 0) ties (0, 0) and (10, 0)
    enc = fc.soft_encode(ab, k=3, sigma=sigma, backend=backend)
    want_idx, want_w = R.soft_encode(ab.double().numpy(), k=3, sigma=sigma)
    dense = R.densify(enc.indices.numpy(), enc.weights.numpy())  # (the torch baseline orders ties its own way)
    np.testing.assert_allclose(dense, R.densify(want_idx, want_w), atol=1e-6)
    assert np.isin(dense[0, :, :], [0.0, 0.5, 1.0]).all() and dense[0, :, 1].max() == 0.5
    logits, _ = _inputs(1, 1, 3)
    loss = fc.rebalanced_cross_entropy(logits.reshape(1, 313, 3), ab, k=3, sigma=sigma, reduction="none",
                                       backend=backend)
    want, _ = R.rebalanced_cross_entropy(logits.reshape(1, 313, 3).double().numpy(), ab.double().numpy(), k=3,
                                         sigma=sigma, reduction="none")
    np.testing.assert_allclose(loss.double().numpy(), want, rtol=1e-5)


# ----------------------------------------------------------------------------- large logits
# Issue 13 item 10. The fused backends computed the loss as x_j - (max + log sum): in float32
# max + log 313 rounds to max + 6 at 1e7, max + 8 at 1e8 and max at 1e30, so constant logits gave
# 6.0, 8.0 and 0.0 instead of log 313. The loss is computed from the shifted logits now,
# -z_j ((x_j - max) - log sum). The torch baseline (log_softmax) gives log 313 at every magnitude
# (checked: it passes unchanged). Only magnitudes that the dtype can hold are generated (float16
# stops at 65504; bfloat16 rounds 3.4e38 up to inf, a +inf logit, the NaN row of the table).

_MAGNITUDES = [1.0, 6e4, -6e4, 1e7, 1e8, -1e8, 1e30, -1e30, 3.3e38, 3.4e38, -3.4e38]
_LARGE_CASES = [pytest.param(dt, mag, id=f"{str(dt)[6:]}-{mag:g}")
                for dt in (torch.float32, torch.float16, torch.bfloat16) for mag in _MAGNITUDES
                if math.isfinite(torch.tensor(mag, dtype=dt).item())]


@pytest.mark.parametrize("dtype, magnitude", _LARGE_CASES)
def test_constant_logits_give_log_313_at_any_magnitude(backend, dtype, magnitude):
    ab = torch.tensor([[[3.0, -41.0, 0.0, 66.0], [-7.0, 20.0, 0.0, 1.0]]])
    x = torch.full((1, 313, 4), magnitude, dtype=dtype, requires_grad=True)
    loss = fc.rebalanced_cross_entropy(x, ab, reduction="sum", backend=backend)
    per_pixel = fc.rebalanced_cross_entropy(x.detach(), ab, reduction="none", backend=backend)
    np.testing.assert_allclose(per_pixel.double().numpy(), np.full((1, 4), math.log(313)), rtol=1e-5)
    loss.backward()
    g = x.grad
    assert g.dtype == dtype and torch.isfinite(g).all()
    _, want = R.rebalanced_cross_entropy(np.zeros((1, 313, 4)), ab.double().numpy(), reduction="sum")
    # softmax - target, with softmax = 1/313: to one rounding of the logits' dtype
    torch.testing.assert_close(g.double(), torch.from_numpy(want), rtol=torch.finfo(dtype).eps, atol=1e-7)


def test_logits_near_float32_max_give_the_shifted_logits_answer(backend):
    """Finite logits near +-3.4e38: finite where x_j - max is finite, +inf where a target bin's
    logit lies more than float32's max below the max (the loss exceeds float32's range: the
    float64 reference's value cast to float32 is inf too), and a finite gradient everywhere."""
    x = torch.full((1, 313, 3), -3.4e38)
    x[0, 5] = 3.4e38  # the max of every pixel
    x[0, 10:12] = 3.3e38  # x - max = -1e37 (exact: Sterbenz), exp gives 0: the sum is 1
    x[0, :, 2] = 3.4e38  # pixel 2: constant at the max
    idx = torch.tensor([[[10, 10, 30], [11, 20, 31]]], dtype=torch.int32)
    w = torch.tensor([[[0.75, 0.4, 0.5], [0.25, 0.6, 0.5]]])
    target = fc.SoftLabels(idx, w)
    xg = x.clone().requires_grad_(True)
    loss = fc.rebalanced_cross_entropy(xg, target, reduction="none", backend=backend)
    want, want_g = R.rebalanced_cross_entropy(x.double().numpy(), target=(idx.numpy(), w.double().numpy()),
                                              reduction="none")
    assert want[0, 1] > np.finfo(np.float32).max  # 0.6 * 6.8e38: beyond float32
    got = loss.detach().double().numpy()
    assert np.isfinite(got[0, [0, 2]]).all() and got[0, 1] == np.inf
    np.testing.assert_allclose(got[0, [0, 2]], want[0, [0, 2]], rtol=1e-5)
    np.testing.assert_allclose(got[0, 2], math.log(313), rtol=1e-5)
    loss.sum().backward()
    assert torch.isfinite(xg.grad).all()
    np.testing.assert_allclose(xg.grad.double().numpy(), want_g, atol=1e-6)
