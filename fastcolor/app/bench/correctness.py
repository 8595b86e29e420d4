"""Correctness of one backend against :mod:`fastcolor.reference` on fresh random inputs: odd
shapes, float32/float16/bfloat16 logits, k in {1, 5, 10}, class weights, every reduction,
nongray, grad_output != 1, precomputed targets, channels-last logits, and the backend contract
called directly (:class:`~fastcolor.backends.contract.LossCall` with a pixel scale). Errors are
relative, ``||out - ref|| / ||ref||``, with NaN checks; on CUDA the caching allocator's free
memory is poisoned with NaN before each call, so that an element a kernel forgets to write
shows up."""
from __future__ import annotations

import traceback

import numpy as np
import torch

import fastcolor as fc
from fastcolor import backends
from fastcolor import reference as R
from fastcolor.app.bench.common import Budget, log, poison, rand_logits, rel_err, sync, wide_ab
from fastcolor.backends.contract import LossCall
from fastcolor.gamut import Q


def loss_cases(quick: bool):
    """(name, shape (N, H, W), dtype, k, weights, reduction, nongray, grad_output, target, layout)."""
    cases = [
        ("1x1-f32-k1-mean", (1, 1, 1), torch.float32, 1, False, "mean", False, 1.0, "ab", "contig"),
        ("7x9-f16-k5-sum-ng", (3, 7, 9), torch.float16, 5, True, "sum", True, 1.7, "ab", "contig"),
        ("33x65-bf16-k10-none", (2, 33, 65), torch.bfloat16, 10, True, "none", False, "rand", "ab", "contig"),
        ("7x9-f32-k10-labels-mean", (3, 7, 9), torch.float32, 10, True, "mean", True, 0.3, "labels", "contig"),
        ("17x31-f32-k5-mean-cl", (2, 17, 31), torch.float32, 5, True, "mean", True, 1.0, "ab", "channels_last"),
        ("17x31-bf16-k5-sum", (1, 17, 31), torch.bfloat16, 5, False, "sum", False, 2.0, "ab", "contig"),
    ]
    if quick:
        cases = [c for c in cases if c[1][1] * c[1][2] <= 63]
    return cases


def check_loss(name, case, device, gen):
    cname, (n, h, w), dtype, k, use_w, reduction, nongray, go, target, layout = case
    logits = rand_logits((n, Q, h, w), dtype, gen)
    ab = wide_ab(n, h, w, gen)
    if nongray and n > 1:
        ab[0] /= 40  # a grey image
    weights = torch.rand(Q, generator=gen) * 4 + 0.1 if use_w else None
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = logits.to(device).clone(memory_format=fmt).requires_grad_(True)
    tgt = ab.to(device)
    target_ab = None
    if target == "labels":
        lab = R.soft_encode(ab.double().numpy(), k)
        tgt = fc.SoftLabels(torch.tensor(lab[0], dtype=torch.int32).to(device),
                            torch.tensor(lab[1], dtype=torch.float32).to(device))
        target_ab = ab.to(device)
    poison(device, 2 * x.numel() * x.element_size() + n * h * w * 64)
    loss = fc.rebalanced_cross_entropy(x, tgt, None if weights is None else weights.to(device), k=k,
                                       reduction=reduction, nongray=nongray, backend=name, target_ab=target_ab)
    if go == "rand":
        g = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    else:
        g = torch.tensor(float(go), dtype=torch.float64)
    loss.backward(g.float().to(device))
    sync(device)
    want_l, want_g = R.rebalanced_cross_entropy(
        logits.double().numpy(), ab.double().numpy(), None if weights is None else weights.double().numpy(),
        k=k, reduction=reduction, nongray=nongray, grad_output=g.numpy(),
        target=None if target == "ab" else R.soft_encode(ab.double().numpy(), k))
    got_l = loss.detach().double().cpu().numpy()
    got_g = x.grad.double().cpu().numpy()
    tol_g = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    e_l, e_g = rel_err(got_l, want_l), rel_err(got_g, want_g)
    ok = (e_l <= 2e-5) and (e_g <= tol_g) and bool(np.isfinite(got_g).all()) and x.grad.dtype == dtype
    return dict(check="loss", case=cname, rel_err_loss=e_l, rel_err_grad=e_g, tol_grad=tol_g,
                nan_free=bool(np.isfinite(got_g).all() and np.isfinite(got_l).all()), ok=bool(ok))


