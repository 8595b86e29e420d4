"""The public API around the kernels: dispatch, argument errors, autograd routes, torch.compile,
prior helpers."""
import numpy as np
import pytest
import torch

import fastcolor as fc
from fastcolor import backends
from fastcolor import reference as R
from fastcolor.ops.decode import _annealed_mean_op
from fastcolor.ops.loss import _ce_op, _FusedCE


def inputs(n=2, h=3, w=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 313, h, w, generator=g, dtype=dtype) * 3,
            torch.rand(n, 2, h, w, generator=g, dtype=dtype) * 200 - 100)


# ----------------------------------------------------------------------------- dispatch


def test_auto_picks_first_available_cpu_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("auto", "cpu") == backends.available("cpu")[0]
    assert backends.available("cpu")[-1] == "torch"


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve("auto", "cpu") == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(fc.BackendUnavailable, match="unknown backend 'nonsense'"):
        fc.annealed_mean(torch.zeros(1, 313, 1, 1))


def test_unavailable_backend_names_what_is_missing():
    logits, ab = inputs()
    with pytest.raises(fc.BackendUnavailable, match="'cuda'.*cuda tensors, not cpu"):
        fc.rebalanced_cross_entropy(logits, ab, backend="cuda")
    with pytest.raises(fc.BackendUnavailable, match="unknown backend"):
        fc.soft_encode(ab, backend="fortran")
    with pytest.raises(TypeError, match="backend"):
        fc.annealed_mean(logits, backend=3)


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("call,match", [
    (lambda x, ab: fc.rebalanced_cross_entropy(x[:, :312], ab), r"logits: expected 313 channels.*got \(2, 312, 3, 4\)"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x.long(), ab), r"logits: expected a floating tensor.*torch.int64"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab[:, :1]), r"target: expected 2 channels"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab[:, :, :2]),
     r"target: expected batch and spatial shape \(2, 3, 4\)"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab, reduction="avg"), r"reduction: expected one of"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab, k=0), r"k: expected an integer in 1..16, got 0"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab, sigma=-1.0), r"sigma: expected a positive finite number"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab, weights=torch.ones(312)),
     r"weights: expected shape \(313,\), got \(312,\)"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab, weight=torch.ones(312)),
     r"weights: expected shape \(313,\), got \(312,\)"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab, torch.ones(313), weight=torch.ones(313)),
     r"weight, weights: expected at most one of them .*got both"),
    (lambda x, ab: fc.RebalancedCrossEntropyLoss(torch.ones(313), weight=torch.ones(313)),
     r"weight, weights: expected at most one of them"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab, mask=torch.zeros(2, 3, 5, dtype=torch.bool)),
     r"mask: expected shape \(N, \*spatial\) = \(2, 3, 4\) matching logits \(2, 313, 3, 4\), got \(2, 3, 5\)"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab, mask=torch.full((2, 3, 4), 2.0)),
     r"mask: expected bool or 0/1 values \(1 = leave the pixel out\), got 24 other values of 24"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab, mask=[[0]]),
     r"mask: expected a bool \(or 0/1\) torch.Tensor, got list"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, ab, mask=torch.zeros(2, 3, 4, dtype=torch.bool, device="meta")),
     r"mask: expected a tensor on cpu like logits, got meta"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, fc.soft_encode(ab), nongray=True), r"nongray: needs the target ab"),
    (lambda x, ab: fc.rebalanced_cross_entropy(x, "ab"), r"target: expected a torch.Tensor, got str"),
    (lambda x, ab: fc.annealed_mean(x, T=0.0), r"T: expected a positive finite number, got 0.0"),
    (lambda x, ab: fc.annealed_mean(x, probs=x), r"exactly one of logits= and probs="),
    (lambda x, ab: fc.annealed_mean(torch.zeros(313)), r"logits: expected shape \(N, 313, ...\), got \(313,\)"),
    (lambda x, ab: fc.soft_encode(ab.permute(0, 2, 1, 3)), r"ab: expected 2 channels"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    logits, ab = inputs()
    with pytest.raises((ValueError, TypeError), match=match):
        call(logits, ab)


def test_device_mismatch_is_reported():
    logits, ab = inputs()
    with pytest.raises(ValueError, match="target: expected a tensor (on|with data)"):
        fc.rebalanced_cross_entropy(logits, ab.to("meta"))


# ----------------------------------------------------------------------------- autograd routes, float64


def test_gradcheck_torch_backend_float64():
    logits, ab = inputs(1, 2, 2, dtype=torch.float64)
    w = torch.rand(313, dtype=torch.float64) + 0.5
    for red in ("mean", "sum", "none"):
        def loss(x, red=red):
            return fc.rebalanced_cross_entropy(x, ab, w, reduction=red, backend="torch")

        torch.autograd.gradcheck(loss, logits.clone().requires_grad_(True), fast_mode=True)
    torch.autograd.gradcheck(lambda x: fc.annealed_mean(x, T=0.38, backend="torch"),
                             logits.clone().requires_grad_(True), fast_mode=True)


def test_gradcheck_fused_routes_float64():
    # The kernels' own autograd plumbing (eager Function and compile-route custom op), driven by
    # the float64-capable torch implementation of the backend contract.
    logits, ab = inputs(1, 2, 3, dtype=torch.float64)
    ab32 = ab.float().reshape(1, 2, 6)
    w = torch.rand(313) + 0.5
    mask = torch.ones(1)
    x = logits.reshape(1, 313, 6).clone().requires_grad_(True)
    pixel_mask = torch.tensor([[False, True, False, False, True, False]])
    for red in ("mean", "sum", "none"):
        for px in (None, pixel_mask):
            def fused(t, red=red, px=px):
                return _FusedCE.apply(t, ab32, None, None, w, mask, px, 5, 5.0, red, "torch")

            torch.autograd.gradcheck(fused, x, fast_mode=True)
    torch.autograd.gradcheck(lambda t: _ce_op(t, ab32, None, None, w, mask, None, 5, 5.0, False, "torch")[0], x,
                             fast_mode=True)
    # The compile route's backward multiplies the upstream gradient by the forward's pixel_scale.
    scale = torch.rand(1, 6) + 0.25
    torch.autograd.gradcheck(lambda t: _ce_op(t, ab32, None, None, w, mask, scale, 5, 5.0, False, "torch")[0], x,
                             fast_mode=True)
    torch.autograd.gradcheck(lambda t: _annealed_mean_op(t, 0.38, False, "torch"), x, fast_mode=True)
    p = torch.softmax(x.detach() / 10, 1).requires_grad_(True)  # away from 0: the numerical step stays positive
    torch.autograd.gradcheck(lambda t: _annealed_mean_op(t, 0.5, True, "torch"), p, fast_mode=True)


def test_backward_twice_with_retained_graph_is_consistent():
    name = backends.resolve("auto", "cpu")
    logits, ab = inputs()
    x = logits.clone().requires_grad_(True)
    loss = fc.rebalanced_cross_entropy(x, ab, backend=name)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward(torch.tensor(1.0))
    torch.testing.assert_close(first, 2 * x.grad)


def test_no_gradient_work_without_requires_grad():
    name = backends.resolve("auto", "cpu")
    logits, ab = inputs()
    with torch.no_grad():
        a = fc.rebalanced_cross_entropy(logits, ab, backend=name)
    b = fc.rebalanced_cross_entropy(logits, ab, backend=name)
    assert not a.requires_grad and a.item() == pytest.approx(b.item(), rel=1e-6)


# ----------------------------------------------------------------------------- torch.compile


def test_compile_fullgraph_model_loss_decoder():
    name = backends.resolve("auto", "cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 313, 1))
    crit = fc.RebalancedCrossEntropyLoss(torch.rand(313) + 0.5, backend=name)
    dec = fc.AnnealedMeanDecoder(backend=name)

    def step(L, ab):
        logits = model(L)
        return crit(logits, ab), dec(logits)

    L = torch.rand(2, 1, 6, 5) * 100
    ab = torch.rand(2, 2, 6, 5) * 100 - 50
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c, ab_c = compiled(L, ab)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e, ab_e = step(L, ab)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(ab_c, ab_e)
    for gc, ge in zip(grads_c, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- prior helpers


def test_prior_accumulator_streams_batches_like_the_reference():
    g = torch.Generator().manual_seed(3)
    batches = [torch.rand(n, 2, 5, 7, generator=g) * 160 - 80 for n in (1, 4, 2)]
    acc = fc.PriorAccumulator()
    for b in batches:
        acc.update(b)
    allpix = np.concatenate([b.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 2) for b in batches])
    assert acc.pixels == allpix.shape[0]
    np.testing.assert_allclose(acc.prior(smooth_sigma=None), R.class_prior(allpix), atol=1e-12)
    np.testing.assert_allclose(acc.prior(smooth_sigma=5.0), R.class_prior(allpix, smooth_sigma=5.0), atol=1e-12)
    w = fc.rarity_weights(torch.from_numpy(acc.prior()))
    np.testing.assert_allclose(w, R.rarity_weights(acc.prior()))
    with pytest.raises(ValueError, match="at least one pixel"):
        fc.PriorAccumulator().prior()


def test_nearest_bin_matches_reference():
    _, ab = inputs(2, 9, 13, seed=8)
    np.testing.assert_array_equal(fc.nearest_bin(ab).numpy(), R.nearest_bin(ab.double().numpy()))


# ----------------------------------------------------------------------------- one name per setting


@pytest.mark.parametrize("argv", [["colorize", "in.png", "-o", "out"], ["eval", "runs/zhang", "photos"],
                                  ["export", "runs/zhang", "-o", "m.onnx"]], ids=lambda a: a[0])
def test_the_temperature_is_T_in_python_and_temperature_or_T_on_the_command_line(argv):
    """README, 'Coming from nn.CrossEntropyLoss': the CLI's --temperature has the short form -T,
    Python's spelling, and every Python entry point that decodes takes T=."""
    import inspect

    from fastcolor.app.cli import build_parser
    from fastcolor.colorize import colorize_image
    from fastcolor.export import export_onnx

    parser = build_parser()
    assert parser.parse_args(argv + ["-T", "0.2"]).temperature == 0.2
    assert parser.parse_args(argv + ["--temperature", "0.2"]).temperature == 0.2
    for fn in (fc.annealed_mean, fc.AnnealedMeanDecoder, colorize_image, export_onnx):
        assert "T" in inspect.signature(fn).parameters, fn