def check_contract(name, device, gen, dtype=torch.float32, need_grad=True):
    """The backend contract called directly (a :class:`LossCall`): pixel scale, image mask,
    grad_scale, need_grad."""
    n, p, k = 2, 61, 5
    logits = rand_logits((n, Q, p), dtype, gen)
    ab = wide_ab(n, 1, p, gen).reshape(n, 2, p)
    cw = torch.rand(Q, generator=gen) * 3 + 0.1
    mask = torch.tensor([1.0, 0.5])
    ps = torch.rand(n, p, generator=gen) + 0.5
    mod = backends.get(name)
    poison(device, 2 * logits.numel() * logits.element_size())
    loss, grad = mod.ce_forward(LossCall(logits=logits.to(device), ab=ab.to(device), class_weights=cw.to(device),
                                         image_mask=mask.to(device), pixel_scale=ps.to(device), k=k, sigma=5.0,
                                         grad_scale=0.75, need_grad=need_grad))
    sync(device)
    want_l, want_g = R.rebalanced_cross_entropy(logits.double().numpy(), ab.double().numpy(), cw.double().numpy(), k,
                                                reduction="none")
    scale = (mask[:, None] * ps).double().numpy()
    e_l = rel_err(loss.double().cpu().numpy(), want_l * scale)
    res = dict(check="contract", case=f"{str(dtype)[6:]}-grad{int(need_grad)}", rel_err_loss=e_l)
    ok = e_l <= 2e-5
    if need_grad:
        e_g = rel_err(grad.double().cpu().numpy(), want_g * 0.75 * scale[:, None, :])
        res["rel_err_grad"] = e_g
        grad_tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        ok = ok and e_g <= grad_tol and grad.dtype == dtype
    else:
        ok = ok and grad is None
    res["ok"] = bool(ok)
    return res


def check_encode(name, device, gen, k, shape=(2, 33, 65)):
    n, h, w = shape
    ab = wide_ab(n, h, w, gen)
    poison(device, n * k * h * w * 8)
    lab = fc.soft_encode(ab.to(device), k=k, backend=name)
    sync(device)
    idx, wts = R.soft_encode(ab.double().numpy(), k)
    px = np.moveaxis(ab.double().numpy(), 1, -1).reshape(-1, 2)
    d2 = np.sort(((px[:, None, :] - fc.AB_BINS[None]) ** 2).sum(-1), axis=1)[:, : k + 1]
    clear = np.diff(d2, axis=1).min(1) > 1e-3 * (1 + d2[:, -1])
    gi = np.moveaxis(lab.indices.cpu().long().numpy(), 1, -1).reshape(-1, k)
    ri = np.moveaxis(idx, 1, -1).reshape(-1, k)
    mismatch = float((gi[clear] != ri[clear]).any(1).mean()) if clear.any() else 0.0
    werr = float(np.abs(lab.weights.cpu().double().numpy() - wts).max())
    ok = mismatch == 0.0 and werr <= 2e-5 and bool(np.isfinite(lab.weights.cpu().numpy()).all())
    return dict(check="encode", case=f"k{k}-{n}x{h}x{w}", index_mismatch=mismatch, max_abs_err_weights=werr,
                ok=bool(ok))


def check_decode(name, device, gen, dtype, T, probs=False, shape=(2, 33, 65)):
    n, h, w = shape
    x64 = torch.randn(n, Q, h, w, generator=gen, dtype=torch.float64) * 2
    if probs:
        x = torch.softmax(x64, 1).to(dtype)
        got = fc.annealed_mean(probs=x.to(device), T=T, backend=name)
        want = R.annealed_mean(probs=x.double().numpy(), T=T)
    else:
        x = x64.to(dtype)
        poison(device, n * 2 * h * w * 4 + 4096)
        got = fc.annealed_mean(x.to(device), T=T, backend=name)
        want = R.annealed_mean(x.double().numpy(), T=T)
    sync(device)
    e = rel_err(got.double().cpu().numpy(), want)
    tol = 1e-4
    return dict(check="decode", case=f"{'probs' if probs else 'logits'}-{str(dtype)[6:]}-T{T}", rel_err=e, tol=tol,
                ok=bool(e <= tol))


def correctness(name, device, quick, gen, budget: Budget):
    out = []
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])

    def run(fn, *a, **kw):
        check = fn.__name__.replace("check_", "")
        label = f"{check}{a[3:] if len(a) > 3 else ''}"
        if not budget.ok(5):
            out.append(dict(check=check, case=label, ok=None, skipped="time budget"))
            return
        try:
            r = fn(*a, **kw)
        except Exception as exc:  # noqa: BLE001 - record and go on
            log(f"[{name}] {label} FAILED: {exc!r}")
            log(traceback.format_exc(limit=4))
            r = dict(check=check, case=label, ok=False, error=repr(exc)[:500])
        out.append(r)
        if not r.get("ok"):
            log(f"[{name}] {r}")

    for case in loss_cases(quick):
        if case[2] in dtypes:
            run(check_loss, name, case, device, gen)
    run(check_contract, name, device, gen, torch.float32, True)
    run(check_contract, name, device, gen, dtypes[-1], False)
    small = (1, 7, 9) if quick else (2, 33, 65)
    for k in (1, 5, 10):
        run(check_encode, name, device, gen, k, small)
    for dtype, T in [(torch.float32, 0.01), (dtypes[-1], 0.38), (torch.float16, 1.0)]:
        run(check_decode, name, device, gen, dtype, T, False, small)
    run(check_decode, name, device, gen, torch.float16, 0.38, True, small)
    return out
